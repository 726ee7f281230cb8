"""The local store: durable ingest, bytes on disk per sample, one tag's day back.

ingest: numeric samples through StoreWriter.write (encoding included), one commit per 10,000
samples (10 devices x 1,000 tags, one poll each), synchronous=FULL; beside it, the same bytes
appended to a plain file with one fsync per 10,000 samples, in the same run.
bytes_per_sample: a day of the realistic signal set (bench/signals.py) ingested with the daemon's
store settings and maintenance (compaction, on a simulated clock); live database pages / samples,
and the whole file (free pages included) / samples; compaction: its throughput.
query_24h_ms: one tag's 24 h at 1 Hz out of that 1,000-tag device, best of 5.
write_bytes_per_sample / write_gb_per_day_small: what the store writes to the disk (write_bytes
of /proc/PID/io, in a child: bench/flash_load.py) for 1,000 tags every second and for 8 tags
every 500 ms, default settings (group commit: one commit per poll cycle; the WAL fsynced every
2 s), 30 simulated minutes (10 with --quick) so compaction and the closing checkpoint are in
the figure; the small gateway again with an fsync per commit, as the baseline of the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from signals import DAY_START_NS, plant_day

from edgeos.model import Batch, TagMeta
from edgeos.store import StoreReader, StoreSettings, StoreWriter

COMMIT = 10_000


def _ingest(tmp: Path, seconds: float) -> tuple[float, list[list[Batch]]]:
    rng = np.random.default_rng(0)
    tags = [TagMeta(d * 1000 + i, f"d{d}", f"t{i}") for d in range(10) for i in range(1000)]
    commits = []
    for c in range(50):
        t = DAY_START_NS + c * 10**9
        commits.append(
            [
                Batch(
                    f"d{d}",
                    np.arange(d * 1000, d * 1000 + 1000, dtype=np.int32),
                    np.full(1000, t, np.int64),
                    np.round(rng.normal(50, 5, 1000), 2),
                    np.zeros(1000, np.uint32),
                )
                for d in range(10)
            ]
        )
    w = StoreWriter(tmp / "ingest", tags, StoreSettings(compact_min_samples=10**12, compact_after_ns=10**18))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for batches in commits:
            n += w.write(batches)
    rate = n / (time.perf_counter() - t0)
    w.close()
    return rate, commits


def _append(tmp: Path, commits: list[list[Batch]], seconds: float) -> float:
    """The baseline: raw columns appended to one file, fsync per commit, nothing else."""
    fd = os.open(tmp / "append.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    n, t0 = 0, time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            for batches in commits:
                for b in batches:
                    os.write(fd, b.tags.tobytes() + b.ts.tobytes() + b.values.tobytes() + b.quality.tobytes())
                    n += len(b)
                os.fsync(fd)
    finally:
        os.close(fd)
    return n / (time.perf_counter() - t0)


def _day(tmp: Path) -> tuple[float, float, float, int, float]:
    ts, values = plant_day()
    n_tags, seconds = values.shape
    tags = [TagMeta(i, "plant", f"t{i:04d}") for i in range(n_tags)]
    w = StoreWriter(tmp / "day", tags, StoreSettings())  # the daemon's defaults
    ids = np.tile(np.arange(n_tags, dtype=np.int32), 100)
    zeros = np.zeros(n_tags * 100, np.uint32)
    busy = 0.0
    for k in range(0, seconds, 100):
        # 100 polls per commit (not 1, to keep the run short); maintenance runs as in the daemon,
        # on the simulated clock, so chunks are the size the daemon makes (compact_min_samples).
        w.write([Batch("plant", ids, np.repeat(ts[k : k + 100], n_tags), values[:, k : k + 100].T.ravel(), zeros)])
        t0 = time.perf_counter()
        w.maintain(now_ns=int(ts[min(k + 99, seconds - 1)]))
        busy += time.perf_counter() - t0
    t0 = time.perf_counter()
    w.maintain(now_ns=int(ts[-1]) + 3600 * 10**9)
    busy += time.perf_counter() - t0
    w.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    total = values.size
    live = w.used_bytes() / total
    file = w.path.stat().st_size / total
    w.close()
    with StoreReader(tmp / "day") as r:
        best = float("inf")
        for i in (17, 503, 998, 17, 240):
            t0 = time.perf_counter()
            h = r.history(f"plant/t{i:04d}", DAY_START_NS, DAY_START_NS + 86_400 * 10**9)
            best = min(best, time.perf_counter() - t0)
            assert len(h) == seconds and h.values.tobytes() == values[i].tobytes()
    return live, file, best * 1000, total, total / busy


def _flash(tmp: Path, tags: int, period_ms: int, seconds: int, *extra: str) -> dict:
    load = Path(__file__).with_name("flash_load.py")
    where = tmp / f"flash-{tags}-{'-'.join(extra) or 'default'}"
    out = subprocess.run(
        [sys.executable, str(load), str(where), str(tags), str(period_ms), str(seconds), *extra],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def run(quick: bool):
    seconds = 3.0 if quick else 10.0
    with tempfile.TemporaryDirectory(prefix="edgeos-bench-store-", dir=os.environ.get("EDGEOS_BENCH_DIR")) as d:
        tmp = Path(d)
        rate, commits = _ingest(tmp, seconds)
        append = _append(tmp, commits, seconds)
        yield "ingest", rate, "samples/s"
        yield "append_baseline", append, "samples/s"
        yield "ingest_vs_append", rate / append, "ratio"
        live, file, query_ms, n, compact_rate = _day(tmp)
        yield "bytes_per_sample", live, "bytes/sample"
        yield "file_bytes_per_sample", file, "bytes/sample"
        yield "day_samples", n, "samples"
        yield "compaction", compact_rate, "samples/s"
        yield "query_24h_ms", query_ms, "ms"
        minutes = 10 if quick else 30
        busy = _flash(tmp, 1000, 1000, minutes * 60)
        yield "write_bytes_per_sample", busy["bytes_per_sample"], "bytes/sample (1,000 tags at 1 s; target <= 20)"
        small = _flash(tmp, 8, 500, minutes * 60)
        yield "write_gb_per_day_small", small["gb_per_day"], "GB/day (8 tags at 500 ms; target <= 0.5)"
        yield "write_bytes_per_commit_small", small["bytes_per_commit"], "bytes/commit"
        # The baseline of the same run: an fsync per commit (fsync_interval = "0s").
        full = _flash(tmp, 8, 500, minutes * 60, "--fsync", "0")
        yield "write_gb_per_day_small_fsync_each_commit", full["gb_per_day"], "GB/day"
        yield "write_small_vs_fsync_each_commit", small["gb_per_day"] / full["gb_per_day"], "ratio"
