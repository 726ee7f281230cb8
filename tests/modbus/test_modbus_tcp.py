"""The adapter against a real pymodbus server on a random loopback port (Modbus TCP and RTU over
TCP): types and byte orders, coalescing counted at the server, faults, sharing, reconnection."""

from __future__ import annotations

import asyncio
import struct
import time

import edgeos_test_peers_modbus as peers  # tests/peers/modbus.py, loaded by conftest.py
import numpy as np
import pytest
from edgeos.protocols.modbus import transport
from edgeos.protocols.modbus.config import BYTE_ORDERS, NUMERIC

from edgeos import Quality, plugins

VALUES = {
    "int16": -12345,
    "uint16": 54321,
    "int32": -123456789,
    "uint32": 3_000_000_000,
    "int64": -(2**50) - 3,
    "uint64": 2**52 + 7,
    "float16": -1.5,
    "float32": 3.25,
    "float64": -2.718281828459045,
}


device = peers.device


async def read_once(dev):
    adapter = plugins.load(plugins.PROTOCOLS, "modbus").create(dev)
    await adapter.connect()
    try:
        batches = [await adapter.read(g, time.time_ns()) for g in adapter.poll_groups()]
    finally:
        await adapter.close()
    return {dev.tags[i - dev.tags[0].id].name: (v, q, t) for b in batches for i, v, q, t in _rows(b)}, adapter


def _rows(b):
    text = b.text if b.text is not None else [None] * len(b)
    return zip(b.tags.tolist(), b.values.tolist(), b.quality.tolist(), list(text), strict=True)


async def test_every_type_and_byte_order_round_trips(tcp_peer, modbus_config, peer_module):
    peer = await tcp_peer()
    tags, layout, addr = [], [], 0
    for typ, (n, _) in NUMERIC.items():
        for order in BYTE_ORDERS:
            name = f"{typ}_{order}"
            tags.append(
                f'{{ name = "{name}", address = "hr{addr}", type = "{typ}", byte_order = "{order}", writable = true }}'
            )
            peer.set_registers(1, "hr", addr, peer_module.wire_registers(typ, order, VALUES[typ]))
            layout.append((name, typ, order, addr))
            addr += n
    peer.set_registers(1, "hr", 900, [0xFE07, 0b1000_0000_0000_0100, *struct.unpack(">3H", b"Line 4")])
    peer.set_registers(1, "ir", 3, [0x0102])
    peer.set_bits(1, "coil", 9, [True])
    peer.set_bits(1, "di", 4, [True, False])
    tags += [
        '{ name = "i8", address = "hr900", type = "int8", byte = "high", writable = true }',
        '{ name = "u8", address = "hr900", type = "uint8", byte = "low" }',
        '{ name = "bit2", address = "hr901.2", writable = true }',
        '{ name = "bit15", address = "40902.15" }',
        '{ name = "text", address = "hr902", type = "string", length = 6, writable = true }',
        '{ name = "input", address = "30004", scale = 0.5, offset = 1.0 }',
        '{ name = "coil", address = "coil9", writable = true }',
        '{ name = "di_on", address = "10005" }',
        '{ name = "di_off", address = "di5" }',
    ]
    cfg = modbus_config(device(peer.port, ",\n".join(tags)))
    dev = cfg.devices[0]
    got, _ = await read_once(dev)
    for name, typ, _, _ in layout:
        v, q, _ = got[name]
        want = struct.unpack(">" + peer_module.FMT[typ], struct.pack(">" + peer_module.FMT[typ], VALUES[typ]))[0]
        assert q == Quality.GOOD and v == float(want), name
    assert got["i8"][0] == -2 and got["u8"][0] == 7
    assert got["bit2"][0] == 1.0 and got["bit15"][0] == 1.0
    assert got["text"][2] == "Line 4" and np.isnan(got["text"][0])
    assert got["input"][0] == 0x0102 * 0.5 + 1.0
    assert got["coil"][0] == 1.0 and got["di_on"][0] == 1.0 and got["di_off"][0] == 0.0

    # Writes: type conversion on the way out, checked at the server's memory.
    adapter = plugins.load(plugins.PROTOCOLS, "modbus").create(dev)
    await adapter.connect()
    try:
        by_name = {t.name: t for t in dev.tags}
        for name, typ, order, a in layout:
            new = -VALUES[typ] if typ.startswith(("int", "float")) else VALUES[typ] // 3
            await adapter.write(by_name[name], new)
            n = NUMERIC[typ][0]
            assert peer.registers(1, "hr", a, n) == peer_module.wire_registers(typ, order, new), name
        await adapter.write(by_name["i8"], -100)
        await adapter.write(by_name["bit2"], False)
        await adapter.write(by_name["text"], "ok")
        await adapter.write(by_name["coil"], "off")
    finally:
        await adapter.close()
    assert peer.registers(1, "hr", 900, 2) == [(0x9C << 8) | 0x07, 0b1000_0000_0000_0000]
    assert peer.registers(1, "hr", 902, 3) == [0x6F6B, 0, 0]
    assert peer.bits(1, "coil", 9, 1) == [False]


async def test_coalescing_issues_the_planned_requests(tcp_peer, modbus_config):
    peer = await tcp_peer()
    tags = [f'{{ name = "r{i}", address = "hr{i}" }}' for i in range(300)]
    tags += [f'{{ name = "f{i}", address = "ir{10 + 2 * i}", type = "float32" }}' for i in range(10)]
    tags += [f'{{ name = "c{i}", address = "coil{3 * i}", poll_interval = "1s" }}' for i in range(50)]
    dev = modbus_config(device(peer.port, ",\n".join(tags))).devices[0]
    describe = "\n".join(plugins.load(plugins.PROTOCOLS, "modbus").describe(dev))
    assert "every 50ms: 310 tags in 4 requests" in describe and "every 1s: 50 tags in 1 request" in describe
    got, adapter = await read_once(dev)
    assert all(q == Quality.GOOD for _, q, _ in got.values())
    assert sorted(peer.reads(1)) == [
        ("coil", 0, 148),
        ("hr", 0, 125),
        ("hr", 125, 125),
        ("hr", 250, 50),
        ("ir", 10, 20),
    ]
    assert adapter.health()["requests"] == 5

    # Without coalescing: one request per tag, as `coalesce = false` promises.
    peer.requests.clear()
    dev = modbus_config(device(peer.port, ",\n".join(tags), "coalesce = false")).devices[0]
    await read_once(dev)
    assert peer.count(1) == 360


async def test_an_exception_4_marks_only_the_failing_tag_bad(tcp_peer, modbus_config):
    peer = await tcp_peer()
    peer.refuse[(1, "hr", 130)] = 4  # server device failure for any read touching hr130
    tags = [f'{{ name = "r{i}", address = "hr{i}" }}' for i in range(0, 200, 10)]
    dev = modbus_config(device(peer.port, ",\n".join(tags), "max_registers = 50")).devices[0]
    got, adapter = await read_once(dev)
    bad = sorted(n for n, (_, q, _) in got.items() if q != Quality.GOOD)
    # hr130 sits in the request 100..140 (max_registers = 50): it is split, only hr130 is Bad.
    assert bad == ["r130"]
    assert all(got[n][1] == Quality.BAD_DEVICE_FAILURE and np.isnan(got[n][0]) for n in bad)
    assert adapter.health()["refused_tags"]["r130"] == "exception 4 (server device failure)"


async def test_illegal_address_splits_the_request_so_neighbours_survive(tcp_peer, modbus_config, peer_module):
    # hr10..19 does not exist, hr25 neither: a coalesced read of 0..39 is refused as a whole.
    peer = await tcp_peer({1: peer_module.UnitMap(hr=[(0, 10), (20, 5), (26, 14)])})
    peer.set_registers(1, "hr", 0, list(range(100, 110)))
    tags = [f'{{ name = "r{i}", address = "hr{i}" }}' for i in [*range(0, 10), 15, *range(20, 40)]]
    dev = modbus_config(device(peer.port, ",\n".join(tags))).devices[0]
    adapter = plugins.load(plugins.PROTOCOLS, "modbus").create(dev)
    await adapter.connect()
    try:
        (group,) = adapter.poll_groups()
        first = await adapter.read(group, time.time_ns())
        requests_first = peer.count(1)
        peer.requests.clear()
        second = await adapter.read(group, time.time_ns())
    finally:
        await adapter.close()
    names = [t.name for t in dev.tags]
    for b in (first, second):
        bad = {names[i] for i, q in zip(b.tags.tolist(), b.quality.tolist(), strict=True) if q}
        assert bad == {"r15", "r25"}
        assert b.values[:10].tolist() == list(range(100, 110))
    assert (first.quality[[names.index("r15"), names.index("r25")]] == Quality.BAD_DEVICE_FAILURE).all()
    # The refined plan is kept: the next poll costs a few requests, not the search again.
    assert peer.count(1) < requests_first and peer.count(1) <= 6
    assert adapter.health()["splits"] >= 2


async def test_a_response_of_the_wrong_length_is_rejected(tcp_peer, modbus_config):
    peer = await tcp_peer()
    peer.short.add(1)
    peer.set_registers(1, "hr", 0, [1, 2, 3])
    dev = modbus_config(device(peer.port, '{ name = "a", address = "hr0" }, { name = "b", address = "hr2" }')).devices[
        0
    ]
    got, adapter = await read_once(dev)
    assert {q for _, q, _ in got.values()} == {Quality.BAD_DECODING_ERROR}
    assert all(np.isnan(v) for v, _, _ in got.values())
    assert adapter.health()["bad_responses"] == 1


async def test_garbage_on_the_wire_never_becomes_values(tcp_peer, modbus_config):
    peer = await tcp_peer()
    peer.garble.add(1)
    peer.set_registers(1, "hr", 0, [7, 7])
    body = device(peer.port, '{ name = "a", address = "hr0" }, { name = "b", address = "hr1" }', "retries = 0")
    got, _ = await read_once(modbus_config(body.replace('"300ms"', '"150ms"')).devices[0])
    assert all(np.isnan(v) and Quality.severity(q) == "bad" for v, q, _ in got.values())


async def test_a_busy_device_is_asked_again(tcp_peer, modbus_config):
    peer = await tcp_peer()
    peer.busy[1] = 1
    peer.set_registers(1, "hr", 0, [42])
    got, _ = await read_once(modbus_config(device(peer.port, '{ name = "a", address = "hr0" }')).devices[0])
    assert got["a"][:2] == (42.0, Quality.GOOD) and peer.count(1) == 2


async def test_rtu_framing_over_tcp(tcp_peer, modbus_config):
    peer = await tcp_peer(framer="rtu")
    peer.set_registers(1, "hr", 4, [0x4049, 0x0FDB])
    body = device(peer.port, '{ name = "pi", address = "hr4", type = "float32" }', 'transport = "rtu_over_tcp"')
    got, _ = await read_once(modbus_config(body).devices[0])
    assert got["pi"][0] == pytest.approx(3.14159274) and got["pi"][1] == Quality.GOOD


async def test_devices_on_one_endpoint_share_one_connection(tcp_peer, modbus_config, run_runtime, peer_module):
    peer = await tcp_peer({1: peer_module.UnitMap(), 2: peer_module.UnitMap()})
    peer.set_registers(1, "hr", 0, [11])
    peer.set_registers(2, "hr", 0, [22])
    body = device(peer.port, '{ name = "a", address = "hr0" }', name="u1", unit=1)
    body += device(peer.port, '{ name = "a", address = "hr0" }', name="u2", unit=2)
    cfg = modbus_config(body)
    sink = peers.Collect(cfg)
    await run_runtime(cfg, sinks=[sink], until=lambda rt: len(sink.good("u1/a")) >= 5 and len(sink.good("u2/a")) >= 5)
    assert sink.good("u1/a")[-1][1] == 11 and sink.good("u2/a")[-1][1] == 22
    assert peer.connections == 1
    assert transport.open_links() == 0


async def test_a_restarted_server_is_reconnected(tcp_peer, modbus_config, run_runtime, peer_module):
    peer = await tcp_peer()
    port = peer.port
    peer.set_registers(1, "hr", 0, [5])
    cfg = modbus_config(device(port, '{ name = "a", address = "hr0" }'))
    sink = peers.Collect(cfg)
    state = {"phase": 0}

    async def restart() -> None:
        while len(sink.good("plc/a")) < 3:
            await asyncio.sleep(0.02)
        await peer.stop()
        state["phase"] = 1
        while not any(q == Quality.BAD_COMM_FAILURE for _, _, q in sink.rows["plc/a"]):
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # a few failed reconnects
        again = await tcp_peer(port=port)
        again.set_registers(1, "hr", 0, [6])
        state["phase"] = 2

    task = asyncio.create_task(restart())
    try:
        rt = await run_runtime(
            cfg, sinks=[sink], timeout=20, until=lambda rt: state["phase"] == 2 and sink.good("plc/a")[-1][1] == 6
        )
    finally:
        task.cancel()
    assert rt.devices["plc"].connects >= 2 and rt.devices["plc"].failures >= 1


@pytest.mark.parametrize("shared", [False, True], ids=["own-endpoint", "shared-endpoint"])
async def test_a_dead_device_does_not_slow_a_healthy_one(tcp_peer, modbus_config, run_runtime, peer_module, shared):
    healthy = await tcp_peer({1: peer_module.UnitMap(), 2: peer_module.UnitMap()})
    dead = healthy if shared else await tcp_peer()
    dead.silent.add(2)
    body = device(healthy.port, '{ name = "a", address = "hr0" }', name="ok", unit=1).replace('"50ms"', '"100ms"', 1)
    body += device(
        dead.port,
        '{ name = "a", address = "hr0" }, { name = "b", address = "ir0" }',
        "retries = 0",
        name="dead",
        unit=2,
    ).replace('"300ms"', '"60ms"')
    cfg = modbus_config(body)
    sink = peers.Collect(cfg)
    rt = await run_runtime(cfg, sinks=[sink], seconds=1.5)
    ts = np.array([r[0] for r in sink.good("ok/a")])
    gaps_ms = np.diff(ts) / 1e6
    assert len(ts) >= 10 and gaps_ms.max() < 500, gaps_ms  # 100 ms rhythm kept (generous bound)
    assert rt.devices["dead"].failures >= 1 and "no answer" in rt.devices["dead"].last_error
    assert not sink.good("dead/a") and sink.rows["dead/a"][0][2] in (Quality.BAD_TIMEOUT, Quality.BAD_COMM_FAILURE)
