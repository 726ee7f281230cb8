"""The serial line adapter: frames from a port, parsed into batches; listen or poll mode.

*listen*: one read loop; whatever one read returns is cut into frames and parsed into one
batch. *poll*: the same read loop, plus one task per request sending it on an absolute grid
(as `PollingAdapter` does) and waiting for the reply frame under a lock, so requests on one
line never overlap. A reply that does not come in time gives the request's tags
`BAD_TIMEOUT`; frames nobody asked for are counted and discarded.

Counters live in a `DeviceState` per configured device, not in the adapter: the runtime makes
a new adapter at each reconnect (an unplugged port raises `PortError` from `run`; the runtime
records Bad samples, backs off and reopens), and the counts must survive that.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
from edgeos.protocols.serial import port as ports
from edgeos.protocols.serial.config import Request, Spec, build_spec
from edgeos.protocols.serial.framing import Framer, Frames, framer_for
from edgeos.protocols.serial.parse import REASONS, Parser

from edgeos.adapter import Answer, DeviceConfig, TagConfig
from edgeos.errors import DeviceError
from edgeos.logs import RateLimited
from edgeos.model import Batch, Quality

log = logging.getLogger("edgeos.protocols.serial")


class DeviceState:
    """Counters of one configured device; outlives its adapters."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()  # bytes, frames, bad_<reason>, timeouts, unsolicited, opens
        self.peak_buffer = 0
        self.last_bad = ""
        self.errors = RateLimited(log)


_STATES: dict[int, DeviceState] = {}


def state_of(device: DeviceConfig) -> DeviceState:
    """The device's state, kept as long as its DeviceConfig lives (one per device per run)."""
    st = _STATES.get(id(device))
    if st is None:
        st = _STATES[id(device)] = DeviceState()
        st.errors.device = device.name  # its log lines carry the device field
        weakref.finalize(device, _STATES.pop, id(device), None)
    return st


def spec_of(device: DeviceConfig) -> Spec:
    spec = build_spec(device.options, device.tags, device.poll_interval_ns)
    assert spec is not None  # build_spec raises ConfigError on problems
    return spec


class SerialAdapter:
    def __init__(self, device: DeviceConfig) -> None:
        self.device = device
        self.spec = spec_of(device)
        self.state = state_of(device)
        self.parser = Parser(device.name, self.spec)
        self.framer: Framer = framer_for(self.spec)
        self.port: ports.Port | None = None
        self._lock = asyncio.Lock()  # poll mode: one request on the line at a time
        self._waiter: asyncio.Future[tuple[Frames, int]] | None = None
        self._heard = 0.0  # listen mode: monotonic time of the last frame (or of the port's opening)
        self._silent = False  # listen mode: the tags were marked Bad for silence; a frame ends it

    async def connect(self) -> None:
        if self.port is None:
            self.port = await ports.open_port(self.device.name, self.spec)
            self.state.counts["opens"] += 1

    async def run(self, emit: Any) -> None:
        if self.port is None:
            raise DeviceError(self.device.name, "not connected", code="not_connected")
        if self.spec.mode == "listen":
            silence = self.spec.options.get("silence_timeout")
            if not silence:
                # Nothing judges its silence: an open port is all there is to know (README, Modes),
                # so a new connection is up at once, not down until the device next sends.
                await emit(Batch.empty(self.device.name), answer=Answer.YES, source="lines")
                await self._listen(emit)
                return
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._listen(emit), name=f"serial:{self.device.name}:read")
                tg.create_task(self._watch(emit, silence / 1e9), name=f"serial:{self.device.name}:silence")
            return
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._listen(emit), name=f"serial:{self.device.name}:read")
            for i, r in enumerate(self.spec.requests):
                tg.create_task(self._poll(i, r, emit), name=f"serial:{self.device.name}:poll{i}")

    async def _listen(self, emit: Any) -> None:
        port, framer, st = self.port, self.framer, self.state
        assert port is not None
        counts = st.counts
        listen = self.spec.mode == "listen"
        while True:
            data = await port.read()
            now = time.time_ns()
            counts["bytes"] += len(data)
            frames = framer.feed(data)
            if framer.peak_buffer > st.peak_buffer:
                st.peak_buffer = framer.peak_buffer
            if not frames.starts and not frames.bad:
                continue
            if listen:
                self._heard = time.monotonic()
                res = self.parser.parse(frames, now)
                self._count(res.frames, res.failures)
                # Lines come unasked: "no answer" only from silence_timeout (README, Modes).
                if len(res.batch) or self._silent:
                    self._silent = False
                    await emit(res.batch, answer=Answer.YES, source="lines")
            elif self._waiter is not None and not self._waiter.done():
                self._waiter.set_result((frames, now))
            else:
                counts["unsolicited"] += len(frames.starts) + len(frames.bad)

    async def _watch(self, emit: Any, silence_s: float) -> None:
        """Listen mode with `silence_timeout`: a device that sends on its own and stops (a scale
        switched off, a cable cut with the port still open) has its tags marked Bad once, and
        counts as down until a frame comes."""
        self._heard = time.monotonic()
        ids = np.array([t.id for t in self.device.tags], np.int32)
        while True:
            wait = self._heard + silence_s - time.monotonic()
            if wait > 0 or self._silent:  # heard in time, or already marked: look again later
                await asyncio.sleep(wait if wait > 0 else silence_s)
                continue
            self._silent = True
            quiet = time.monotonic() - self._heard
            why = "%s: no frame for %.1fs (silence_timeout %gs): tags Bad until one comes"
            await emit(self._no_answer(ids, "silence", why, quiet, silence_s), answer=Answer.NO, source="lines")

    def _no_answer(self, ids: np.ndarray, code: str, why: str, *args: Any) -> Batch:
        """Counted (`code` + s), logged with `code` (once a minute), and the tags' BadTimeout samples."""
        self.state.counts[code + "s"] += 1
        self.state.errors.log(logging.WARNING, code, why, self.device.name, *args)
        return Batch.filled(self.device.name, ids, time.time_ns(), math.nan, Quality.BAD_TIMEOUT)

    async def _poll(self, i: int, req: Request, emit: Any) -> None:
        loop = asyncio.get_running_loop()
        interval = req.interval_ns / 1e9
        wall = time.time()
        start = loop.time() + ((wall // interval + 1) * interval - wall)
        k = 0
        ids = np.array(req.pattern.tag_ids, np.int32)
        while True:
            delay = start + k * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            batch, answered = await self._ask(req, ids)
            # Per request: one a device does not serve does not make it flap down and up.
            await emit(batch, answer=Answer.YES if answered else Answer.NO, source=("request", i))
            k = max(k + 1, int((loop.time() - start) / interval) + 1)

    async def _ask(self, req: Request, ids: np.ndarray) -> tuple[Batch, bool]:
        """The request's samples, and whether a reply came (a bad frame is a reply)."""
        assert self.port is not None
        async with self._lock:
            fut: asyncio.Future[tuple[Frames, int]] = asyncio.get_running_loop().create_future()
            self._waiter = fut
            self.state.counts["requests"] += 1
            self.framer.drop_partial()
            try:
                await self.port.write(req.send)
                async with asyncio.timeout(req.timeout_ns / 1e9):
                    frames, now = await fut
            except TimeoutError:
                why = "%s: no reply to %r within %gs"
                return self._no_answer(ids, "timeout", why, req.send, req.timeout_ns / 1e9), False
            finally:
                self._waiter = None
        extra = len(frames.starts) - 1
        if extra > 0:  # one reply per request: the rest arrived unasked
            self.state.counts["unsolicited"] += extra
            frames = Frames(frames.data, frames.starts[:1], frames.ends[:1], frames.bad, frames.bad_at)
        res = self.parser.parse(frames, now, [req.pattern])
        self._count(res.frames, res.failures)
        return res.batch, True

    def _count(self, frames: int, failures: list) -> None:
        st = self.state
        st.counts["frames"] += frames
        if not failures:
            return
        for f in failures:
            st.counts[f"bad_{f.reason}"] += 1
        f = failures[-1]
        st.last_bad = f"{f.reason}: {f.detail}" if f.detail else f.reason
        if len(failures) > 1:
            first = failures[0]
            detail = f"{first.detail} (and {len(failures) - 1} more bad frames in this read)"
        else:
            first, detail = f, f.detail
        st.errors.log(
            logging.WARNING, f"bad:{first.reason}", "%s: bad frame (%s): %s", self.device.name, first.reason, detail
        )

    async def write(self, tag: TagConfig, value: float | bool | str) -> float | bool | str | None:
        raise DeviceError(self.device.name, "serial tags are read-only", code="read_only", stage="write")

    async def close(self) -> None:
        p, self.port = self.port, None
        # The framer goes with this adapter; its count must outlive it like the others.
        self.state.counts["garbage_bytes"] += self.framer.garbage_bytes
        self.framer.garbage_bytes = 0
        if p is not None:
            p.close()

    def health(self) -> Mapping[str, Any]:
        """Counters since the daemon started (they survive reopening the port)."""
        st, c = self.state, self.state.counts
        out: dict[str, Any] = {
            "port": self.spec.port,
            "connected": self.port is not None,
            "opens": c["opens"],
            "bytes": c["bytes"],
            "frames": c["frames"],
            "bad_frames": sum(v for k, v in c.items() if k.startswith("bad_")),
        }
        out.update({f"bad_{r}": c[f"bad_{r}"] for r in REASONS})  # every reason, 0 until it happens
        out["garbage_bytes"] = c["garbage_bytes"] + self.framer.garbage_bytes
        if self.spec.mode == "poll":
            out.update(requests=c["requests"], timeouts=c["timeouts"])
        elif self.spec.options.get("silence_timeout"):
            out["silences"] = c["silences"]  # times no frame came for silence_timeout
        out["unsolicited"] = c["unsolicited"]
        out["buffered_bytes"] = self.framer.buffered
        out["peak_buffered_bytes"] = st.peak_buffer
        out["last_bad"] = st.last_bad or None
        return out
