"""The local store: round trips, compaction, retention, the size budget, bad files, the lock."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

import msgpack
import numpy as np
import pytest

from edgeos import Batch, Quality, TagMeta, ValueKind
from edgeos.errors import StoreError
from edgeos.store import StoreReader, StoreSettings, StoreWriter, aggregate
from edgeos.store.writer import DB_NAME

T0 = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z
SEC = 10**9
TAGS = [
    TagMeta(0, "press", "temp", unit="degC"),
    TagMeta(1, "press", "running", ValueKind.BOOL),
    TagMeta(2, "press", "state", ValueKind.STRING),
    TagMeta(3, "oven", "temp"),
]


def poll(device: str, ids: list[int], t: int, values, quality=None, text=None) -> Batch:
    n = len(ids)
    q = np.zeros(n, np.uint32) if quality is None else np.asarray(quality, np.uint32)
    return Batch(device, np.array(ids, np.int32), np.full(n, t), np.asarray(values, float), q, text)


def fill(w: StoreWriter, seconds: int, start: int = T0) -> None:
    rng = np.random.default_rng(1)
    for s in range(seconds):
        t = start + s * SEC + int(rng.integers(-3, 4)) * 1_000_000
        w.write(
            [
                poll("press", [0, 1, 2], t, [round(60 + s * 0.01, 2), s % 2, np.nan], text=[None, None, f"S{s % 3}"]),
                poll("oven", [3], t, [float(s)], quality=[Quality.BAD_COMM_FAILURE if s == 5 else 0]),
            ]
        )


def test_round_trip_before_and_after_compaction(tmp_path):
    w = StoreWriter(tmp_path, TAGS)
    fill(w, 100)
    with StoreReader(tmp_path) as r:
        before = {t.key: r.history(t.key) for t in r.tags()}
    w.maintain(T0 + 200 * SEC, compact_all=True)
    assert w.counters.compacted_samples == 400
    with StoreReader(tmp_path) as r:
        assert r.db.execute("SELECT COUNT(*) FROM units WHERE compacted=0").fetchone()[0] == 0
        for key, h in before.items():
            after = r.history(key)
            np.testing.assert_array_equal(after.ts, h.ts)
            assert after.values.tobytes() == h.values.tobytes()  # bit-exact, NaN included
            np.testing.assert_array_equal(after.quality, h.quality)
            assert after.text == h.text
        temp = r.history("press/temp")
        assert len(temp) == 100 and temp.values[-1] == 60.99 and (temp.ts % 1_000_000 == 0).all()
        assert r.history("state").text[:3] == ["S0", "S1", "S2"]
        oven = r.history("oven/temp")
        assert oven.quality[5] == Quality.BAD_COMM_FAILURE and oven.quality[4] == 0
        # Time ranges are inclusive on both ends.
        part = r.history("oven/temp", oven.ts[10], oven.ts[19])
        assert part.values.tolist() == [float(x) for x in range(10, 20)]
    w.close()


def test_history_spans_chunks_and_hot_units_in_order(tmp_path):
    w = StoreWriter(tmp_path, TAGS)
    fill(w, 50)
    w.maintain(T0 + 100 * SEC, compact_all=True)
    fill(w, 50, start=T0 + 50 * SEC)
    with StoreReader(tmp_path) as r:
        h = r.history("oven/temp")
        assert len(h) == 100 and (np.diff(h.ts) > 0).all()
        latest = {t.key: (ts, v) for t, ts, v, q in r.latest()}
        assert latest["oven/temp"][1] == 49.0 and latest["press/state"][1] == "S1"
    w.close()


def test_tag_ids_survive_config_changes(tmp_path):
    w = StoreWriter(tmp_path, TAGS)
    fill(w, 3)
    w.close()
    # The config now lists the tags in another order, with one new tag: ids map, data stays.
    moved = [TagMeta(0, "oven", "temp"), TagMeta(1, "oven", "new"), TagMeta(2, "press", "temp")]
    w = StoreWriter(tmp_path, moved)
    w.write([poll("oven", [0, 1], T0 + 10 * SEC, [100.0, 7.0])])
    w.close()
    with StoreReader(tmp_path) as r:
        assert r.history("oven/temp").values.tolist() == [0.0, 1.0, 2.0, 100.0]
        assert r.history("oven/new").values.tolist() == [7.0]
        assert len(r.history("press/temp")) == 3


def test_retention_drops_whole_units_by_age_and_counts(tmp_path, caplog):
    w = StoreWriter(tmp_path, TAGS, StoreSettings(retention_ns=3600 * SEC))
    fill(w, 10, start=T0)
    w.maintain(T0 + 10 * SEC, compact_all=True)
    fill(w, 10, start=T0 + 7200 * SEC)
    caplog.set_level(logging.INFO, logger="edgeos.store")
    w.maintain(T0 + 7210 * SEC)
    assert w.counters.dropped_retention == 40
    assert "retention: dropped 40 samples" in caplog.text
    with StoreReader(tmp_path) as r:
        assert r.count() == 40 and r.history("oven/temp").values.tolist() == [float(x) for x in range(10)]
    w.close()


def test_size_budget_drops_oldest_and_ingest_never_stops(tmp_path, caplog):
    budget = 3 * 1024 * 1024
    w = StoreWriter(tmp_path, [TagMeta(i, "d", f"t{i}") for i in range(500)], StoreSettings(max_size=budget))
    rng = np.random.default_rng(0)
    caplog.set_level(logging.WARNING, logger="edgeos.store")
    total = 0
    for s in range(400):
        b = Batch(
            "d",
            np.arange(500, dtype=np.int32),
            np.full(500, T0 + s * SEC),
            rng.normal(size=500),
            np.zeros(500, np.uint32),
        )
        total += w.write([b])
        if s % 20 == 19:
            w.maintain(T0 + s * SEC, compact_all=True)
            assert w.used_bytes() <= budget
    w.maintain(T0 + 400 * SEC, compact_all=True)
    assert total == 200_000 and w.counters.dropped_budget > 0
    # Enforced at each maintenance round: the file may pass the budget by what was written
    # between two rounds plus one compaction slice (docs/store.md, I6); here that is < 0.6 MiB.
    assert w.path.stat().st_size <= budget + 600 * 1024
    with StoreReader(tmp_path) as r:
        h = r.history("d/t0")
        # The newest data is all there; what went was the oldest, in whole chunks.
        assert h.ts[-1] == T0 + 399 * SEC and (np.diff(h.ts) == SEC).all()
        assert r.count() + w.counters.dropped_budget == total
    assert caplog.text.count("reached its") == 1  # once per episode, not per drop
    w.close()


def test_garbage_file_is_moved_aside_not_deleted(tmp_path, caplog):
    (tmp_path / DB_NAME).write_bytes(b"this is not a database" * 100)
    w = StoreWriter(tmp_path, TAGS)
    fill(w, 2)
    w.close()
    aside = list(tmp_path.glob(f"{DB_NAME}.bad-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not a database")
    assert "not an SQLite database" in caplog.text and "moved it to" in caplog.text
    with StoreReader(tmp_path) as r:
        assert r.count() == 8


def test_foreign_sqlite_database_is_moved_aside(tmp_path):
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("CREATE TABLE invoices(id)")
    db.commit()
    db.close()
    w = StoreWriter(tmp_path, TAGS)
    w.close()
    assert len([p for p in tmp_path.glob(f"{DB_NAME}.bad-*") if not p.name.endswith(("-wal", "-shm"))]) == 1


def test_damaged_pages_after_a_crash_are_detected(tmp_path, caplog):
    w = StoreWriter(tmp_path, TAGS)
    fill(w, 200)
    w.maintain(T0 + 300 * SEC, compact_all=True)
    w.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    # Simulate a crash (no clean close) that left garbage in the middle of the file.
    w.db.close()
    import os

    os.close(w._lock_fd)
    path = tmp_path / DB_NAME
    data = bytearray(path.read_bytes())
    page = 16384
    data[2 * page : 4 * page] = b"\xa5" * (2 * page)
    path.write_bytes(bytes(data))
    w = StoreWriter(tmp_path, TAGS)
    w.close()
    assert "integrity check failed" in caplog.text or "unreadable" in caplog.text
    assert len([p for p in tmp_path.glob(f"{DB_NAME}.bad-*") if not p.name.endswith(("-wal", "-shm"))]) == 1


def test_newer_schema_is_refused_clearly(tmp_path):
    w = StoreWriter(tmp_path, TAGS)
    w.db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    w.close()
    with pytest.raises(StoreError, match="schema version 99 was written by a newer edgeos; this edgeos reads up to 2"):
        StoreWriter(tmp_path, TAGS)
    assert not list(tmp_path.glob(f"{DB_NAME}.bad-*"))  # refused, not moved: the data is fine


def test_store_from_edgeos_0_1_0_is_migrated(tmp_path):
    # The development store format of edgeos 0.1.0 (schema 1, unit version 1), written by hand.
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.executescript(
        """
        CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE tags(id INTEGER PRIMARY KEY, device TEXT NOT NULL, name TEXT NOT NULL,
            kind TEXT NOT NULL, unit TEXT NOT NULL DEFAULT '', UNIQUE(device, name));
        CREATE TABLE units(id INTEGER PRIMARY KEY, device TEXT NOT NULL, t_min INTEGER NOT NULL,
            t_max INTEGER NOT NULL, n INTEGER NOT NULL, data BLOB NOT NULL);
        INSERT INTO meta VALUES('schema_version', '1');
        INSERT INTO tags VALUES(1, 'oven', 'temp', 'number', '');
        """
    )
    v1 = msgpack.packb(
        {
            "v": 1,
            "d": "oven",
            "n": 2,
            "tag": np.array([1, 1], "<i4").tobytes(),
            "ts": np.array([T0, T0 + SEC], "<i8").tobytes(),
            "val": np.array([1.5, 2.5], "<f8").tobytes(),
            "q": np.zeros(2, "<u4").tobytes(),
        }
    )
    db.execute("INSERT INTO units VALUES(7, 'oven', ?, ?, 2, ?)", (T0, T0 + SEC, v1))
    db.commit()
    db.close()
    w = StoreWriter(tmp_path, [TagMeta(0, "oven", "temp")])
    w.write([poll("oven", [0], T0 + 2 * SEC, [3.5])])
    assert w.db.execute("SELECT MIN(id), MAX(id) FROM units").fetchone() == (7, 8)
    w.maintain(T0, compact_all=True)
    w.close()
    with StoreReader(tmp_path) as r:
        assert r.history("oven/temp").values.tolist() == [1.5, 2.5, 3.5]


def test_second_writer_on_a_data_directory_is_refused(tmp_path):
    w = StoreWriter(tmp_path, TAGS)
    with pytest.raises(StoreError, match=r"in use by another edgeos process \(pid \d+\)"):
        StoreWriter(tmp_path, TAGS)
    w.close()
    StoreWriter(tmp_path, TAGS).close()  # free again once the first closed


def test_readers_do_not_block_the_writer(tmp_path):
    w = StoreWriter(tmp_path, TAGS)
    fill(w, 20)
    stop = threading.Event()
    reads = []

    def reader():
        with StoreReader(tmp_path) as r:
            while not stop.is_set():
                with r._snapshot():  # hold a read transaction open as a long export would
                    reads.append(len(r.history("oven/temp")))
                    time.sleep(0.01)

    th = threading.Thread(target=reader)
    th.start()
    try:
        worst = 0.0
        for s in range(20, 120):
            t = time.perf_counter()
            w.write([poll("oven", [3], T0 + s * SEC, [float(s)])])
            worst = max(worst, time.perf_counter() - t)
    finally:
        stop.set()
        th.join(10)
    assert len(reads) > 3 and min(reads) >= 20
    assert worst < 1.0  # never waits on the reader's lock (a busy wait would take 5 s)
    with StoreReader(tmp_path) as r:
        assert len(r.history("oven/temp")) == 120
    w.close()


def test_aggregate_buckets_align_to_the_clock_and_skip_bad():
    from edgeos.store.reader import History, TagInfo

    ts = T0 + np.arange(180, dtype=np.int64) * SEC + 500_000_000
    v = np.arange(180, dtype=float)
    q = np.zeros(180, np.uint32)
    q[60] = Quality.BAD_COMM_FAILURE
    h = History(TagInfo(1, "d", "t", "number", ""), ts, v, q)
    starts, means, counts = aggregate(h, 60 * SEC, "mean")
    assert (starts == T0 + np.array([0, 60, 120]) * SEC).all()
    assert counts.tolist() == [60, 59, 60]
    assert means[0] == np.mean(np.arange(60)) and means[1] == np.mean(np.arange(61, 120))
    assert aggregate(h, 60 * SEC, "max")[1].tolist() == [59.0, 119.0, 179.0]
    assert aggregate(h, 60 * SEC, "last")[1].tolist() == [59.0, 119.0, 179.0]
