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


class _Rng:
    """Uniform and normal columns from splitmix64 over a counter, vectorised in numpy, seeded
    for repeatable runs. numpy.random would cost every daemon 2.6 MB of RSS for a simulator's
    noise (docs/benchmarks.md, "Footprint"); this costs a few numpy expressions per poll."""

    _GAMMA = 0x9E3779B97F4A7C15

    def __init__(self, seed: int) -> None:
        self._next = seed % 2**64
        self._next = int(self._bits(1)[0])  # seeds 5 and 6 start far apart, not one step

    def _bits(self, n: int) -> np.ndarray:
        z = np.arange(1, n + 1, dtype=np.uint64)
        z *= np.uint64(self._GAMMA)
        z += np.uint64(self._next)
        self._next = (self._next + n * self._GAMMA) % 2**64
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
        return z

    def uniform(self, low: float, high: float, n: int) -> np.ndarray:
        """n floats in [low, high)."""
        return low + (high - low) * ((self._bits(n) >> np.uint64(11)) * 2.0**-53)

    def normal(self, mean: float, sd: float, n: int) -> np.ndarray:
        """n normal floats (Box-Muller on the two 32-bit halves of one draw)."""
        z = self._bits(n)
        u1 = ((z >> np.uint64(32)) + 0.5) * 2.0**-32  # (0, 1): log(u1) is finite
        u2 = (z & np.uint64(0xFFFFFFFF)) * (2 * np.pi * 2.0**-32)
        return mean + sd * np.sqrt(-2.0 * np.log(u1)) * np.cos(u2)


class _GroupSignals:
    """Per-group parameter columns, so one poll is a handful of numpy expressions."""

    def __init__(self, tags: tuple[TagConfig, ...], rng: _Rng) -> None:
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
        self.rng = _Rng(device.options["seed"])
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
