"""Serial configs: every problem reported at load in one pass; ports not shared; edgeos check."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from edgeos.cli import app
from edgeos.errors import ConfigError

MANY_PROBLEMS = """
[[devices]]
name = "bad"
protocol = "serial"
port = "ftp://x"
parity = "sideways"
stopbits = 3
framing = "fixed"
terminator = "hex:zz"
encoding = "klingon"
pattern = '^(?P<w>[\\d.+'
checksum = "xor"
checksum_order = "little"
timestamp_format = "yesterday"
tags = [
  { name = "w" },
  { name = "x-y" },
  { name = "s", type = "string", scale = 2.0 },
  { name = "q", group = "nothing" },
]

[[devices]]
name = "poller"
protocol = "serial"
port = "/dev/ttyS9"
mode = "poll"
silence_timeout = "5s"
requests = [{ send = "W\\r\\n", timeout = "forever" }, { pattern = "(?P<a>\\\\d+)" }]
tags = [{ name = "a" }]
"""


def test_every_problem_in_one_pass(serial_config):
    with pytest.raises(ConfigError) as info:
        serial_config(MANY_PROBLEMS)
    msg = str(info.value)
    for expected in [
        'devices[0].port: found "ftp://x", expected a device path or socket://, rfc2217:// URL',
        'devices[0].parity: found "sideways", expected one of none, even, odd, mark, space',
        "devices[0].stopbits: found 3, expected 1, 1.5 or 2",
        'devices[0].frame_length: missing: required with framing = "fixed"',
        'devices[0].terminator: found "hex:zz", expected hex digits',
        'devices[0].encoding: found "klingon"',
        "devices[0].pattern: invalid regular expression",
        "devices[0].checksum_order: applies to 16-bit checksums, not to xor",
        'devices[0].timestamp_format: found "yesterday"',
        'devices[0](bad).tags[1](x-y).name: found "x-y", which cannot name a regex group',
        "devices[0](bad).tags[2](s).scale: scale and offset apply to numbers, not to a string tag",
        "devices[1].requests[0].timeout:",
        "devices[1].requests[1].send: missing required key",
        "devices[1].requests[0].pattern: missing: neither the request nor the device has a pattern",
        'devices[1].silence_timeout: applies to mode = "listen" (in poll mode each request has its timeout)',
    ]:
        assert expected in msg, f"{expected!r} not in:\n{msg}"


def test_a_tag_no_pattern_carries_is_refused(serial_config):
    body = """
    [[devices]]
    name = "d"
    protocol = "serial"
    port = "/dev/ttyS9"
    pattern = '^(?P<w>\\d+)$'
    tags = [{ name = "w" }, { name = "q", group = "nothing" }]
    """
    with pytest.raises(ConfigError, match=r'tags\[1\]\(q\).group: no pattern has a group named "nothing"'):
        serial_config(body)


SHARED = """
[[devices]]
name = "scale1"
protocol = "serial"
port = "{a}"
pattern = '(?P<w>\\d+)'
tags = [{{ name = "w" }}]

[[devices]]
name = "plc"
protocol = "modbus"
transport = "rtu"
serial_port = "{b}"
tags = [{{ name = "x", address = "hr0" }}]

[[devices]]
name = "plc2"
protocol = "modbus"
transport = "rtu"
serial_port = "{c}"
unit_id = 2
tags = [{{ name = "x", address = "hr0" }}]
"""


def test_two_devices_may_not_share_a_port_except_modbus_rtu(serial_config):
    with pytest.raises(ConfigError) as info:
        serial_config(SHARED.format(a="/dev/ttyUSB0", b="/dev/ttyUSB0", c="/dev/ttyUSB1"))
    assert 'devices[1].serial_port: "/dev/ttyUSB0" is also the port of device "scale1" (devices[0])' in str(info.value)
    # Modbus RTU devices among themselves share a line; a serial device alone on its port is fine.
    cfg = serial_config(SHARED.format(a="/dev/ttyUSB0", b="/dev/ttyUSB1", c="/dev/ttyUSB1"))
    assert [d.name for d in cfg.devices] == ["scale1", "plc", "plc2"]
    # ...with the line's one set of settings: a second baud rate is refused at load, naming
    # both (it was refused only when the second device connected).
    other_baud = SHARED.format(a="/dev/ttyUSB0", b="/dev/ttyUSB1", c="/dev/ttyUSB1") + "baudrate = 9600\n"
    with pytest.raises(ConfigError) as info:
        serial_config(other_baud)
    assert (
        'devices[2].serial_port: "/dev/ttyUSB1" is also the line of device "plc" (devices[1], baudrate 19200, '
        "parity none, bytesize 8, stopbits 1): devices on one serial line must use the same line settings "
        "(found baudrate 9600, parity none, bytesize 8, stopbits 1)"
    ) in str(info.value)


CHECKED = """
[gateway]
id = "gw"
data_dir = "data"

[[devices]]
name = "meter"
protocol = "serial"
port = "/dev/ttyUSB3"
baudrate = 19200
parity = "even"
terminator = "CR"
checksum = "crc16_ccitt"
checksum_gap = 1
pattern = '^V=(?P<v>[\\d.]+)'
tags = [{ name = "v" }]

[[devices]]
name = "ctl"
protocol = "serial"
port = "socket://10.0.0.5:4001"
framing = "start_end"
mode = "poll"
requests = [{ send = "R\\r", pattern = '^(?P<r>\\d+)$', interval = "2s" }]
tags = [{ name = "r", type = "integer" }]
"""


def test_check_shows_framing_checksum_and_patterns(write_config):
    res = CliRunner().invoke(app, ["check", str(write_config(CHECKED))])
    assert res.exit_code == 0, res.output
    for expected in [
        "serial /dev/ttyUSB3 19200 8E1, listen mode",
        "framing: terminator CR, max_frame 1024 bytes, encoding ascii",
        "checksum crc16_ccitt, 4 hex digits ending the frame, over bytes 0.. up to 1 byte before them",
        "pattern ^V=(?P<v>[\\d.]+)",
        "-> v (number)",
        "serial socket://10.0.0.5:4001, poll mode",
        "framing: start STX end ETX",
        "request 'R\\r' every 2s, reply within 1s: pattern ^(?P<r>\\d+)$",
        "-> r (integer)",
    ]:
        assert expected in res.output, f"{expected!r} not in:\n{res.output}"


def test_poll_mode_device_pattern_no_request_uses_is_refused(serial_config):
    body = """
    [[devices]]
    name = "d"
    protocol = "serial"
    port = "/dev/ttyS9"
    mode = "poll"
    pattern = '^(?P<w>\\d+)$'
    requests = [{ send = "R", pattern = '^(?P<r>\\d+)$' }]
    tags = [{ name = "w" }, { name = "r" }]
    """
    with pytest.raises(ConfigError, match=r"devices\[0\].pattern: no request uses it"):
        serial_config(body)
