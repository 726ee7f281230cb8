"""Upstream sync against a real mosquitto: nothing lost, in order, deduplicable, bounded."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeos import wire
from edgeos.config import load_config
from edgeos.runtime import Runtime

DEVICES = """
[[devices]]
name = "press"
protocol = "simulated"
poll_interval = "20ms"
tags = [{ name = "a" }, { name = "b", signal = "text" }, { name = "c", signal = "random_walk" }]

[[devices]]
name = "oven"
protocol = "simulated"
poll_interval = "30ms"
tags_csv = "oven.csv"
"""
OVEN = "name,signal\n" + "".join(f"z{i},sine\n" for i in range(40))


def config(write_config, port: int, upstream: str = "", store: str = "") -> Path:
    body = f"""
[gateway]
id = "gw1"
data_dir = "data"
shutdown_timeout = "5s"
[store]
commit_interval = "50ms"
{store}
{DEVICES}
[upstream]
enabled = true
host = "127.0.0.1"
port = {port}
reconnect_min = "50ms"
reconnect_max = "300ms"
{upstream}
"""
    return write_config(body, oven__csv=OVEN)


def stored_units(data_dir: Path) -> dict[int, tuple[str, bytes]]:
    db = sqlite3.connect(f"{(data_dir / 'edgeos.db').as_uri()}?mode=ro", uri=True)
    try:
        return {i: (d, b) for i, d, b in db.execute("SELECT id, device, data FROM units")}
    finally:
        db.close()


async def wait_until(pred, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.05)


def assert_exactly_once_in_order(got, data_dir: Path) -> None:
    from edgeos import wire

    stored = stored_units(data_dir)
    units = got.units()
    assert [s for s, _, _ in units] == sorted(stored), "every stored unit, once each"
    for seq, device, unit in units:
        d, blob = stored[seq]
        assert device == d
        expect = wire.decode_unit(blob)
        assert unit.ts.tobytes() == expect.ts.tobytes() and unit.values.tobytes() == expect.values.tobytes()
    # In order per device: timestamps never go back along the sequence.
    for device in {d for _, d, _ in units}:
        firsts = [u.ts.min() for _, d, u in units if d == device]
        assert firsts == sorted(firsts)


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_steady_state_every_sample_arrives_in_order(write_config, broker, subscribe, version):
    cfg = load_config(config(write_config, broker.port, f'mqtt_version = "{version}"\n'))
    async with subscribe(broker) as got:
        rt = Runtime(cfg)
        task = asyncio.create_task(rt.run())
        await asyncio.sleep(1.5)
        await wait_until(lambda: rt.sync.status.published_samples > 500)
        rt.stop()
        await asyncio.wait_for(task, 20)
        await wait_until(lambda: {s for s, _, _ in got.units()} >= set(stored_units(cfg.gateway.data_dir)))
    assert_exactly_once_in_order(got, cfg.gateway.data_dir)
    # Arrival order per device is already sequence order in steady state (no redelivery here).
    for device in ("press", "oven"):
        seqs = [s for m in got.messages if m.device == device for s in m.seqs]
        assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    assert got.status[0]["state"] == "online" and got.status[-1]["state"] == "offline"
    assert {t.key for t in got.dictionary.values()} >= {"press/a", "press/b", "oven/z39"}
    units = got.units()
    text = [u.text for _, d, u in units if d == "press" and u.text is not None]
    assert text and any(t in ("RUN", "IDLE", "ALARM") for t in text[0])
    with sqlite3.connect(cfg.gateway.data_dir / "edgeos.db") as db:
        cursor = int(db.execute("SELECT value FROM meta WHERE key='sync_cursor'").fetchone()[0])
    assert cursor == max(stored_units(cfg.gateway.data_dir))
    # The status written at the stop shows the cursor and head as they ended, not a second old.
    from edgeos.service.status import read_status

    final, _ = read_status(cfg.gateway.data_dir)
    assert final["stopped"] and final["sync"]["cursor"] == cursor == final["sync"]["head"]
    assert final["sync"]["backlog_units"] == 0


async def test_broker_outage_during_ingest_loses_nothing(write_config, broker, subscribe):
    cfg = load_config(config(write_config, broker.port))
    async with subscribe(broker) as got:
        rt = Runtime(cfg)
        task = asyncio.create_task(rt.run())
        await wait_until(lambda: rt.sync is not None and rt.sync.status.published_samples > 200)
        broker.stop()  # the broker goes away while devices keep producing
        await asyncio.sleep(1.5)
        assert rt.sync.status.state != "connected" and rt.store.counters.committed_samples > 0
        broker.start()  # same port, persistent sessions restored
        await wait_until(lambda: rt.sync.status.connects >= 2)
        await wait_until(lambda: rt.sync.cursor >= max(stored_units(cfg.gateway.data_dir)) - 20)
        rt.stop()
        await asyncio.wait_for(task, 20)
        await wait_until(lambda: {s for s, _, _ in got.units()} >= set(stored_units(cfg.gateway.data_dir)))
    assert_exactly_once_in_order(got, cfg.gateway.data_dir)


async def test_sigkill_of_edgeos_mid_stream_loses_nothing(write_config, broker, subscribe):
    cfg_path = config(write_config, broker.port)
    cfg = load_config(cfg_path)
    edgeos = str(Path(sys.executable).with_name("edgeos"))
    async with subscribe(broker) as got:
        for round_ in range(2):
            proc = subprocess.Popen([edgeos, "run", "-c", str(cfg_path)], stderr=subprocess.DEVNULL)  # noqa: ASYNC220
            try:
                await wait_until(lambda n=round_: got.deliveries() > 100 * (n + 1))
                await asyncio.sleep(0.3)
            finally:
                proc.send_signal(signal.SIGKILL if round_ == 0 else signal.SIGTERM)
                proc.wait(20)
        await wait_until(lambda: {s for s, _, _ in got.units()} >= set(stored_units(cfg.gateway.data_dir)))
    assert_exactly_once_in_order(got, cfg.gateway.data_dir)
    assert got.deliveries() >= len(got.units())  # redelivery after the kill is deduplicated


async def test_refused_credentials_are_clear_and_data_stays_local(
    write_config, make_broker, tmp_path, caplog, subscribe
):
    b = make_broker(users={"gw1": "right"})
    (tmp_path / "pw").write_text("wrong\n")
    (tmp_path / "pw").chmod(0o600)  # a secret file others may read is warned about (issue 28)
    cfg = load_config(config(write_config, b.port, 'username = "gw1"\npassword_file = "pw"\n'))
    caplog.set_level("ERROR", logger="edgeos.sync")
    rt = Runtime(cfg)
    task = asyncio.create_task(rt.run())
    await wait_until(lambda: rt.sync is not None and rt.sync.status.failures >= 3)
    stored_before = rt.store.counters.committed_samples  # committed; stored once fsynced (I3)
    await asyncio.sleep(0.3)
    rt.stop()
    await asyncio.wait_for(task, 20)
    assert "refused the credentials" in caplog.text
    assert len([r for r in caplog.records if "credentials" in r.getMessage()]) == 1  # rate limited
    assert rt.counters.stored > stored_before > 0 and rt.sync.status.published_samples == 0
    # Fixed credentials: everything that accumulated goes out.
    (tmp_path / "pw").write_text("right\n")
    async with subscribe(b, username="gw1", password="right") as got:
        rt = Runtime(cfg)
        task = asyncio.create_task(rt.run())
        await wait_until(lambda: rt.sync.cursor >= rt.sync.status.head > 0, 30)
        rt.stop()
        await asyncio.wait_for(task, 20)
        await wait_until(lambda: {s for s, _, _ in got.units()} >= set(stored_units(cfg.gateway.data_dir)))
    assert_exactly_once_in_order(got, cfg.gateway.data_dir)


@pytest.mark.parametrize("san, ok", [("IP:127.0.0.1", True), ("DNS:someone-else.example", False)])
async def test_tls_verifies_the_broker_hostname(write_config, make_broker, tmp_path, caplog, certs, san, ok):
    certs = certs(tmp_path / "certs", san)
    b = make_broker(tls=certs)
    cfg = load_config(config(write_config, b.port, f'tls = true\nca_file = "{certs["ca"]}"\n'))
    caplog.set_level("ERROR", logger="edgeos.sync")
    rt = Runtime(cfg)
    task = asyncio.create_task(rt.run())
    if ok:
        await wait_until(lambda: rt.sync is not None and rt.sync.status.published_samples > 100)
    else:
        await wait_until(lambda: rt.sync is not None and rt.sync.status.failures >= 2)
    rt.stop()
    await asyncio.wait_for(task, 20)
    if not ok:
        assert "certificate" in caplog.text and "failed verification" in caplog.text
        assert rt.sync.status.published_samples == 0 and rt.counters.stored > 0


async def test_backlog_drain_respects_the_rate_cap_and_live_data_flows(write_config, broker, subscribe):
    import numpy as np

    from edgeos import Batch
    from edgeos.store import StoreWriter

    cap = 400_000  # bytes/s
    cfg = load_config(config(write_config, broker.port, f'rate_limit_bytes = "{cap}B"\n'))
    # A backlog, as an outage leaves it: 150 units of 1,000 samples already stored (version-3
    # units of random floats are about 8 KB each).
    w = StoreWriter(cfg.gateway.data_dir, cfg.tags)
    rng = np.random.default_rng(0)
    t0 = time.time_ns() - 3600 * 10**9
    for k in range(150):
        ts = t0 + (k * 1000 + np.arange(1000)) * 10**6
        w.write(
            [
                Batch(
                    "press", np.tile([0, 2], 500).astype(np.int32), ts, rng.normal(size=1000), np.zeros(1000, np.uint32)
                )
            ]
        )
    w.close()
    backlog = stored_units(cfg.gateway.data_dir)
    backlog_bytes = sum(len(b) for _, b in backlog.values())
    assert backlog_bytes > 2 * cap
    async with subscribe(broker) as got:
        rt = Runtime(cfg)
        task = asyncio.create_task(rt.run())
        start = time.monotonic()
        await wait_until(lambda: {s for s, _, _ in got.units()} >= set(backlog), 60)
        elapsed = time.monotonic() - start
        live_seen_during_drain = any(s > max(backlog) for m in got.messages for s in m.seqs)
        rt.stop()
        await asyncio.wait_for(task, 20)
    # One second of burst, then no faster than the cap.
    assert elapsed >= (backlog_bytes - cap) / cap * 0.9, (elapsed, backlog_bytes)
    assert live_seen_during_drain, "live data waited for the whole backlog"


READ_ONLY_DATA = "topic read edgeos/#\ntopic write edgeos/gw1/status\ntopic write edgeos/gw1/tags\n"


def meta_cursor(data_dir: Path) -> int:
    db = sqlite3.connect(f"{(data_dir / 'edgeos.db').as_uri()}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key='sync_cursor'").fetchone()
        return int(row[0]) if row else 0
    finally:
        db.close()


def unit_counts(data_dir: Path) -> tuple[int, int, int]:
    """(units stored, of which compacted, highest id)."""
    db = sqlite3.connect(f"{(data_dir / 'edgeos.db').as_uri()}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*), COALESCE(SUM(compacted), 0), COALESCE(MAX(id), 0) FROM units").fetchone()
    finally:
        db.close()


async def test_a_refused_publish_holds_the_cursor_and_is_retried(write_config, make_broker, subscribe, caplog):
    # MQTT 5: the broker's ACL makes the data topics read-only, so every data PUBACK carries
    # reason 0x87 (not authorized). Nothing may count as delivered.
    b = make_broker(acl=READ_ONLY_DATA)
    cfg = load_config(config(write_config, b.port, store='compact_after = "1s"\n'))
    caplog.set_level("ERROR", logger="edgeos.sync")
    async with subscribe(b) as got:
        rt = Runtime(cfg)
        task = asyncio.create_task(rt.run())
        await wait_until(lambda: rt.sync is not None and rt.sync.status.failures >= 3)
        # Compaction runs meanwhile: its units are kept raw until the broker has them.
        await wait_until(lambda: unit_counts(cfg.gateway.data_dir)[1] > 0)
        await asyncio.sleep(1.2)  # at least one more maintenance round persisting the cursor
        assert rt.sync.cursor == 0 and rt.sync.status.cursor == 0
        assert meta_cursor(cfg.gateway.data_dir) == 0
        error = rt.sync.status.last_error
        assert "refused" in error and "edgeos/gw1/" in error and "135" in error, error
        rt.stop()
        await asyncio.wait_for(task, 20)
        assert got.messages == []
    assert meta_cursor(cfg.gateway.data_dir) == 0
    units, compacted, top = unit_counts(cfg.gateway.data_dir)
    assert compacted > 0 and units == top, "compacted units behind a refused publish were deleted"
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert 1 <= len(refusals) < rt.sync.status.failures, "refusals are logged, rate limited"
    assert "edgeos/gw1/" in refusals[0].getMessage()

    # The ACL is fixed: everything stored arrives, exactly once. (Compacted units the broker
    # now has are deleted behind the cursor, so the expectation is taken before.)
    kept = stored_units(cfg.gateway.data_dir)
    b.stop()
    b.acl = "topic readwrite edgeos/#\n"
    b.start()
    async with subscribe(b) as got:
        rt = Runtime(cfg)
        task = asyncio.create_task(rt.run())
        await wait_until(lambda: rt.sync.cursor >= rt.sync.status.head > 0, 30)
        rt.stop()
        await asyncio.wait_for(task, 20)
        expected = kept | stored_units(cfg.gateway.data_dir)
        await wait_until(lambda: {s for s, _, _ in got.units()} >= set(expected))
    units = got.units()
    assert [s for s, _, _ in units] == sorted(expected)
    assert all(u.ts.tobytes() == wire.decode_unit(expected[s][1]).ts.tobytes() for s, _, u in units)
    assert got.deliveries() == len(units), "a unit was delivered twice"


async def test_one_device_refused_while_others_are_delivered_backs_off_and_logs_rarely(
    write_config, make_broker, caplog
):
    # The ACL refuses only the oven's topic: the press's units keep being acknowledged, but the
    # cursor can never pass the first oven unit. That must count as a failing link (backoff
    # grows, one log line a minute), not as "delivering again" at every reconnect.
    b = make_broker(acl=READ_ONLY_DATA + "topic write edgeos/gw1/press/data\n")
    path = config(write_config, b.port)
    path.write_text(path.read_text().replace('reconnect_max = "300ms"', 'reconnect_max = "2s"'))
    cfg = load_config(path)
    caplog.set_level("WARNING", logger="edgeos.sync")
    rt = Runtime(cfg)
    task = asyncio.create_task(rt.run())
    try:
        await wait_until(lambda: rt.sync is not None and rt.sync.status.failures >= 2)
        await asyncio.sleep(5)
        first_oven = min(s for s, (d, _) in stored_units(cfg.gateway.data_dir).items() if d == "oven")
        assert rt.sync.cursor < first_oven
        # Without growing backoff a session every ~30 ms: some 150 in these 5 s.
        assert rt.sync.status.connects < 25, rt.sync.status.connects
    finally:
        rt.stop()
        await asyncio.wait_for(task, 20)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("refused" in m for m in lines) <= 2, lines
    assert not any("delivering again" in m for m in lines), lines


def make_store(data_dir: Path, units: int, devices: int = 1, *, first_id: int = 1, tags: int = 1) -> None:
    """A store file written with plain sqlite3 and the schema module: `units` one-sample units,
    round robin over `devices` devices (so each message carries one unit), ids from `first_id`."""
    import numpy as np

    from edgeos import wire
    from edgeos.store import schema

    data_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(data_dir / "edgeos.db")
    schema.create(db)
    db.execute("PRAGMA journal_mode=WAL")
    t0 = time.time_ns()
    rows = []
    for k in range(units):
        device = f"d{k % devices}"
        ts = np.array([t0 + k * 1000], np.int64)
        blob = wire.encode_unit(device, np.array([1], np.int32), ts, np.array([float(k)]), np.zeros(1, np.uint32))
        rows.append((first_id + k, device, int(ts[0]), int(ts[0]), 1, blob))
    with db:
        db.executemany(
            "INSERT OR IGNORE INTO tags(id, device, name, kind) VALUES(?, 'd0', ?, 'number')",
            [(i, f"t{i}") for i in range(1, tags + 1)],
        )
        db.executemany("INSERT INTO units(id, device, t_min, t_max, n, data) VALUES(?,?,?,?,?,?)", rows)
    db.close()


def make_sync(write_config, port: int, upstream: str = ""):
    from edgeos.sync import Sync
    from edgeos.sync.mqtt import MqttTransport

    cfg = load_config(config(write_config, port, upstream))
    transport = MqttTransport(cfg.gateway.id, cfg.upstream.options, cfg.source.parent)
    return cfg, Sync(cfg.gateway.id, cfg.gateway.data_dir, cfg.upstream.options, transport)


async def test_the_cursor_read_from_other_threads_is_never_ahead(write_config, broker):
    # The store thread and the status thread read the cursor while the event loop acknowledges
    # units; with a tiny switch interval a read lands inside every update.
    import threading

    cfg, sync = make_sync(write_config, broker.port, "max_inflight = 1\n")
    make_store(cfg.gateway.data_dir, 3000, devices=256)
    seen: list[list[int]] = [[], []]  # per reader: in the order it read them
    errors: list[BaseException] = []
    done = threading.Event()

    def read(mine: list[int]) -> None:
        # The last read comes after `done`, so after the loop saw the cursor at 3000: a read
        # taken just before the final acknowledgement is not the last one (CI caught 2999 so).
        while True:
            last = done.is_set()
            try:
                mine.append(sync.cursor)
                if mine is seen[1]:
                    vars(sync.status).copy()  # as the store thread writes status.json
            except Exception as e:  # noqa: BLE001 - any exception here is the defect
                errors.append(e)
            if last:
                return

    readers = [threading.Thread(target=read, args=(mine,)) for mine in seen]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    task = asyncio.create_task(sync.run())
    try:
        for t in readers:
            t.start()
        await wait_until(lambda: sync.cursor >= 3000, 60)
    finally:
        done.set()
        for t in readers:
            t.join(10)
        sys.setswitchinterval(interval)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sync.close()
    assert not errors, errors[:3]
    # The cursor only ever moves forward: a read above an unacknowledged unit would be
    # followed by a lower one.
    for cursors in seen:
        assert cursors == sorted(cursors), next((a, b) for a, b in itertools.pairwise(cursors) if b < a)
        assert len(cursors) > 1000 and cursors[-1] == 3000


def test_status_refresh_reads_only_what_changed(write_config, dead_port):
    cfg, sync = make_sync(write_config, dead_port)
    make_store(cfg.gateway.data_dir, 30_000)
    try:
        sync.refresh_status()  # the first one counts the whole backlog, once
        assert (sync.status.head, sync.status.backlog_units, sync.status.backlog_samples) == (30_000,) * 3
        make_store(cfg.gateway.data_dir, 10, first_id=30_001)
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        sync._status_outbox.conn().set_progress_handler(count, 100)  # called every 100 SQLite VM instructions
        sync.refresh_status()
        assert (sync.status.head, sync.status.backlog_units, sync.status.backlog_samples) == (30_010,) * 3
        assert sync.status.lag_seconds > 0
        # Ten new units: a few probes by primary key and a count of those ten, not the backlog.
        assert steps[0] < 30, steps[0]
    finally:
        sync.close()


def test_status_backlog_follows_the_cursor_and_the_store_deleting_the_oldest(write_config, dead_port):
    import random

    cfg, sync = make_sync(write_config, dead_port)
    rng = random.Random(7)
    make_store(cfg.gateway.data_dir, 5000, devices=3)
    top, cursor = 5000, 0
    db = sqlite3.connect(cfg.gateway.data_dir / "edgeos.db")
    try:
        for _ in range(60):
            op = rng.random()
            if op < 0.4:
                cursor = min(top, cursor + rng.randrange(0, 3000))
            elif op < 0.7:
                n = rng.randrange(1, 2500)
                make_store(cfg.gateway.data_dir, n, devices=3, first_id=top + 1)
                top += n
            else:  # retention or the size budget: the oldest units go, sent or not
                with db:
                    db.execute("DELETE FROM units WHERE id <= ?", (cursor + rng.randrange(0, 2000),))
            sync.refresh_status(cursor)
            units, samples, head = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(n), 0), (SELECT MAX(id) FROM units) FROM units WHERE id > ?", (cursor,)
            ).fetchone()
            st = sync.status
            assert (st.backlog_units, st.backlog_samples) == (units, samples)
            assert st.head == (head or st.head)
    finally:
        db.close()
        sync.close()


def test_the_sync_reads_the_store_without_a_memory_map(write_config, dead_port):
    # A media error under a mapped page is a SIGBUS, which kills the daemon.
    cfg, sync = make_sync(write_config, dead_port)
    make_store(cfg.gateway.data_dir, 10)
    try:
        sync.refresh_status()
        assert sync.outbox.conn().execute("PRAGMA mmap_size").fetchone()[0] == 0
        assert sync._status_outbox.conn().execute("PRAGMA mmap_size").fetchone()[0] == 0
    finally:
        sync.close()


async def test_live_data_is_not_held_by_the_backlog_rate_cap(write_config, broker, subscribe):
    # No backlog at connect: everything is live, and live data is uncapped (docs/payload.md),
    # however small the cap for draining a backlog (here one message a second).
    cfg = load_config(config(write_config, broker.port, 'rate_limit_bytes = "1B"\n'))
    async with subscribe(broker) as got:
        rt = Runtime(cfg)
        task = asyncio.create_task(rt.run())
        try:
            # About 40 messages a second are committed (two devices, a commit every 50 ms).
            await wait_until(lambda: rt.sync is not None and rt.sync.status.published_messages >= 60, 20)
        finally:
            rt.stop()
            await asyncio.wait_for(task, 20)
        await wait_until(lambda: {s for s, _, _ in got.units()} >= set(stored_units(cfg.gateway.data_dir)))
    assert_exactly_once_in_order(got, cfg.gateway.data_dir)


async def test_a_store_file_replaced_under_the_sync_is_followed(write_config, broker, subscribe, running):
    # The store quarantines a corrupt file: it moves it aside and starts a new one whose ids
    # continue above the old ones. The sync must read the new file, from its cursor on.
    cfg, sync = make_sync(write_config, broker.port)
    data = cfg.gateway.data_dir
    make_store(data, 50, devices=2)
    async with subscribe(broker) as got:
        async with running(sync):
            await wait_until(lambda: sync.cursor >= 50)
            for suffix in ("", "-wal", "-shm"):
                if (data / f"edgeos.db{suffix}").exists():
                    (data / f"edgeos.db{suffix}").rename(data / f"edgeos.db.bad-test{suffix}")
            make_store(data, 30, devices=2, first_id=1000, tags=2)  # its own tag dictionary
            await wait_until(lambda: sync.cursor >= 1029)
            await wait_until(lambda: sync.status.head == 1029 and sync.status.backlog_units == 0)
        await wait_until(lambda: {s for s, _, _ in got.units()} >= set(range(1000, 1030)))
    assert [s for s, _, _ in got.units()] == [*range(1, 51), *range(1000, 1030)]
    # The new file's dictionary went out before its units, which name it.
    assert len(got.dictionary) == 2
    assert {m.dictionary for m in got.messages if m.seqs[0] >= 1000} == {2}


async def test_tags_added_while_live_go_out_before_the_units_that_name_them(write_config, broker, subscribe, running):
    # A reload adds tags while the sync is connected: the live lane notices the store's tag
    # count grew (read in its reader thread with each run), publishes the new dictionary, and
    # frames the units again so that they name it.
    cfg, sync = make_sync(write_config, broker.port)
    data = cfg.gateway.data_dir
    make_store(data, 20, devices=2, tags=1)
    async with subscribe(broker) as got:
        async with running(sync):
            await wait_until(lambda: sync.cursor >= 20)
            await wait_until(lambda: len(got.dictionary) == 1)
            make_store(data, 10, devices=2, first_id=21, tags=3)
            await wait_until(lambda: sync.cursor >= 30)
        await wait_until(lambda: {s for s, _, _ in got.units()} >= set(range(1, 31)))
        await wait_until(lambda: len(got.dictionary) == 3)
    assert {m.dictionary for m in got.messages if m.seqs[0] <= 20} == {1}
    assert {m.dictionary for m in got.messages if m.seqs[0] >= 21} == {3}


async def test_a_store_not_readable_at_the_sync_start_is_waited_for(write_config, broker, subscribe, caplog, running):
    # The sync starts before the store can be read (absent, or busy): it retries, logs once,
    # and never ends the daemon's task group with an sqlite3 error.
    cfg, sync = make_sync(write_config, broker.port)
    data = cfg.gateway.data_dir
    async with subscribe(broker) as got:
        async with running(sync) as task:
            await asyncio.sleep(0.5)
            assert not task.done() and "cannot read the sync cursor" in caplog.text
            make_store(data, 10)
            await wait_until(lambda: sync.cursor >= 10)
        await wait_until(lambda: {s for s, _, _ in got.units()} >= set(range(1, 11)))


async def test_credentials_without_tls_are_warned_about_once(write_config, make_broker, tmp_path, caplog):
    from edgeos.sync.mqtt import MqttTransport

    (tmp_path / "pw").write_text("right\n")
    caplog.set_level("WARNING", logger="edgeos.sync")
    # Loopback: nothing crosses a network, no warning.
    b = make_broker(users={"gw1": "right"})
    cfg = load_config(config(write_config, b.port, 'username = "gw1"\npassword_file = "pw"\n'))
    local = MqttTransport("gw1", cfg.upstream.options, cfg.source.parent)
    async with local.session() as session:
        await session.publish("edgeos/gw1/x", b"1")
    assert "cleartext" not in caplog.text
    # A remote broker (a documentation address: nothing answers, the warning comes first).
    remote = MqttTransport("gw1", {**cfg.upstream.options, "host": "192.0.2.1"}, cfg.source.parent)
    for _ in range(3):
        with contextlib.suppress(Exception):
            async with asyncio.timeout(0.3), remote.session():
                pass
    warnings = [r.getMessage() for r in caplog.records if "cleartext" in r.getMessage()]
    assert len(warnings) == 1 and "192.0.2.1" in warnings[0], warnings


@contextlib.contextmanager
def _refusing_broker(directory: Path):
    """mosquitto with its dynamic-security plugin at its defaults: an anonymous client may
    connect but subscribe to nothing (SUBACK 0x87 in MQTT 5, 0x80 in 3.1.1)."""
    import getpass
    import socket

    directory.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dynsec = directory / "dynsec.json"
    init = ["mosquitto_ctrl", "dynsec", "init", str(dynsec), "admin", "adminpw"]
    subprocess.run(init, check=True, capture_output=True, timeout=20)
    conf = directory / "mosquitto.conf"
    conf.write_text(
        f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
        "plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so\n"
        f"plugin_opt_config_file {dynsec}\n"
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            assert time.monotonic() < deadline and proc.poll() is None, "mosquitto did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_a_refused_subscription_is_asked_again_then_fails_the_session(monkeypatch, tmp_path, caplog, version):
    """A refused subscription (a cluster node electing its leader refuses them for a while) is
    asked again on the same connection; one refused for SUBSCRIBE_PATIENCE fails the session."""
    from edgeos.errors import SyncError
    from edgeos.sync import mqtt

    monkeypatch.setattr(mqtt, "SUBSCRIBE_PATIENCE", 3.0)
    caplog.set_level("WARNING", logger="edgeos.sync")
    with _refusing_broker(tmp_path / "broker") as port:
        options = {"host": "127.0.0.1", "port": port, "status_topic": None, "mqtt_version": version}
        async with mqtt.MqttTransport("gw1", options, tmp_path).session() as session:
            t0 = time.monotonic()
            with pytest.raises(SyncError, match="refused the subscription to edgeos/gw1/replay"):
                async with asyncio.timeout(30):
                    await session.subscribe("edgeos/gw1/replay")
            waited = time.monotonic() - t0
            assert session.failure is None, session.failure  # the connection itself stayed up
    again = [r for r in caplog.records if "asking again" in r.getMessage()]
    assert len(again) >= 2, [r.getMessage() for r in caplog.records]
    assert waited >= 1.0, waited  # it did wait before giving up (0.5 + 1 s of backoff at least)


async def test_a_broker_refusing_messages_as_too_large_is_named(write_config, make_broker):
    """MQTT 5, mosquitto's message_size_limit: its PUBACK of reason 0x95 makes paho close the
    connection as a protocol error. That read "closed or reset", naming neither cause nor fix
    (an independent tester's finding); the cursor holds, nothing is lost, as with any refusal."""
    b = make_broker(extra=["message_size_limit 300"])
    cfg = load_config(config(write_config, b.port))
    rt = Runtime(cfg)
    task = asyncio.create_task(rt.run())
    try:
        await wait_until(lambda: rt.sync is not None and rt.sync.status.failures >= 2)
        error = rt.sync.status.last_error
        assert "message_size_limit" in error and "max_message" in error, error
        assert rt.sync.cursor == 0
    finally:
        rt.stop()
        await asyncio.wait_for(task, 20)
