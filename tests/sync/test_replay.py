"""Replay on request against real brokers (issue 25): a broker that forgets what it
acknowledged, data really gone, malformed requests, and the message size cap."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path

import aiomqtt
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeos import wire
from edgeos.config import load_config
from edgeos.runtime import Runtime
from edgeos.store.outbox import Outbox

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
tags = [{ name = "z1", signal = "sine" }, { name = "z2", signal = "sine" }]
"""


def config(write_config, port: int, upstream: str = "") -> Path:
    return write_config(
        f"""
[gateway]
id = "gw1"
data_dir = "data"
shutdown_timeout = "5s"
[store]
commit_interval = "50ms"
{DEVICES}
[upstream]
enabled = true
host = "127.0.0.1"
port = {port}
reconnect_min = "50ms"
reconnect_max = "300ms"
{upstream}
"""
    )


def stored(data_dir: Path) -> dict[int, tuple[str, bytes]]:
    db = sqlite3.connect(f"{(data_dir / 'edgeos.db').as_uri()}?mode=ro", uri=True)
    try:
        return {i: (d, b) for i, d, b in db.execute("SELECT id, device, data FROM units")}
    finally:
        db.close()


def answering_replays(path: Path) -> tuple[Runtime, asyncio.Task]:
    """The gateway of config `path` again, its devices off: it adds no unit, and it answers the
    replay requests a consumer still needs after the producing run stopped (what a broker lost
    can only come back by replay)."""
    quiet = path.with_name("replay-only.toml")
    off = 'protocol = "simulated"\nenabled = false'
    quiet.write_text(path.read_text().replace('protocol = "simulated"', off))
    rt = Runtime(load_config(quiet))
    return rt, asyncio.create_task(rt.run())


async def wait_until(pred, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.05)


class Central:
    """A plant-side consumer built on wire.Consumer and a plain aiomqtt client: it reconnects,
    feeds what arrives, publishes the replay requests that are due, and keeps every payload."""

    def __init__(self, port: int, *, drop=None, reorder_wait: float = 1.0, after: Central | None = None) -> None:
        self.port = port
        self.consumer = wire.Consumer(reorder_wait=reorder_wait, retry_after=3.0)
        self.delivered: list[wire.Delivered] = []
        if after is not None:  # the same consumer, back online
            self.consumer, self.delivered = after.consumer, after.delivered
        self.payloads: list[tuple[str, bytes]] = []
        self.gone: list[wire.Gone] = []
        self.requests: list[bytes] = []
        self.drop = drop or (lambda env: False)
        self.task: asyncio.Task | None = None
        self.closing = False

    async def _run(self) -> None:
        while not self.closing:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier="central", clean_session=False) as c:
                    await c.subscribe("edgeos/+/+/data", qos=1)
                    await c.subscribe("edgeos/+/replay/gone", qos=1)
                    asker = asyncio.create_task(self._ask(c))
                    try:
                        async for msg in c.messages:
                            payload = bytes(msg.payload)
                            self.payloads.append((str(msg.topic), payload))
                            if str(msg.topic).endswith("/data") and self.drop(wire.decode_envelope(payload)):
                                continue
                            self.delivered += self.consumer.feed(payload)
                            self.gone += self.consumer.take_gone()
                    finally:
                        asker.cancel()
                        await asyncio.gather(asker, return_exceptions=True)
            except aiomqtt.MqttError:
                if asyncio.current_task().cancelling() or self.closing:
                    raise
                await asyncio.sleep(0.1)

    async def _ask(self, client: aiomqtt.Client) -> None:
        while True:
            await asyncio.sleep(0.2)
            for topic, payload in self.consumer.requests():
                self.requests.append(payload)
                await client.publish(topic, payload, qos=1)

    def seqs(self) -> list[int]:
        return sorted(d.seq for d in self.delivered)

    async def __aenter__(self) -> Central:
        self.task = asyncio.create_task(self._run())
        await asyncio.sleep(0.3)
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Cancelled again each second, and told to end by a flag too: on Python 3.11 aiomqtt's
        # wait_for can swallow a cancellation, and the reconnect loop would then run on.
        assert self.task is not None
        self.closing = True
        for _ in range(10):
            self.task.cancel()
            done, _ = await asyncio.wait({self.task}, timeout=1.0)
            if done:
                break
        assert self.task.done(), "the test consumer did not stop"
        if not self.task.cancelled():
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                self.task.result()


def assert_each_once(central: Central, expect: dict[int, tuple[str, bytes]]) -> None:
    seqs = [d.seq for d in central.delivered]
    assert len(seqs) == len(set(seqs)), "a seq delivered twice"
    assert sorted(seqs) == sorted(expect)
    for d in central.delivered:
        dev, blob = expect[d.seq]
        ref = wire.decode_unit(blob)
        assert d.device == dev and d.unit.ts.tobytes() == ref.ts.tobytes()
        assert d.unit.values.tobytes() == ref.values.tobytes()


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_units_a_broker_forgot_after_acknowledging_are_replayed(write_config, make_broker, version):
    # mosquitto without persistence; the consumer goes offline, the gateway publishes (the
    # broker acknowledges and queues for the consumer's session), the broker is killed and
    # restarted: the queue is gone. The consumer notices, asks, and ends with every seq once.
    b = make_broker(persistence=False)
    path = config(write_config, b.port, f'mqtt_version = "{version}"\n')
    cfg = load_config(path)
    rt = Runtime(cfg)
    task = asyncio.create_task(rt.run())
    try:
        async with Central(b.port) as central:
            await wait_until(lambda: len(central.delivered) > 30)
        before = rt.sync.status.published_messages
        await wait_until(lambda: rt.sync.status.published_messages > before + 40)  # acknowledged, queued
        b.kill()
        b.start()  # same port, nothing remembered
        async with Central(b.port, after=central) as central2:
            await wait_until(lambda: rt.sync.status.connects >= 2)
            await wait_until(lambda: rt.sync.status.replay_units > 0, 30)
            # What an operator's Prometheus sees of it.
            from edgeos.service.metrics import Metrics

            scraped = {
                k: float(v)
                for k, v in (ln.rsplit(" ", 1) for ln in Metrics(rt).render().decode().splitlines() if "_replay_" in ln)
                if not k.startswith("#")
            }
            assert scraped['edgeos_sync_replay_requests_total{outcome="taken"}'] >= 1
            assert scraped['edgeos_sync_replay_requests_total{outcome="malformed"}'] == 0
            assert scraped["edgeos_sync_replay_units_total"] > 0
            assert scraped["edgeos_sync_replay_listening"] == 1
            rt.stop()
            await asyncio.wait_for(task, 20)
            expect = stored(cfg.gateway.data_dir)
            rt, task = answering_replays(path)  # a replay still under way goes on
            await wait_until(lambda: set(central2.seqs()) >= set(expect), 30)
    finally:
        rt.stop()
        await asyncio.wait_for(task, 20)
    assert central2.requests, "the gap was asked for"
    assert any(d.replay for d in central2.delivered)
    assert_each_once(central2, expect)
    assert central2.consumer.gaps("gw1") == []


def make_store(data_dir: Path, units: int, *, old: int = 0, samples: int = 1) -> None:
    """`units` units over two devices (ids from 1, d0 odd, d1 even); the first `old` two days old."""
    from edgeos.store import schema

    data_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(data_dir / "edgeos.db")
    schema.create(db)
    db.execute("PRAGMA journal_mode=WAL")
    now = time.time_ns()
    rng = np.random.default_rng(3)
    rows = []
    for k in range(units):
        device = f"d{k % 2}"
        t0 = now - (2 * 86_400 * 10**9 if k < old else 0) + k * 10**6
        ts = t0 + np.arange(samples, dtype=np.int64) * 1000
        blob = wire.encode_unit(
            device, np.arange(samples, dtype=np.int32) % 7 + 1, ts, rng.random(samples), np.zeros(samples, np.uint32)
        )
        rows.append((k + 1, device, int(ts.min()), int(ts.max()), samples, blob))
    with db:
        db.executemany(
            "INSERT INTO tags(id, device, name, kind) VALUES(?, 'd0', ?, 'number')", [(i, f"t{i}") for i in range(1, 8)]
        )
        db.executemany("INSERT INTO units(id, device, t_min, t_max, n, data) VALUES(?,?,?,?,?,?)", rows)
    db.close()


def make_sync(write_config, port: int, upstream: str = ""):
    from edgeos.sync import Sync
    from edgeos.sync.mqtt import MqttTransport

    cfg = load_config(config(write_config, port, upstream))
    transport = MqttTransport(cfg.gateway.id, cfg.upstream.options, cfg.source.parent)
    return cfg, Sync(cfg.gateway.id, cfg.gateway.data_dir, cfg.upstream.options, transport)


async def test_units_retention_dropped_before_the_replay_are_answered_gone(write_config, broker, running):
    # The consumer misses 30..50 on the way; by the time it asks, retention dropped 1..40.
    cfg, sync = make_sync(write_config, broker.port, 'max_message = "8KiB"\n')  # a unit a message
    data = cfg.gateway.data_dir
    make_store(data, 100, old=40, samples=700)
    held = stored(data)
    lost = set(range(30, 51))
    drop = lambda env: bool(lost & set(env.seqs)) and not env.replay  # noqa: E731
    async with Central(broker.port, drop=drop) as central, running(sync):
        await wait_until(lambda: sync.cursor >= 100)
        from edgeos.store import StoreSettings, StoreWriter

        w = StoreWriter(data, (), StoreSettings(retention_ns=86_400 * 10**9))
        try:
            w.trim(time.time_ns())
        finally:
            w.close()
        assert min(stored(data)) == 41
        await wait_until(lambda: set(central.seqs()) >= set(range(41, 101)) and len(central.gone) >= 2, 30)
        await asyncio.sleep(0.5)
    # Each device's gap: its units from after its last one seen to the one its next unit named.
    asked = sorted((r["dev"], r["first"], r["last"]) for r in map(msgpack.unpackb, central.requests))
    assert asked == [("d0", 30, 49), ("d1", 29, 50)]
    gone = sorted((g.device, g.first, g.last, tuple(g.ranges)) for g in central.gone)
    assert gone == [("d0", 30, 49, ((30, 40),)), ("d1", 29, 50, ((29, 40),))]
    assert sync.status.replay_gone == 23
    assert central.seqs() == [*range(1, 30), *range(41, 101)]
    for d in central.delivered:  # replays are the first bytes sent, same seq
        assert d.unit.values.tobytes() == wire.decode_unit(held[d.seq][1]).values.tobytes()
    replayed = [
        wire.decode_envelope(p) for t, p in central.payloads if t.endswith("/data") and wire.decode_envelope(p).replay
    ]
    assert {s for e in replayed for s in e.seqs} == set(range(41, 51))
    for e in replayed:
        assert all(bytes(u) == held[s][1] for s, u in zip(e.seqs, e.units, strict=True))


_garbage = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda d: msgpack.packb(d), st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**64 - 1), max_size=4)
    ),
    st.builds(
        lambda a, span, gw: msgpack.packb({"v": 1, "gw": gw, "first": a, "last": a + span}),
        st.integers(1, 1000),
        st.integers(-1000, -1) | st.integers(10_000_000, 2**40),  # reversed or huge
        st.just("gw1"),
    ),
    st.builds(  # another gateway's id on this gateway's topic
        lambda a, gw, js: wire.encode_replay_request(gw, a, a + 5, form="json" if js else "msgpack"),
        st.integers(1, 50),
        st.text(min_size=1, max_size=8).filter(lambda g: g != "gw1"),
        st.booleans(),
    ),
    st.builds(  # a version that compares equal to 1 but is not the integer 1
        lambda v, js: (
            json.dumps({"v": v, "gw": "gw1", "first": 1, "last": 3}).encode()
            if js
            else msgpack.packb({"v": v, "gw": "gw1", "first": 1, "last": 3})
        ),
        st.sampled_from([True, 1.0]),
        st.booleans(),
    ),
    st.builds(
        lambda v: msgpack.packb({"v": 1, "gw": "gw1", "first": v, "last": 3}),
        st.one_of(st.floats(), st.booleans(), st.text(max_size=3), st.just(0), st.just(-5), st.just(2**63 - 1)),
    ),
    st.builds(lambda s: s.encode(), st.text(alphabet='{}[]":,0123456789abfirstlgw', max_size=40)),
)


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payloads=st.lists(_garbage, min_size=10, max_size=40))
def test_malformed_replay_requests_are_counted_and_answered_with_nothing(write_config, broker, payloads, running):
    # A decodable request among them would be answered: make sure none is.
    def valid(p: bytes) -> bool:
        try:
            return wire.decode_replay_request(p).gateway == "gw1"
        except ValueError:
            return False

    payloads = [p for p in payloads if not valid(p)]

    async def scenario() -> None:
        cfg, sync = make_sync(write_config, broker.port)
        if not (cfg.gateway.data_dir / "edgeos.db").exists():
            make_store(cfg.gateway.data_dir, 20)
        async with Central(broker.port) as central, running(sync):
            await wait_until(lambda: sync.cursor >= 20 and sync.status.replay_listening)
            seen = len(central.payloads)
            async with aiomqtt.Client("127.0.0.1", broker.port) as c:
                for p in payloads:
                    await c.publish("edgeos/gw1/replay", p, qos=1)
            await wait_until(lambda: sync.status.replay_malformed == len(payloads), 10)
            await asyncio.sleep(0.3)
            assert central.payloads[seen:] == []  # nothing answered: no gone, no replay
            assert sync.status.state == "connected" and sync.status.replay_requests == 0
            # Still serving: a good request is answered.
            async with aiomqtt.Client("127.0.0.1", broker.port) as c:
                await c.publish("edgeos/gw1/replay", wire.encode_replay_request("gw1", 3, 4, form="json"), qos=1)
            await wait_until(lambda: sync.status.replay_units == 2, 10)

    asyncio.run(scenario())


async def _mosquitto_pub(port: int, topic: str, message: str) -> None:
    """mosquitto_pub, the Debian package's C client (mosquitto-clients): neither edgeos nor aiomqtt."""
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_pub",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-q",
        "1",
        "-t",
        topic,
        "-m",
        message,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(10):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()


async def test_the_mosquitto_clients_ask_in_json_and_get_the_units_as_sent(write_config, broker, running):
    """A plant engineer with mosquitto_pub and mosquitto_sub, no edgeos code on that side: the
    documented JSON request, pretty-printed by hand or compact with a device, brings back the
    units byte for byte, and a range with deleted units is answered gone with exactly them."""
    cfg, sync = make_sync(write_config, broker.port)
    data = cfg.gateway.data_dir
    make_store(data, 20)
    db = sqlite3.connect(data / "edgeos.db")
    with db:
        db.execute("DELETE FROM units WHERE id IN (7, 8)")  # as retention or the budget would
    db.close()
    held = stored(data)
    sub = await asyncio.create_subprocess_exec(
        "mosquitto_sub",
        "-h",
        "127.0.0.1",
        "-p",
        str(broker.port),
        "-q",
        "1",
        "-t",
        "edgeos/gw1/+/data",
        "-t",
        "edgeos/gw1/replay/gone",
        "-t",
        "probe",
        "-F",
        "%t %x",
        stdout=asyncio.subprocess.PIPE,
    )
    lines: list[str] = []
    try:
        assert sub.stdout is not None
        for _ in range(50):  # until it is subscribed: it hears a probe
            await _mosquitto_pub(broker.port, "probe", "ready?")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.3):
                    if (await sub.stdout.readline()).startswith(b"probe "):
                        break
        else:
            pytest.fail("mosquitto_sub heard no probe")
        async with running(sync):
            await wait_until(lambda: sync.cursor >= 20 and sync.status.replay_listening)
            pretty = '{\n  "v": 1,\n  "gw": "gw1",\n  "first": 3,\n  "last": 6\n}\n'
            await _mosquitto_pub(broker.port, "edgeos/gw1/replay", pretty)
            await wait_until(lambda: sync.status.replay_units == 4, 10)
            await _mosquitto_pub(broker.port, "edgeos/gw1/replay", '{"v":1,"gw":"gw1","first":5,"last":9}')
            await wait_until(lambda: sync.status.replay_units == 7, 10)
            compact = '{"v":1,"gw":"gw1","first":10,"last":14,"dev":"d0"}'
            await _mosquitto_pub(broker.port, "edgeos/gw1/replay", compact)
            await wait_until(lambda: sync.status.replay_units == 9, 10)
            replayed: list[int] = []
            gone: list[wire.Gone] = []
            async with asyncio.timeout(10):  # until everything sent was heard (QoS 1: it comes)
                while sorted(replayed) != [3, 4, 5, 5, 6, 6, 9, 11, 13] or not gone:
                    line = (await sub.stdout.readline()).decode()
                    assert line, "mosquitto_sub ended"
                    lines.append(line)
                    topic, _, payload = line.strip().partition(" ")
                    if topic == "edgeos/gw1/replay/gone":
                        gone.append(wire.decode_gone(bytes.fromhex(payload)))
                    elif topic.endswith("/data"):
                        env = wire.decode_envelope(bytes.fromhex(payload))
                        assert topic == f"edgeos/gw1/{env.device}/data"
                        for seq, unit in zip(env.seqs, env.units, strict=True):
                            assert bytes(unit) == held[seq][1] and env.device == held[seq][0]
                            if env.replay:  # not the first sending of the store's units
                                replayed.append(seq)
                        assert len(replayed) <= 9, replayed
    finally:
        if sub.returncode is None:
            sub.kill()
        await sub.wait()
    assert [(g.first, g.last, g.device, g.ranges) for g in gone] == [(5, 9, None, [(7, 8)])]
    assert sync.status.replay_requests == 3 and sync.status.replay_malformed == 0


def test_replay_request_codec_refuses_what_it_must():
    assert wire.decode_replay_request(wire.encode_replay_request("g", 1, 5, "d", form="json")) == wire.ReplayRequest(
        "g", 1, 5, "d"
    )
    for bad in (
        {"v": 1, "gw": "g", "first": 5, "last": 4},
        {"v": 1, "gw": "g", "first": 1, "last": 10_000_001},
        {"v": 1, "gw": "g", "first": True, "last": 4},
        {"v": 1, "gw": "g", "first": 0, "last": 4},
        {"v": 1, "gw": "g", "first": 1, "last": 4, "dev": 7},
        {"v": 1, "gw": "g", "first": 1, "last": 4, "cmd": "write"},
        {"v": 2, "gw": "g", "first": 1, "last": 4},
        {"v": True, "gw": "g", "first": 1, "last": 4},  # True == 1 in Python: not the version
        {"v": 1.0, "gw": "g", "first": 1, "last": 4},
    ):
        with pytest.raises(ValueError):
            wire.decode_replay_request(msgpack.packb(bad))
    with pytest.raises(ValueError):
        wire.decode_replay_request(b"x" * 2000)
    with pytest.raises(ValueError):
        wire.decode_replay_request(b'{"v":true,"gw":"g","first":1,"last":3}')
    # JSON as typed by hand or pretty-printed: blanks before the object are JSON's own.
    typed = b'\n  {"v": 1, "gw": "g",\n   "first": 1, "last": 3}\n'
    assert wire.decode_replay_request(typed) == wire.ReplayRequest("g", 1, 3)
    # A key twice is ambiguous, in either form: refused, not "the last one wins".
    with pytest.raises(ValueError, match="twice"):
        wire.decode_replay_request(b'{"v": 1, "gw": "g", "first": 1, "last": 3, "last": 9000000}')
    twice = b"\x85" + b"".join(msgpack.packb(x) for x in ("v", 1, "gw", "g", "first", 1, "last", 3, "last", 9))
    assert msgpack.unpackb(twice) == {"v": 1, "gw": "g", "first": 1, "last": 9}  # what it used to take
    with pytest.raises(ValueError, match="twice"):
        wire.decode_replay_request(twice)


async def test_no_message_exceeds_max_message_and_samples_arrive_exact(write_config, broker, running):
    cfg, sync = make_sync(write_config, broker.port, 'max_message = "16KiB"\n')
    make_store(cfg.gateway.data_dir, 30, samples=3000)  # random floats: about 25 KB a unit
    held = stored(cfg.gateway.data_dir)
    assert max(len(b) for _, b in held.values()) > 16 * 1024
    async with Central(broker.port) as central, running(sync):
        await wait_until(lambda: sync.cursor >= 30 and sync.status.replay_listening)
        await wait_until(lambda: set(central.seqs()) >= set(held))
        # A replay of a split unit is split the same way.
        async with aiomqtt.Client("127.0.0.1", broker.port) as c:
            await c.publish("edgeos/gw1/replay", wire.encode_replay_request("gw1", 5, 6), qos=1)
        await wait_until(lambda: sum(1 for _, p in central.payloads if wire.decode_envelope(p).replay) >= 4)
    sizes = [len(p) for t, p in central.payloads if t.endswith("/data")]
    assert max(sizes) <= 16 * 1024 and len(sizes) > 60
    assert any(wire.decode_envelope(p).part for _, p in central.payloads)
    assert_each_once(central, held)
    for d in central.delivered:
        ref = wire.decode_unit(held[d.seq][1])
        assert d.unit.tags.tolist() == ref.tags.tolist() and d.unit.quality.tobytes() == ref.quality.tobytes()


async def test_the_brokers_connack_limits_are_obeyed(write_config, make_broker, running):
    """A broker that announces (MQTT 5 CONNACK) a Maximum Packet Size of 20,000 bytes and a
    Receive Maximum of 5, as mosquitto's max_packet_size and max_inflight_messages do. With the
    default 128 KiB cap, 25 KB units would go whole: mosquitto drops the connection at the first
    ("disconnected due to oversize packet"), and again at every resend after a reconnect.
    Obeyed, every unit arrives once, in parts, on one connection."""
    broker = make_broker(extra=["max_packet_size 20000", "max_inflight_messages 5"])
    cfg, sync = make_sync(write_config, broker.port)  # MQTT 5, the default
    make_store(cfg.gateway.data_dir, 30, samples=3000)  # random floats: about 25 KB a unit
    held = stored(cfg.gateway.data_dir)
    assert max(len(b) for _, b in held.values()) > 20_000
    async with Central(broker.port) as central, running(sync):
        await wait_until(lambda: sync.cursor >= 30)
        await wait_until(lambda: set(central.seqs()) >= set(held))
    st = sync.status
    assert st.connects == 1 and st.failures == 0, st.last_error
    assert (st.broker_max_packet, st.broker_receive_maximum) == (20_000, 5)
    sizes = [len(p) for t, p in central.payloads if t.endswith("/data")]
    assert st.max_message == 20_000 - 1024 and max(sizes) <= st.max_message
    assert any(wire.decode_envelope(p).part for _, p in central.payloads)
    assert_each_once(central, held)


async def test_a_dictionary_over_the_brokers_packet_size_is_named(write_config, make_broker, running):
    """The tag dictionary is one retained message, never split: over the broker's announced
    Maximum Packet Size, the broker would drop the connection at every session start and
    nothing would flow, unexplained. The sync says what does not fit, and where to raise it."""
    broker = make_broker(extra=["max_packet_size 4000"])
    cfg, sync = make_sync(write_config, broker.port)
    make_store(cfg.gateway.data_dir, 3)
    db = sqlite3.connect(cfg.gateway.data_dir / "edgeos.db")
    with db:
        db.executemany(
            "INSERT INTO tags(id, device, name, kind) VALUES(?, 'd0', ?, 'number')",
            [(i, f"line{i:03d}/a_rather_long_tag_name_{i}") for i in range(8, 300)],
        )
    db.close()
    async with running(sync):
        await wait_until(lambda: sync.status.failures >= 2)
    assert sync.cursor == 0
    assert "does not fit the broker's Maximum Packet Size (4000 bytes)" in sync.status.last_error


async def test_an_oversize_message_is_what_the_broker_drops(write_config, make_broker, running):
    """The control: MQTT 3.1.1 has no such announcement, so the same broker and store over
    3.1.1 (the 128 KiB cap kept) lose the connection at the first large message, again and
    again; there `upstream.max_message` is the user's to set (docs/payload.md)."""
    broker = make_broker(extra=["max_packet_size 20000"])
    cfg, sync = make_sync(write_config, broker.port, 'mqtt_version = "3.1.1"\n')
    make_store(cfg.gateway.data_dir, 30, samples=3000)
    async with running(sync):
        await wait_until(lambda: sync.status.failures >= 2)
    assert sync.cursor < 30 and sync.status.max_message == 128 * 1024
    assert "lost the connection" in sync.status.last_error


async def test_a_broker_without_retained_messages(write_config, make_broker, running):
    """mosquitto with retain_available false refuses (MQTT 5 CONNACK 0x9A) a CONNECT whose will
    is retained, and drops a client at a retained PUBLISH. The sync then sends its will, status
    and tag dictionary unretained, and everything arrives once."""
    broker = make_broker(extra=["retain_available false"])
    cfg, sync = make_sync(write_config, broker.port)
    make_store(cfg.gateway.data_dir, 10)
    held = stored(cfg.gateway.data_dir)
    async with Central(broker.port) as central, running(sync):
        await wait_until(lambda: sync.cursor >= 10)
        await wait_until(lambda: set(central.seqs()) >= set(held))
    st = sync.status
    assert st.connects == 1 and st.failures == 1, st.last_error  # the refused retained will
    assert "Retain not supported" in st.last_error
    assert_each_once(central, held)


async def test_a_broker_of_qos_0_only_is_named(write_config, make_broker, running):
    """mosquitto with max_qos 0 drops a client at its first QoS 1 PUBLISH ("QoS not
    supported"). The sync names what is wrong instead of publishing: nothing is acknowledged,
    so nothing would be safe."""
    broker = make_broker(extra=["max_qos 0"])
    cfg, sync = make_sync(write_config, broker.port)
    make_store(cfg.gateway.data_dir, 3)
    async with running(sync):
        await wait_until(lambda: sync.status.failures >= 2)
    assert sync.cursor == 0 and sync.status.published_messages == 0
    assert "accepts QoS 0 only" in sync.status.last_error  # the will's QoS 1, refused at CONNACK
    # Without a will (the collector's sessions), the CONNACK's Maximum QoS 0 says it.
    from edgeos.errors import SyncError
    from edgeos.sync.mqtt import MqttTransport

    plain = MqttTransport("collector", {"servers": [f"127.0.0.1:{broker.port}"], "status_topic": None}, Path("."))
    with pytest.raises(SyncError, match="accepts QoS 0 only"):
        async with plain.session():
            pass


async def test_servers_are_tried_in_turn_and_a_session_subscribes(write_config, broker, dead_port, running):
    from edgeos.sync.mqtt import MqttTransport, servers

    assert servers({"servers": ["a:1", "[::1]:2", "b"], "port": 9}) == [("a", 1), ("::1", 2), ("b", 9)]
    assert servers({"host": "h", "tls": True}) == [("h", 8883)]
    # The first broker refuses the connection: the next attempt goes to the next one.
    cfg, sync = make_sync(
        write_config, broker.port, f'servers = ["127.0.0.1:{dead_port}", "127.0.0.1:{broker.port}"]\n'
    )
    make_store(cfg.gateway.data_dir, 10)
    async with Central(broker.port) as central, running(sync):
        await wait_until(lambda: sync.cursor >= 10)
        assert sync.status.failures >= 1 and sync.status.server == f"broker 127.0.0.1:{broker.port}"
        await wait_until(lambda: set(central.seqs()) >= set(range(1, 11)))
    # The module's subscribe capability, as the plant-side collector uses it (no status, no will).
    plain = MqttTransport("collector", {"servers": [f"127.0.0.1:{broker.port}"], "status_topic": None}, Path("."))
    async with plain.session() as session:
        await session.subscribe("edgeos/+/replay")
        async with aiomqtt.Client("127.0.0.1", broker.port) as c:
            await c.publish("edgeos/gwX/replay", b"hello", qos=1)
        async with asyncio.timeout(5):
            async for topic, payload in session.messages():
                assert (topic, payload) == ("edgeos/gwX/replay", b"hello")
                break


def _sparse_beside_busy(data_dir: Path, busy: int) -> None:
    """Unit 1 of device "sparse", then `busy` units of "busy", then unit busy + 2 of "sparse"
    (a meter polled every 15 minutes beside a fast PLC)."""
    from edgeos.store import schema

    data_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(data_dir / "edgeos.db")
    schema.create(db)
    db.execute("PRAGMA journal_mode=WAL")
    now = time.time_ns()

    def unit(device: str, k: int) -> tuple:
        ts = np.array([now + k], np.int64)
        blob = wire.encode_unit(device, np.array([1], np.int32), ts, np.ones(1), np.zeros(1, np.uint32))
        return (k, device, int(ts[0]), int(ts[0]), 1, blob)

    rows = [unit("sparse", 1), *(unit("busy", k) for k in range(2, busy + 2)), unit("sparse", busy + 2)]
    with db:
        db.execute("INSERT INTO tags(id, device, name, kind) VALUES(1, 'busy', 't', 'number')")
        db.executemany("INSERT INTO units(id, device, t_min, t_max, n, data) VALUES(?,?,?,?,?,?)", rows)
    db.close()


def test_a_sparse_devices_first_unit_of_a_session_names_its_predecessor_however_far_back(write_config):
    """A session's first message of a device names the device's previous unit (`pv`) even when
    150,000 units of others lie between: `pv` 0 there hid from consumers any loss just before
    it (a gateway restart or a broker reconnect; an independent tester's finding)."""
    cfg, sync = make_sync(write_config, 1)
    _sparse_beside_busy(cfg.gateway.data_dir, 150_000)
    outbox = Outbox(cfg.gateway.data_dir)
    try:
        _, messages, _, _ = sync._prepare(outbox, 150_001, None, {})
        ((device, seqs, payload, _),) = messages
        assert (device, seqs) == ("sparse", [150_002])
        assert wire.decode_envelope(payload).prev == 1
        # The summary is brought forward, not rebuilt, and answers below its bound too.
        assert outbox.device_before("sparse", 150_002) == 1
        assert outbox.device_before("busy", 150_002, scan=10) == 150_001
        assert outbox.device_before("sparse", 60_000, scan=10) == 1
        assert outbox.device_before("busy", 60_000, scan=10) == 59_999
        assert outbox.device_before("sparse", 30_000, scan=10) == 1  # below the summary's bound
        assert outbox.device_before("busy", 30_000, scan=0) == 29_999  # ... its last there asked for
        assert outbox.device_before("nobody", 150_002) == 0
    finally:
        outbox.close()
        sync.close()


def test_only_messages_on_the_replay_topic_are_requests() -> None:
    """An independent tester's finding: amqtt 0.12 sends a new clean session the retained
    messages of other clients' subscriptions, and the gateway took them as replay requests
    (counted malformed, or a well-formed one on another topic answered). The listener now
    takes only what matches its subscription, by MQTT 3.1.1 section 4.7's rules."""
    from edgeos.sync.engine import topic_matches

    assert topic_matches("edgeos/gw/replay", "edgeos/gw/replay")
    others = ("edgeos/gw/notreplay", "edgeos/gw/replay/gone", "edgeos/gw", "edgeos/gw2/replay", "/edgeos/gw/replay")
    for other in others:
        assert not topic_matches("edgeos/gw/replay", other), other
    assert topic_matches("edgeos/+/replay", "edgeos/gw/replay") and topic_matches("a/+", "a/")
    assert not topic_matches("edgeos/+/replay", "edgeos/a/b/replay")
    assert topic_matches("sport/#", "sport") and topic_matches("sport/#", "sport/tennis/player1")
    assert topic_matches("#", "anything/at/all") and not topic_matches("#", "$SYS/broker/load")
    assert not topic_matches("+/monitor", "$SYS/monitor") and topic_matches("$SYS/#", "$SYS/monitor")
