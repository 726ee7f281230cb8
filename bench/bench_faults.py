"""Longer fault runs than the suite's (tests/faults/): the thundering herd after a quick and a
slow broker restart, more power cuts, longer I/O-error runs. Figures, not assertions:
docs/reliability.md sets them beside the promises."""

from __future__ import annotations

import asyncio
import errno
import random
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

FAULTS = Path(__file__).resolve().parents[1] / "tests" / "faults"
sys.path.insert(0, str(FAULTS))

LO, HI = 1_000_000_000, 60_000_000_000


def _herd(down_s: float, n: int) -> dict:
    from herd import edgeos_policy, no_jitter_policy, restart_herd

    with tempfile.TemporaryDirectory() as d:
        groups = {"edgeos": edgeos_policy(LO, HI), "nojitter": no_jitter_policy(LO, HI)}
        return asyncio.run(restart_herd(Path(d), groups, n, down_s))


def _power_cuts(cuts: int) -> tuple[int, int, int]:
    import numpy as np
    from powercut import build_shim, cut_once

    from edgeos.store import StoreReader

    rng = random.Random(2026)
    with tempfile.TemporaryDirectory() as d:
        shim = build_shim(Path(d))
        data = Path(d) / "data"
        reported: set[int] = set()
        undone = 0
        for _ in range(cuts):
            got, counts = cut_once(shim, data, max(reported) + 1 if reported else 0, rng.uniform(0.05, 0.5), rng=rng)
            reported.update(got)
            undone += counts["undone"]
        with StoreReader(data) as r:
            values = np.concatenate([r.history(f"dev/t{i}").values for i in range(10)])
        present = set((values // 1000).astype(np.int64).tolist())
        return len(reported), undone, len(reported - present)


def _io(points: tuple[str, ...], err: int, prob: float, seconds: float) -> tuple[dict, int]:
    from test_io_errors import _present, run_under_faults

    with tempfile.TemporaryDirectory() as d:
        acked, stats = run_under_faults(Path(d), points, err, prob, seconds)
        db = sqlite3.connect(Path(d) / "edgeos.db")
        ok = db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
        lost = len(set(acked) - _present(Path(d)).keys())
        return stats | {"integrity_ok": int(ok)}, lost


def run(quick: bool) -> Iterator[tuple[str, float, str]]:
    for down in (0.3, 5.0):
        res = _herd(down, 200)
        e, nj = res["edgeos"]["peak_per_100ms"], res["nojitter"]["peak_per_100ms"]
        yield f"herd_down{down:g}s.edgeos_peak", e, "connections per 100 ms (200 clients)"
        yield f"herd_down{down:g}s.nojitter_peak", nj, "connections per 100 ms (200 clients)"
        yield f"herd_down{down:g}s.ratio", nj / max(1, e), "x lower with jitter (target >= 5)"
    cuts = 8 if quick else 40
    reported, undone, lost = _power_cuts(cuts)
    yield "power_cut.cuts", cuts, "cuts"
    yield "power_cut.reported", reported, "commits reported"
    yield "power_cut.unsynced_dropped", undone, "writes"
    yield "power_cut.lost", lost, "reported commits lost (target 0)"
    secs = 2.0 if quick else 10.0
    for points, err, prob in (
        (("posix/io/rw/pwrite",), errno.EIO, 0.05),
        (("posix/io/sync/fdatasync",), errno.EIO, 0.02),
        (("posix/io/rw/pwrite",), errno.ENOSPC, 0.02),
    ):
        stats, lost = _io(points, err, prob, secs)
        name = f"io.{points[0].rsplit('/', 1)[1]}_{errno.errorcode[err]}_p{prob:g}"
        yield f"{name}.acked", stats["acked"], "commits acknowledged"
        yield f"{name}.failed", stats["failures"], "commits failed (retried)"
        yield f"{name}.fsync_exits", stats["fsync_exits"], "exits for restart"
        yield f"{name}.lost", lost, "acknowledged lost (target 0)"
        yield f"{name}.integrity_ok", stats["integrity_ok"], "1 = integrity_check ok"
