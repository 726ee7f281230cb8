"""`edgeos serial test`: what sample lines parse into, without the device."""

from __future__ import annotations

from typer.testing import CliRunner

from edgeos.cli import app

CONFIG = """
[gateway]
id = "gw"
data_dir = "data"

[[devices]]
name = "scale"
protocol = "serial"
port = "/dev/ttyUSB0"
pattern = '^(?P<status>ST|US),GS,(?P<weight>[+-]\\d+\\.\\d+) (?P<unit>\\w+)$'
checksum = "sum8"
checksum_gap = 1
tags = [
  { name = "weight", scale = 1000.0 },
  { name = "stable", group = "status", type = "bool", true_values = ["ST"] },
  { name = "unit", type = "string" },
]
"""


def line(text: str) -> str:
    return f"{text}*{sum(text.encode()) & 0xFF:02X}"


def test_serial_test_shows_each_tag_and_refusals(write_config):
    cfg = write_config(CONFIG)
    good = line("ST,GS,+0012.34 kg")
    res = CliRunner().invoke(app, ["serial", "test", "scale", good, "-c", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "checksum sum8: found" in res.output and ": ok" in res.output
    assert "weight = 12340.0 (GOOD)" in res.output
    assert "stable = true (GOOD)" in res.output and "unit = 'kg' (GOOD)" in res.output
    bad = good[:-1] + ("0" if good[-1] != "0" else "1")
    res = CliRunner().invoke(app, ["serial", "test", "scale", bad, line("XX,GS"), "-c", str(cfg)])
    assert res.exit_code == 1
    assert "FAILED" in res.output and "refused: checksum" in res.output
    assert "no match" in res.output and "refused: no_match" in res.output
    assert "weight = - (BAD_DECODING_ERROR)" in res.output


def test_serial_test_names_a_device_that_is_not_serial(write_config):
    cfg = write_config(CONFIG)
    res = CliRunner().invoke(app, ["serial", "test", "nope", "x", "-c", str(cfg)])
    assert res.exit_code == 2 and "serial devices: scale" in res.output


def test_serial_test_with_the_device_timestamp(write_config):
    body = CONFIG.replace("(?P<unit>\\w+)$'", "(?P<unit>\\w+) (?P<t>[\\d:. -]+)$'")
    body = body.replace('checksum = "sum8"\nchecksum_gap = 1\n', "")
    body = body.replace(
        "tags = [",
        'timestamp_group = "t"\ntimestamp_format = "%d.%m.%Y %H:%M:%S"\ntimezone = "Europe/Berlin"\ntags = [',
    )
    cfg = write_config(body)
    res = CliRunner().invoke(app, ["serial", "test", "scale", "ST,GS,+0001.00 kg 04.12.2026 10:30:00", "-c", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "weight = 1000.0 (GOOD)  at 2026-12-04T09:30:00.000000000Z" in res.output
    res = CliRunner().invoke(app, ["serial", "test", "scale", "ST,GS,+0001.00 kg 99.12.2026 10:30:00", "-c", str(cfg)])
    assert res.exit_code == 1 and "refused: timestamp" in res.output


def test_a_modbus_ascii_answer_checks_with_lrc_hex(write_config):
    """A Modbus ASCII answer (":" unit, function, byte count, registers, LRC) read as a line:
    the LRC covers the bytes its hex digits encode, after the colon."""
    cfg = write_config(
        """
        [gateway]
        id = "gw"
        data_dir = "data"

        [[devices]]
        name = "meter"
        protocol = "serial"
        port = "/dev/ttyUSB0"
        pattern = '^:110306(?P<a>[0-9A-F]{4})(?P<b>[0-9A-F]{4})[0-9A-F]{4}$'
        checksum = "lrc_hex"
        checksum_from = 1
        tags = [{ name = "a", type = "string" }, { name = "b", type = "string" }]
        """
    )
    body = "110306AE415652" + "4340"
    lrc = (-sum(bytes.fromhex(body))) & 0xFF
    res = CliRunner().invoke(app, ["serial", "test", "meter", f":{body}{lrc:02X}", "-c", str(cfg)])
    assert res.exit_code == 0 and "a = 'AE41' (GOOD)" in res.output, res.output
    res = CliRunner().invoke(app, ["serial", "test", "meter", f":{body}{(lrc + 1) & 0xFF:02X}", "-c", str(cfg)])
    assert res.exit_code == 1 and "refused: checksum" in res.output, res.output
