"""Addresses, options, CSV register maps, `edgeos check` and `edgeos write` for Modbus."""

from __future__ import annotations

import pytest
from edgeos.protocols.modbus.config import Address, parse_address
from typer.testing import CliRunner

from edgeos import Quality, ValueKind, plugins
from edgeos.cli import app


@pytest.mark.parametrize(
    ("text", "table", "wire", "bit"),
    [
        ("40001", "hr", 0, None),
        ("400001", "hr", 0, None),
        ("465536", "hr", 65535, None),
        ("30010", "ir", 9, None),
        ("10001", "di", 0, None),
        ("00001", "coil", 0, None),
        ("40001.15", "hr", 0, 15),
        ("hr0", "hr", 0, None),
        ("HR 100", "hr", 100, None),
        ("holding:100.3", "hr", 100, 3),
        ("ir0x10", "ir", 16, None),
        ("coil_7", "coil", 7, None),
        ("di3", "di", 3, None),
    ],
)
def test_addresses_plant_engineers_write(text: str, table: str, wire: int, bit: int | None) -> None:
    a = parse_address(text)
    assert (a.table, a.wire(0), a.bit) == (table, wire, bit)


def test_address_base_applies_to_prefixed_addresses_only() -> None:
    assert parse_address("hr1").wire(1) == 0 and parse_address("hr1").wire(0) == 1
    assert parse_address("40001").wire(1) == 0 and parse_address("40001").wire(0) == 0
    assert parse_address("hr0") == Address("hr", 0, False)


@pytest.mark.parametrize("text", ["40000", "20001", "hr", "x100", "40001.16", "coil1.0", "hr70000", "4001"])
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="found"):
        parse_address(text)


def test_tag_kinds() -> None:
    plugin = plugins.load(plugins.PROTOCOLS, "modbus")
    assert plugin.tag_kind({"address": "coil1"}) is ValueKind.BOOL
    assert plugin.tag_kind({"address": "40001.2"}) is ValueKind.BOOL
    assert plugin.tag_kind({"address": "40001"}) is ValueKind.NUMBER
    assert plugin.tag_kind({"address": "40001", "type": "string", "length": 4}) is ValueKind.STRING


CSV = """\
name;address;type;byte_order;length;scale;offset;unit;poll_interval;writable;filters
# a register map exported from a spreadsheet (';' locale)
speed;40001;uint16;;;0.1;;rpm;;yes;deadband(abs=0.5)
temperature;hr2;float32;CDAB;;;;degC;200ms;;
level;ir0x10;int16;;;0.01;-5;m;;;
door;40011.4;;;;;;;;;
pump;coil0;;;;;;;1s;x;
label;hr20;string;BADC;2;;;;;;
"""


async def test_a_csv_register_map_is_read(tcp_peer, modbus_config, peer_module, run_runtime):
    peer = await tcp_peer()
    peer.set_registers(1, "hr", 0, [1234])
    peer.set_registers(1, "hr", 2, peer_module.wire_registers("float32", "CDAB", 80.5))
    peer.set_registers(1, "ir", 16, [0xFFFF])
    peer.set_registers(1, "hr", 10, [1 << 4])
    peer.set_registers(1, "hr", 20, [0x4241])  # "AB" with bytes swapped
    peer.set_bits(1, "coil", 0, [True])
    body = f"""
[[devices]]
name = "plc"
protocol = "modbus"
host = "127.0.0.1"
port = {peer.port}
poll_interval = "100ms"
tags_csv = "registers.csv"
tags = [{{ name = "label_len2", address = "hr20", type = "string", length = 2 }}]
"""
    cfg = modbus_config(body, registers__csv=CSV)
    assert [t.name for t in cfg.devices[0].tags] == [
        "label_len2",
        "speed",
        "temperature",
        "level",
        "door",
        "pump",
        "label",
    ]

    class Sink:
        rows: dict[str, tuple[float, int, str | None]] = {}

        async def put(self, b) -> None:
            text = b.text if b.text is not None else [None] * len(b)
            for t, v, q, s in zip(b.tags.tolist(), b.values.tolist(), b.quality.tolist(), text, strict=True):
                self.rows[cfg.tags[t].name] = (v, q, s)

        async def flush(self) -> None:
            return None

    sink = Sink()
    await run_runtime(cfg, sinks=[sink], until=lambda rt: len(sink.rows) == len(cfg.tags))
    rows = sink.rows
    assert rows["speed"][0] == pytest.approx(123.4) and rows["temperature"][0] == 80.5
    assert rows["level"][0] == pytest.approx(-5.01) and rows["door"][0] == 1.0 and rows["pump"][0] == 1.0
    assert rows["label"][2] == "AB" and rows["label_len2"][2] == "BA"
    assert all(q == Quality.GOOD for _, q, _ in rows.values())
    speed = next(t for t in cfg.devices[0].tags if t.name == "speed")
    assert speed.meta.writable and speed.filters[0].name == "deadband"


def test_check_prints_the_request_plan(write_config) -> None:
    tags = ",\n".join(f'{{ name = "r{i}", address = "hr{i}" }}' for i in range(200))
    cfg = write_config(
        '[gateway]\nid = "gw"\ndata_dir = "data"\n[[devices]]\nname = "plc"\nprotocol = "modbus"\n'
        f'host = "127.0.0.1"\npoll_interval = "100ms"\ntags = [\n{tags}\n]\n'
    )
    out = CliRunner().invoke(app, ["check", str(cfg)])
    assert out.exit_code == 0, out.output
    assert "modbus tcp 127.0.0.1:502 unit 1: 20.0 requests/s (coalesced)" in out.output
    assert "every 100ms: 200 tags in 2 requests, 200 registers read" in out.output
    assert "hr 0..124 (125 registers, 125 tags)" in out.output
    # The plan names the unit id the reads use, under either of its names.
    for key in ("unit_id", "unit"):
        cfg.write_text(cfg.read_text().replace('host = "127.0.0.1"\n', f'host = "127.0.0.1"\n{key} = 2\n', 1))
        out = CliRunner().invoke(app, ["check", str(cfg)])
        assert "modbus tcp 127.0.0.1:502 unit 2: 20.0 requests/s (coalesced)" in out.output, out.output
        cfg.write_text(cfg.read_text().replace(f"{key} = 2\n", ""))


async def test_edgeos_write_converts_checks_and_refuses(tcp_peer, write_config, peer_module) -> None:
    peer = await tcp_peer()
    cfg = write_config(
        f"""
[gateway]
id = "gw"
data_dir = "data"
[[devices]]
name = "plc"
protocol = "modbus"
host = "127.0.0.1"
port = {peer.port}
tags = [
  {{ name = "setpoint", address = "hr5", type = "int16", scale = 0.1, writable = true }},
  {{ name = "ratio", address = "hr6", type = "float32", byte_order = "DCBA", writable = true }},
  {{ name = "pump", address = "coil2", writable = true }},
  {{ name = "speed", address = "hr0" }},
  {{ name = "speed_sp", address = "hr7", type = "uint16", writable = true }},
  {{ name = "gain", address = "hr8", type = "float32", writable = true }},
]
"""
    )
    runner = CliRunner()

    def write(*args: str):
        # The CLI runs its own event loop: call it from a thread so this test's loop serves the peer.
        import asyncio

        return asyncio.to_thread(runner.invoke, app, ["write", "-c", str(cfg), *args])  # "-12.3" as it is

    out = await write("plc", "setpoint", "-12.3")
    assert out.exit_code == 0, out.output
    assert peer.registers(1, "hr", 5, 1) == [(-123) & 0xFFFF]
    out = await write("plc", "ratio", "0.25")
    assert out.exit_code == 0 and peer.registers(1, "hr", 6, 2) == peer_module.wire_registers("float32", "DCBA", 0.25)
    out = await write("plc", "pump", "on")
    assert out.exit_code == 0 and peer.bits(1, "coil", 2, 1) == [True]
    out = await write("plc", "setpoint", "5000")
    assert out.exit_code == 1 and "out of range for int16" in out.output
    out = await write("plc", "speed", "1")
    assert out.exit_code == 1 and "not writable" in out.output
    out = await write("plc", "pump", "maybe")
    assert out.exit_code == 2 and "expected true/false" in out.output
    assert peer.registers(1, "hr", 5, 1) == [(-123) & 0xFFFF]
    # The confirmation says what the device holds, and when that was rounded.
    out = await write("plc", "speed_sp", "12.7")
    assert out.exit_code == 0 and peer.registers(1, "hr", 7, 1) == [13]
    assert "wrote plc/speed_sp = 13 (asked 12.7; rounded" in out.output
    out = await write("plc", "setpoint", "-12.34")
    assert "= -12.3 (asked -12.34; rounded" in out.output
    out = await write("plc", "gain", "0.1")
    assert "wrote plc/gain = 0.1\n" in out.output  # float32's 0.1, in float32's shortest form
    out = await write("plc", "pump", "off")
    assert "wrote plc/pump = false" in out.output


def test_command_line_integers_stay_exact() -> None:
    from edgeos.cli.device import parse_value

    assert parse_value("18446744073709551615", ValueKind.NUMBER) == 2**64 - 1
    assert type(parse_value("-0x10", ValueKind.NUMBER)) is int and parse_value("-0x10", ValueKind.NUMBER) == -16
    assert parse_value("2.5", ValueKind.NUMBER) == 2.5 and parse_value("1e3", ValueKind.NUMBER) == 1000.0
    with pytest.raises(ValueError, match="expected a number"):
        parse_value("twelve", ValueKind.NUMBER)


async def test_byte_orders_are_case_insensitive_like_addresses(tcp_peer, modbus_config, peer_module) -> None:
    from edgeos import ConfigError

    peer = await tcp_peer()
    peer.set_registers(1, "hr", 0, peer_module.wire_registers("float32", "CDAB", 3.25))
    peer.set_registers(1, "hr", 2, peer_module.wire_registers("int32", "DCBA", -7))
    tags = (
        '{ name = "f", address = "hr0", type = "float32", byte_order = "cdab" },\n'
        '{ name = "i", address = "hr2", type = "int32", byte_order = "Dcba" }'
    )
    dev = modbus_config(peer_module.device(peer.port, tags)).devices[0]
    adapter = plugins.load(plugins.PROTOCOLS, "modbus").create(dev)
    await adapter.connect()
    try:
        (batch,) = [await adapter.read(g, 0) for g in adapter.poll_groups()]
    finally:
        await adapter.close()
    assert batch.values.tolist() == [3.25, -7.0] and batch.quality.tolist() == [Quality.GOOD] * 2
    with pytest.raises(ConfigError) as info:
        modbus_config(
            peer_module.device(peer.port, '{ name = "x", address = "hr0", type = "int32", byte_order = "abdc" }')
        )
    (problem,) = info.value.problems
    assert problem.path.endswith(".byte_order")
    assert problem.message.startswith('found "abdc", expected one of ABCD, CDAB, BADC, DCBA')


def test_zero_transaction_id_applies_to_modbus_tcp_only(modbus_config) -> None:
    from edgeos import ConfigError

    body = """
        [[devices]]
        name = "conv"
        protocol = "modbus"
        transport = "rtu_over_tcp"
        host = "127.0.0.1"
        zero_transaction_id = true
        tags = [{ name = "a", address = "hr0" }]
    """
    with pytest.raises(ConfigError) as info:
        modbus_config(body)
    (problem,) = info.value.problems
    assert problem.path.endswith(".zero_transaction_id") and 'only with transport = "tcp"' in problem.message
