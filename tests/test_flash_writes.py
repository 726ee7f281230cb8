"""What the store writes to the disk per stored sample (issue 22, docs/store.md "Writes").

A child process runs the store path on a simulated clock (bench/flash_load.py) and reports
`write_bytes` from /proc/self/io. The bounds are guards, well above what the store achieves
(the targets live in bench/bench_store.py): a regression that puts an index, a sequence page
or a secure-delete rewrite back on every commit trips them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

LOAD = Path(__file__).parents[1] / "bench" / "flash_load.py"


def _load(data_dir: Path, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(LOAD), str(data_dir), *args], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout)


def test_small_gateway_writes_little_per_commit(tmp_path):
    # 8 tags every 500 ms for 15 simulated minutes: 1,800 commits, compaction included.
    r = _load(tmp_path / "small", "8", "500", "900")
    assert r["commits"] == 1800 and r["samples"] == 14_400
    # Was 87,000 bytes a commit (five 16 KiB pages: the unit's leaf, three indexes, sqlite_sequence).
    assert r["write_bytes"] / r["commits"] < 24_000, r


def test_busy_gateway_writes_little_per_sample(tmp_path):
    # 1,000 tags every second for 15 simulated minutes, compaction included.
    r = _load(tmp_path / "busy", "1000", "1000", "900")
    assert r["samples"] == 900_000
    assert r["bytes_per_sample"] < 80, r  # was 140
