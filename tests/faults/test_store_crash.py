"""kill -9 during ingest, at random moments, many times: nothing reported committed is lost."""

from __future__ import annotations

import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeos.store import StoreReader

CHILD = Path(__file__).with_name("ingest_child.py")
KILLS = 22


def _present(data_dir: Path) -> dict[int, int]:
    with StoreReader(data_dir) as r:
        values = np.concatenate([r.history(f"dev/t{i}").values for i in range(10)])
    ks, counts = np.unique((values // 1000).astype(np.int64), return_counts=True)
    return dict(zip(ks.tolist(), counts.tolist(), strict=True))


@pytest.mark.parametrize("fsync_ns", [0, 2_000_000_000], ids=["fsync-every-commit", "fsync-interval"])
def test_sigkill_during_ingest_loses_nothing_committed(tmp_path, fsync_ns):
    # With an fsync interval (synchronous=NORMAL) a commit is in the WAL when it returns: a
    # kill of the process (not of the machine) cannot lose it (docs/store.md I3).
    rng = random.Random(20261122)
    start = 0
    reported_total = set()
    kills = KILLS if not fsync_ns else KILLS // 2
    for kill in range(kills):
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(tmp_path), str(start), str(fsync_ns)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            reported = []
            deadline = time.monotonic() + rng.uniform(0.02, 0.4)
            while time.monotonic() < deadline:
                if select.select([proc.stdout], [], [], 0.01)[0]:
                    reported.append(int(proc.stdout.readline()))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        # Lines already in the pipe were printed after their commit returned: committed too.
        reported += [int(x) for x in proc.stdout.read().split()]
        proc.stdout.close()
        proc.stderr.close()
        reported_total.update(reported)

        present = _present(tmp_path)
        missing = sorted(reported_total - present.keys())
        assert not missing, f"kill {kill}: units reported committed but lost: {missing[:10]}"
        partial = {k: c for k, c in present.items() if c != 1000}
        assert not partial, f"kill {kill}: partial or duplicated units: {partial}"
        db = sqlite3.connect(f"{(tmp_path / 'edgeos.db').as_uri()}?mode=ro", uri=True)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
        start = max(present) + 1 if present else 0
    assert len(reported_total) > kills * 3  # the kills really landed during ingest
