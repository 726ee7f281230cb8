"""Plant collector: decoded units into PostgreSQL, its size on disk, and a 24 h query.

A throwaway PostgreSQL (tests/peers/postgres.py: initdb in a temp dir, random port) on this
machine. Messages are encoded beforehand by `edgeos.wire` exactly as gateways publish them; the
timed path is the collector's own (`Collector._handle`: decode, tag ids, one COPY transaction
per batch, ledger) with the broker replaced by a list, so the figure is the collector's and
PostgreSQL's, not mosquitto's.

- samples_per_s: 1,000-tag units (one poll of a 1,000-tag gateway) into PostgreSQL by the
  collector's two writer connections (`writers = 2`, the default), with CPU %
  of this process (the collector) and of the PostgreSQL server processes over the same interval.
- bytes_per_sample_pg: after rollup into per-tag hour rows, tables + indexes + the units ledger
  divided by samples, for a plant of 1,000 tags polled at 1 s (values quantised like registers,
  timestamps jittered by a few ms like real polls). The layout is per hour, so a day is 24 such
  hours; --quick stores 1 hour, the full run 4.
- query_24h_ms: one tag's last 24 h (86,400 samples, packed) through the `samples` view, the
  issue's example query, median of 7: executed by the server (EXPLAIN ANALYZE), and separately
  fetched into Python (asyncpg building 86,400 datetime objects is most of that).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from edgeos import wire

HERE = Path(__file__).resolve().parent


def _postgres():
    spec = importlib.util.spec_from_file_location(
        "edgeos_peers_postgres", HERE.parent / "tests" / "peers" / "postgres.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cpu_of(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError):
            pass
    return total


def _children(ppid: int) -> list[int]:
    out = [ppid]
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == ppid:
                    out.append(int(p.name))
            except (OSError, IndexError):
                pass
    return out


def _plant_units(gateway: str, tags: int, seconds: int, start_s: int, seed: int = 1):
    """One unit per second of a `tags`-tag device: register-like values, jittered timestamps."""
    rng = np.random.default_rng(seed)
    ids = np.arange(tags, dtype=np.int32)
    level = rng.normal(50, 10, tags)
    for s in range(seconds):
        level += rng.normal(0, 0.05, tags)
        values = np.round(level, 1)
        ts = (start_s + s) * 10**9 + rng.integers(0, 8, tags) * 1_000_000  # ms jitter of a poll
        yield s, wire.encode_unit("plc", ids, ts.astype(np.int64), values, np.zeros(tags, np.uint32))


class _Session:
    where = "bench"

    def ack(self, msg) -> None:
        pass


async def _collector(dsn: str, gateway: str, tags: int):
    from edgeos.collector.config import CollectorConfig
    from edgeos.collector.service import Collector

    cfg = CollectorConfig(
        path=Path("bench.toml"), broker={"servers": [("127.0.0.1", 1)], "receive_maximum": 64}, dsn=dsn
    )
    c = Collector(cfg)
    await c.db.connect()
    for w in c.writers:
        await w.connect()
    await c.db.save_dictionary(gateway, {i: wire.TagEntry(i, "plc", f"t{i}", "number", "") for i in range(tags)})
    return c


def _messages(gateway: str, tags: int, seconds: int, start_s: int, per_message: int = 1):
    from edgeos.collector.mqtt import Incoming

    out, seqs, units = [], [], []
    for s, u in _plant_units(gateway, tags, seconds, start_s):
        seqs.append(s + 1)
        units.append(u)
        if len(units) == per_message:
            out.append(
                Incoming(f"edgeos/{gateway}/plc/data", wire.encode_message(gateway, "plc", seqs, units, tags), 0, 0)
            )
            seqs, units = [], []
    return out


async def _throughput(pg, quick: bool):
    dsn = pg.create_database("throughput")
    tags, seconds = 1000, 200 if quick else 600
    now_s = int(time.time()) - seconds
    msgs = _messages("gw-t", tags, seconds, now_s, per_message=10)
    c = await _collector(dsn, "gw-t", tags)
    session = _Session()
    batch = 20  # messages (200 units, 200,000 samples) per transaction
    pids = _children(pg.proc.pid)
    cpu0, pg0, t0 = time.process_time(), _cpu_of(pids), time.perf_counter()
    batches = iter([msgs[i : i + batch] for i in range(0, len(msgs), batch)])

    async def writer(db) -> None:
        for b in batches:
            await c._handle(session, b, db)  # noqa: SLF001 - the collector's own batch path

    await asyncio.gather(*(writer(w) for w in c.writers))
    wall = time.perf_counter() - t0
    cpu, pgcpu = time.process_time() - cpu0, _cpu_of(pids) - pg0
    n = c.metrics.samples_written
    assert n == tags * seconds, (n, tags * seconds)
    for d in [c.db, *c.writers]:
        await d.close()
    return n / wall, 100 * cpu / wall, 100 * pgcpu / wall


async def _size_and_query(pg, quick: bool):
    import asyncpg

    from edgeos.collector import schema

    dsn = pg.create_database("plantday")
    tags, hours = 1000, 1 if quick else 4
    day0 = (int(time.time()) // 86400 - 2) * 86400
    c = await _collector(dsn, "gw-p", tags)
    session = _Session()
    written = 0
    for h in range(hours):
        msgs = _messages("gw-p", tags, 3600, day0 + h * 3600)
        for i in range(0, len(msgs), 200):
            await c._handle(session, msgs[i : i + 200])  # noqa: SLF001
        written = c.metrics.samples_written
    # A 10-tag gateway with a whole day for the 24 h query.
    c2 = await _collector(dsn, "line1-gw", 10)
    now_s = int(time.time())
    msgs = _messages("line1-gw", 10, 86400, now_s - 86400 + 300, per_message=60)  # all inside the 24 h
    for i in range(0, len(msgs), 50):
        await c2._handle(session, msgs[i : i + 50])  # noqa: SLF001
    conn = await asyncpg.connect(dsn)
    try:
        await schema.rollup(conn, dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))
        await conn.execute("VACUUM ANALYZE")
        size = await conn.fetchval(
            """SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c
               JOIN pg_inherits i ON i.inhrelid = c.oid
               WHERE i.inhparent IN ('samples_packed'::regclass, 'samples_recent'::regclass)"""
        )
        packed_gw_p = await conn.fetchval(
            """SELECT sum(pg_column_size(p.*)) FROM samples_packed p JOIN tags t ON t.id = p.tag
               WHERE t.gateway = 'gw-p'"""
        )
        total_packed = await conn.fetchval("SELECT sum(pg_column_size(p.*)) FROM samples_packed p")
        ledger = await conn.fetchval("SELECT pg_total_relation_size('units')")
        # The plant's share: its rows' share of the packed partitions, plus its ledger rows.
        units_gw_p = await conn.fetchval("SELECT count(*) FROM units WHERE gateway = 'gw-p'")
        units_all = await conn.fetchval("SELECT count(*) FROM units")
        plant_bytes = float(size) * float(packed_gw_p) / float(total_packed) + ledger * units_gw_p / units_all
        times, fetch = [], []
        q = "SELECT ts, value FROM samples WHERE tag = 'line1-gw/plc/t3' AND ts > now() - interval '1 day'"
        for _ in range(7):
            plan = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + q)
            times.append(json.loads(plan)[0]["Execution Time"] / 1000)
            t0 = time.perf_counter()
            rows = await conn.fetch(q)
            fetch.append(time.perf_counter() - t0)
        assert len(rows) == 86400, len(rows)
    finally:
        await conn.close()
    await c.db.close()
    await c2.db.close()
    return plant_bytes / written, float(np.median(times)) * 1000, float(np.median(fetch)) * 1000, written


def run(quick: bool):
    pgmod = _postgres()
    pg = pgmod.Postgres(settings={"shared_buffers": "512MB", "max_wal_size": "4GB"})
    pg.start()
    try:
        rate, cpu, pgcpu = asyncio.run(_throughput(pg, quick))
        yield "samples_per_s", rate, "samples/s"
        yield "collector_cpu", cpu, "%"
        yield "postgres_cpu", pgcpu, "%"
        per_sample, q_ms, fetch_ms, n = asyncio.run(_size_and_query(pg, quick))
        yield "bytes_per_sample_pg", per_sample, f"B/sample (rolled up, {n} samples; gateway store ~1.2)"
        yield "query_24h_ms", q_ms, "ms (server: executed, 86,400 rows)"
        yield "query_24h_fetch_ms", fetch_ms, "ms (the same rows fetched into Python by asyncpg)"
    finally:
        pg.close()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    for f, v, u in run("--quick" in sys.argv):
        print(f"collector.{f}: {v:.4g} {u}")
