"""Real vendors' frames through the serial adapter, configured as protocols/serial/README.md and
protocols/serial/sample.toml tell a plant engineer to, on a real line (a socat pty pair).

The frames are the vendors' published formats:

- Mettler Toledo MT-SICS level 0/1 (`S`, `SI`): "S S      100.00 g" (stable), "S D ..." (dynamic),
  "S +" overload, "S -" underload, "S I" command not executable, "ES" syntax error, "ET"
  transmission error, "EL" logical error; CRLF terminated.
- Sartorius SBI print format: 16 characters "+    12.345 g  " (sign, value, unit; no unit while
  unstable), or 22 characters with a 6-character ID code in front ("N     +    12.345 g  ").
- A&D (and Ohaus indicators in A&D format): "ST,+00012.34  g", "US,..." unstable, "OL,..." overload;
  and the weighing-indicator line sample.toml is written for, "ST,GS,+0012.34 kg".
- Barcode readers: the code then CR, or CRLF.
- An energy meter printing CSV lines (a header line, then one line per interval).

Each device's frames are also given to `edgeos serial test DEVICE LINE... -c CONFIG` (the
documented way to try a pattern) and what it prints is compared with what the adapter emitted.
"""

from __future__ import annotations

import asyncio
import math
import re
import subprocess
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path

from edgeos import Quality
from edgeos.config import load_config

EDGEOS = str(Path(sys.executable).with_name("edgeos"))
SAMPLE = Path(__file__).parents[2] / "protocols" / "serial" / "sample.toml"
GOOD, BAD = int(Quality.GOOD), int(Quality.BAD_DECODING_ERROR)
TIMEOUT = int(Quality.BAD_TIMEOUT)
HEADER = '[gateway]\nid = "gw"\ndata_dir = "data"\nshutdown_timeout = "5s"\n'


def config(write_config, body: str):
    path = write_config(HEADER + body)
    return path, load_config(path)


def serial_test(path: Path, device: str, frames: list[str], *extra: str) -> tuple[int, list[tuple]]:
    """`edgeos serial test` on frames (escaped as its --help says): (exit code, [(tag, value, quality, at)])."""
    res = subprocess.run(
        [EDGEOS, "serial", "test", device, "-c", str(path), *extra, "--", *frames],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=path.parent,
    )
    rows = []
    for ln in res.stdout.splitlines():
        m = re.match(r"^  (\S+) = (.*) \((\w+)\)(?:  at (\S+))?$", ln)
        if m:
            rows.append(m.groups())
    assert rows or res.returncode != 0, res.stdout + res.stderr
    return res.returncode, rows


def cli_view(run, kinds: dict[str, str]) -> list[tuple]:
    """The adapter's rows written as `edgeos serial test` writes a tag's value."""
    out = []
    for name, _ts, v, q, text in run.rows:
        if q != GOOD:
            shown = "-"
        elif kinds.get(name) == "string":
            shown = repr(text)
        elif kinds.get(name) == "bool":
            shown = "true" if v else "false"
        else:
            shown = repr(v)
        out.append((name, shown, Quality(q).name))
    return out


def per_tag(rows) -> dict[str, list[tuple]]:
    d: dict[str, list[tuple]] = {}
    for r in rows:
        d.setdefault(r[0], []).append(tuple(r[1:3]))
    return d


def escape(frame: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 and b != 0x5C else f"\\x{b:02x}" for b in frame)


# ------------------------------------------------------------------------- Mettler Toledo MT-SICS

MT_TAGS = """
tags = [
  { name = "weight", unit = "g" },
  { name = "stable", group = "status", type = "bool", true_values = ["S"] },
  { name = "unit", type = "string" },
  { name = "reply", type = "string" },
]
"""
MT_LISTEN = (
    """
[[devices]]
name = "mt"
protocol = "serial"
port = "{port}"
pattern = [
  '^S (?P<status>[SD]) +(?P<weight>-?\\d+\\.\\d+) (?P<unit>\\S+)$',
  '^(?P<reply>S [I+-]|E[STL])$',
]
"""
    + MT_TAGS
)

MT_FRAMES = [
    b"S S      100.00 g",
    b"S D      100.02 g",
    b"S S     -12.34 g",
    b"S +",
    b"S -",
    b"S I",
    b"ES",
    b"ET",
    b"EL",
    b"#\x15@~",
    b"S S \xb5100.00 g",
]


async def test_mt_sics_stream_values_states_and_error_replies(line, write_config, run_adapter):
    """A balance in MT-SICS continuous output (SIR), CRLF terminated (the default terminator).
    sample.toml has no MT-SICS pattern: the engineer writes one from the README (a list of
    patterns: the weight line, and the status/error replies "as a pattern of their own")."""
    path, cfg = config(write_config, MT_LISTEN.replace("{port}", line.adapter))
    run = await run_adapter(cfg.devices[0])
    line.send(b"".join(f + b"\r\n" for f in MT_FRAMES))
    await run.wait(lambda r: r.adapter.health()["frames"] >= len(MT_FRAMES))
    await asyncio.sleep(0.1)
    w = run.of("weight")
    assert [(r[2], r[3]) for r in w if r[3] == GOOD] == [(100.0, GOOD), (100.02, GOOD), (-12.34, GOOD)]
    assert [r[2] for r in run.of("stable") if r[3] == GOOD] == [1.0, 0.0, 1.0]
    assert [r[4] for r in run.of("unit") if r[3] == GOOD] == ["g", "g", "g"]
    # The replies matched by their own pattern are Good text samples of `reply` only.
    assert [r[4] for r in run.of("reply") if r[3] == GOOD] == ["S +", "S -", "S I", "ES", "ET", "EL"]
    # Garbage (no pattern matches) and a non-ASCII byte (encoding ascii): Bad samples for all
    # the patterns' tags, counted per reason.
    for tag in ("weight", "stable", "unit", "reply"):
        bad = [r for r in run.of(tag) if r[3] != GOOD]
        assert [r[3] for r in bad] == [BAD, BAD], (tag, bad)
        assert all(math.isnan(r[2]) for r in bad)
    h = run.adapter.health()
    assert h["frames"] == len(MT_FRAMES) and h["bad_frames"] == 2
    assert h["bad_no_match"] == 1 and h["bad_decode"] == 1
    # `edgeos serial test` on the same frames says the same, tag by tag.
    rc, rows = serial_test(path, "mt", [escape(f) for f in MT_FRAMES])
    assert rc == 1  # a line was refused
    kinds = {"stable": "bool", "unit": "string", "reply": "string"}
    assert per_tag([r[:3] for r in rows]) == per_tag(cli_view(run, kinds))


MT_POLL = """
[[devices]]
name = "mt"
protocol = "serial"
port = "{port}"
mode = "poll"
poll_interval = "300ms"
requests = [
  {{ send = "S\\r\\n", pattern = '^S (?P<status>S) +(?P<weight>-?\\d+\\.\\d+) (?P<unit>\\S+)$' }},
  {{ send = "SI\\r\\n", pattern = '^S (?P<istatus>[SD]) +(?P<iweight>-?\\d+\\.\\d+) (?P<iunit>\\S+)$' }},
]
tags = [
  {{ name = "weight", unit = "g" }},
  {{ name = "stable", group = "status", type = "bool", true_values = ["S"] }},
  {{ name = "unit", type = "string" }},
  {{ name = "immediate", group = "iweight", unit = "g" }},
  {{ name = "istable", group = "istatus", type = "bool", true_values = ["S"] }},
  {{ name = "iunit", type = "string" }},
]
"""


async def test_mt_sics_poll_s_and_si(line, write_config, run_adapter):
    """Poll mode: "S\\r\\n" (stable weight) and "SI\\r\\n" (immediate weight) sent as written; the
    balance answers each; then it cannot give a stable weight ("S I") and a dynamic one
    ("S D"), then "ES" to SI: the request's tags are Bad, not timed out, and the device answers."""
    from edgeos_test_peers_serial import Responder

    path, cfg = config(write_config, MT_POLL.format(port=line.adapter))
    state = {"phase": 0}

    def reply(req: bytes) -> bytes | None:
        if state["phase"] == 0:
            return {b"S": b"S S      100.00 g\r\n", b"SI": b"S D      100.03 g\r\n"}.get(req)
        return {b"S": b"S I\r\n", b"SI": b"ES\r\n"}.get(req)

    dev = Responder(line, reply)
    try:
        run = await run_adapter(cfg.devices[0])
        await run.wait(lambda r: len([x for x in r.of("weight") if x[3] == GOOD]) >= 2 and len(r.of("immediate")) >= 2)
        assert set(dev.requests) <= {b"S", b"SI"} and {b"S", b"SI"} <= set(dev.requests)
        assert all(r[2] == 100.0 and r[3] == GOOD for r in run.of("weight"))
        assert all(r[2] == 1.0 for r in run.of("stable"))
        assert all(r[2] == 100.03 and r[3] == GOOD for r in run.of("immediate"))
        assert all(r[2] == 0.0 for r in run.of("istable"))  # "S D": dynamic
        assert all(r[4] == "g" for r in run.of("unit") + run.of("iunit"))
        n = len(run.rows)
        state["phase"] = 1
        await run.wait(
            lambda r: (
                len([x for x in r.rows[n:] if x[0] == "weight"]) >= 2
                and len([x for x in r.rows[n:] if x[0] == "immediate"]) >= 2
            )
        )
        later = run.rows[n:]
        # The first request after the switch may have been answered before it; after that, Bad.
        for tag in ("weight", "stable", "unit", "immediate", "istable", "iunit"):
            qs = [r[3] for r in later if r[0] == tag]
            assert qs[-1] == BAD, (tag, qs)
            assert TIMEOUT not in qs, (tag, qs)
        h = run.adapter.health()
        assert h["timeouts"] == 0 and h["bad_no_match"] >= 2
    finally:
        dev.stop()
    # `edgeos serial test` reads a line with the first request's pattern, --request 2 the second's.
    rc, rows = serial_test(path, "mt", ["S S      100.00 g", "S I"])
    assert rc == 1
    assert ("weight", "100.0", "GOOD", None) in rows and ("stable", "true", "GOOD", None) in rows
    assert ("weight", "-", "BAD_DECODING_ERROR", None) in rows
    rc, rows = serial_test(path, "mt", ["S D      100.03 g", "ES"], "--request", "2")
    assert rc == 1
    assert ("immediate", "100.03", "GOOD", None) in rows and ("istable", "false", "GOOD", None) in rows
    assert ("immediate", "-", "BAD_DECODING_ERROR", None) in rows


# ------------------------------------------------------------------------- Sartorius SBI

SARTORIUS = """
[[devices]]
name = "sbi"
protocol = "serial"
port = "{port}"
pattern = '^(?:(?P<id>[A-Za-z#]+) +)?\\+ *(?P<weight>\\d+\\.\\d+) (?P<unit>[ A-Za-z%]{{3}})$'
tags = [
  {{ name = "weight" }},
  {{ name = "stable", group = "unit", type = "bool", true_values = ["g", "kg"] }},
  {{ name = "unit_text", group = "unit2", type = "string" }},
  {{ name = "id", type = "string" }},
]
"""

SBI_FRAMES = [
    b"+    12.345 g  ",  # 16-character format, stable
    b"+    12.347    ",  # unstable: no unit
    b"N     +    12.345 g  ",  # 22-character format, ID code N (net)
    b"G#    +    15.000 g  ",  # ID code G# (gross)
    b"        High    ",  # overload special code
]


async def test_sartorius_sbi_print_format(line, write_config, run_adapter):
    """Sartorius SBI: positive weights (the sign is a separate column, so the pattern takes the
    digits after it), the stability indication (no unit while unstable) as a bool from a group
    that is always there (its text stripped: "g" true, "" false), the optional ID code as a
    string tag that gives no sample when absent, and an overload code that matches nothing."""
    body = SARTORIUS.replace("(?P<unit>[ A-Za-z%]{{3}})", "(?P<unit>(?P<unit2>[ A-Za-z%]{{3}}))")
    path, cfg = config(write_config, body.format(port=line.adapter))
    run = await run_adapter(cfg.devices[0])
    line.send(b"".join(f + b"\r\n" for f in SBI_FRAMES))
    await run.wait(lambda r: r.adapter.health()["frames"] >= len(SBI_FRAMES))
    await asyncio.sleep(0.1)
    weight = run.of("weight")
    assert [r[2] for r in weight][:4] == [12.345, 12.347, 12.345, 15.0]
    assert [r[3] for r in weight] == [GOOD, GOOD, GOOD, GOOD, BAD]
    assert [r[2] for r in run.of("stable")][:4] == [1.0, 0.0, 1.0, 1.0]
    # A string is the text as sent.
    assert [r[4] for r in run.of("unit_text")][:4] == ["g  ", "   ", "g  ", "g  "]
    # The optional ID group: samples only for the frames that carry it (plus the overload's Bad).
    ids = run.of("id")
    assert [(r[4], r[3]) for r in ids] == [("N", GOOD), ("G#", GOOD), (None, BAD)], ids
    assert run.adapter.health()["bad_no_match"] == 1
    rc, rows = serial_test(path, "sbi", [escape(f) for f in SBI_FRAMES])
    assert rc == 1
    kinds = {"stable": "bool", "unit_text": "string", "id": "string"}
    assert per_tag([r[:3] for r in rows]) == per_tag(cli_view(run, kinds))


async def test_sartorius_signed_field_is_not_a_number(line, write_config, run_adapter):
    """The whole SBI value field with its sign ("-    12.345") does not convert: README.md
    'Patterns and tags': "A number that does not convert ... gives that tag a Bad sample"
    (counted as bad_value), and `edgeos serial test` says the same."""
    body = """
[[devices]]
name = "sbi"
protocol = "serial"
port = "{port}"
pattern = '^(?P<weight>[+-] *\\d+\\.\\d+) (?P<unit>[ a-z]{{3}})$'
tags = [{{ name = "weight" }}, {{ name = "unit", type = "string" }}]
"""
    path, cfg = config(write_config, body.format(port=line.adapter))
    run = await run_adapter(cfg.devices[0])
    line.send(b"-    12.345 g  \r\n")
    await run.wait(lambda r: len(r.of("weight")) >= 1)
    assert run.of("weight")[0][3] == BAD and run.of("unit")[0][4] == "g  "
    assert run.adapter.health()["bad_value"] == 1
    rc, rows = serial_test(path, "sbi", ["-    12.345 g  "])
    assert rc == 1 and ("weight", "-", "BAD_DECODING_ERROR", None) in rows


# ------------------------------------------------------------------------- A&D / Ohaus indicators


def sample_device(port: str) -> str:
    """sample.toml's device as shipped, on this port."""
    text = SAMPLE.read_text()
    assert tomllib.loads(text)["devices"][0]["port"] == "/dev/ttyUSB0"
    return text.replace('port = "/dev/ttyUSB0"', f'port = "{port}"')


async def test_indicator_with_sample_toml_as_shipped(line, write_config, run_adapter):
    """sample.toml's pattern, unchanged, on the indicator lines it names ("ST,GS,+0012.34 kg"):
    stable and unstable (US) weights, an overload line (OL) that it does not match (Bad samples)."""
    path, cfg = config(write_config, sample_device(line.adapter))
    frames = [b"ST,GS,+0012.34 kg", b"US,GS,+0012.36 kg", b"ST,GS,-0000.50 kg", b"ST,GS,+0512.0g", b"OL,GS,+9999.99 kg"]
    run = await run_adapter(cfg.devices[0])
    line.send(b"".join(f + b"\r\n" for f in frames))
    await run.wait(lambda r: r.adapter.health()["frames"] >= len(frames))
    await asyncio.sleep(0.1)
    assert [(r[2], r[3]) for r in run.of("weight")][:4] == [(12.34, GOOD), (12.36, GOOD), (-0.5, GOOD), (512.0, GOOD)]
    assert run.of("weight")[4][3] == BAD
    assert [r[2] for r in run.of("stable")][:4] == [1.0, 0.0, 1.0, 1.0]
    assert [r[4] for r in run.of("weight_unit")][:4] == ["kg", "kg", "kg", "g"]
    assert [r[3] for r in run.of("stable")][4] == BAD and [r[3] for r in run.of("weight_unit")][4] == BAD
    rc, rows = serial_test(path, "scale1", [f.decode() for f in frames])
    assert rc == 1
    kinds = {"stable": "bool", "weight_unit": "string"}
    assert per_tag([r[:3] for r in rows]) == per_tag(cli_view(run, kinds))


AND_DEVICE = """
[[devices]]
name = "ad"
protocol = "serial"
port = "{port}"
pattern = '^(?P<status>ST|US),(?P<weight>[+-]\\d+\\.?\\d*) *(?P<weight_unit>[A-Za-z%]+)$'
tags = [
  {{ name = "weight" }},
  {{ name = "stable", group = "status", type = "bool", true_values = ["ST"] }},
  {{ name = "weight_unit", type = "string" }},
]
"""


async def test_and_format_and_overload(line, write_config, run_adapter):
    """A&D's own format ("ST,+00012.34  g": 9-character value, 3-character unit, no GS field)
    does not match sample.toml's pattern (Bad samples, as the README says of unmatched frames);
    the engineer adapts it. The overload line "OL,+9999999E+19" must not become a weight."""
    path, cfg = config(write_config, sample_device(line.adapter))
    run = await run_adapter(cfg.devices[0])
    line.send(b"ST,+00012.34  g\r\n")
    await run.wait(lambda r: len(r.of("weight")) >= 1)
    assert run.of("weight")[0][3] == BAD and run.adapter.health()["bad_no_match"] == 1
    await run.stop()

    path, cfg = config(write_config, AND_DEVICE.format(port=line.adapter))
    frames = [b"ST,+00012.34  g", b"US,+00012.35  g", b"ST,-00000.50 kg", b"OL,+9999999E+19", b"ST,+0001234 pc"]
    run = await run_adapter(cfg.devices[0])
    line.send(b"".join(f + b"\r\n" for f in frames))
    await run.wait(lambda r: r.adapter.health()["frames"] >= len(frames))
    await asyncio.sleep(0.1)
    w = run.of("weight")
    assert [(r[2], r[3]) for r in w if r[3] == GOOD] == [(12.34, GOOD), (12.35, GOOD), (-0.5, GOOD), (1234.0, GOOD)]
    assert [r[3] for r in w] == [GOOD, GOOD, GOOD, BAD, GOOD]
    assert [r[2] for r in run.of("stable") if r[3] == GOOD] == [1.0, 0.0, 1.0, 1.0]
    assert [r[4] for r in run.of("weight_unit") if r[3] == GOOD] == ["g", "g", "kg", "pc"]
    rc, rows = serial_test(path, "ad", [f.decode() for f in frames])
    assert rc == 1
    kinds = {"stable": "bool", "weight_unit": "string"}
    assert per_tag([r[:3] for r in rows]) == per_tag(cli_view(run, kinds))


OHAUS = """
[[devices]]
name = "ohaus"
protocol = "serial"
port = "{port}"
pattern = '^ *(?P<weight>-?\\d+\\.\\d+) +(?P<unit>[a-z]+) +(?P<mode>[GNT]?) *(?P<unstable>\\??)$'
tags = [
  {{ name = "weight" }},
  {{ name = "unit", type = "string" }},
  {{ name = "unstable", type = "bool", true_values = ["?"] }},
]
"""


async def test_ohaus_print_with_stability_mark(line, write_config, run_adapter):
    """Ohaus print lines: right-justified weight, unit, G/N, and "?" when not stable."""
    path, cfg = config(write_config, OHAUS.format(port=line.adapter))
    frames = [b"      12.34 g   N  ", b"      12.37 g   N ?", b"     -1.50 kg  G  "]
    run = await run_adapter(cfg.devices[0])
    line.send(b"".join(f + b"\r\n" for f in frames))
    await run.wait(lambda r: r.adapter.health()["frames"] >= len(frames))
    await asyncio.sleep(0.1)
    assert [(r[2], r[3]) for r in run.of("weight")] == [(12.34, GOOD), (12.37, GOOD), (-1.5, GOOD)]
    assert [(r[2], r[3]) for r in run.of("unstable")] == [(0.0, GOOD), (1.0, GOOD), (0.0, GOOD)]
    rc, rows = serial_test(path, "ohaus", [f.decode() for f in frames])
    assert rc == 0
    assert per_tag([r[:3] for r in rows]) == per_tag(cli_view(run, {"unit": "string", "unstable": "bool"}))


# ------------------------------------------------------------------------- barcode readers

BARCODE = """
[[devices]]
name = "scanner"
protocol = "serial"
port = "{port}"
terminator = "{term}"
pattern = '^(?P<code>[\\x21-\\x7e]+){tail}$'
tags = [{{ name = "code", type = "string" }}]
"""
CODES = [b"4006381333931", b"0012345678905", b"ABC-123/45", b"NR", b"0000"]


async def test_barcode_reader_cr_terminated(line, write_config, run_adapter):
    """A reader ending each code with CR (terminator = "CR"): the codes as text, leading zeros
    kept; a blank line (a double CR) matches nothing and gives a Bad sample."""
    path, cfg = config(write_config, BARCODE.format(port=line.adapter, term="CR", tail=""))
    run = await run_adapter(cfg.devices[0])
    line.send(b"".join(c + b"\r" for c in CODES[:3]) + b"\r" + CODES[4] + b"\r")
    await run.wait(lambda r: len(r.of("code")) >= 5)
    rows = run.of("code")
    assert [(r[4], r[3]) for r in rows] == [
        ("4006381333931", GOOD),
        ("0012345678905", GOOD),
        ("ABC-123/45", GOOD),
        (None, BAD),
        ("0000", GOOD),
    ]
    assert run.adapter.health()["bad_no_match"] == 1
    rc, out = serial_test(path, "scanner", [c.decode() for c in CODES[:3]] + ["", CODES[4].decode()])
    assert per_tag([r[:3] for r in out]) == per_tag(cli_view(run, {"code": "string"}))


async def test_barcode_reader_crlf_with_lf_terminator(line, write_config, run_adapter):
    """A CRLF reader under terminator = "LF" with the pattern anchored '\\r?$' (README.md,
    Framing): the code without its CR; a CR-only line mixed in also parses."""
    path, cfg = config(write_config, BARCODE.format(port=line.adapter, term="LF", tail="\\r?"))
    run = await run_adapter(cfg.devices[0])
    line.send(b"4006381333931\r\nABC-123/45\r\n0012345678905\n")
    await run.wait(lambda r: len(r.of("code")) >= 3)
    assert [(r[4], r[3]) for r in run.of("code")] == [
        ("4006381333931", GOOD),
        ("ABC-123/45", GOOD),
        ("0012345678905", GOOD),
    ]
    rc, out = serial_test(path, "scanner", ["4006381333931\\r", "ABC-123/45\\r", "0012345678905"])
    assert rc == 0
    assert per_tag([r[:3] for r in out]) == per_tag(cli_view(run, {"code": "string"}))


async def test_barcode_reader_crlf_default_terminator(line, write_config, run_adapter):
    """The default terminator (CRLF) on a CRLF reader: each code; a bare LF is not a frame end,
    so that code joins the next line (README.md, Framing)."""
    path, cfg = config(write_config, BARCODE.format(port=line.adapter, term="CRLF", tail=""))
    run = await run_adapter(cfg.devices[0])
    line.send(b"4006381333931\r\nABC\nDEF\r\n")
    await run.wait(lambda r: len(r.of("code")) >= 2)
    await asyncio.sleep(0.1)
    rows = run.of("code")
    assert [(r[4], r[3]) for r in rows] == [("4006381333931", GOOD), (None, BAD)]


# ------------------------------------------------------------------------- CSV energy meter

METER = """
[[devices]]
name = "meter"
protocol = "serial"
port = "{port}"
pattern = [
  '^(?P<t>\\d\\d\\.\\d\\d\\.\\d{{4}},\\d\\d:\\d\\d:\\d\\d),(?P<u1>[^,]*),(?P<i1>[^,]*),(?P<p>[^,]*),(?P<e>[^,]*)$',
]
timestamp_group = "t"
timestamp_format = "%d.%m.%Y,%H:%M:%S"
timezone = "Europe/Berlin"
tags = [
  {{ name = "u1", unit = "V" }},
  {{ name = "i1", unit = "A" }},
  {{ name = "p", unit = "W", scale = 1000 }},
  {{ name = "e", unit = "kWh" }},
]
"""

METER_FRAMES = [
    b"06.12.2026,10:30:00,230.4,5.02,1.156,12345.67",
    b"06.12.2026,10:31:00,229.9,,1.150,12345.69",
    b"06.12.2026,10:32:00,231.0,4.98,-0.012,1.23457E+04",
    b"06.12.2026,10:33:00,ERR,ERR,ERR,ERR",
]


def ns(text: str) -> int:
    return int(datetime.fromisoformat(text).astimezone(UTC).timestamp()) * 10**9


async def test_energy_meter_csv(line, write_config, run_adapter):
    """A meter printing CSV lines with its local time: the device's time in Europe/Berlin; an empty field and "ERR" do
    not convert and give Bad samples for those tags only; a scale turns kW into W."""
    path, cfg = config(write_config, METER.format(port=line.adapter))
    run = await run_adapter(cfg.devices[0])
    line.send(b"".join(f + b"\r\n" for f in METER_FRAMES))
    await run.wait(lambda r: r.adapter.health()["frames"] >= len(METER_FRAMES))
    await asyncio.sleep(0.1)
    u1, i1, p, e = (run.of(t) for t in ("u1", "i1", "p", "e"))
    assert [(r[2], r[3]) for r in u1][:3] == [(230.4, GOOD), (229.9, GOOD), (231.0, GOOD)]
    assert [r[3] for r in i1] == [GOOD, BAD, GOOD, BAD]
    assert [round(r[2], 6) for r in p][:3] == [1156.0, 1150.0, -12.0]
    assert [r[2] for r in e][:3] == [12345.67, 12345.69, 12345.7]
    assert all(r[3] == BAD for r in (u1[3], i1[3], p[3], e[3]))
    assert [r[1] for r in u1][:3] == [ns(f"2026-12-06T10:3{m}:00+01:00") for m in range(3)]
    h = run.adapter.health()
    assert h["bad_no_match"] == 0, h
    rc, rows = serial_test(path, "meter", [f.decode() for f in METER_FRAMES])
    assert rc == 1
    assert per_tag([r[:3] for r in rows]) == per_tag(cli_view(run, {}))
    good_at = [r[3] for r in rows if r[0] == "u1" and r[2] == "GOOD"]
    assert good_at == [f"2026-12-06T09:3{m}:00.000000000Z" for m in range(3)]
    # README.md, Bad input: a frame that carries a value that does not convert is counted
    # (bad_frames, bad_value): two frames here, out of 4.
    counts = (h["frames"], h["bad_frames"], h["bad_value"])
    assert counts == (4, 2, 2), counts


METER_HEADER = """
[[devices]]
name = "meter"
protocol = "serial"
port = "{port}"
pattern = ['^(?P<u1>\\d+\\.\\d+),(?P<e>\\d+\\.\\d+)$', '^U1\\[V\\],E\\[kWh\\]$']
tags = [{{ name = "u1", unit = "V" }}, {{ name = "e", unit = "kWh" }}]
"""


async def test_energy_meter_header_line_with_a_pattern_of_its_own(line, write_config, run_adapter):
    """Found by this file (now fixed). README.md 'Patterns and tags': "A frame that matches no pattern (a blank
    line, a device's keep-alive or status reply) gives the pattern's tags a Bad sample too: match
    such lines with a pattern of their own if they are normal." A meter repeats its CSV header
    line: the engineer gives it a pattern of its own (it carries no value, so no group)."""
    path, cfg = config(write_config, METER_HEADER.format(port=line.adapter))
    run = await run_adapter(cfg.devices[0])
    line.send(b"U1[V],E[kWh]\r\n230.4,12345.67\r\nU1[V],E[kWh]\r\n230.5,12345.68\r\n")
    await run.wait(lambda r: r.adapter.health()["frames"] >= 4)
    await asyncio.sleep(0.1)
    assert [(r[2], r[3]) for r in run.of("u1")] == [(230.4, GOOD), (230.5, GOOD)]
    assert run.adapter.health()["bad_frames"] == 0


async def test_energy_meter_header_line_with_device_time(line, write_config, run_adapter):
    """Found by this file: with timestamp_group, every pattern had to hold the timestamp group,
    so a meter's repeated header line (no time, no tag) could not be matched as the README's
    remedy says; now a pattern that names no tag needs neither."""
    body = """
[[devices]]
name = "meter"
protocol = "serial"
port = "{port}"
pattern = ['^(?P<t>\\d\\d:\\d\\d:\\d\\d),(?P<u1>\\d+\\.\\d+)$', '^Time,U1\\[V\\]$']
timestamp_group = "t"
timestamp_format = "%H:%M:%S"
tags = [{{ name = "u1", unit = "V" }}]
"""
    path, cfg = config(write_config, body.format(port=line.adapter))
    run = await run_adapter(cfg.devices[0])
    line.send(b"Time,U1[V]\r\n10:30:00,230.4\r\n")
    await run.wait(lambda r: r.adapter.health()["frames"] >= 2)
    await asyncio.sleep(0.1)
    assert [(r[2], r[3]) for r in run.of("u1")] == [(230.4, GOOD)]
    assert run.adapter.health()["bad_frames"] == 0
