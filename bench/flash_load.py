"""Child process: what the store writes to the disk for a steady load (docs/store.md, "Writes").

`python bench/flash_load.py DATA_DIR TAGS PERIOD_MS SECONDS [--upstream] [--group N] [--fsync S]`
runs the daemon's store path on a simulated clock: one commit per poll cycle (the runtime's
group commit; `--group N` puts N cycles in one commit, as a `commit_interval` of N periods
does), the WAL fsynced every S simulated seconds after a commit (the daemon's default
`fsync_interval`, 2 s; `--fsync 0` fsyncs every commit, synchronous=FULL),
the maintenance round once a simulated second (compaction, retention, the budget,
the sync cursor when upstream is on), the daemon's default store settings. It prints one JSON
object: `write_bytes` from /proc/self/io (what the kernel charges to the disk, counted in
4 KiB pages dirtied; rewriting a page after its fsync counts it again) per source: `commit`,
`maintain` (the sync cursor's writes included), `close` (its checkpoint); the samples and
commits. The clock is simulated, so a run takes seconds; the page cache's own writeback (the -shm file
every ~30 s) is not in it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from edgeos.model import Batch, TagMeta
from edgeos.store import StoreSettings, StoreWriter, default_max_size

T0 = 1_767_225_600 * 10**9


def write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


def main(argv: list[str]) -> dict:
    data_dir, n_tags, period_ms, seconds = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    upstream = "--upstream" in argv
    group = int(argv[argv.index("--group") + 1]) if "--group" in argv else 1
    fsync_s = float(argv[argv.index("--fsync") + 1]) if "--fsync" in argv else 2.0
    fsync_ns = int(fsync_s * 1e9)
    tags = [TagMeta(i, "plc", f"t{i}") for i in range(n_tags)]
    settings = StoreSettings(
        max_size=default_max_size(data_dir)[0], keep_until_synced=upstream, fsync_interval_ns=fsync_ns
    )
    w = StoreWriter(data_dir, tags, settings)
    rng = np.random.default_rng(1)
    ids = np.arange(n_tags, dtype=np.int32)
    level = rng.uniform(0, 1000, n_tags).round(1)
    zeros = np.zeros(n_tags, np.uint32)
    src = dict.fromkeys(("commit", "fsync", "maintain", "close"), 0)
    flush_at = 0
    samples = commits = 0
    cursor = 0
    period = period_ms * 1_000_000
    cycles = int(seconds * 1000 // period_ms)
    next_maint = T0 + 10**9
    wall = time.perf_counter()
    pending: list[Batch] = []
    for k in range(cycles):
        now = T0 + k * period
        # A register-like signal: a slow walk, scaled by 0.1, jitter of a few ms on the timestamps.
        level += rng.normal(0, 0.3, n_tags).round(1)
        ts = now + rng.integers(0, 5_000_000, n_tags)
        pending.append(Batch("plc", ids, ts.astype(np.int64), level.round(1), zeros))
        if len(pending) == group:
            a = write_bytes()
            samples += w.write(pending)
            src["commit"] += write_bytes() - a
            commits += 1
            pending = []
            if fsync_ns and not flush_at:
                flush_at = now + fsync_ns
        if flush_at and now >= flush_at:
            # Counted apart: an fsync writes nothing itself, but the pages it cleans count again
            # at their next write (the cost lands in "commit").
            a = write_bytes()
            w.flush()
            src["fsync"] += write_bytes() - a
            flush_at = 0
        if now >= next_maint:
            next_maint += 10**9
            # With upstream on, the sync forwards what was committed up to the last round; its
            # cursor is written by the maintenance round (so counted in "maintain").
            a = write_bytes()
            w.maintain(now, sync_cursor=cursor if upstream else None)
            src["maintain"] += write_bytes() - a
            cursor = w.counters.committed_units
    a = write_bytes()
    w.close()
    src["close"] = write_bytes() - a
    total = sum(src.values())
    return {
        "tags": n_tags,
        "period_ms": period_ms,
        "seconds": seconds,
        "samples": samples,
        "commits": commits,
        "fsync_interval_s": fsync_s,
        "write_bytes": total,
        "by_source": src,
        "bytes_per_sample": total / max(1, samples),
        "bytes_per_commit": src["commit"] / max(1, commits),
        "gb_per_day": total / seconds * 86_400 / 1e9,
        "wall_s": time.perf_counter() - wall,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
