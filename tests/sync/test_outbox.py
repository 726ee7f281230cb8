"""The store's outbox API (edgeos/store/outbox.py) and the replay window of forwarded units."""

from __future__ import annotations

import time

import numpy as np

from edgeos.model import Batch, TagMeta, ValueKind
from edgeos.store import StoreSettings, StoreWriter
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
