"""The PostgreSQL side on a real server: exactly-once ledger, schema versions, rollup, the view."""

from __future__ import annotations

import asyncio
import datetime as dt

import asyncpg
import numpy as np
import pytest

from edgeos import wire
from edgeos.collector import db as dbm
from edgeos.collector import schema

T0 = int(dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC).timestamp()) * 10**9


def unit(seq: int, n_tags: int = 5, *, device: str = "press1", sub_ms: bool = False) -> wire.Unit:
    tags = np.arange(n_tags, dtype=np.int32)
    ts = np.full(n_tags, T0 + seq * 1_000_000_000 + (1234 if sub_ms else 0), np.int64)
    values = (np.arange(n_tags) + seq * 0.5).astype(np.float64)
    return wire.Unit(device, tags, ts, values, np.zeros(n_tags, np.uint32))


async def fresh(dsn: str, gateway: str = "gw1", n_tags: int = 5, pack_min: int = 0) -> dbm.Database:
    d = dbm.Database(dsn, pack_min=pack_min)
    await d.connect()
    entries = {i: wire.TagEntry(i, "press1", f"t{i}", "number", "bar") for i in range(n_tags)}
    await d.save_dictionary(gateway, entries)
    return d


def pending(d: dbm.Database, gw: str, seqs, **kw) -> list[dbm.Pending]:
    out = []
    for s in seqs:
        u = unit(s, **kw)
        out.append(dbm.Pending(gw, s, u, d.tag_map(gw)[u.tags]))
    return out


async def test_duplicates_and_a_second_collector_write_each_unit_once(pg):
    _, dsn = pg
    a, b = await fresh(dsn), await fresh(dsn)
    w1 = await a.write(pending(a, "gw1", range(0, 10)))
    assert (w1.units, w1.duplicates, w1.samples) == (10, 0, 50)
    # The same units again (broker redelivery) and, at once, from a second collector, overlapping.
    r = await asyncio.gather(a.write(pending(a, "gw1", range(5, 20))), b.write(pending(b, "gw1", range(0, 25))))
    assert sum(x.units for x in r) == 15 and sum(x.duplicates for x in r) == 25
    n, total = await a.conn.fetchrow("SELECT count(*), sum(value) FROM samples")
    assert n == 25 * 5
    assert total == pytest.approx(sum(float(unit(s).values.sum()) for s in range(25)))
    assert await a.conn.fetchval("SELECT count(*) FROM units") == 25
    await a.close()
    await b.close()


async def test_a_batch_cut_off_mid_transaction_leaves_nothing(pg, monkeypatch):
    """The ledger rows are inserted, then the samples' COPY breaks: the commit never happens."""
    _, dsn = pg
    a = await fresh(dsn)
    batch = pending(a, "gw1", range(0, 3))
    with monkeypatch.context() as m:
        m.setattr(dbm.copy, "sample_rows", lambda *a, **k: b"\x00\x05broken row")
        with pytest.raises(dbm.DatabaseError):
            await a.write(batch)
    a2 = await fresh(dsn)
    assert await a2.conn.fetchval("SELECT count(*) FROM units") == 0
    assert await a2.conn.fetchval("SELECT count(*) FROM samples_recent") == 0
    assert (await a2.write(pending(a2, "gw1", range(0, 3)))).units == 3
    await a2.close()


async def test_a_newer_schema_is_refused(pg):
    _, dsn = pg
    a = await fresh(dsn)
    await a.conn.execute("UPDATE edgeos_collector SET version = $1", schema.SCHEMA_VERSION + 1)
    await a.close()
    conn = await asyncpg.connect(dsn)
    with pytest.raises(schema.SchemaError, match="newer"):
        await schema.migrate(conn)
    await conn.close()


async def test_a_version_1_database_is_migrated_and_keeps_its_samples(pg):
    """A database a schema-1 collector wrote (rows only) is brought to the current version at
    connect: its samples read the same through the view, and live rows join them."""
    _, dsn = pg
    conn = await asyncpg.connect(dsn)
    await conn.execute(schema._MIGRATIONS[1])  # noqa: SLF001 - the old schema, as it was
    await conn.execute("UPDATE edgeos_collector SET version = 1")
    await conn.close()
    old = dbm.Database(dsn, pack_min=0)
    old.conn = await asyncpg.connect(dsn)  # as a schema-1 collector: no migration
    await old.conn.execute(
        "CREATE TEMP TABLE incoming (gateway text, seq bigint, device text, samples integer, prev bigint) "
        "ON COMMIT DELETE ROWS"
    )
    await old.save_dictionary("gw1", {i: wire.TagEntry(i, "press1", f"t{i}", "number", "bar") for i in range(5)})
    await old.write(pending(old, "gw1", range(0, 3)))
    await old.close()
    d = await fresh(dsn, pack_min=16)  # connects: migrates
    assert await d.conn.fetchval("SELECT version FROM edgeos_collector") == schema.SCHEMA_VERSION
    await d.write(pending(d, "gw1", range(3, 5)))
    assert await d.conn.fetchval("SELECT count(*) FROM samples_live") == 1
    rows = await d.conn.fetch("SELECT ts, value FROM samples WHERE tag = 'gw1/press1/t1' ORDER BY ts")
    assert [r["value"] for r in rows] == [float(unit(s).values[1]) for s in range(5)]
    await d.close()


async def test_rollup_packs_hours_exactly_and_the_view_reads_both(pg):
    _, dsn = pg
    a = await fresh(dsn)
    await a.write(pending(a, "gw1", range(0, 100)))
    await a.write(pending(a, "gw1", range(100, 110), sub_ms=True))
    # One unit an hour later: stays a row.
    late = unit(4000)
    await a.write([dbm.Pending("gw1", 4000, late, a.tag_map("gw1")[late.tags])])
    before = await a.conn.fetch("SELECT tag, ts, value, quality FROM samples ORDER BY tag, ts")
    packed = await schema.rollup(a.conn, dt.datetime.fromtimestamp(T0 / 1e9 + 3600, dt.UTC))
    assert packed == 1
    assert await a.conn.fetchval("SELECT count(*) FROM samples_recent") == 5
    assert await a.conn.fetchval("SELECT count(*) FROM samples_packed") == 5  # one row per tag
    after = await a.conn.fetch("SELECT tag, ts, value, quality FROM samples ORDER BY tag, ts")
    assert [tuple(r) for r in after] == [tuple(r) for r in before]
    plan = "\n".join(
        r[0]
        for r in await a.conn.fetch(
            "EXPLAIN SELECT ts, value FROM samples WHERE tag = 'gw1/press1/t3' AND ts > now() - interval '1 day'"
        )
    )
    print(plan)
    assert "tags_key" in plan and "Index Cond: ((tag = t.id) AND (ts >" in plan
    await a.close()


async def test_retention_drops_whole_partitions(pg):
    _, dsn = pg
    a = await fresh(dsn)
    await a.write(pending(a, "gw1", range(0, 10)))
    await schema.rollup(a.conn, dt.datetime.fromtimestamp(T0 / 1e9 + 7200, dt.UTC))
    assert await a.conn.fetchval("SELECT count(*) FROM samples") == 50
    await schema.drop_older(a.conn, dt.datetime.fromtimestamp(T0 / 1e9 + 2 * 86400, dt.UTC))
    assert await a.conn.fetchval("SELECT count(*) FROM samples") == 0
    await a.close()


async def test_samples_between_reads_only_the_windows_it_needs(pg):
    _, dsn = pg
    a = await fresh(dsn)
    await a.write(pending(a, "gw1", range(0, 100)))
    await a.write(pending(a, "gw1", [4000, 8000]))
    await schema.rollup(a.conn, dt.datetime.fromtimestamp(T0 / 1e9 + 7200, dt.UTC))
    lo = dt.datetime.fromtimestamp(T0 / 1e9 + 10, dt.UTC)
    hi = dt.datetime.fromtimestamp(T0 / 1e9 + 4001, dt.UTC)
    by_fn = await a.conn.fetch("SELECT ts, value FROM samples_between('gw1/press1/t2', $1, $2) ORDER BY ts", lo, hi)
    by_view = await a.conn.fetch(
        "SELECT ts, value FROM samples WHERE tag = 'gw1/press1/t2' AND ts >= $1 AND ts < $2 ORDER BY ts", lo, hi
    )
    assert [tuple(r) for r in by_fn] == [tuple(r) for r in by_view] and len(by_fn) == 91
    await a.close()


async def test_a_backlog_batch_written_packed_reads_back_as_rows_would(pg_cluster):
    """The same units into two databases, as rows (pack_min=0) and packed where a tag has 16
    samples in an hour of the batch: the view shows the same samples, bit for bit."""
    rng = np.random.default_rng(7)
    units = []
    for s in range(60):
        n = 5
        ts = np.full(n, T0 + 3_540_000_000_000 + s * 2_000_000_000, np.int64)  # crosses an hour
        ts += rng.integers(0, 3, n) * 1234  # sub-millisecond parts in some
        q = np.where(rng.random(n) < 0.2, 0x80000000, 0).astype(np.uint32)
        units.append(wire.Unit("press1", np.arange(n, dtype=np.int32), ts, rng.normal(size=n), q))
    units.append(
        wire.Unit(
            "press1",
            np.array([1], np.int32),
            np.array([T0], np.int64),
            np.array([2.5]),
            np.zeros(1, np.uint32),
            ["text"],
        )
    )
    out = []
    for name, pack_min in [("rows_db", 0), ("packed_db", 16)]:
        d = await fresh(pg_cluster.create_database(name), pack_min=pack_min)
        await d.write([dbm.Pending("gw1", i + 1, u, d.tag_map("gw1")[u.tags]) for i, u in enumerate(units)])
        out.append(await d.conn.fetch("SELECT tag, ts, value, quality, text FROM samples ORDER BY tag, ts, value"))
        n_packed = await d.conn.fetchval("SELECT count(*) FROM samples_packed")
        n_rows = await d.conn.fetchval("SELECT count(*) FROM samples_recent")
        assert (n_packed, n_rows) == ((0, 301) if pack_min == 0 else (10, 1))
        await d.close()
    assert [tuple(r) for r in out[0]] == [tuple(r) for r in out[1]]
    assert len(out[0]) == 301


async def test_rollup_merges_packed_pieces_and_rows_of_an_hour_into_one_row_per_tag(pg):
    _, dsn = pg
    d = await fresh(dsn, pack_min=16)
    for first in (0, 40, 80):  # three backlog batches: three packed pieces per tag
        await d.write(pending(d, "gw1", range(first, first + 40)))
    await d.write(pending(d, "gw1", [120]))  # and a live row, moved into a fourth piece
    before = await d.conn.fetch("SELECT tag, ts, value, quality FROM samples ORDER BY tag, ts")
    assert await d.conn.fetchval("SELECT count(*) FROM samples_packed") == 15
    assert await d.conn.fetchval("SELECT count(*) FROM samples_live") == 1
    assert await d.pack_live() == 5
    assert await d.conn.fetchval("SELECT count(*) FROM samples_pieces") == 5
    assert [tuple(r) for r in await d.conn.fetch("SELECT tag, ts, value, quality FROM samples ORDER BY tag, ts")] == [
        tuple(r) for r in before
    ]
    assert await schema.rollup(d.conn, dt.datetime.fromtimestamp(T0 / 1e9 + 3600, dt.UTC)) == 1
    assert await d.conn.fetchval("SELECT count(*) FROM samples_packed") == 5
    assert await d.conn.fetchval("SELECT count(*) FROM samples_recent") == 0
    assert await d.conn.fetchval("SELECT count(*) FROM samples_pieces") == 0
    after = await d.conn.fetch("SELECT tag, ts, value, quality FROM samples ORDER BY tag, ts")
    assert [tuple(r) for r in after] == [tuple(r) for r in before] and len(after) == 121 * 5
    # The merged pieces' dead space goes once the day is over.
    day_over = dt.datetime.fromtimestamp(T0 / 1e9 + 86400, dt.UTC)
    assert await schema.rewrite_closed_days(d.conn, day_over) == 1
    assert await schema.rewrite_closed_days(d.conn, day_over) == 0
    again = await d.conn.fetch("SELECT tag, ts, value, quality FROM samples ORDER BY tag, ts")
    assert [tuple(r) for r in again] == [tuple(r) for r in before]
    await d.close()


async def test_live_units_are_one_row_a_device_then_packed_pieces_then_rolled_up(pg_cluster):
    """Live traffic (one sample a tag in a batch) into two databases, as rows (pack_min=0) and
    as live rows of arrays: the view and samples_between show the same samples, bit for bit,
    before and after maintenance moves the live rows into packed pieces and the rollup merges
    those; a redelivery writes nothing."""
    rng = np.random.default_rng(11)
    batches = []
    for s in range(40):
        n = 5
        ts = np.full(n, T0 + 3_580_000_000_000 + s * 1_000_000_000, np.int64)  # crosses an hour
        ts += rng.integers(0, 3, n) * 1234  # sub-millisecond parts in some
        q = np.where(rng.random(n) < 0.2, 0x80000000, 0).astype(np.uint32)
        u = wire.Unit("press1", np.arange(n, dtype=np.int32), ts, rng.normal(size=n), q)
        v = wire.Unit("press2", np.arange(n, 2 * n, dtype=np.int32), ts + 5, rng.normal(size=n), np.zeros(n, np.uint32))
        batches.append([(2 * s + 1, u), (2 * s + 2, v)])
    q_all = "SELECT tag, ts, value, quality, text FROM samples ORDER BY tag, ts, value"
    q_fn = "SELECT ts, value, quality FROM samples_between('gw1/press2/t7', $1, $2) ORDER BY ts"
    lo, hi = dt.datetime.fromtimestamp(T0 / 1e9, dt.UTC), dt.datetime.fromtimestamp(T0 / 1e9 + 7200, dt.UTC)
    seen = []
    for name, pack_min in [("live_rows_db", 0), ("live_db", 16)]:
        d = dbm.Database(pg_cluster.create_database(name), pack_min=pack_min)
        await d.connect()
        entries = {i: wire.TagEntry(i, "press1" if i < 5 else "press2", f"t{i}", "number", "") for i in range(10)}
        await d.save_dictionary("gw1", entries)
        for b in batches:
            w = await d.write([dbm.Pending("gw1", seq, u, d.tag_map("gw1")[u.tags]) for seq, u in b])
            assert (w.units, w.samples) == (2, 10)
        again = await d.write([dbm.Pending("gw1", seq, u, d.tag_map("gw1")[u.tags]) for seq, u in batches[3]])
        assert (again.units, again.duplicates) == (0, 2)
        states = [await d.conn.fetch(q_all)]
        fn = [await d.conn.fetch(q_fn, lo, hi)]
        live = await d.conn.fetchval("SELECT count(*) FROM samples_live")
        recent = await d.conn.fetchval("SELECT count(*) FROM samples_recent")
        assert (live, recent) == ((0, 400) if pack_min == 0 else (80, 0))  # a row a device and batch
        if pack_min:
            assert await d.pack_live(rows_per_txn=7) == 400  # in slices of 7 rows
            assert await d.conn.fetchval("SELECT count(*) FROM samples_live") == 0
            # a piece per tag and hour of each slice: more than the 10 tags x 2 hours rolled up
            assert await d.conn.fetchval("SELECT count(*) FROM samples_pieces") > 20
            assert await d.conn.fetchval("SELECT count(*) FROM samples_packed") == 0
            states.append(await d.conn.fetch(q_all))
            fn.append(await d.conn.fetch(q_fn, lo, hi))
        await schema.rollup(d.conn, dt.datetime.fromtimestamp(T0 / 1e9 + 3 * 3600, dt.UTC))
        assert await d.conn.fetchval("SELECT count(*) FROM samples_packed") == 20
        assert await d.conn.fetchval("SELECT count(*) FROM samples_pieces") == 0
        # Live traffic leaves no dead space in the day's packed partition: no day to rewrite.
        assert await d.conn.fetchval("SELECT count(*) FROM packed_dirty") == 0
        states.append(await d.conn.fetch(q_all))
        fn.append(await d.conn.fetch(q_fn, lo, hi))
        seen.append(([[tuple(r) for r in x] for x in states], [[tuple(r) for r in x] for x in fn]))
        await d.close()
    (rows_states, rows_fn), (live_states, live_fn) = seen
    assert len(rows_states[0]) == 400 and len(rows_fn[0]) == 40
    for state in rows_states[1:] + live_states:
        assert state == rows_states[0]
    for got in rows_fn[1:] + live_fn:
        assert got == rows_fn[0]


async def test_the_first_maintenance_comes_soon_after_start_not_a_whole_period_later(pg, monkeypatch):
    """A collector restarted more often than `maintain_every` still maintains: its first pass
    comes FIRST_MAINTENANCE_S after start (shortened here), though maintain_every is an hour."""
    import types
    from pathlib import Path

    from edgeos.collector import service
    from edgeos.collector.config import CollectorConfig

    _, dsn = pg
    d = await fresh(dsn, pack_min=16)
    await d.write(pending(d, "gw1", range(1, 4)))
    assert await d.conn.fetchval("SELECT count(*) FROM samples_live") == 1  # a row a device and batch
    monkeypatch.setattr(service, "FIRST_MAINTENANCE_S", 0.2)
    cfg = CollectorConfig(path=Path("collector.toml"), broker={}, dsn=dsn)
    cfg.maintain_every = 3600.0
    owner = types.SimpleNamespace(cfg=cfg, db=types.SimpleNamespace(password=None))
    task = asyncio.create_task(service.Collector._maintenance(owner))
    try:
        for _ in range(100):  # 10 s at most
            if await d.conn.fetchval("SELECT count(*) FROM samples_live") == 0:
                break
            await asyncio.sleep(0.1)
        assert await d.conn.fetchval("SELECT count(*) FROM samples_live") == 0
        assert await d.conn.fetchval("SELECT sum(samples) FROM units") == 15
        assert await d.conn.fetchval("SELECT count(*) FROM samples") == 15  # moved, not lost
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await d.close()
