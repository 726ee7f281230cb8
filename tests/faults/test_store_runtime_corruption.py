"""A store damaged while the daemon runs (pages overwritten in place under the open writer):
StoreCorrupt, then recover() moves the file aside and a fresh store carries on (I9, I14)."""

from __future__ import annotations

import logging
import os
import sqlite3

import numpy as np
import pytest

from edgeos import Batch, TagMeta
from edgeos.store import StoreReader, StoreWriter
from edgeos.store import writer as store_writer

T0 = 1_767_225_600 * 10**9
TAGS = [TagMeta(i, "d", f"t{i}") for i in range(100)]
PAGE = 16384


def _batch(s: int, rng) -> Batch:
    return Batch(
        "d",
        np.arange(100, dtype=np.int32),
        np.full(100, T0 + s * 10**9),
        rng.normal(size=100),
        np.zeros(100, np.uint32),
    )


def _damaged_writer(path) -> tuple[StoreWriter, int, bytes]:
    """A writer with about 6 MiB written (more than SQLite's page cache), whose file then gets
    garbage over every page but page 1 and the meta table's, in place."""
    rng = np.random.default_rng(0)
    StoreWriter(path, [TagMeta(0, "old", "gone")]).close()  # store ids: not the config's order
    w = StoreWriter(path, TAGS)
    for s in range(3000):
        w.write([_batch(s, rng)])
    top = w.db.execute("SELECT MAX(id) FROM units").fetchone()[0]
    w.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the pages live in the file now
    keep = {1} | {r[0] for r in w.db.execute("SELECT rootpage FROM sqlite_master WHERE tbl_name='meta'")}
    db_path = path / store_writer.DB_NAME
    pages = db_path.stat().st_size // PAGE
    garbage = np.random.default_rng(1).bytes(PAGE)
    with db_path.open("r+b") as f:
        for p in range(2, pages + 1):
            if p not in keep:
                f.seek((p - 1) * PAGE)
                f.write(garbage)
    return w, top, garbage


def test_corruption_while_running_raises_store_corrupt_and_recover_carries_on(tmp_path, caplog):
    w, top, garbage = _damaged_writer(tmp_path)
    tags = [(1, "gone")] + [(i + 2, f"t{i}") for i in range(100)]
    damaged = (tmp_path / store_writer.DB_NAME).read_bytes().count(garbage)
    rng = np.random.default_rng(2)
    with pytest.raises(store_writer.StoreCorrupt):
        w.write([_batch(5000, rng)])
        w.maintain(T0 + 10**13, compact_all=True)
    moved = w.recover()
    # Kept, never deleted (closing it may have checkpointed the last commit into it).
    assert moved.exists() and moved.read_bytes().count(garbage) >= damaged * 9 // 10
    assert "damaged while running" in caplog.text
    # The same writer object goes on: new ids continue above every old one, tags are mapped.
    assert w.write([_batch(6000, rng), _batch(6001, rng)]) == 200
    first = w.db.execute("SELECT MIN(id) FROM units").fetchone()[0]
    assert first > top
    assert w.db.execute("SELECT id, name FROM tags ORDER BY id").fetchall() == tags  # ids keep their meaning
    w.maintain(T0 + 10**13, compact_all=True)
    w.close()
    w = StoreWriter(tmp_path, TAGS)  # the fresh store is healthy: no second quarantine
    w.close()
    bad = [p for p in tmp_path.glob("edgeos.db.bad-*") if not p.name.endswith(("-wal", "-shm"))]
    assert bad == [moved]
    with StoreReader(tmp_path) as r:
        assert r.count() == 200 and len(r.history("d/t0")) == 2


def test_a_store_found_damaged_is_not_marked_clean_at_stop(tmp_path, caplog):
    w, _, _ = _damaged_writer(tmp_path)
    with pytest.raises(store_writer.StoreError):
        w.maintain(T0 + 10**13, compact_all=True)
    w.close()  # an orderly stop without recover(): the next start must check the file
    db = sqlite3.connect(tmp_path / store_writer.DB_NAME)
    clean = db.execute("SELECT value FROM meta WHERE key='clean_shutdown'").fetchone()
    db.close()
    assert clean == ("0",)
    caplog.set_level(logging.ERROR, logger="edgeos.store")
    StoreWriter(tmp_path, TAGS).close()
    assert "integrity check failed" in caplog.text or "unreadable" in caplog.text
    assert [p for p in os.listdir(tmp_path) if p.startswith("edgeos.db.bad-") and p[-4:] not in ("-wal", "-shm")]


async def test_the_daemon_recovers_from_a_store_damaged_while_it_runs_and_keeps_collecting(tmp_path, caplog):
    """The runtime's half of I9: the damage is found by a maintenance round (or a commit), the
    file is set aside, collecting goes on into a fresh store, and the damaged file is kept."""
    import asyncio

    from edgeos.config import load_config
    from edgeos.runtime import Runtime

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    w = StoreWriter(data, TAGS)  # about 6 MiB of hot units, old enough to be compacted at once
    for s in range(3000):
        w.write([_batch(s, rng)])
    w.close()
    cfg_path = tmp_path / "edgeos.toml"
    (tmp_path / "tags.csv").write_text("name\n" + "".join(f"t{i}\n" for i in range(100)))
    cfg_path.write_text(
        """
[gateway]
id = "g"
data_dir = "data"
[store]
compact_after = "1s"
[[devices]]
name = "d"
protocol = "simulated"
poll_interval = "20ms"
tags_csv = "tags.csv"
"""
    )
    rt = Runtime(load_config(cfg_path))
    task = asyncio.create_task(rt.run())
    db_path = data / store_writer.DB_NAME
    garbage = np.random.default_rng(1).bytes(PAGE)
    try:
        async with asyncio.timeout(60):
            await rt.running.wait()
            keep = {1} | {r[0] for r in rt.store.db.execute("SELECT rootpage FROM sqlite_master WHERE tbl_name='meta'")}
            with db_path.open("r+b") as f:  # the daemon has it open; its pages are not cached yet
                for p in range(2, db_path.stat().st_size // PAGE + 1):
                    if p not in keep:
                        f.seek((p - 1) * PAGE)
                        f.write(garbage)
            while not rt.counters.store_recoveries:
                await asyncio.sleep(0.1)
            stored = rt.counters.stored
            while rt.counters.stored < stored + 5_000:  # collecting goes on, into the fresh file
                await asyncio.sleep(0.1)
    finally:
        rt.stop()
        await asyncio.wait_for(task, 30)
    assert "STORE DAMAGED while running" in caplog.text
    bad = [p for p in data.glob("edgeos.db.bad-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(bad) == 1 and bad[0].read_bytes().count(garbage) > 100
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT MAX(id) FROM units").fetchone()[0] > 3000  # seqs go on
    finally:
        db.close()
    with StoreReader(data) as r:
        assert r.count() >= 5_000
