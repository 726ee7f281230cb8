"""The adapter on a real pty line (socat), a device writing frames on the other end."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from edgeos import Quality

GOOD, BAD = int(Quality.GOOD), int(Quality.BAD_DECODING_ERROR)

SCALE = """
[[devices]]
name = "scale"
protocol = "serial"
port = "{port}"
baudrate = 9600
pattern = '^(?P<status>ST|US),GS,(?P<weight>[+-]\\d+\\.\\d+) (?P<unit>kg|g)$'
{extra}
tags = [
  {{ name = "weight", unit = "kg" }},
  {{ name = "stable", group = "status", type = "bool", true_values = ["ST"] }},
  {{ name = "unit", type = "string" }},
]
"""


async def test_listen_lines_split_and_glued(line, serial_config, run_adapter):
    cfg = serial_config(SCALE.format(port=line.adapter, extra=""))
    run = await run_adapter(cfg.devices[0])
    line.send(b"ST,GS,+0012.34 kg\r")
    await asyncio.sleep(0.05)
    line.send(b"\nUS,GS,-0000.50 kg\r\nST,GS,+0001.00 g\r\nST,GS,+00")  # glued, then a partial frame
    await asyncio.sleep(0.05)
    line.send(b"02.00 kg\r\n")
    await run.wait(lambda r: len(r.of("weight")) >= 4)
    assert [r[2] for r in run.of("weight")] == [12.34, -0.5, 1.0, 2.0]
    assert [r[2] for r in run.of("stable")] == [1.0, 0.0, 1.0, 1.0]
    assert [r[4] for r in run.of("unit")] == ["kg", "kg", "g", "kg"]
    # Numbers and booleans beside a string tag are not string samples: no text (an empty text
    # made every reader show them as the string "", the number unseen).
    assert all(r[4] is None for r in run.of("weight") + run.of("stable"))
    assert all(r[3] == GOOD for r in run.rows)
    h = run.adapter.health()
    assert h["frames"] == 4 and h["bad_frames"] == 0
    # Every documented reason is there from the start, at 0 (a monitoring rule can name it).
    reasons = ("checksum", "decode", "no_match", "overlong", "incomplete", "value", "timestamp")
    assert all(h[f"bad_{r}"] == 0 for r in reasons) and h["last_bad"] is None


async def test_garbage_non_utf8_and_overlong_become_bad_samples(line, serial_config, run_adapter):
    cfg = serial_config(SCALE.format(port=line.adapter, extra='encoding = "utf-8"\nmax_frame = 32'))
    run = await run_adapter(cfg.devices[0])
    line.send(b"garbage here\r\n\xff\xfe\x80\r\n" + b"z" * 100 + b"\r\nST,GS,+0001.50 kg\r\n")
    await run.wait(lambda r: any(x[3] == GOOD for x in r.of("weight")))
    weight = run.of("weight")
    assert [r[3] for r in weight] == [BAD, BAD, BAD, GOOD] and weight[-1][2] == 1.5
    assert all(math.isnan(r[2]) for r in weight[:3])
    # Every tag of the pattern gets the Bad sample (no text, the string tag's too: NaN, Bad).
    assert [r[3] for r in run.of("unit")] == [BAD, BAD, BAD, GOOD]
    assert [r[4] for r in run.of("unit")] == [None, None, None, "kg"]
    assert all(r[4] is None for r in weight)
    h = run.adapter.health()
    assert (h["bad_no_match"], h["bad_decode"], h["bad_overlong"], h["bad_frames"]) == (1, 1, 1, 3)
    assert h["frames"] == 4


async def test_checksum_failures(line, serial_config, run_adapter):
    body = """
    [[devices]]
    name = "meter"
    protocol = "serial"
    port = "{port}"
    terminator = "LF"
    pattern = '^\\$V,(?P<v>[\\d.]+),(?P<i>[\\d.]+)$'
    checksum = "xor"
    checksum_from = 1
    checksum_gap = 1
    tags = [{{ name = "v" }}, {{ name = "i", scale = 0.001 }}]
    """
    cfg = serial_config(body.format(port=line.adapter))
    run = await run_adapter(cfg.devices[0])

    def nmea(s: str, hexfmt: str = "02X") -> bytes:
        x = 0
        for c in s[1:].encode():
            x ^= c
        return f"{s}*{x:{hexfmt}}\n".encode()

    good = nmea("$V,230.1,1500")
    bad = good.replace(b"230.1", b"230.7")
    line.send(good + bad + nmea("$V,231.0,1000", "02x"))  # hex digits in either case
    await run.wait(lambda r: len(r.of("v")) >= 3)
    assert [(r[2], r[3]) for r in run.of("i")][::2] == [(1.5, GOOD), (1.0, GOOD)]
    v = run.of("v")
    assert v[0][2:4] == (230.1, GOOD) and v[1][3] == BAD and v[2][2:4] == (231.0, GOOD)
    assert run.adapter.health()["bad_checksum"] == 1


async def test_start_end_framing_with_binary_crc(line, serial_config, run_adapter):
    from edgeos.protocols.serial.checksum import compute

    body = """
    [[devices]]
    name = "ctl"
    protocol = "serial"
    port = "{port}"
    framing = "start_end"
    start = "STX"
    end = "ETX"
    checksum = "crc16_modbus"
    checksum_format = "binary"
    pattern = '^T(?P<t>-?\\d+)$'
    tags = [{{ name = "t", type = "integer", scale = 0.1 }}]
    """
    cfg = serial_config(body.format(port=line.adapter))
    run = await run_adapter(cfg.devices[0])

    def frame(text: bytes) -> bytes:
        crc = compute("crc16_modbus", text)
        return b"\x02" + text + crc.to_bytes(2, "little") + b"\x03"

    line.send(b"noise" + frame(b"T215") + frame(b"T-4")[:-3] + b"\x00\x00\x03" + frame(b"T7"))
    await run.wait(lambda r: len(r.of("t")) >= 3)
    t = run.of("t")
    assert [r[3] for r in t] == [GOOD, BAD, GOOD] and math.isnan(t[1][2])
    assert (t[0][2], t[2][2]) == (21.5, pytest.approx(0.7))


async def test_fixed_length_framing(line, serial_config, run_adapter):
    body = """
    [[devices]]
    name = "rfid"
    protocol = "serial"
    port = "{port}"
    framing = "fixed"
    frame_length = 11
    start = "STX"
    pattern = '^(?P<tag_id>[0-9A-F]{{10}})$'
    tags = [{{ name = "tag_id", type = "string" }}]
    """
    cfg = serial_config(body.format(port=line.adapter))
    run = await run_adapter(cfg.devices[0])
    line.send(b"\x020A1B2C3D4E\x02")
    await asyncio.sleep(0.05)
    line.send(b"FFFFFFFFFF")
    await run.wait(lambda r: len(r.of("tag_id")) >= 2)
    assert [r[4] for r in run.of("tag_id")] == ["0A1B2C3D4E", "FFFFFFFFFF"]


POLL = """
[[devices]]
name = "ctl"
protocol = "serial"
port = "{port}"
mode = "poll"
requests = [
  {{ send = "T?\\r\\n", pattern = '^T=(?P<temp>-?\\d+\\.\\d)$', interval = "50ms", timeout = "100ms" }},
  {{ send = "P?\\r\\n", pattern = '^P=(?P<pressure>\\d+)$', interval = "50ms", timeout = "100ms" }},
]
tags = [{{ name = "temp" }}, {{ name = "pressure", type = "integer" }}]
"""


async def test_poll_mode_requests_and_replies(line, serial_config, run_adapter):
    peer_mod = __import__("edgeos_test_peers_serial")
    answers = {b"T?": b"T=21.5\r\n", b"P?": b"P=1013\r\n"}
    responder = peer_mod.Responder(line, lambda req: answers.get(req))
    try:
        cfg = serial_config(POLL.format(port=line.adapter))
        run = await run_adapter(cfg.devices[0])
        await run.wait(lambda r: len(r.of("temp")) >= 3 and len(r.of("pressure")) >= 3)
        assert {r[2] for r in run.of("temp")} == {21.5} and {r[2] for r in run.of("pressure")} == {1013.0}
        assert all(r[3] == GOOD for r in run.rows)
        # A device that stops answering one request: that request's tags are Bad (timeout).
        answers.pop(b"P?")
        await run.wait(lambda r: any(x[3] == Quality.BAD_TIMEOUT for x in r.of("pressure")))
        n = len(run.of("temp"))
        await run.wait(lambda r: len(r.of("temp")) >= n + 2)
        assert all(r[3] == GOOD for r in run.of("temp"))
        h = run.adapter.health()
        assert h["timeouts"] >= 1 and h["requests"] >= 6
        assert set(responder.requests) <= {b"T?", b"P?"}  # never interleaved on the line
    finally:
        responder.stop()


async def test_one_request_unanswered_does_not_make_the_device_flap(line, serial_config, run_runtime):
    """Up/down goes by each request's last answer: with T? answered and P? never, the device is
    up at every look (it answers; P?'s tags are Bad, BadTimeout), not down after each P? and up
    after each T?. Neither answered: down."""
    peer_mod = __import__("edgeos_test_peers_serial")
    answers = {b"T?": b"T=21.5\r\n"}
    responder = peer_mod.Responder(line, lambda req: answers.get(req))
    looks: list[bool] = []

    def until(rt) -> bool:
        st = rt.devices["ctl"]
        timeouts = st.adapter.health()["timeouts"] if st.adapter is not None else 0
        if len(looks) < 75:
            if st.last_ok_ns and timeouts >= 2:
                looks.append(st.up)
            return False
        answers.clear()
        return not st.up

    try:
        cfg = serial_config(POLL.format(port=line.adapter))
        rt = await run_runtime(cfg, until=until, timeout=20)
    finally:
        responder.stop()
    assert len(looks) == 75 and all(looks), looks
    assert rt.devices["ctl"].silent and rt.devices["ctl"].failures == 0


async def test_a_device_that_dies_is_down_before_its_slow_request_is_asked_again(line, serial_config, run_runtime):
    """T? every 50 ms, P? every 8 s, both answered: then the instrument dies. T?'s first
    timeout takes the device down, though P? answered more recently than its own interval:
    a request that worked and stopped says the device stopped (docs/adapters.md, Answers)."""
    peer_mod = __import__("edgeos_test_peers_serial")
    answers = {b"T?": b"T=21.5\r\n", b"P?": b"P=1013\r\n"}
    responder = peer_mod.Responder(line, lambda req: answers.get(req))
    seen: dict[str, float] = {}

    def until(rt) -> bool:
        st = rt.devices["ctl"]
        if "died" not in seen:
            if st.up and b"P?" in responder.requests and responder.requests.count(b"T?") >= 3:
                answers.clear()
                seen["died"] = time.monotonic()
            return False
        if not st.up:
            seen["down"] = time.monotonic()
            return True
        return False

    try:
        slow_p = POLL.replace('"50ms", timeout = "100ms" }},\n]', '"8s", timeout = "100ms" }},\n]')
        cfg = serial_config(slow_p.format(port=line.adapter))
        assert cfg.devices[0].options["requests"][1]["interval"] == "8s"
        rt = await run_runtime(cfg, until=until, timeout=15)  # P? is first asked within 8 s
    finally:
        responder.stop()
    assert "down" in seen, rt.devices["ctl"]
    assert seen["down"] - seen["died"] < 2.0, seen  # one T? timeout (100 ms), not P?'s next ask (8 s)
    assert rt.devices["ctl"].silent and rt.devices["ctl"].failures == 0


async def test_poll_mode_drops_stale_bytes_before_each_request(line, serial_config, run_adapter):
    """Line noise while nobody asked (no terminator) must not be glued to the next reply."""
    peer_mod = __import__("edgeos_test_peers_serial")
    answers = {b"T?": b"T=21.5\r\n", b"P?": b"P=1013\r\n"}
    responder = peer_mod.Responder(line, lambda req: answers.get(req))
    try:
        cfg = serial_config(POLL.format(port=line.adapter).replace('"50ms"', '"200ms"'))
        run = await run_adapter(cfg.devices[0])
        await run.wait(lambda r: len(r.of("temp")) >= 1)
        line.send(b"\x00noise")  # between polls: a partial frame, then nothing
        n = len(run.of("temp"))
        await run.wait(lambda r: len(r.of("temp")) >= n + 2)
        assert all(r[3] == GOOD for r in run.rows), run.adapter.health()
        assert run.adapter.health()["garbage_bytes"] >= 6
    finally:
        responder.stop()


async def test_a_port_held_by_another_process_is_refused(line, serial_config):
    import serial

    from edgeos import DeviceError, plugins

    cfg = serial_config(SCALE.format(port=line.adapter, extra=""))
    other = serial.Serial(line.adapter, exclusive=True)
    try:
        adapter = plugins.load(plugins.PROTOCOLS, "serial").create(cfg.devices[0])
        with pytest.raises(DeviceError) as info:
            await adapter.connect()
        assert info.value.code == "in_use" and "in use" in str(info.value)
        await adapter.close()
    finally:
        other.close()


async def test_start_end_with_a_checksum_after_the_end_byte(line, serial_config, run_adapter):
    """STX data ETX BCC: the BCC (XOR over data and ETX) follows the end byte."""
    body = """
    [[devices]]
    name = "plc"
    protocol = "serial"
    port = "{port}"
    framing = "start_end"
    trailer = 1
    checksum = "xor"
    checksum_format = "binary"
    pattern = '^D(?P<d>\\d+)$'
    tags = [{{ name = "d", type = "integer" }}]
    """
    cfg = serial_config(body.format(port=line.adapter))
    run = await run_adapter(cfg.devices[0])

    def frame(data: bytes) -> bytes:
        x = 0
        for c in data + b"\x03":
            x ^= c
        return b"\x02" + data + b"\x03" + bytes([x])

    line.send(frame(b"D12") + frame(b"D13")[:-1] + b"\x00" + frame(b"D14")[:-1])
    await asyncio.sleep(0.05)
    line.send(frame(b"D14")[-1:])  # the BCC alone in the next read
    await run.wait(lambda r: len(r.of("d")) >= 3)
    d = run.of("d")
    assert [r[3] for r in d] == [GOOD, BAD, GOOD] and (d[0][2], d[2][2]) == (12.0, 14.0)
