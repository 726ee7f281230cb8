"""Network faults between the gateway and its peers, through tests/faults/proxy.py.

Modbus TCP (a real pymodbus server): the proxy stalls, resets mid-message, cuts after 9 bytes
of a 17-byte answer, and trickles, in turn, while the runtime polls every 50 ms with a 300 ms
timeout and no retries, beside a simulated device polled every 100 ms. Promises checked
(docs/reliability.md, "Network faults"):
- a stall is detected (Bad samples) within 1.5 timeouts of the first request it holds;
- no partial value: every Good sample is exactly the device's value (a 32-bit integer and a
  float over 4 registers);
- no sample lost: every sample the runtime produced is in the store;
- memory bounded (RSS growth printed and bounded);
- the other device's polling goes on at its rate.
Negative control: the proxy flips a byte (corruption TCP does not catch); the value check
must notice it.

MQTT (the transport alone, and the gateway's upstream), keep-alive 1 s: an idle link is kept,
a stalled one dropped by the watchdog 1.5 keep-alives after its last packet; a reset while a
publish waits for its PUBACK fails it at once, and every stored unit arrives, decoded equal.
Negative control: without its early pings the idle link must be dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import resource
import sys
import time
from pathlib import Path

import numpy as np

from edgeos import Quality
from edgeos.config import load_config
from edgeos.runtime import Runtime
from edgeos.store import StoreReader

sys.path.insert(0, str(Path(__file__).parent))
from proxy import FaultProxy  # noqa: E402


def _peers():
    name = "edgeos_test_peers_modbus"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "peers" / "modbus.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


A, B = 3_000_000_123, 1234.5  # uint32 hr0..1, float32 hr2..3
POLL_S, TIMEOUT_S, STEADY_S = 0.05, 0.3, 0.1

CONFIG = """
[gateway]
id = "gw1"
data_dir = "data"
log_level = "error"
[[devices]]
name = "plc"
protocol = "modbus"
host = "127.0.0.1"
port = {port}
unit_id = 1
poll_interval = "50ms"
timeout = "300ms"
retries = 0
reconnect_min = "20ms"
reconnect_max = "100ms"
tags = [
  {{ name = "a", address = "hr0", type = "uint32" }},
  {{ name = "b", address = "hr2", type = "float32" }},
]
[[devices]]
name = "steady"
protocol = "simulated"
poll_interval = "100ms"
tags = [{{ name = "s", signal = "ramp" }}]
"""


class Sink:
    """Every sample the runtime produced: (arrival monotonic, key, ts, value, quality)."""

    def __init__(self, cfg) -> None:
        self.keys = [m.key for m in cfg.tags]
        self.rows: list[tuple[float, str, int, float, int]] = []

    async def put(self, b) -> None:
        now = time.monotonic()
        for t, ts, v, q in zip(b.tags.tolist(), b.ts.tolist(), b.values.tolist(), b.quality.tolist(), strict=True):
            self.rows.append((now, self.keys[t], ts, v, q))

    async def flush(self) -> None:
        return None

    def of(self, key: str, since: float = 0.0) -> list[tuple[float, str, int, float, int]]:
        return [r for r in self.rows if r[1] == key and r[0] >= since]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def wrong_values(sink: Sink) -> list[tuple[str, float]]:
    bad = []
    for _, key, _, v, q in sink.rows:
        if q == Quality.GOOD and ((key == "plc/a" and v != A) or (key == "plc/b" and v != B)):
            bad.append((key, v))
    return bad


async def _setup(tmp_path: Path):
    peers = _peers()
    peer = await peers.ModbusPeer().start_tcp()
    peer.set_registers(1, "hr", 0, peers.wire_registers("uint32", "ABCD", A))
    peer.set_registers(1, "hr", 2, peers.wire_registers("float32", "ABCD", B))
    proxy = await FaultProxy("127.0.0.1", peer.port).start()
    cfg_path = tmp_path / "edgeos.toml"
    cfg_path.write_text(CONFIG.format(port=proxy.port))
    cfg = load_config(cfg_path)
    sink = Sink(cfg)
    return peer, proxy, cfg, sink


async def test_modbus_through_stall_reset_cut_and_trickle(tmp_path):
    peer, proxy, cfg, sink = await _setup(tmp_path)
    rt = Runtime(cfg, sinks=[sink])
    task = asyncio.create_task(rt.run(), name="runtime")
    marks: dict[str, float] = {}
    try:
        async with asyncio.timeout(20):
            await rt.running.wait()
            while not [r for r in sink.of("plc/a") if r[4] == Quality.GOOD]:
                await asyncio.sleep(0.02)
        rss0 = _rss_mb()
        await asyncio.sleep(0.5)
        phases = [
            ("stall", {}, 1.5),
            ("pass", {}, 1.0),
            ("reset", {}, 0.5),
            ("pass", {}, 1.0),
            ("cut", {"cut_after": 9}, 0.8),
            ("pass", {}, 1.0),
            ("trickle", {"trickle_s": 0.015}, 1.2),
            ("pass", {}, 1.2),
        ]
        for i, (mode, kw, secs) in enumerate(phases):
            marks[f"{i}:{mode}"] = time.monotonic()
            proxy.set(mode, **kw)
            await asyncio.sleep(secs)
        rss1 = _rss_mb()
    finally:
        rt.stop()
        await asyncio.wait_for(task, 30)
        await proxy.stop()
        await peer.stop()

    # A stall is detected within 1.5 timeouts of the first request it holds (which goes out at
    # most one poll interval after the stall began).
    t_stall = marks["0:stall"]
    first_bad = next(r[0] for r in sink.of("plc/a", t_stall) if r[4] != Quality.GOOD)
    detect = first_bad - t_stall
    print(f"faults.net.modbus.stall_detect_s: {detect:.3f} (target <= 1.5 x timeout {TIMEOUT_S} s + poll {POLL_S} s)")
    # Generous: the figure above is the measurement (a timed bound here would fail on a loaded
    # machine); this says the stall was seen, as Bad samples, at all.
    assert detect < 10, detect

    # Every fault phase ended in recovery: Good samples again in the pass phase after it.
    for name, t0 in marks.items():
        if name.endswith(":pass"):
            assert any(r[4] == Quality.GOOD for r in sink.of("plc/a", t0)), f"no recovery after {name}"
    bad = [r for r in sink.rows if r[1] == "plc/a" and r[4] != Quality.GOOD]
    assert bad, "the faults produced no Bad samples: were they injected?"

    # No partial (or otherwise wrong) value.
    assert not wrong_values(sink), wrong_values(sink)[:5]

    # No sample lost: the store holds every sample the runtime produced, per tag.
    with StoreReader(cfg.gateway.data_dir) as r:
        for key in ("plc/a", "plc/b", "steady/s"):
            stored = len(r.history(key))
            produced = len(sink.of(key))
            assert stored == produced, f"{key}: produced {produced}, stored {stored}"

    # The other device polled on at its rate through every fault.
    steady = np.array([r[2] for r in sink.of("steady/s", marks["0:stall"])], np.int64)
    gaps = np.diff(steady) / 1e9
    span = time.monotonic() - marks["0:stall"]
    print(
        f"faults.net.modbus.other_device: {len(steady)} polls in {span:.1f} s at {STEADY_S} s, "
        f"max gap {gaps.max():.3f} s; RSS {rss0:.0f} -> {rss1:.0f} MB; "
        f"{len(bad)} Bad samples, {proxy.connections} connections, {proxy.resets} resets"
    )
    assert gaps.max() < 5 * STEADY_S, gaps.max()
    assert rss1 - rss0 < 50


async def test_negative_control_a_flipped_byte_is_caught_by_the_value_check(tmp_path):
    peer, proxy, cfg, sink = await _setup(tmp_path)
    rt = Runtime(cfg, sinks=[sink], store=False)
    task = asyncio.create_task(rt.run(), name="runtime")
    try:
        async with asyncio.timeout(20):
            await rt.running.wait()
            proxy.set("flip")
            while len([r for r in sink.rows if r[1] == "plc/b"]) < 5:
                await asyncio.sleep(0.02)
    finally:
        rt.stop()
        await asyncio.wait_for(task, 30)
        await proxy.stop()
        await peer.stop()
    assert wrong_values(sink), "the value check did not notice corrupted answers"


# -- MQTT: the gateway's upstream through the proxy -----------------------------------------

MQTT = """
[gateway]
id = "gw1"
data_dir = "data"
log_level = "error"
[store]
commit_interval = "50ms"
[upstream]
enabled = true
host = "127.0.0.1"
port = {port}
keepalive = "1s"
reconnect_min = "100ms"
reconnect_max = "1s"
[[devices]]
name = "press"
protocol = "simulated"
poll_interval = "50ms"
tags = [{{ name = "p", signal = "ramp" }}]
"""


async def _until(pred, what: str, within: float) -> float:
    """Seconds until `pred()` held, polled every 10 ms; fails the test after `within` s."""
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < within, f"{what}: not within {within} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def _idle_then_stall(tmp_path: Path, idle: float) -> tuple[float, float, int, float | None, object]:
    """The transport alone through the proxy, subscribed to a topic nobody publishes to: idle
    for `idle` s, then stalled. Returns (longest silence while idle, when the idle link was
    dropped or None, bytes that crossed while idle, time from the stall to the drop, failure)."""
    from herd import Mosquitto

    from edgeos.sync.mqtt import MqttTransport

    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    proxy = await FaultProxy("127.0.0.1", broker.port).start()
    options = {"host": "127.0.0.1", "port": proxy.port, "keepalive": 1_000_000_000, "status_topic": None}
    transport = MqttTransport("gw1", options, tmp_path)
    detect = None
    try:
        async with asyncio.timeout(60), transport.session() as session:
            await session.subscribe("edgeos/gw1/replay")
            bytes0, worst, dropped = proxy.bytes, 0.0, None
            t_idle = time.monotonic()
            while time.monotonic() - t_idle < idle:
                worst = max(worst, time.monotonic() - session.last_in)
                if session.failure is not None:
                    dropped = time.monotonic() - t_idle
                    break
                await asyncio.sleep(0.02)
            idle_bytes = proxy.bytes - bytes0
            if dropped is None:
                t_stall = time.monotonic()
                proxy.set("stall")
                await session.lost.wait()
                detect = time.monotonic() - t_stall
                print(
                    f"faults.net.mqtt.stall_detect_s: {detect:.3f} idle (keep-alive 1 s; dropped "
                    f"{time.monotonic() - session.last_in:.3f} s after the last packet received: {session.failure})"
                )
    finally:
        await proxy.stop()
        broker.stop()
    return worst, dropped, idle_bytes, detect, session.failure


async def test_mqtt_idle_link_is_kept_and_a_stalled_one_dropped_by_the_watchdog(tmp_path):
    """Keep-alive 1 s: idle for 6 keep-alives through a healthy proxy the transport stays
    connected (its early PINGREQs are answered); stalled, the watchdog drops it."""
    from edgeos.sync.mqtt import STALL_AFTER

    worst, dropped, idle_bytes, detect, failure = await _idle_then_stall(tmp_path, 6.0)
    print(
        f"faults.net.mqtt.idle_max_silence_s: {worst:.3f} (6 idle keep-alives of 1 s, {idle_bytes} bytes of "
        f"pings; the watchdog drops at {STALL_AFTER:g} s)"
    )
    assert dropped is None, f"a healthy idle link was dropped after {dropped:.2f} s: {failure}"
    assert idle_bytes > 0, "no ping crossed the idle link"
    assert "stalled" in str(failure), failure  # the watchdog's, not another check
    assert detect is not None and detect <= 10.0, detect


async def test_negative_control_without_early_pings_an_idle_link_is_dropped(tmp_path, monkeypatch):
    from edgeos.sync import mqtt

    monkeypatch.setattr(mqtt, "PING_AFTER", 100.0)  # the watchdog alone, no pings of its own
    _, dropped, _, _, failure = await _idle_then_stall(tmp_path, 6.0)
    assert dropped is not None, "the idle check did not notice a link left without pings"
    assert "stalled" in str(failure), failure


async def test_mqtt_upstream_through_stall_and_reset_mid_publish(tmp_path):
    """The gateway's upstream: a stall while data flows is detected by the watchdog; a reset
    while publishes wait for their PUBACK fails them at once (not after PUBLISH_TIMEOUT), the
    sync reconnects and sends them again, and every stored unit arrives, decoded equal."""
    import aiomqtt
    from herd import Mosquitto

    from edgeos import wire

    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    proxy = await FaultProxy("127.0.0.1", broker.port).start()
    cfg_path = tmp_path / "edgeos.toml"
    cfg_path.write_text(MQTT.format(port=proxy.port))
    cfg = load_config(cfg_path)
    received: dict[int, wire.Unit] = {}
    deliveries = 0
    subscribed = asyncio.Event()

    async def listen() -> None:
        nonlocal deliveries
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="central") as client:
            await client.subscribe("edgeos/gw1/+/data", qos=1)
            subscribed.set()
            async for msg in client.messages:
                m = wire.decode(bytes(msg.payload))
                for seq, unit in zip(m.seqs, m.units, strict=True):
                    received.setdefault(seq, unit)
                deliveries += len(m.seqs)

    listener = asyncio.create_task(listen(), name="listener")
    async with asyncio.timeout(30):
        await subscribed.wait()  # before the gateway's first unit: the consumer misses none
    rt = Runtime(cfg)
    task = asyncio.create_task(rt.run(), name="runtime")
    try:
        async with asyncio.timeout(90):
            await rt.running.wait()
            await _until(lambda: rt.sync is not None and rt.sync.status.state == "connected" and received, "up", 30)
            sync = rt.sync
            # A stall while data flows.
            proxy.set("stall")
            detect = await _until(lambda: sync.status.state != "connected", "stall detected", 30)
            stall_error = sync.status.last_error
            proxy.set("pass")
            await _until(lambda: sync.status.state == "connected", "reconnected after the stall", 30)
            # A reset while publishes wait for their PUBACK: hold the link until one does (on a
            # machine so loaded that none went out before the watchdog dropped the link, again).
            for _ in range(5):
                proxy.set("stall")
                await _until(
                    lambda: any(lane.inflight for lane in sync._lanes) or sync.status.state != "connected",
                    "a publish in flight",
                    30,
                )
                if sync.status.state == "connected":
                    break
                proxy.set("pass")
                await _until(lambda: sync.status.state == "connected", "reconnected", 30)
            assert any(lane.inflight for lane in sync._lanes), "no publish in flight in 5 tries"
            inflight = sum(len(lane.inflight) for lane in sync._lanes)
            connects = sync.status.connects
            t_reset = time.monotonic()
            proxy.set("reset")
            failed = await _until(lambda: sync.status.state != "connected", "the reset noticed", 30)
            reset_error = sync.status.last_error
            proxy.set("pass")
            await _until(lambda: sync.status.connects > connects, "reconnected after the reset", 30)
            reconnected = time.monotonic() - t_reset
            stored = _stored_units(cfg.gateway.data_dir)  # units committed at the stop are not checked
            # 25 s: a publish still waiting out PUBLISH_TIMEOUT (30 s, the bug this test is for) fails.
            await _until(lambda: set(stored) <= set(received), "every stored unit delivered", 25)
            caught_up = time.monotonic() - t_reset
    finally:
        rt.stop()
        listener.cancel()
        with contextlib.suppress(BaseException):
            await listener
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 30)
        await proxy.stop()
        broker.stop()
    print(
        f"faults.net.mqtt.stall_detect_s: {detect:.3f} with data flowing (keep-alive 1 s; to the sync's state "
        f"change; {stall_error})"
    )
    print(
        f"faults.net.mqtt.reset_catch_up_s: {caught_up:.2f} ({inflight} publish(es) in flight at the reset failed "
        f"after {failed:.3f} s, reconnected after {reconnected:.2f} s; {len(stored)} units stored, "
        f"{deliveries} deliveries)"
    )
    assert "stalled" in stall_error, stall_error
    assert "lost the connection" in reset_error, reset_error
    # No sample lost, none changed: every stored unit arrived and decodes to what the store holds.
    for seq, (n, data) in stored.items():
        ref, got = wire.decode_unit(data), received[seq]
        assert len(got.ts) == n
        assert got.ts.tolist() == ref.ts.tolist() and got.values.tolist() == ref.values.tolist(), seq


def _stored_units(data_dir: Path) -> dict[int, tuple[int, bytes]]:
    """id -> (samples, unit bytes) of every unit in the store now."""
    import sqlite3

    db = sqlite3.connect(f"{(data_dir / 'edgeos.db').as_uri()}?mode=ro", uri=True)
    try:
        return {i: (n, bytes(d)) for i, n, d in db.execute("SELECT id, n, data FROM units")}
    finally:
        db.close()


# -- OPC UA: a subscription through the proxy --------------------------------------------------

OPCUA = """
[gateway]
id = "gw1"
data_dir = "data"
log_level = "error"
[[devices]]
name = "plc"
protocol = "opcua"
endpoint = "opc.tcp://127.0.0.1:{port}/"
security_mode = "None"
poll_interval = "100ms"
publishing_interval = "100ms"
keepalive_count = 5
timeout = "500ms"
reconnect_min = "100ms"
reconnect_max = "500ms"
tags = [{{ name = "x", node = "ns=2;s=x" }}]
"""


async def test_opcua_subscription_through_stall_and_reset(tmp_path):
    from test_malformed_input import OddPeer, _free_port

    port = _free_port()
    peer = await asyncio.to_thread(OddPeer, port)
    proxy = await FaultProxy("127.0.0.1", port).start()
    cfg_path = tmp_path / "edgeos.toml"
    cfg_path.write_text(OPCUA.format(port=proxy.port))
    cfg = load_config(cfg_path)
    sink = Sink(cfg)
    rt = Runtime(cfg, sinks=[sink])
    task = asyncio.create_task(rt.run(), name="runtime")

    async def until(pred, since: float, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((r[0] for r in sink.of("plc/x", since) if pred(r)), None)
            if hit is not None:
                return hit
            await asyncio.sleep(0.02)
        return None

    try:
        async with asyncio.timeout(60):
            await rt.running.wait()
            assert await until(lambda r: r[4] == Quality.GOOD, 0, 20)
            t_stall = time.monotonic()
            proxy.set("stall")
            session = rt.devices["plc"].adapter.session
            last_answer = session.last_publish if session is not None else None
            bad_at = await until(lambda r: r[4] != Quality.GOOD, t_stall, 10)
            proxy.set("pass")
            t_pass = time.monotonic()
            good_again = await until(lambda r: r[4] == Quality.GOOD, t_pass, 15)
            t_reset = time.monotonic()
            proxy.set("reset")
            reset_bad = await until(lambda r: r[4] != Quality.GOOD, t_reset, 10)
            proxy.set("pass")
            t_pass2 = time.monotonic()
            good_after_reset = await until(lambda r: r[4] == Quality.GOOD, t_pass2, 15)
    finally:
        rt.stop()
        await asyncio.wait_for(task, 30)
        await proxy.stop()
        peer.stop()
    keepalive = 0.1 * 5
    target = 1.5 * keepalive  # issue 28: within 1.5 keep-alive intervals
    detect = None if bad_at is None else bad_at - t_stall
    verdict = "n/a" if detect is None else ("met" if detect <= target else "MISSED")
    print(
        f"faults.net.opcua.stall_detect_s: {detect if detect is None else round(detect, 3)} "
        f"(keep-alive {keepalive} s; target <= 1.5 keep-alives = {target} s: {verdict}; "
        f"{None if bad_at is None or not last_answer else round(bad_at - last_answer, 3)} s after the last answer); "
        f"recovered {None if good_again is None else round(good_again - t_pass, 2)} s after the stall, "
        f"{None if good_after_reset is None else round(good_after_reset - t_pass2, 2)} s after a reset"
    )
    # Generous: the figure above is the measurement; this only says the stall was seen at all.
    assert detect is not None and detect < 10, detect
    assert good_again is not None and reset_bad is not None and good_after_reset is not None
    assert all(r[3] == 1.5 for r in sink.rows if r[1] == "plc/x" and r[4] == Quality.GOOD)


OPCUA_IDLE = OPCUA.replace("keepalive_count = 5", "keepalive_count = 20")


async def test_opcua_idle_subscription_through_the_proxy_is_not_stalled(tmp_path):
    """The negative side of stall detection: a healthy subscription whose value never changes
    gets only keep-alives; for several keep-alive intervals none of its tags may be marked Bad.
    (Keep-alive 2 s here: the mark, 2.8 s from the last answer, leaves room for a loaded
    machine; the server is asked for a keep-alive every 1 s, and asyncua's comes every 1.2 s.)"""
    from test_malformed_input import OddPeer, _free_port

    port = _free_port()
    peer = await asyncio.to_thread(OddPeer, port)
    proxy = await FaultProxy("127.0.0.1", port).start()
    cfg_path = tmp_path / "edgeos.toml"
    cfg_path.write_text(OPCUA_IDLE.format(port=proxy.port))
    cfg = load_config(cfg_path)
    sink = Sink(cfg)
    rt = Runtime(cfg, sinks=[sink])
    task = asyncio.create_task(rt.run(), name="runtime")
    idle_s = 6.0
    try:
        async with asyncio.timeout(60):
            await rt.running.wait()
            while not any(r[4] == Quality.GOOD for r in sink.of("plc/x")):
                await asyncio.sleep(0.02)
            adapter = rt.devices["plc"].adapter
            before = dict(adapter.health())
            t0 = time.monotonic()
            await asyncio.sleep(idle_s)
            after = dict(rt.devices["plc"].adapter.health())
            same_adapter = rt.devices["plc"].adapter is adapter
    finally:
        rt.stop()
        await asyncio.wait_for(task, 30)
        await proxy.stop()
        peer.stop()
    keepalives = after["keepalives"] - before["keepalives"]
    print(
        f"faults.net.opcua.idle: {keepalives} keep-alives in {idle_s} s, stalls {after['stalls']}, "
        f"rebuilds {after['silent_rebuilds']}"
    )
    assert keepalives >= 3  # idle indeed: the subscription lived on keep-alives
    assert after["stalls"] == 0 and after["silent_rebuilds"] == 0 and same_adapter
    assert not [r for r in sink.of("plc/x", t0) if r[4] != Quality.GOOD]
