"""Test fixtures packaged as a third-party plugin: an adapter that misbehaves on demand, and a filter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeos import Batch, DeviceConfig, Emit, Field, Problems, Quality, TagConfig, ValueKind


class MisbehavingAdapter:
    """Emits on its own clock (like a subscription) and fails in the ways a real driver can."""

    instances: list[MisbehavingAdapter] = []

    def __init__(self, device: DeviceConfig) -> None:
        self.device = device
        self.opts = device.options
        self.closed = 0
        self.emitted = 0
        self.swallowed = 0
        MisbehavingAdapter.instances.append(self)

    async def connect(self) -> None:
        if self.opts["mode"] == "connect_raises":
            raise RuntimeError("driver bug in connect")

    async def run(self, emit: Emit) -> None:
        ids = np.array([t.id for t in self.device.tags], np.int32)
        period = self.opts["period"] / 1e9
        if self.opts["mode"] == "unanswered_then_empty":
            await self._unanswered_then_empty(emit, ids, period)
        while True:
            try:
                await asyncio.sleep(period)
            except asyncio.CancelledError:
                if self.opts["mode"] == "fails_on_cancel":
                    # A driver whose cleanup fails as it is cancelled, or a TaskGroup whose child
                    # failed as the stop came (Python 3.11: the child's error wins over the
                    # cancellation): the supervisor sees an error, not the cancellation.
                    raise ConnectionResetError("connection lost as the poll was cancelled") from None
                if self.opts["mode"] != "swallows_cancel" or self.swallowed >= self.opts["raise_every"]:
                    raise
                # What Python 3.11's wait_for does to a cancellation that meets an answer: drops it.
                self.swallowed += 1
            n = len(ids)
            mode = self.opts["mode"]
            batch = Batch(
                "someone_else" if mode == "other_device" else self.device.name,
                ids + 1000 if mode == "foreign_ids" else ids,
                np.full(n, time.time_ns() + self.opts["clock_ahead"]),
                np.full(n, float(self.emitted)),
                np.zeros(n, np.uint32),
            )
            await emit("not a batch" if mode == "not_a_batch" else batch)  # type: ignore[arg-type]
            self.emitted += 1
            if self.opts["mode"] == "run_raises" and self.emitted % self.opts["raise_every"] == 0:
                raise ValueError("driver bug in run")
            if self.opts["mode"] == "run_returns" and self.emitted % self.opts["raise_every"] == 0:
                return

    async def _unanswered_then_empty(self, emit: Emit, ids: np.ndarray, period: float) -> None:
        """First connection: `raise_every` batches all BadTimeout (no answer, not told), then
        the connection is lost. Later ones: empty batches (answers with nothing to report)."""
        first = sum(a.device.name == self.device.name for a in MisbehavingAdapter.instances) == 1
        while True:
            await asyncio.sleep(period)
            n = len(ids) if first else 0
            q = np.full(n, Quality.BAD_TIMEOUT, np.uint32)
            await emit(Batch(self.device.name, ids[:n], np.full(n, time.time_ns()), np.full(n, np.nan), q))
            self.emitted += 1
            if first and self.emitted == self.opts["raise_every"]:
                raise ConnectionResetError("connection lost")

    async def write(self, tag: TagConfig, value: float | bool | str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        self.closed += 1
        if self.opts["mode"] == "close_hangs":
            await asyncio.sleep(3600)
        if self.opts["mode"] == "close_raises":
            raise OSError("close failed")

    def health(self) -> Mapping[str, Any]:
        if self.opts["mode"] == "health_raises":
            raise RuntimeError("plugin bug in health()")
        return {"emitted": self.emitted}


class MisbehavingProtocol:
    name = "misbehaving"
    device_fields = {
        "mode": Field(
            "choice",
            "ok",
            choices=(
                "ok",
                "connect_raises",
                "run_raises",
                "run_returns",
                "close_hangs",
                "close_raises",
                "health_raises",
                "swallows_cancel",
                "fails_on_cancel",
                "not_a_batch",
                "other_device",
                "foreign_ids",
                "create_raises",
                "validate_raises",
                "unanswered_then_empty",
                "describe_raises",
            ),
        ),
        "period": Field("duration", "20ms"),
        "raise_every": Field("int", 5, min=1),
        "clock_ahead": Field("duration", "0s"),  # a device clock this far ahead of the gateway's
    }
    tag_fields: dict[str, Field] = {"kind_raises": Field("bool", False)}

    def tag_kind(self, options: Mapping[str, Any]) -> ValueKind:
        if options.get("kind_raises"):
            raise ZeroDivisionError("plugin bug in tag_kind")
        return ValueKind.NUMBER

    def validate(self, device: DeviceConfig, path: str, problems: Problems) -> None:
        if device.options["mode"] == "validate_raises":
            raise KeyError("plugin bug in validate")

    def describe(self, device: DeviceConfig) -> list[str]:
        if device.options["mode"] == "describe_raises":
            raise IndexError("plugin bug in describe")
        return [f"mode {device.options['mode']}"]

    def create(self, device: DeviceConfig) -> MisbehavingAdapter:
        if device.options["mode"] == "create_raises":
            raise RuntimeError("driver bug in create")
        return MisbehavingAdapter(device)


class ScaleFilter:
    def __init__(self, n_tags: int, params: Mapping[int, Mapping[str, Any]]) -> None:
        self.factor = np.ones(n_tags)
        self.fail_every = max((p.get("fail_every", 0) for p in params.values()), default=0)
        self.calls = 0
        for tag, p in params.items():
            self.factor[tag] = p["factor"]

    def apply(self, batch: Batch) -> Batch:
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            raise ZeroDivisionError("bug in a third-party filter")
        return Batch(
            batch.device, batch.tags, batch.ts, batch.values * self.factor[batch.tags], batch.quality, batch.text
        )


class ScalePlugin:
    name = "scale"
    fields = {"factor": Field("float", 1.0), "fail_every": Field("int", 0)}  # fail_every: raise at every Nth batch

    def create(self, n_tags: int, params: Mapping[int, Mapping[str, Any]]) -> ScaleFilter:
        return ScaleFilter(n_tags, params)


protocol = MisbehavingProtocol()
scale = ScalePlugin()
