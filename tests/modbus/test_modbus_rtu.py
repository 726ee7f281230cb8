"""Modbus RTU on a serial line: a pymodbus serial server on one end of a socat pty pair, the
adapter on the other; several units share the line (and one connection)."""

from __future__ import annotations

import edgeos_test_peers_modbus as peers  # tests/peers/modbus.py, loaded by conftest.py
import numpy as np

from edgeos import Quality


def rtu_device(path: str, name: str, unit: int, tags: str, extra: str = "") -> str:
    return f"""
[[devices]]
name = "{name}"
protocol = "modbus"
transport = "rtu"
serial_port = "{path}"
baudrate = 115200
unit = {unit}
poll_interval = "100ms"
timeout = "200ms"
retries = 0
reconnect_min = "50ms"
reconnect_max = "200ms"
{extra}
tags = [{tags}]
"""


async def test_units_on_one_serial_line_are_read_without_interleaving(
    pty_pair, peer_module, modbus_config, run_runtime
):
    peer = peer_module.ModbusPeer({1: peer_module.UnitMap(), 2: peer_module.UnitMap()}, framer="rtu")
    await peer.start_rtu(pty_pair.a, baudrate=115200)
    try:
        peer.set_registers(1, "hr", 0, peer_module.wire_registers("float32", "CDAB", 21.5))
        peer.set_registers(2, "hr", 0, peer_module.wire_registers("int32", "DCBA", -7))
        peer.set_bits(2, "coil", 3, [True])
        tags1 = '{ name = "t", address = "40001", type = "float32", byte_order = "CDAB" }'
        tags2 = (
            '{ name = "n", address = "hr0", type = "int32", byte_order = "DCBA" }, '
            '{ name = "c", address = "coil3", writable = true }'
        )
        cfg = modbus_config(rtu_device(pty_pair.b, "m1", 1, tags1) + rtu_device(pty_pair.b, "m2", 2, tags2))
        sink = peers.Collect(cfg)
        rt = await run_runtime(
            cfg, sinks=[sink], until=lambda rt: all(len(sink.good(k)) >= 5 for k in ("m1/t", "m2/n", "m2/c"))
        )
        assert sink.good("m1/t")[-1][1] == 21.5 and sink.good("m2/n")[-1][1] == -7 and sink.good("m2/c")[-1][1] == 1
        # Interleaved frames on a line would corrupt CRCs: every request was answered and valid.
        for name in ("m1", "m2"):
            h = rt.devices[name]
            assert h.failures == 0, h.last_error
        assert not [r for rows in sink.rows.values() for r in rows if r[2] != Quality.GOOD]
        assert {u for u, *_ in peer.requests} == {1, 2}
    finally:
        await peer.stop()


async def test_a_silent_unit_on_a_shared_line_costs_only_its_own_timeouts(
    pty_pair, peer_module, modbus_config, run_runtime
):
    peer = peer_module.ModbusPeer({1: peer_module.UnitMap(), 3: peer_module.UnitMap()}, framer="rtu")
    await peer.start_rtu(pty_pair.a, baudrate=115200)
    peer.silent.add(3)
    try:
        peer.set_registers(1, "hr", 0, [99])
        body = rtu_device(pty_pair.b, "alive", 1, '{ name = "a", address = "hr0" }')
        body += rtu_device(pty_pair.b, "gone", 3, '{ name = "a", address = "hr0" }', 'poll_interval = "50ms"').replace(
            'poll_interval = "100ms"\n', "", 1
        )
        cfg = modbus_config(body.replace('timeout = "200ms"', 'timeout = "40ms"'))
        sink = peers.Collect(cfg)
        rt = await run_runtime(cfg, sinks=[sink], seconds=1.5)
        ts = np.array([r[0] for r in sink.good("alive/a")])
        gaps_ms = np.diff(ts) / 1e6
        assert len(ts) >= 8 and gaps_ms.max() < 500, gaps_ms  # the 100 ms rhythm holds (generous bound)
        assert rt.devices["gone"].failures >= 1 and not sink.good("gone/a")
    finally:
        await peer.stop()


async def test_serial_settings_must_agree_on_one_port(pty_pair, peer_module, modbus_config):
    from edgeos import DeviceError, plugins

    peer = peer_module.ModbusPeer(framer="rtu")
    await peer.start_rtu(pty_pair.a, baudrate=115200)
    try:
        # One config refuses the two at load (tests/serial/test_serial_config.py); devices of
        # two configs (an OEM's, built in code) are refused when the second connects.
        a = modbus_config(rtu_device(pty_pair.b, "a", 1, '{ name = "x", address = "hr0" }')).devices[0]
        b = modbus_config(
            rtu_device(pty_pair.b, "b", 2, '{ name = "x", address = "hr0" }').replace("115200", "9600")
        ).devices[0]
        plugin = plugins.load(plugins.PROTOCOLS, "modbus")
        first, second = plugin.create(a), plugin.create(b)
        await first.connect()
        try:
            try:
                await second.connect()
            except DeviceError as e:
                assert "same line settings" in str(e)
            else:
                raise AssertionError("a second baud rate on one port was accepted")
        finally:
            await second.close()
            await first.close()
    finally:
        await peer.stop()


async def test_a_serial_port_that_is_not_there_is_named_unplugged(tmp_path, modbus_config):
    # As the serial adapter says it (an independent tester's finding: a vanished pty read
    # "connection refused or port unavailable").
    from edgeos import DeviceError, plugins

    gone = tmp_path / "ttyUSB9"
    adapter = plugins.load(plugins.PROTOCOLS, "modbus").create(
        modbus_config(rtu_device(str(gone), "plc", 1, '{ name = "x", address = "hr0" }')).devices[0]
    )
    try:
        try:
            await adapter.connect()
        except DeviceError as e:
            assert f"{gone}: no such device (unplugged?)" in str(e), e
        else:
            raise AssertionError("a missing serial port connected")
    finally:
        await adapter.close()


def _fds_on(path: str) -> int:
    import os

    real = os.path.realpath(path)
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == real
        except OSError:
            pass
    return n


async def test_a_port_that_refuses_its_line_settings_is_named_and_not_held(pty_pair, modbus_config):
    """An independent tester's finding: a pty refuses even parity (EINVAL from tcsetattr) after
    the port was opened and locked; the half-made port stayed open with its lock until a
    garbage collection, so every reconnect read "in use (by the running daemon?)"."""
    from edgeos import DeviceError, plugins

    dev = modbus_config(
        rtu_device(pty_pair.b, "plc", 1, '{ name = "x", address = "hr0" }').replace(
            "baudrate = 115200", 'baudrate = 9600\nparity = "even"'
        )
    ).devices[0]
    plugin = plugins.load(plugins.PROTOCOLS, "modbus")
    for _ in range(3):  # each reconnect: the same reason, never "in use"
        adapter = plugin.create(dev)
        try:
            try:
                await adapter.connect()
            except DeviceError as e:
                assert "refuses these line settings" in str(e) and "9600 8E1" in str(e), e
                assert "in use" not in str(e), e
            else:
                raise AssertionError("a pty took even parity")
        finally:
            await adapter.close()
        assert _fds_on(pty_pair.b) == 0  # closed now, not at a later garbage collection
