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
    assert detect <= 1.5 * TIMEOUT_S + POLL_S, detect

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


async def test_mqtt_upstream_through_stall_and_reset(tmp_path, monkeypatch):
    import aiomqtt

    from edgeos.sync import mqtt

    # A publish whose PUBACK died with the connection waits PUBLISH_TIMEOUT (30 s) before the
    # engine gives up on it and reconnects: measured 27-30 s to catch up after a reset
    # (docs/reliability.md). 5 s here keeps the suite's time; the behaviour is the same.
    monkeypatch.setattr(mqtt, "PUBLISH_TIMEOUT", 5.0)
    from herd import Mosquitto

    from edgeos import wire

    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    proxy = await FaultProxy("127.0.0.1", broker.port).start()
    cfg_path = tmp_path / "edgeos.toml"
    cfg_path.write_text(MQTT.format(port=proxy.port))
    cfg = load_config(cfg_path)
    seqs: set[int] = set()
    deliveries = 0

    async def listen() -> None:
        nonlocal deliveries
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="central") as client:
            await client.subscribe("edgeos/gw1/+/data", qos=1)
            async for msg in client.messages:
                m = wire.decode(bytes(msg.payload))
                seqs.update(m.seqs)
                deliveries += len(m.seqs)

    rt = Runtime(cfg)
    task = asyncio.create_task(rt.run(), name="runtime")
    listener = asyncio.create_task(listen(), name="listener")
    try:
        async with asyncio.timeout(60):
            await rt.running.wait()
            while rt.sync is None or rt.sync.status.state != "connected" or not seqs:
                await asyncio.sleep(0.02)
            t_stall = time.monotonic()
            proxy.set("stall")
            while rt.sync.status.state == "connected":
                await asyncio.sleep(0.01)
            detect = time.monotonic() - t_stall
            await asyncio.sleep(max(0.0, 3.0 - detect))
            proxy.set("pass")
            await asyncio.sleep(1.0)
            proxy.set("reset")
            await asyncio.sleep(0.5)
            proxy.set("pass")
            await asyncio.sleep(0.5)
            # Everything stored up to now reaches the broker (units committed at the stop itself
            # wait for the next start: not part of this check).
            stored = set(_stored_ids(cfg.gateway.data_dir))
            t_wait = time.monotonic()
            while not stored <= seqs:
                await asyncio.sleep(0.05)
            caught_up = time.monotonic() - t_wait
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
        f"faults.net.mqtt.stall_detect_s: {detect:.2f} (keepalive 1 s; issue target <= 1.5 s, "
        f"{'met' if detect <= 1.5 else 'MISSED'}); "
        f"{len(stored)} units stored, all delivered {caught_up:.1f} s after the link came back "
        f"({deliveries} deliveries, duplicates deduplicated by seq)"
    )
    assert stored <= seqs
    # paho (under aiomqtt) pings after one keep-alive of silence and gives up one more later,
    # checked once a second: about 2 keep-alives + 1 s, measured 1.86-5.04 s on a loaded machine.
    # The 1.5 is not met (docs/reliability.md); this asserts that the stall is detected.
    assert detect <= 10.0, detect


def _stored_ids(data_dir: Path) -> list[int]:
    import sqlite3

    db = sqlite3.connect(f"{(data_dir / 'edgeos.db').as_uri()}?mode=ro", uri=True)
    try:
        return [i for (i,) in db.execute("SELECT id FROM units")]
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


OPCUA_IDLE = OPCUA.replace("keepalive_count = 5", "keepalive_count = 10")


async def test_opcua_idle_subscription_through_the_proxy_is_not_stalled(tmp_path):
    """The negative side of stall detection: a healthy subscription whose value never changes
    gets only keep-alives; for several keep-alive intervals none of its tags may be marked Bad.
    (Keep-alive 1 s here: the bound, 1.5 s from the last answer, leaves room for a loaded
    machine; the server is asked for a keep-alive every 0.5 s, and asyncua's comes every 0.7 s.)"""
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
