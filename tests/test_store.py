"""The local store: round trips, compaction, retention, the size budget, bad files, the lock."""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
import stat
import threading
import time

import msgpack
import numpy as np
import pytest

from edgeos import Batch, Quality, TagMeta, ValueKind, wire
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
    page = w.db.execute("PRAGMA page_size").fetchone()[0]
    # Simulate a crash (no clean close) that left garbage in the middle of the file.
    w.db.close()
    import os

    os.close(w._lock_fd)
    path = tmp_path / DB_NAME
    data = bytearray(path.read_bytes())
    data[2 * page : 4 * 16384] = b"\xa5" * (4 * 16384 - 2 * page)  # from page 3 to 64 KiB
    path.write_bytes(bytes(data))
    w = StoreWriter(tmp_path, TAGS)
    fill(w, 1)
    assert w.db.execute("SELECT MIN(id) FROM units").fetchone()[0] > 400  # ids never reused
    w.close()
    assert "integrity check failed" in caplog.text or "unreadable" in caplog.text
    assert len([p for p in tmp_path.glob(f"{DB_NAME}.bad-*") if not p.name.endswith(("-wal", "-shm"))]) == 1


def test_newer_schema_is_refused_clearly(tmp_path):
    w = StoreWriter(tmp_path, TAGS)
    w.db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    w.close()
    with pytest.raises(StoreError, match="schema version 99 was written by a newer edgeos; this edgeos reads up to 4"):
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
        s, deadline = 20, time.monotonic() + 20
        # Commits are fast (a page or two each): go on until the reader has read a few times.
        while (s < 120 or len(reads) <= 5) and time.monotonic() < deadline:
            t = time.perf_counter()
            w.write([poll("oven", [3], T0 + s * SEC, [float(s)])])
            worst = max(worst, time.perf_counter() - t)
            s += 1
    finally:
        stop.set()
        th.join(10)
    assert len(reads) > 3 and min(reads) >= 20
    assert worst < 1.0  # never waits on the reader's lock (a busy wait would take 5 s)
    with StoreReader(tmp_path) as r:
        assert len(r.history("oven/temp")) == s  # 20 from fill, then one a commit
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


# -- issue 18: durability ------------------------------------------------------------------


def _present(w: StoreWriter) -> int:
    """Samples a query can see: chunks plus hot (not compacted) units."""
    a = w.db.execute("SELECT COALESCE(SUM(n), 0) FROM chunks").fetchone()[0]
    b = w.db.execute("SELECT COALESCE(SUM(n), 0) FROM units WHERE compacted=0").fetchone()[0]
    return int(a + b)


def _identity(w: StoreWriter) -> None:
    """(I12) Each committed sample is present or counted in exactly one dropped/quarantined counter."""
    c = w.counters
    accounted = _present(w) + c.dropped_retention + c.dropped_budget + getattr(c, "quarantined_samples", 0)
    assert c.committed_samples == accounted, vars(c)


def _walk_batch(device: str, ntags: int, t: int, rng) -> Batch:
    return Batch(
        device,
        np.arange(ntags, dtype=np.int32),
        np.full(ntags, t),
        np.round(50 + np.cumsum(rng.integers(-2, 3, ntags)) * 0.1, 1),
        np.zeros(ntags, np.uint32),
    )


def test_minus_zero_keeps_its_sign_through_compaction(tmp_path):
    from edgeos.store.chunk import decode_chunk, encode_chunk

    v = np.array([1.5, -0.0, 2.25, 0.0, -0.0, 3.0, np.nan, -1.75])
    ts = T0 + np.arange(len(v), dtype=np.int64) * SEC
    c = decode_chunk(encode_chunk(ts, v, np.zeros(len(v), np.uint32)))
    assert c.values.tobytes() == v.tobytes()  # bit-exact: the sign of zero included
    w = StoreWriter(tmp_path, TAGS)
    for i, x in enumerate(v):
        w.write([poll("oven", [3], int(ts[i]), [x])])
    w.maintain(T0 + 100 * SEC, compact_all=True)
    with StoreReader(tmp_path) as r:
        assert r.history("oven/temp").values.tobytes() == v.tobytes()
    w.close()


def test_a_tag_whose_unit_changes_gets_a_new_id_and_old_history_keeps_its_unit(tmp_path):
    w = StoreWriter(tmp_path, TAGS)
    w.write([poll("press", [0], T0, [60.0])])
    w.close()
    changed = [TagMeta(0, "press", "temp", unit="degF"), *TAGS[1:]]
    w = StoreWriter(tmp_path, changed)
    w.write([poll("press", [0], T0 + SEC, [140.0])])
    w.close()
    w = StoreWriter(tmp_path, changed)  # unchanged since: no third id
    w.close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    # The sync's dictionary query: every id ever given, the old one with its old unit.
    rows = db.execute("SELECT id, device, name, kind, unit FROM tags ORDER BY id").fetchall()
    db.close()
    temps = [r for r in rows if r[1:3] == ("press", "temp")]
    assert [r[4] for r in temps] == ["degC", "degF"] and temps[0][0] < temps[1][0]
    assert len(rows) == len(TAGS) + 1  # the dictionary grew: its version (length) moved
    with StoreReader(tmp_path) as r:
        h = r.history("press/temp")  # by name: both ids over time
        assert h.values.tolist() == [60.0, 140.0] and h.tag.unit == "degF"
        assert [t.key for t in r.tags()].count("press/temp") == 1
        assert {t.key: v for t, _, v, _ in r.latest()}["press/temp"] == 140.0


def _flip(blob: bytes, where: bytes, offset: int, bit: int) -> bytes:
    i = blob.index(where) + offset
    b = bytearray(blob)
    b[i] ^= 1 << bit
    return bytes(b)


def test_an_undecodable_unit_is_quarantined_and_compaction_carries_on(tmp_path, caplog):
    w = StoreWriter(tmp_path, TAGS)
    fill(w, 20)
    ids = [r[0] for r in w.db.execute("SELECT id FROM units WHERE device='oven' ORDER BY id")]
    # One flipped bit in a map key ("ts" -> "us": KeyError at decode), one in the sample count
    # (1 -> 3: the columns disagree).
    for uid, where, offset in ((ids[3], b"\xa2ts", 1), (ids[7], b"\xa1n\x01", 2)):
        (blob,) = w.db.execute("SELECT data FROM units WHERE id=?", (uid,)).fetchone()
        w.db.execute("UPDATE units SET data=? WHERE id=?", (_flip(blob, where, offset, 0 if offset == 1 else 1), uid))
    assert w.db.execute("PRAGMA quick_check").fetchone()[0] == "ok"  # SQLite cannot see it
    with StoreReader(tmp_path) as r:
        assert len(r.history("oven/temp")) == 18  # queries skip it meanwhile
    w.maintain(T0 + 100 * SEC, compact_all=True)  # must not raise
    c = w.counters
    assert (c.quarantined_units, c.quarantined_samples, c.compacted_samples) == (2, 2, 78)
    bad = w.db.execute("SELECT id, device, reason FROM bad_units ORDER BY id").fetchall()
    assert [b[0] for b in bad] == [ids[3], ids[7]] and "KeyError" in bad[0][2]
    assert "does not decode" in caplog.text
    _identity(w)
    with StoreReader(tmp_path) as r:
        assert len(r.history("oven/temp")) == 18 and len(r.history("press/temp")) == 20
    w.close()


def test_a_huge_commit_is_split_into_bounded_units(tmp_path):
    from edgeos.store import writer as store_writer

    n = 1_000_000
    rng = np.random.default_rng(3)
    b = Batch(
        "press",
        rng.integers(0, 3, n).astype(np.int32),
        T0 + np.arange(n, dtype=np.int64) * 1_000_000,
        rng.normal(size=n),
        np.where(rng.random(n) < 0.01, np.uint32(Quality.BAD_COMM_FAILURE), np.uint32(0)),
        np.array([f"state {i}" if i % 5 == 0 else None for i in range(n)], object),
    )
    w = StoreWriter(tmp_path, TAGS)
    assert w.write([b]) == n
    rows = w.db.execute("SELECT n, length(data), t_min, t_max FROM units ORDER BY id").fetchall()
    assert len(rows) > 1 and sum(r[0] for r in rows) == n
    assert max(r[0] for r in rows) <= store_writer.MAX_UNIT_SAMPLES
    assert max(r[1] for r in rows) <= store_writer.MAX_UNIT_BYTES
    assert all(a[3] <= b[2] for a, b in itertools.pairwise(rows))  # in time order
    with StoreReader(tmp_path) as r:
        assert r.count() == n
        h = r.history("press/state")
        mine = b.tags == 2
        assert len(h) == int(mine.sum()) and h.values.tobytes() == b.values[mine].tobytes()
        assert h.text == b.text[mine].tolist()
    w.close()


def _trace(w: StoreWriter) -> list[str]:
    seen: list[str] = []
    w.db.set_trace_callback(seen.append)
    return seen


def test_size_budget_with_upstream_pending_drops_hidden_raw_copies_first(tmp_path):
    budget = 2 * 1024 * 1024
    settings = StoreSettings(
        max_size=budget, keep_until_synced=True, compress_units=False
    )  # plain units: the volume reaches the budget
    w = StoreWriter(tmp_path, [TagMeta(i, "d", f"t{i}") for i in range(500)], settings)
    rng = np.random.default_rng(0)
    total = 0
    checkpoints = []
    for s in range(300):
        total += w.write([_walk_batch("d", 500, T0 + s * SEC, rng)])
        if s % 20 == 19:
            seen = _trace(w)
            w.maintain(T0 + s * SEC, compact_all=True, sync_cursor=0)  # the broker is down
            w.db.set_trace_callback(None)
            checkpoints.append(sum("wal_checkpoint(TRUNCATE)" in q for q in seen))
            assert w.used_bytes() <= budget
            _identity(w)
    c = w.counters
    assert c.dropped_unsent > 0  # raw copies went ...
    assert c.dropped_budget == 0  # ... and no history: it all stays queryable
    assert c.committed_samples == total == _present(w)
    with StoreReader(tmp_path) as r:
        h = r.history("d/t0")
        assert len(h) == 300 and h.ts[0] == T0
    assert max(checkpoints) <= 2  # bounded waits for readers per round
    w.close()


def test_size_budget_then_drops_oldest_history_each_sample_counted_once(tmp_path):
    budget = 1024 * 1024
    settings = StoreSettings(
        max_size=budget, keep_until_synced=True, compact_after_ns=10**18, compress_units=False
    )  # plain units: the volume reaches the budget
    w = StoreWriter(tmp_path, [TagMeta(i, "d", f"t{i}") for i in range(500)], settings)
    rng = np.random.default_rng(0)
    for s in range(300):
        w.write([_walk_batch("d", 500, T0 + s * SEC, rng)])
        if s % 20 == 19:
            if s == 39:
                w.maintain(T0 + s * SEC, compact_all=True, sync_cursor=0)
            else:
                w.maintain(T0 + s * SEC, sync_cursor=0)  # hot units pile up, never compacted
            assert w.used_bytes() <= budget
            _identity(w)
    c = w.counters
    assert c.dropped_budget > 0 and c.compacted_samples == 20_000
    assert w.db.execute("SELECT COUNT(*) FROM units WHERE compacted=1").fetchone()[0] == 0
    chunks_left = w.db.execute("SELECT COALESCE(SUM(n), 0) FROM chunks").fetchone()[0]
    hot_dropped = c.dropped_budget - (c.compacted_samples - chunks_left)
    # Raw copies count only in dropped_unsent (their chunks were history, counted in
    # dropped_budget when they went); hot units dropped before upstream got them count in both.
    assert c.dropped_unsent == c.compacted_samples + hot_dropped
    with StoreReader(tmp_path) as r:
        h = r.history("d/t0")
        assert h.ts[-1] == T0 + 299 * SEC and (np.diff(h.ts) == SEC).all()  # the oldest went
        assert r.count() + c.dropped_budget == c.committed_samples
    w.close()


def test_retention_counts_compacted_but_unsent_units_in_dropped_unsent(tmp_path):
    w = StoreWriter(tmp_path, TAGS, StoreSettings(retention_ns=3600 * SEC, keep_until_synced=True))
    fill(w, 10, start=T0)
    w.maintain(T0 + 10 * SEC, compact_all=True, sync_cursor=0)  # chunks + raw copies kept
    fill(w, 10, start=T0 + 7200 * SEC)
    w.maintain(T0 + 7210 * SEC, sync_cursor=0)
    assert w.counters.dropped_retention == 40  # the chunks: once
    assert w.counters.dropped_unsent == 40  # the raw copies upstream never got
    assert w.db.execute("SELECT COUNT(*) FROM units WHERE t_max < ?", (T0 + 3600 * SEC,)).fetchone()[0] == 0
    _identity(w)
    w.close()


def test_raw_copies_are_deleted_once_upstream_is_disabled(tmp_path, caplog):
    w = StoreWriter(tmp_path, TAGS, StoreSettings(keep_until_synced=True))
    fill(w, 10)
    w.maintain(T0 + 10 * SEC, compact_all=True, sync_cursor=0)
    assert w.db.execute("SELECT SUM(n) FROM units WHERE compacted=1").fetchone()[0] == 40
    w.close()
    w = StoreWriter(tmp_path, TAGS, StoreSettings(keep_until_synced=False))
    w.maintain(T0 + 20 * SEC)
    w.maintain(T0 + 21 * SEC)
    assert w.db.execute("SELECT COUNT(*) FROM units WHERE compacted=1").fetchone()[0] == 0
    assert w.counters.dropped_unsent == 40 and caplog.text.count("upstream is disabled") == 1
    with StoreReader(tmp_path) as r:
        assert r.count() == 40  # the history stays
    w.close()


def test_retention_and_budget_statements_use_indexes(tmp_path):
    w = StoreWriter(tmp_path, TAGS, StoreSettings(retention_ns=3600 * SEC, keep_until_synced=True))
    fill(w, 10)
    w.maintain(T0 + 10 * SEC, compact_all=True, sync_cursor=0)
    seen = _trace(w)
    w.trim(T0 + 7200 * SEC)
    w.db.set_trace_callback(None)
    plans = []
    for q in seen:
        if q.lstrip().upper().startswith(("SELECT", "DELETE")) and ("units" in q or "chunks" in q):
            detail = [r[3] for r in w.db.execute("EXPLAIN QUERY PLAN " + q)]
            plans.append((q, detail))
            assert not any(d.startswith(("SCAN units", "SCAN chunks")) for d in detail), (q, detail)
            # Chunks and raw copies by their t_max indexes; hot units by id from hot_from (I19).
            assert any("t_max<" in d or "rowid>" in d for d in detail), (q, detail)
    assert any("DELETE FROM units" in q for q, _ in plans)
    w.close()


def test_store_files_are_created_0640_in_a_0750_directory(tmp_path):
    old = os.umask(0o022)
    try:
        d = tmp_path / "new" / "data"
        w = StoreWriter(d, TAGS)
        fill(w, 2)
        for name in ("edgeos.db", "edgeos.db-wal", "edgeos.db-shm", "edgeos.lock", "edgeos.seq", "edgeos.tags"):
            assert stat.S_IMODE((d / name).stat().st_mode) == 0o640, name
        assert stat.S_IMODE(d.stat().st_mode) == 0o750
        w.close()
        for name in ("edgeos.db", "edgeos.lock"):  # as an older edgeos left them
            os.chmod(d / name, 0o644)
        StoreWriter(d, TAGS).close()
        for name in ("edgeos.db", "edgeos.lock"):
            assert stat.S_IMODE((d / name).stat().st_mode) == 0o640, name
    finally:
        os.umask(old)


def _max_id(path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT COALESCE(MAX(id), 0) FROM units").fetchone()[0]
    finally:
        db.close()


def test_unit_ids_continue_above_the_old_ones_after_a_quarantine(tmp_path):
    StoreWriter(tmp_path, [TagMeta(0, "old", "gone")]).close()  # store ids: not the config's order
    w = StoreWriter(tmp_path, TAGS)
    fill(w, 30)
    w.close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    tag_rows = db.execute("SELECT id, device, name, kind, unit FROM tags ORDER BY id").fetchall()
    db.close()
    old = _max_id(tmp_path / DB_NAME)
    assert old == 60
    reserved = int((tmp_path / "edgeos.seq").read_text())
    assert reserved >= old
    # Damage the file past recognition (garbage over its header): a real quarantine.
    with (tmp_path / DB_NAME).open("r+b") as f:
        f.write(b"\xa5" * 4096)
    w = StoreWriter(tmp_path, TAGS)
    fill(w, 1)
    first = w.db.execute("SELECT MIN(id) FROM units").fetchone()[0]
    assert first > max(old, reserved)  # a forward jump, never a reuse
    # Tag ids keep their meaning too (the old file is unreadable: from edgeos.tags).
    assert w.db.execute("SELECT id, device, name, kind, unit FROM tags ORDER BY id").fetchall() == tag_rows
    w.close()
    assert len([p for p in tmp_path.glob(f"{DB_NAME}.bad-*") if not p.name.endswith(("-wal", "-shm"))]) == 1


def test_a_store_without_the_seq_file_gets_one_and_it_is_written_rarely(tmp_path):
    from edgeos.store import writer as store_writer

    w = StoreWriter(tmp_path, TAGS)
    fill(w, 5)
    w.close()
    (tmp_path / "edgeos.seq").unlink()  # a store from an older edgeos
    w = StoreWriter(tmp_path, TAGS)
    reserved = int((tmp_path / "edgeos.seq").read_text())
    assert reserved >= 10 + store_writer.SEQ_RESERVE - store_writer.SEQ_MARGIN
    mtime = (tmp_path / "edgeos.seq").stat().st_mtime_ns
    fill(w, 50)
    assert (tmp_path / "edgeos.seq").stat().st_mtime_ns == mtime  # not per commit
    w.close()
    # The database deleted by hand: a new one still starts above every id given.
    for p in tmp_path.glob(f"{DB_NAME}*"):
        p.unlink()
    w = StoreWriter(tmp_path, TAGS)
    fill(w, 1)
    assert w.db.execute("SELECT MIN(id) FROM units").fetchone()[0] > reserved
    w.close()


def test_a_reader_takes_a_relative_data_dir(tmp_path, monkeypatch):
    from edgeos.store import StoreReader, StoreWriter

    StoreWriter(tmp_path / "data", []).close()
    monkeypatch.chdir(tmp_path)
    for form in ("data", "./data"):
        with StoreReader(form) as r:
            assert r.count() == 0


def test_a_start_after_an_unclean_stop_says_so(tmp_path, caplog):
    import os

    from edgeos.store import StoreWriter

    w = StoreWriter(tmp_path, [])
    w.db.close()  # as a kill -9 leaves it: not marked clean, lock released by the kernel
    os.close(w._lock_fd)
    StoreWriter(tmp_path, []).close()
    assert "did not stop cleanly" in caplog.text
    caplog.clear()
    StoreWriter(tmp_path, []).close()  # after a clean stop: no check, no warning
    assert "did not stop cleanly" not in caplog.text


def test_a_restored_backup_never_reuses_sequence_numbers(tmp_path):
    import shutil

    import numpy as np

    from edgeos import Batch, TagMeta
    from edgeos.store import StoreWriter

    tags = [TagMeta(0, "d", "t")]

    def one(w, t):
        w.write([Batch("d", np.array([0], np.int32), [t], [1.0], np.zeros(1, np.uint32))])

    w = StoreWriter(tmp_path, tags)
    one(w, 1)
    w.close()
    backup = tmp_path / "backup.db"
    shutil.copy(tmp_path / "edgeos.db", backup)
    w = StoreWriter(tmp_path, tags)
    for t in range(2, 30):
        one(w, t)
    given = w.db.execute("SELECT MAX(id) FROM units").fetchone()[0]
    w._raise_reserve(given, strict=True)  # the bound moved on, as after a million units
    w.close()
    shutil.copy(backup, tmp_path / "edgeos.db")  # an operator restores yesterday's file
    w = StoreWriter(tmp_path, tags)
    one(w, 100)
    new = w.db.execute("SELECT MAX(id) FROM units").fetchone()[0]
    w.close()
    assert new > given  # a jump forward, never an id consumers already have


def test_ids_are_not_reused_after_the_newest_units_are_deleted(tmp_path):
    # Schema 4 gives ids itself (no AUTOINCREMENT): compaction deletes every unit, newest
    # included, and a restart must still continue above them (meta.top_id, I14).
    w = StoreWriter(tmp_path, TAGS)
    fill(w, 5)
    top = _max_id(tmp_path / "edgeos.db")
    w.maintain(T0 + 10 * SEC, compact_all=True)
    assert _max_id(tmp_path / "edgeos.db") == 0  # every unit compacted away
    w.close()
    w = StoreWriter(tmp_path, TAGS)
    w.write([poll("oven", [3], T0 + 20 * SEC, [1.0])])
    assert _max_id(tmp_path / "edgeos.db") == top + 1
    w.close()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize(
    "values",
    [
        np.array([21.5, 21.6, -3.25, 0.0, 1e6, 7.0]),  # decimals: stored as scaled integers
        np.array([-0.0, 1.5, np.nan, np.inf, -np.inf, 1e300]),  # kept bit for bit
        np.random.default_rng(3).normal(50, 5, 6),  # plain floats
        np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]),  # booleans
    ],
)
def test_version_3_units_read_back_bit_for_bit(values):
    tags = np.array([1, 2, 3, 70_000, 5, 1], np.int32)
    ts = np.array([T0, T0 + 1_000_000, T0, T0 + 7, T0 - 5, T0 + 2**40], np.int64)
    quality = np.array([0, 0, 0x80000000, 0, 0, 0], np.uint32)
    text = [None, "a", None, "ü" * 3, None, None]
    for q, txt in ((quality, text), (np.zeros(6, np.uint32), None)):
        u = wire.decode_unit(wire.encode_unit("dev", tags, ts, values, q, txt))
        assert u.device == "dev" and u.text == txt
        assert _same(u.tags, tags) and _same(u.ts, ts) and _same(u.quality, q)
        assert u.values.tobytes() == values.astype("<f8").tobytes()
    empty = wire.decode_unit(wire.encode_unit("dev", tags[:0], ts[:0], values[:0], quality[:0]))
    assert len(empty) == 0


def test_version_3_units_are_small_and_version_2_still_reads():
    n = 1000
    rng = np.random.default_rng(1)
    tags = np.arange(n, dtype=np.int32)
    ts = T0 + rng.integers(0, 5, n) * 1_000_000
    values = rng.uniform(0, 1000, n).round(1)
    q = np.zeros(n, np.uint32)
    v2 = wire.encode_unit("plc", tags, ts, values, q, compress=False)
    v3 = wire.encode_unit("plc", tags, ts, values, q)
    assert len(v3) < len(v2) / 4  # 18 bytes a sample -> under 4.5
    for data in (v2, v3):
        u = wire.decode_unit(data)
        assert _same(u.ts, ts) and u.values.tobytes() == values.tobytes() and (u.tags == tags).all()
    with pytest.raises(ValueError, match="newer"):
        wire.decode_unit(msgpack.packb({"v": 4, "n": 0}))


def test_a_store_of_version_2_units_compacts_and_reads(tmp_path):
    # A store written before version 3 (or with compress_units=False) reads and compacts as before.
    w = StoreWriter(tmp_path, TAGS, StoreSettings(compress_units=False))
    fill(w, 5)
    w.close()
    w = StoreWriter(tmp_path, TAGS)
    fill(w, 5, start=T0 + 5 * SEC)
    with StoreReader(tmp_path) as r:
        before = r.history("oven/temp")
    w.maintain(T0 + 20 * SEC, compact_all=True)
    w.close()
    with StoreReader(tmp_path) as r:
        after = r.history("oven/temp")
    assert len(before) == 10 and _same(after.ts, before.ts) and _same(after.values, before.values)


def _saved_cursor(path) -> int:
    db = sqlite3.connect(f"{(path / DB_NAME).as_uri()}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key='sync_cursor'").fetchone()
        return int(row[0]) if row else 0
    finally:
        db.close()


def test_the_sync_cursor_is_written_every_ten_seconds_while_it_moves_and_at_close(tmp_path):
    w = StoreWriter(tmp_path, TAGS, StoreSettings(keep_until_synced=True))
    fill(w, 30)
    w.maintain(T0 + 1 * SEC, sync_cursor=5)
    assert _saved_cursor(tmp_path) == 5
    for s, c in ((2, 7), (5, 8), (10, 9)):  # moving, but within ten seconds of the last write
        w.maintain(T0 + s * SEC, sync_cursor=c)
        assert _saved_cursor(tmp_path) == 5
    w.maintain(T0 + 11 * SEC, sync_cursor=12)
    assert _saved_cursor(tmp_path) == 12
    w.maintain(T0 + 12 * SEC, sync_cursor=14)
    w.close()  # the last cursor known is written at close
    assert _saved_cursor(tmp_path) == 14


def test_a_maintenance_round_with_nothing_to_do_writes_nothing(tmp_path):
    settings = StoreSettings(retention_ns=3600 * SEC, keep_until_synced=True)
    w = StoreWriter(tmp_path, TAGS, settings)
    fill(w, 10)
    w.maintain(T0 + 10 * SEC, sync_cursor=3)
    other = sqlite3.connect(tmp_path / DB_NAME)
    before = other.execute("PRAGMA data_version").fetchone()[0]
    for s in range(11, 40):  # the cursor stands still; nothing is due for compaction or retention
        w.maintain(T0 + s * SEC, sync_cursor=3)
    assert other.execute("PRAGMA data_version").fetchone()[0] == before
    other.close()
    w.close()


def test_a_schema_3_store_is_migrated_and_its_ids_go_on(tmp_path):
    # Schema 3 (before issue 22): AUTOINCREMENT units and three indexes written per commit.
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.executescript(
        """
        CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE tags(id INTEGER PRIMARY KEY, device TEXT NOT NULL, name TEXT NOT NULL,
            kind TEXT NOT NULL, unit TEXT NOT NULL DEFAULT '', retired INTEGER NOT NULL DEFAULT 0);
        CREATE UNIQUE INDEX tags_active ON tags(device, name) WHERE retired=0;
        CREATE TABLE units(id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL,
            t_min INTEGER NOT NULL, t_max INTEGER NOT NULL, n INTEGER NOT NULL,
            compacted INTEGER NOT NULL DEFAULT 0, data BLOB NOT NULL);
        CREATE INDEX units_device_time ON units(device, t_max);
        CREATE INDEX units_pending ON units(compacted, id);
        CREATE INDEX units_time ON units(t_max);
        CREATE TABLE chunks(id INTEGER PRIMARY KEY, tag INTEGER NOT NULL,
            t_min INTEGER NOT NULL, t_max INTEGER NOT NULL, n INTEGER NOT NULL, data BLOB NOT NULL);
        CREATE TABLE bad_units(id INTEGER PRIMARY KEY, device TEXT NOT NULL, reason TEXT NOT NULL, data BLOB NOT NULL);
        INSERT INTO meta VALUES('schema_version', '3');
        INSERT INTO meta VALUES('clean_shutdown', '1');
        INSERT INTO tags(id, device, name, kind) VALUES(1, 'oven', 'temp', 'number');
        """
    )
    for k in range(4):
        data = wire.encode_unit("oven", np.array([1], np.int32), np.array([T0 + k * SEC]), np.array([float(k)]),
                                np.zeros(1, np.uint32), compress=False)  # fmt: skip
        db.execute("INSERT INTO units(device, t_min, t_max, n, data) VALUES('oven', ?, ?, 1, ?)",
                   (T0 + k * SEC, T0 + k * SEC, data))  # fmt: skip
    db.execute("DELETE FROM units WHERE id=4")  # the newest unit gone: only sqlite_sequence knows 4
    db.commit()
    db.close()
    (tmp_path / "edgeos.seq").write_text("1000000\n")
    w = StoreWriter(tmp_path, [TagMeta(0, "oven", "temp")])
    indexes = {r[0] for r in w.db.execute("SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='units'")}
    assert indexes == {"units_copies", "units_copies_time"}
    assert w.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "4"
    w.write([poll("oven", [0], T0 + 9 * SEC, [9.0])])
    assert w.db.execute("SELECT MAX(id) FROM units").fetchone()[0] == 5  # never 4 again
    with StoreReader(tmp_path) as r:
        assert r.history("oven/temp").values.tolist() == [0.0, 1.0, 2.0, 9.0]
    w.maintain(T0 + 20 * SEC, compact_all=True)
    w.close()
    with StoreReader(tmp_path) as r:
        assert r.history("oven/temp").values.tolist() == [0.0, 1.0, 2.0, 9.0]


def test_unit_version_2_can_be_kept_for_older_consumers(write_config):
    import sqlite3

    import msgpack
    import numpy as np

    from edgeos import Batch
    from edgeos.config import load_config
    from edgeos.runtime import store_settings
    from edgeos.store import StoreWriter

    body = (
        '[gateway]\nid = "g"\ndata_dir = "data"\n[store]\n{}\n'
        '[[devices]]\nname = "m"\nprotocol = "simulated"\ntags = [{{ name = "a" }}]\n'
    )
    for line, version in (("", 3), ("unit_version = 2", 2)):
        cfg = load_config(write_config(body.format(line)))
        w = StoreWriter(cfg.gateway.data_dir, cfg.tags, store_settings(cfg))
        w.write([Batch("m", np.array([0], np.int32), [10**18], [1.5], np.zeros(1, np.uint32))])
        w.close()
        db = sqlite3.connect(cfg.gateway.data_dir / "edgeos.db")
        try:
            blob = db.execute("SELECT data FROM units ORDER BY id DESC LIMIT 1").fetchone()[0]
        finally:
            db.close()
        assert msgpack.unpackb(blob, raw=False)["v"] == version
