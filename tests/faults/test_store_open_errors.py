"""Start-up errors that are not damage (a full disk, a lock held by another program) must fail
the start clearly and leave the store untouched; only real corruption is moved aside (I9)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeos import Batch, TagMeta
from edgeos.errors import StoreError
from edgeos.store import StoreReader, StoreWriter

CHILD = Path(__file__).with_name("openfull_child.py")
TAGS = [TagMeta(i, "dev", f"t{i}") for i in range(10)]


def _bad_files(d: Path) -> list[Path]:
    return sorted(d.glob("edgeos.db.bad-*"))


def test_a_full_disk_at_start_fails_clearly_and_moves_nothing(on_tmpfs):
    _, r = on_tmpfs(CHILD, "8m", timeout=120)
    assert "error_type" not in r, r  # a StoreError, not a traceback
    assert "error" in r and "edgeos.db" in r["error"] and "left untouched" in r["error"], r
    assert "No space left on device" in r["error"], r
    assert r["moved"] == [] and r["unchanged"], r
    # Once space returned the same store opened: nothing lost, ids continue (no reuse).
    assert r["count"] == 20_010 and r["next_id"] == 21


def test_a_lock_held_by_another_program_fails_clearly_and_moves_nothing(tmp_path):
    w = StoreWriter(tmp_path, TAGS)
    i = np.arange(100)
    w.write([Batch("dev", (i % 10).astype(np.int32), i, i.astype(float), np.zeros(100, np.uint32))])
    w.close()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            f"db = sqlite3.connect({str(tmp_path / 'edgeos.db')!r}, isolation_level=None)\n"
            "db.execute('BEGIN IMMEDIATE')\n"
            "db.execute(\"INSERT OR REPLACE INTO meta VALUES('operator', 'was here')\")\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=r"edgeos\.db: cannot .*locked.*left untouched"):
            StoreWriter(tmp_path, TAGS)
        assert _bad_files(tmp_path) == []
    finally:
        holder.kill()
        holder.wait(10)
    StoreWriter(tmp_path, TAGS).close()  # the lock gone, the same store opens
    with StoreReader(tmp_path) as r:
        assert r.count() == 100
