"""Where a sample's latency goes, per stage, for the e2e bench (docs/benchmarks.md).

Off unless EDGEOS_TRACE names a file: then the runtime records, per batch read, a row of wall
clock times (ns) in a bounded ring of int64 columns (no object per sample), plus the store
thread's other work (maintenance, fsync) and the sync's reads, and dumps them there at stop as
JSON. Rows: device, newest sample time, emitted by the adapter, taken by the pipeline, put to
the writer, commit started, commit returned, top unit id of that commit. The bench joins them
with what its subscriber saw (bench/e2e/harness.py).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

PATH = os.environ.get("EDGEOS_TRACE", "")
ROWS = 1 << 16
COLS = ("ts", "emit", "pipe_in", "pipe_out", "commit_start", "commit_done", "top_id")


class Trace:
    def __init__(self, path: str) -> None:
        self.path = path
        self.rows = np.zeros((ROWS, len(COLS)), np.int64)
        self.device = np.zeros(ROWS, np.int32)
        self.devices: dict[str, int] = {}
        self.n = 0
        self.by_obj: dict[int, int] = {}  # id(batch) -> row, while the batch is in flight
        self.events: list[tuple[str, int, int]] = []  # (kind, start, end): store-thread work
        self.reads: list[tuple[int, int]] = []  # (time, last unit id read) of the sync's reads

    def emitted(self, batch: Any) -> None:
        if not len(batch) or self.n >= ROWS:
            return
        i = self.n
        self.n += 1
        self.device[i] = self.devices.setdefault(batch.device, len(self.devices))
        r = self.rows[i]
        r[0] = int(batch.ts.max())
        r[1] = time.time_ns()
        self.by_obj[id(batch)] = i

    def piped(self, raw: Any, t_in: int, kept: Any) -> None:
        i = self.by_obj.pop(id(raw), None)
        if i is None:
            return
        self.rows[i, 2] = t_in
        self.rows[i, 3] = time.time_ns()
        if kept is not None and len(kept):
            self.by_obj[id(kept)] = i

    def committed(self, batches: list, t0: int, top_id: int) -> None:
        t1 = time.time_ns()
        for b in batches:
            i = self.by_obj.pop(id(b), None)
            if i is not None:
                self.rows[i, 4:7] = (t0, t1, top_id)

    def event(self, kind: str, t0: int) -> None:
        if len(self.events) < ROWS:
            self.events.append((kind, t0, time.time_ns()))

    def read(self, last: int) -> None:
        if last and len(self.reads) < ROWS:
            self.reads.append((time.time_ns(), last))

    async def watch_loop(self) -> None:
        """The event loop's stalls: a 10 ms sleep that overshoots by more than 5 ms is one."""
        import asyncio

        while True:
            t0 = time.time_ns()
            await asyncio.sleep(0.01)
            if time.time_ns() - t0 > 15_000_000:
                self.event("loop_stall", t0 + 10_000_000)

    def wrap_read(self, prepare: Any) -> Any:
        """The sync's read-and-frame of the next run of units (in its reader thread)."""

        def traced(*a: Any) -> Any:
            out = prepare(*a)
            self.read(out[0])
            return out

        return traced

    def dump(self) -> None:
        doc = {
            "cols": COLS,
            "rows": self.rows[: self.n].tolist(),
            "device": self.device[: self.n].tolist(),
            "devices": sorted(self.devices, key=self.devices.__getitem__),
            "events": self.events,
            "reads": self.reads,
        }
        with open(self.path, "w") as f:
            json.dump(doc, f)


TRACE: Trace | None = Trace(PATH) if PATH else None
