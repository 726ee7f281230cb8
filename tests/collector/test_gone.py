"""A range the gateway's retention dropped before the replay: recorded gone, never asked again."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sqlite3
import sys
import time
from pathlib import Path

import asyncpg
import numpy as np

from edgeos import wire
from edgeos.config import load_config

_spec = importlib.util.spec_from_file_location("edgeos_test_plant", Path(__file__).with_name("plant.py"))
plant = sys.modules.get("edgeos_test_plant") or importlib.util.module_from_spec(_spec)
if "edgeos_test_plant" not in sys.modules:
    sys.modules["edgeos_test_plant"] = plant
    _spec.loader.exec_module(plant)
free_port = sys.modules["edgeos_test_sync_peers"].free_port

TAGS = 7


def add_units(data_dir: Path, first: int, count: int, *, age_s: float = 0.0) -> None:
    """Units `first`.. over two devices, written into the store file as the writer would."""
    from edgeos.store import schema

    data_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(data_dir / "edgeos.db")
    if first == 1:
        schema.create(db)
        db.execute("PRAGMA journal_mode=WAL")
        db.executemany(
            "INSERT INTO tags(id, device, name, kind) VALUES(?, 'd0', ?, 'number')",
            [(i, f"t{i}") for i in range(1, TAGS + 1)],
        )
    now = time.time_ns() - int(age_s * 1e9)
    rng = np.random.default_rng(first)
    rows = []
    for k in range(first, first + count):
        ts = now + k * 10**6 + np.arange(20, dtype=np.int64) * 1000
        blob = wire.encode_unit(
            f"d{k % 2}", np.arange(20, dtype=np.int32) % TAGS + 1, ts, rng.random(20), np.zeros(20, np.uint32)
        )
        rows.append((k, f"d{k % 2}", int(ts.min()), int(ts.max()), 20, blob))
    with db:
        db.executemany("INSERT INTO units(id, device, t_min, t_max, n, data) VALUES(?,?,?,?,?,?)", rows)
    db.commit()
    db.close()


async def test_a_range_dropped_by_retention_before_the_replay_is_recorded_gone(tmp_path, pg, make_mosquitto):
    from edgeos.store import StoreSettings, StoreWriter
    from edgeos.sync import Sync
    from edgeos.sync.mqtt import MqttTransport

    _, dsn = pg
    broker = make_mosquitto(persistence=False)
    port = free_port()
    col = plant.collector(plant.collector_config(tmp_path / "c", "col", [broker.port], dsn, port))
    gwdir = tmp_path / "gw"
    gwdir.mkdir()
    (gwdir / "edgeos.toml").write_text(
        f"""
[gateway]
id = "gw1"
data_dir = "data"
[[devices]]
name = "d0"
protocol = "simulated"
tags = [{{ name = "t1" }}]
[upstream]
enabled = true
host = "127.0.0.1"
port = {broker.port}
reconnect_min = "50ms"
reconnect_max = "300ms"
"""
    )
    cfg = load_config(gwdir / "edgeos.toml")
    data = cfg.gateway.data_dir
    add_units(data, 1, 100, age_s=2 * 86400)  # 1..100: two days old
    add_units(data, 101, 10)
    col.start()
    await plant.healthy(port)
    col.stop()  # offline: the broker queues for its session
    sync = Sync(
        cfg.gateway.id,
        data,
        cfg.upstream.options,
        MqttTransport(cfg.gateway.id, cfg.upstream.options, cfg.source.parent),
    )
    task = asyncio.create_task(sync.run())
    conn = await asyncpg.connect(dsn)
    try:
        async with asyncio.timeout(20):
            while sync.cursor < 110:
                await asyncio.sleep(0.05)
        broker.stop()  # forgets the queue it acknowledged
        broker.start()
        # Retention drops 1..100 before anyone asks for them.
        w = StoreWriter(data, (), StoreSettings(retention_ns=86_400 * 10**9))
        try:
            w.trim(time.time_ns())
        finally:
            w.close()
        col.start()
        await plant.healthy(port)
        add_units(data, 111, 10)  # their predecessors (110, 109) were lost on the way
        async with asyncio.timeout(30):
            while True:
                counts = dict(await conn.fetch("SELECT state, count(*) FROM gaps GROUP BY state"))
                if counts.get("gone") and not counts.get("open"):
                    break
                await asyncio.sleep(0.2)
        seqs = [r[0] for r in await conn.fetch("SELECT seq FROM units ORDER BY seq")]
        assert seqs == list(range(101, 121))  # replayed 101..110, the rest as sent; 1..100 gone
        gone = await conn.fetch("SELECT first_seq, last_seq FROM gaps WHERE state = 'gone' ORDER BY 1")
        assert all(r["last_seq"] <= 100 for r in gone)
        assert await conn.fetchval("SELECT count(*) FROM samples") == 20 * 20
        # Not asked for again: the request count stays put.
        asked = plant.metrics(port)["edgeos_collector_replay_requests_total"]
        await asyncio.sleep(3.0)
        assert plant.metrics(port)["edgeos_collector_replay_requests_total"] == asked
    finally:
        await conn.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        sync.close()
        col.stop()
