"""Simulated device: deterministic signals computed per poll as columns, no hardware needed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeos.adapter import DeviceConfig, PollGroup, PollingAdapter, TagConfig
from edgeos.errors import DeviceError
from edgeos.model import QUALITY_DTYPE, Batch, Quality

_KIND = {name: i for i, name in enumerate(("sine", "ramp", "random_walk", "step", "square", "counter", "bool", "text"))}


class _GroupSignals:
    """Per-group parameter columns, so one poll is a handful of numpy expressions."""

    def __init__(self, tags: tuple[TagConfig, ...], rng: np.random.Generator) -> None:
        o = [t.options for t in tags]
        self.ids = np.array([t.id for t in tags], np.int32)
        self.kind = np.array([_KIND[x["signal"]] for x in o])
        self.amp = np.array([x["amplitude"] for x in o])
        self.off = np.array([x["offset"] for x in o])
        self.period = np.array([x["period"] / 1e9 for x in o])
        self.noise = np.array([x["noise"] for x in o])
        self.res = np.array([x["resolution"] for x in o])
        self.phase = rng.uniform(0, 1, len(tags))
        self.walk = np.zeros(len(tags))
        self.states = [x["states"] for x in o]
        self.is_text = self.kind == _KIND["text"]
        self.manual: dict[int, Any] = {}  # tag id -> value written


class SimulatedAdapter(PollingAdapter):
    def __init__(self, device: DeviceConfig) -> None:
        super().__init__(device)
        self.rng = np.random.default_rng(device.options["seed"])
        self.connected = False
        self.started = 0.0
        self.reads = 0
        self.writes: dict[int, Any] = {}
        self._signals: dict[int, _GroupSignals] = {}

    async def connect(self) -> None:
        opts = self.device.options
        if opts["connect_delay"]:
            await asyncio.sleep(opts["connect_delay"] / 1e9)
        if opts["fail_connect"]:
            raise DeviceError(self.device.name, "connection refused (fail_connect)", code="connect", stage="connect")
        self.connected = True
        self.started = time.monotonic()

    async def read(self, group: PollGroup, now_ns: int) -> Batch:
        fail_after = self.device.options["fail_after"]
        if fail_after and time.monotonic() - self.started >= fail_after / 1e9:
            raise DeviceError(self.device.name, "simulated connection loss (fail_after)", code="comm")
        self.reads += 1
        g = self._signals.get(id(group))
        if g is None:
            g = self._signals[id(group)] = _GroupSignals(group.tags, self.rng)
        t = now_ns / 1e9
        frac = (t / g.period + g.phase) % 1.0
        k = g.kind
        v = np.select(
            [k == 0, k == 1, k == 3, k == 4, k == 5, k == 6],
            [
                np.sin(2 * np.pi * frac),
                frac,
                np.floor(frac * 4) / 3,
                (frac < 0.5).astype(float),
                np.floor(t / g.period) % 65536,  # wraps like a 16-bit counter register
                (frac < 0.5).astype(float),
            ],
            default=0.0,
        )
        rw = k == 2
        if rw.any():
            g.walk[rw] += self.rng.normal(0, 0.05, int(rw.sum()))
            v = np.where(rw, g.walk, v)
        v = g.off + g.amp * v
        if g.noise.any():
            v = v + self.rng.normal(0, 1, len(v)) * g.noise
        booleans = k == 6
        v[booleans] = (v[booleans] > g.off[booleans]).astype(float)
        q = g.res > 0
        if q.any():
            v[q] = np.round(v[q] / g.res[q]) * g.res[q]
        text = None
        if g.is_text.any():
            text = np.full(len(v), None, object)
            for i in np.flatnonzero(g.is_text):
                states = g.states[i]
                text[i] = states[int(frac[i] * len(states)) % len(states)]
            v[g.is_text] = np.nan
        for i, tid in enumerate(g.ids):
            if int(tid) in self.writes:
                val = self.writes[int(tid)]
                if isinstance(val, str):
                    if text is None:
                        text = np.full(len(v), None, object)
                    text[i] = val
                    v[i] = np.nan
                else:
                    v[i] = float(val)
        n = len(g.ids)
        return Batch(self.device.name, g.ids, np.full(n, now_ns, np.int64), v, np.zeros(n, QUALITY_DTYPE), text)

    async def write(self, tag: TagConfig, value: float | bool | str) -> float | bool | str:
        """Hold the written value: the tag reads it back until the next write."""
        self.writes[tag.id] = value
        return value

    async def close(self) -> None:
        self.connected = False

    def health(self) -> Mapping[str, Any]:
        return {**super().health(), "reads": self.reads, "connected": self.connected}


__all__ = ["Quality", "SimulatedAdapter"]
