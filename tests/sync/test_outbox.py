"""The store's outbox API (edgeos/store/outbox.py) and the replay window of forwarded units."""

from __future__ import annotations

import sqlite3
import time

import numpy as np

from edgeos.model import Batch, TagMeta, ValueKind
from edgeos.store import StoreSettings, StoreWriter, outbox
from edgeos.store.outbox import Outbox

TAGS = [TagMeta(0, "d0", "a", ValueKind.NUMBER), TagMeta(1, "d1", "b", ValueKind.NUMBER)]


def write(w: StoreWriter, k: int, t0: int) -> None:
    ts = np.full(3, t0 + k * 10**6, np.int64)
    w.write([Batch(f"d{k % 2}", np.full(3, k % 2, np.int32), ts, np.arange(3.0) + k, np.zeros(3, np.uint32))])


def test_runs_ranges_gone_and_head_through_the_outbox(tmp_path):
    w = StoreWriter(tmp_path, TAGS)
    t0 = time.time_ns()
    for k in range(50):
        write(w, k, t0)
    committed = {}
    w.db.execute("DELETE FROM units WHERE id BETWEEN 10 AND 14 OR id = 30")  # as retention would
    for i, d, b in w.db.execute("SELECT id, device, data FROM units"):
        committed[i] = (d, b)
    o = Outbox(tmp_path)
    try:
        assert o.head() == 50 and o.top() == 50 and o.cursor() == 0
        run = o.after(0, max_bytes=300)  # bounded by bytes, at least one unit
        assert 1 <= len(run) < 45 and run.ids == list(range(1, len(run) + 1))
        assert [bytes(b) for b in run.data] == [committed[i][1] for i in run.ids]
        whole = o.after(0, max_bytes=1 << 20)
        assert whole.ids == sorted(committed) and whole.last == 50
        assert o.after(20, end=26).ids == [21, 22, 23, 24, 25]
        r = o.range(5, 40, "d1", max_bytes=1 << 20)
        assert r.ids == [i for i in range(5, 41) if i in committed and committed[i][0] == "d1"] and r.last == 40
        assert set(r.devices) == {"d1"}
        assert o.gone(1, 50) == [(10, 14), (30, 30)]
        assert o.gone(10, 12) == [(10, 12)] and o.gone(15, 29) == []
        assert o.device_before("d0", 31) == 29 and o.device_before("d1", 2) == 0
        assert [t[2] for t in o.dictionary()] == ["a", "b"]
    finally:
        o.close()
        w.close()


def test_forwarded_units_stay_replayable_for_the_window(tmp_path):
    hour = 3600 * 10**9
    w = StoreWriter(tmp_path, TAGS, StoreSettings(keep_until_synced=True, replay_window_ns=hour))
    t0 = time.time_ns()
    try:
        for k in range(20):
            write(w, k, t0)
        w.maintain(t0 + 10**9, compact_all=True, sync_cursor=20)
        w.save_cursor(20)
        # Compacted and forwarded, but kept as sent: a replay gets the first bytes.
        kept = w.db.execute("SELECT COUNT(*) FROM units WHERE compacted=1").fetchone()[0]
        assert kept == 20
        o = Outbox(tmp_path)
        try:
            assert [bytes(b) for b in o.range(1, 20).data] and o.gone(1, 20) == []
        finally:
            o.close()
        w.maintain(t0 + 2 * hour, sync_cursor=20)  # the window passed
        assert w.db.execute("SELECT COUNT(*) FROM units").fetchone()[0] == 0
    finally:
        w.close()
    # Without a window (replay_window = 0) forwarded compacted units go with the cursor, as before.
    w = StoreWriter(tmp_path / "b", TAGS, StoreSettings(keep_until_synced=True))
    try:
        for k in range(5):
            write(w, k, t0)
        w.maintain(t0 + 10**9, compact_all=True)
        w.save_cursor(5)
        assert w.db.execute("SELECT COUNT(*) FROM units").fetchone()[0] == 0
    finally:
        w.close()


def test_the_maintenance_round_expires_forwarded_copies_at_most_once_a_minute(tmp_path):
    """(I20) With the cursor still, the maintenance round deletes forwarded raw copies whose
    window passed, looks at most once a minute, and writes nothing when none expired."""
    sec = 10**9
    w = StoreWriter(tmp_path, TAGS, StoreSettings(keep_until_synced=True, replay_window_ns=90 * sec))
    t0 = time.time_ns()
    try:
        for k in range(10):
            write(w, k, t0)
        w.maintain(t0, compact_all=True, sync_cursor=10)
        w.save_cursor(10)
        raw = "SELECT COUNT(*) FROM units WHERE compacted=1"
        assert w.db.execute(raw).fetchone()[0] == 10
        before = w.db.total_changes
        w.maintain(t0 + 61 * sec)  # a look, inside the window: nothing expired, nothing written
        assert w.db.total_changes == before and w.db.execute(raw).fetchone()[0] == 10
        w.maintain(t0 + 100 * sec)  # expired, but the last look was 39 s ago
        assert w.db.execute(raw).fetchone()[0] == 10
        w.maintain(t0 + 122 * sec)  # a minute after the last look
        assert w.db.execute(raw).fetchone()[0] == 0
    finally:
        w.close()


def test_a_run_stays_bounded_when_units_grow_past_the_estimate(tmp_path, monkeypatch):
    """Runs are read as one concatenation sized by the last run's mean unit size. Units that
    then grow a thousandfold (up to the writer's bound, 128 KiB, I15) must not make a run of
    hundreds of MB: SQLite refuses to build it
    past the cap, and the run is read row by row to the byte bound instead; every unit's bytes
    stay exactly as committed, in id order. (The cap is lowered to 256 KiB here, so that 20
    units pass it.)"""
    monkeypatch.setattr(outbox, "RUN_CAP", 256 << 10)
    w = StoreWriter(tmp_path, TAGS)
    t0 = time.time_ns()
    rng = np.random.default_rng(1)
    try:
        for k in range(40):
            write(w, k, t0)
        big = 7_000
        for k in range(40, 60):  # one device's samples of a large poll: ~50 KB a unit
            ts = t0 + k * 10**6 + np.arange(big, dtype=np.int64)
            w.write([Batch("d0", np.zeros(big, np.int32), ts, rng.normal(size=big), np.zeros(big, np.uint32))])
        committed = dict(w.db.execute("SELECT id, data FROM units"))
        sizes = [len(committed[i]) for i in range(1, 61)]
        assert min(sizes[40:]) > 40_000 > 100 > max(sizes[:40])
        o = Outbox(tmp_path)
        try:
            first = o.after(0, max_bytes=1000)  # at a first guess of the unit size; sets the estimate
            assert first.ids == list(range(1, len(first) + 1))
            small = o.after(first.last, max_bytes=1000)  # ~70 bytes a unit: about 1,000 bytes
            assert small.ids == list(range(first.last + 1, small.last + 1)) and 10 <= len(small) < 20
            assert 900 <= sum(map(len, small.data)) < 1100
            # 64 KiB at ~70 bytes a unit is ~900 units; the first 20 are small, the next 20
            # ~50 KB each: 1 MB, past the cap of max(256 KiB, 4 x 64 KiB).
            run = o.after(20, max_bytes=64 << 10)
            assert run.ids == list(range(21, 43)) and run.last == 42  # the unit that passes the bound is the last
            assert [bytes(b) for b in run.data] == [committed[i] for i in run.ids]
            assert sum(map(len, run.data)) < (64 << 10) + len(committed[42])
            after = o.after(42, max_bytes=1 << 20)  # the estimate follows: ~20 units a MB
            assert after.ids == list(range(43, 43 + len(after))) and 15 <= len(after) <= 18
            assert [bytes(b) for b in after.data] == [committed[i] for i in after.ids]
            whole = o.range(1, 60, "d0", max_bytes=64 << 20)
            assert whole.ids == [i for i in range(1, 61) if i > 40 or i % 2 == 1] and whole.last == 60
            assert [bytes(b) for b in whole.data] == [committed[i] for i in whole.ids]
        finally:
            o.close()
    finally:
        w.close()


def test_a_run_the_aggregate_cannot_split_is_read_row_by_row(tmp_path):
    """The run's columns come back joined (devices by a newline). A device name with a newline
    (possible through the Python API, not the config) splits into more items than units: the
    row does not check out, and the run is read a row per unit, bytes and names intact."""
    tags = [TagMeta(0, "line\n1", "a", ValueKind.NUMBER), TagMeta(1, "d1", "b", ValueKind.NUMBER)]
    w = StoreWriter(tmp_path, tags)
    t0 = time.time_ns()
    try:
        for k in range(6):
            ts = np.full(2, t0 + k * 10**6, np.int64)
            dev = "line\n1" if k % 2 == 0 else "d1"
            w.write([Batch(dev, np.full(2, k % 2, np.int32), ts, np.arange(2.0) + k, np.zeros(2, np.uint32))])
        committed = {i: (d, b) for i, d, b in w.db.execute("SELECT id, device, data FROM units")}
        o = Outbox(tmp_path)
        try:
            run = o.after(0, max_bytes=1 << 20)
            assert run.ids == [1, 2, 3, 4, 5, 6] and run.last == 6
            assert run.devices == ["line\n1", "d1"] * 3
            assert [(d, bytes(b)) for d, b in zip(run.devices, run.data, strict=True)] == [
                committed[i] for i in run.ids
            ]
            assert o.range(1, 9, "line\n1").ids == [1, 3, 5]
        finally:
            o.close()
    finally:
        w.close()


def test_a_utf16_store_is_read_row_by_row(tmp_path):
    """SQLite concatenates blobs as text, which a UTF-16 file would transcode. edgeos creates
    UTF-8 files only, but a file made UTF-16 before the store's tables (by hand) is read a row
    per unit, each unit's bytes exactly as committed."""
    db = sqlite3.connect(tmp_path / "edgeos.db")
    db.execute("PRAGMA encoding = 'UTF-16le'")
    db.execute("CREATE TABLE x(a)")
    db.execute("DROP TABLE x")
    db.close()
    w = StoreWriter(tmp_path, TAGS)
    t0 = time.time_ns()
    try:
        for k in range(8):
            write(w, k, t0)
        assert w.db.execute("PRAGMA encoding").fetchone()[0] == "UTF-16le"
        committed = {i: (d, b) for i, d, b in w.db.execute("SELECT id, device, data FROM units")}
        o = Outbox(tmp_path)
        try:
            run = o.after(0, max_bytes=1 << 20)
            assert run.ids == list(range(1, 9))
            assert [(d, bytes(b)) for d, b in zip(run.devices, run.data, strict=True)] == [
                committed[i] for i in run.ids
            ]
        finally:
            o.close()
    finally:
        w.close()
