"""Options of the serial protocol, and the checked `Spec` the adapter, `edgeos check` and
`edgeos serial test` all work from (built once per device; every problem found in one pass).

Byte strings (terminator, start, end, a request's `send`) are written as text with escapes:
`\\r`, `\\n`, `\\t`, `\\0`, `\\\\` and `\\xHH` (one byte); `hex:0D0A` gives the bytes in hex; for
terminator, start and end also the names CR, LF, CRLF, STX, ETX, EOT, ENQ, ACK, NAK, NUL.
"""

from __future__ import annotations

import codecs
import datetime as dt
import re
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeos.protocols.serial.checksum import DEFAULT_ORDER, KINDS, WIDTH

from edgeos.config.schema import Field, Problems, parse_table
from edgeos.model import ValueKind

NAMES = {
    "CR": b"\r",
    "LF": b"\n",
    "CRLF": b"\r\n",
    "STX": b"\x02",
    "ETX": b"\x03",
    "EOT": b"\x04",
    "ENQ": b"\x05",
    "ACK": b"\x06",
    "NAK": b"\x15",
    "NUL": b"\x00",
}
_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|[rnt0\\])")
_SIMPLE = {"r": b"\r", "n": b"\n", "t": b"\t", "0": b"\x00", "\\": b"\\"}
MAX_FRAME_LIMIT = 1 << 20
TYPES = ("number", "integer", "string", "bool")
PARITY = {"none": "N", "even": "E", "odd": "O", "mark": "M", "space": "S"}
TIME_FORMATS = ("unix", "unix_ms", "unix_us", "unix_ns", "iso8601")
TRUE_VALUES = ["1", "true", "on", "yes"]  # the text of a true bool, by default (any case)


def parse_bytes(text: str, encoding: str = "latin-1", *, names: bool = False) -> bytes:
    """Text with escapes (module docstring) as bytes; ValueError with the reason."""
    if names and text in NAMES:
        return NAMES[text]
    if text.startswith("hex:"):
        try:
            return bytes.fromhex(text[4:])
        except ValueError:
            raise ValueError(f'found "{text}", expected hex digits after "hex:", e.g. "hex:0D0A"') from None
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(text):
        out += text[pos : m.start()].encode(encoding)
        e = m.group(1)
        out += bytes([int(e[1:], 16)]) if e[0] == "x" else _SIMPLE[e]
        pos = m.end()
    out += text[pos:].encode(encoding)
    return bytes(out)


def show_bytes(b: bytes) -> str:
    """Bytes as a reader wants them in `edgeos check`: names where one fits, else escapes."""
    for name, v in NAMES.items():
        if b == v:
            return name
    return '"' + "".join(chr(c) if 32 <= c < 127 and c != 92 else f"\\x{c:02x}" for c in b) + '"'


def _bytes_check(names: bool):
    def check(v: str) -> str | None:
        try:
            b = parse_bytes(v, names=names)
        except (ValueError, UnicodeEncodeError) as e:
            return str(e) if isinstance(e, ValueError) else f'found "{v}": only bytes (characters up to \\xff)'
        return None if b else f'found "{v}": expected at least one byte'

    return check


def _encoding_check(v: str) -> str | None:
    try:
        codecs.lookup(v)
    except LookupError:
        return f'found "{v}", expected a Python codec name such as "ascii", "utf-8" or "latin-1"'
    return None


def _timezone_check(v: str) -> str | None:
    try:
        zoneinfo.ZoneInfo(v)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return f'found "{v}", expected a time zone name such as "UTC" or "Europe/Berlin"'
    return None


def strptime_fill(fmt: str) -> str:
    """What a strptime format leaves to the gateway's clock: "" (a full date), "year" (a month
    and day without a year) or "date" (a time of day only, as NMEA's GGA carries). strptime
    fills either with 1900, which would store a Good sample a century back."""
    if fmt in TIME_FORMATS:
        return ""
    directives = set(re.findall(r"%(.)", fmt.replace("%%", "")))
    if directives & set("YyGcx"):
        return ""
    return "year" if directives & set("mdbBjUW") else "date"


def _strptime_check(fmt: str) -> str | None:
    """A format strptime refuses (an unknown directive such as %Q) would refuse every frame."""
    if fmt in TIME_FORMATS:
        return None
    if "%" not in fmt:
        return f'found "{fmt}", expected a strptime format ("%Y-%m-%d %H:%M:%S") or one of ' + ", ".join(TIME_FORMATS)
    try:
        dt.datetime.strptime("", fmt)
    except ValueError as e:
        if "does not match" not in str(e) and "unconverted data" not in str(e):
            return f'found "{fmt}": {e}'
    return None


def _stopbits_check(v: float) -> str | None:
    return None if v in (1.0, 1.5, 2.0) else f"found {v:g}, expected 1, 1.5 or 2"


DEVICE_FIELDS = {
    "port": Field("str", help="serial device (/dev/ttyUSB0) or pyserial URL (socket://host:port, rfc2217://host:port)"),
    "baudrate": Field("int", 9600, min=50, max=4_000_000),
    "parity": Field("choice", "none", choices=tuple(PARITY)),
    "bytesize": Field("int", 8, min=5, max=8),
    "stopbits": Field("float", 1.0, check=_stopbits_check),
    "rtscts": Field("bool", False, help="RTS/CTS hardware flow control"),
    "xonxoff": Field("bool", False, help="XON/XOFF software flow control"),
    "framing": Field("choice", "terminator", choices=("terminator", "fixed", "start_end")),
    "terminator": Field("str", "CRLF", check=_bytes_check(True), help="end of a frame (framing = terminator)"),
    "frame_length": Field("int", None, min=1, max=MAX_FRAME_LIMIT, help="bytes of a frame (framing = fixed)"),
    "start": Field("str", None, check=_bytes_check(True), help="first bytes of a frame (start_end; fixed: sync)"),
    "end": Field("str", "ETX", check=_bytes_check(True), help="last bytes of a frame (framing = start_end)"),
    "trailer": Field(
        "int", 0, min=0, max=16, help="start_end: bytes after the end that belong to the frame (e.g. a BCC)"
    ),
    "max_frame": Field("int", 1024, min=1, max=MAX_FRAME_LIMIT, help="longest frame in bytes; longer is discarded"),
    "encoding": Field("str", "ascii", check=_encoding_check, help="how a frame's bytes become text"),
    "mode": Field("choice", "listen", choices=("listen", "poll")),
    "pattern": Field("any", None, help="regular expression(s) whose named groups are the tags"),
    "requests": Field("any", None, help="poll mode: [{send, pattern, interval, timeout}]"),
    "silence_timeout": Field(
        "duration",
        None,
        min=10_000_000,
        max=86_400_000_000_000,
        help="listen mode: no frame for this long marks the tags BadTimeout and the device down until one comes",
    ),
    "timestamp_group": Field("str", None, help="named group holding the device's own timestamp"),
    "timestamp_format": Field(
        "str", "iso8601", check=_strptime_check, help="strptime format, or unix, unix_ms, unix_us, unix_ns, iso8601"
    ),
    "timezone": Field("str", "UTC", check=_timezone_check, help="zone of timestamps that carry none"),
    "checksum": Field("choice", "none", choices=("none", *KINDS)),
    "checksum_format": Field("choice", "hex", choices=("hex", "binary"), help="hex characters or raw bytes"),
    "checksum_from": Field("int", 0, min=0, max=MAX_FRAME_LIMIT, help="first byte of the frame it covers"),
    "checksum_gap": Field("int", 0, min=0, max=16, help="bytes between the covered data and the checksum"),
    "checksum_order": Field("choice", None, choices=("big", "little"), help="byte order of a 16-bit checksum"),
}

REQUEST_FIELDS = {
    "send": Field("str", help='bytes to send, with escapes, e.g. "W\\r\\n"'),
    "pattern": Field("str", None, help="regular expression for the reply (default: the device's pattern)"),
    "interval": Field("duration", None, min=1_000_000, max=86_400_000_000_000, help="default: poll_interval"),
    "timeout": Field("duration", "1s", min=1_000_000, max=60_000_000_000, help="how long the reply may take"),
}

TAG_FIELDS = {
    "group": Field("str", None, help="the pattern's named group (default: the tag's name)"),
    "type": Field("choice", "number", choices=TYPES),
    "true_values": Field("list", TRUE_VALUES, item="str", help="text of a true bool (any case)"),
    "scale": Field("float", 1.0),
    "offset": Field("float", 0.0),
}


def tag_kind(options: Mapping[str, Any]) -> ValueKind:
    return {"bool": ValueKind.BOOL, "string": ValueKind.STRING}.get(options.get("type", "number"), ValueKind.NUMBER)


@dataclass(frozen=True)
class TagSlot:
    """A tag carried by a pattern: its id and name, the group's index, how the text converts."""

    id: int
    name: str
    group: int
    type: str
    scale: float = 1.0
    offset: float = 0.0
    true_values: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Pattern:
    """A compiled regex and the tags its named groups carry."""

    source: str
    regex: re.Pattern[str]
    slots: tuple[TagSlot, ...]
    ts_group: int | None = None

    @property
    def tag_ids(self) -> list[int]:
        return [s.id for s in self.slots]


@dataclass(frozen=True)
class Request:
    """Poll mode: bytes sent at an interval, and the pattern its reply is read with."""

    send: bytes
    pattern: Pattern
    interval_ns: int
    timeout_ns: int
    text: str = ""


@dataclass(frozen=True)
class Checksum:
    kind: str
    binary: bool
    start: int
    gap: int
    order: str

    @property
    def size(self) -> int:
        """Bytes the checksum takes at the end of the frame."""
        return WIDTH[self.kind] * (1 if self.binary else 2)

    def describe(self) -> str:
        width = WIDTH[self.kind]
        if self.binary:
            fmt = f"{width} binary byte{'s' if width > 1 else ''}" + (f" ({self.order} endian)" if width > 1 else "")
        else:
            fmt = f"{self.size} hex digits"
        gap = f" up to {self.gap} byte{'s' if self.gap > 1 else ''} before them" if self.gap else ""
        return f"checksum {self.kind}, {fmt} ending the frame, over bytes {self.start}..{gap}"

    @property
    def checksum_format(self) -> str:
        return "binary" if self.binary else "hex"


@dataclass(frozen=True)
class Spec:
    """Everything the adapter needs, checked."""

    port: str
    baudrate: int
    parity: str
    bytesize: int
    stopbits: float
    rtscts: bool
    xonxoff: bool
    framing: str
    terminator: bytes
    frame_length: int
    start: bytes
    end: bytes
    max_frame: int
    trailer: int
    encoding: str
    mode: str
    patterns: tuple[Pattern, ...]
    requests: tuple[Request, ...] = ()
    checksum: Checksum | None = None
    ts_format: str = "iso8601"
    timezone: str = "UTC"
    ts_fill: str = ""  # strptime_fill of ts_format
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def line(self) -> str:
        stop = f"{self.stopbits:g}"
        flow = " rtscts" if self.rtscts else ""
        flow += " xonxoff" if self.xonxoff else ""
        if "://" in self.port and not self.port.startswith("rfc2217://"):
            return self.port
        return f"{self.port} {self.baudrate} {self.bytesize}{PARITY[self.parity]}{stop}{flow}"

    def framing_text(self) -> str:
        if self.framing == "terminator":
            what = f"terminator {show_bytes(self.terminator)}"
        elif self.framing == "fixed":
            what = f"fixed {self.frame_length} bytes" + (f" starting {show_bytes(self.start)}" if self.start else "")
        else:
            what = f"start {show_bytes(self.start)} end {show_bytes(self.end)}"
            if self.trailer:
                what += f" and {self.trailer} more byte{'s' if self.trailer > 1 else ''}"
        return f"framing: {what}, max_frame {self.max_frame} bytes, encoding {self.encoding}"


def build_spec(
    options: Mapping[str, Any],
    tags: Sequence[Any],
    default_interval_ns: int,
    path: str = "",
    problems: Problems | None = None,
) -> Spec | None:
    """The checked spec, or None with every problem added to `problems` (key paths under `path`).

    `tags` are TagConfigs (id, name, options)."""
    own = problems is None
    problems = problems if problems is not None else Problems("")
    before = len(problems.items)
    o = {k: f.default for k, f in DEVICE_FIELDS.items() if not f.required} | dict(options)
    p = f"{path}." if path else ""
    enc = o["encoding"]
    if _encoding_check(enc):
        enc = "ascii"

    def byte_opt(key: str, default: str | None) -> bytes:
        v = o.get(key) if o.get(key) is not None else default
        if v is None:
            return b""
        try:
            return parse_bytes(v, names=True)
        except (ValueError, UnicodeEncodeError):
            return b"?"

    terminator = byte_opt("terminator", "CRLF")
    start = byte_opt("start", "STX" if o["framing"] == "start_end" else None)
    end = byte_opt("end", "ETX")
    if not o.get("port"):
        problems.add(f"{p}port", 'missing: the serial device or URL, e.g. "/dev/ttyUSB0" or "socket://10.0.0.5:4001"')
    elif "://" in o["port"]:
        scheme = o["port"].split("://", 1)[0]
        if scheme not in ("socket", "rfc2217", "loop", "spy"):
            problems.add(f"{p}port", f'found "{o["port"]}", expected a device path or socket://, rfc2217:// URL')
        elif scheme in ("socket", "rfc2217"):
            m = re.match(r"^[a-z0-9]+://[^:/]+:(\d+)", o["port"])
            if not m:
                problems.add(f"{p}port", f'found "{o["port"]}", expected {scheme}://HOST:PORT')
            elif not 1 <= int(m.group(1)) <= 65535:
                problems.add(f"{p}port", f'found "{o["port"]}", a TCP port is 1..65535')
    if o["framing"] == "fixed" and not o.get("frame_length"):
        problems.add(f"{p}frame_length", 'missing: required with framing = "fixed"')
    if o["framing"] != "fixed" and o.get("frame_length"):
        problems.add(f"{p}frame_length", f'applies to framing = "fixed", not "{o["framing"]}"')
    if o["framing"] == "fixed" and o.get("frame_length") and o["frame_length"] > o["max_frame"]:
        problems.add(f"{p}frame_length", f"found {o['frame_length']}, more than max_frame = {o['max_frame']}")
    if o["framing"] == "fixed" and o.get("frame_length") and start and o["frame_length"] <= len(start):
        # The start bytes count in the length: a frame must hold them and at least one byte more.
        problems.add(
            f"{p}frame_length",
            f"found {o['frame_length']}, not more than the {len(start)} start bytes it includes",
        )
    if o.get("trailer") and o["framing"] != "start_end":
        problems.add(f"{p}trailer", f'applies to framing = "start_end", not "{o["framing"]}"')
    if o["framing"] == "start_end" and start == end:
        problems.add(f"{p}end", "found the same bytes as start: a frame could not be told from the next")

    # Patterns: the device's (one, or a list in listen mode), and each request's.
    tag_by_group: dict[str, Any] = {}
    for i, t in enumerate(tags):
        g = t.options.get("group") or t.name
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", g):
            key = "group" if t.options.get("group") else "name"
            problems.add(
                f"{p}tags[{i}].{key}",
                f'found "{g}", which cannot name a regex group: give the tag group = "..." '
                f"(letters, digits, _){_where(t)}",
            )
            continue
        if g in tag_by_group:
            problems.add(f"{p}tags[{i}].group", f'group "{g}" is already the group of tag "{tag_by_group[g].name}"')
            continue
        tag_by_group[g] = t
        if t.options.get("type", "number") in ("string", "bool") and (
            t.options.get("scale", 1.0) != 1.0 or t.options.get("offset", 0.0) != 0.0
        ):
            problems.add(f"{p}tags[{i}].scale", f"scale and offset apply to numbers, not to a {t.options['type']} tag")
        if t.options.get("type", "number") != "bool" and t.options.get("true_values", TRUE_VALUES) != TRUE_VALUES:
            problems.add(
                f"{p}tags[{i}].true_values", f'applies to type = "bool", not to a {t.options.get("type", "number")} tag'
            )
    used: set[str] = set()
    ts_group = o.get("timestamp_group")

    def compile_pattern(src: Any, key: str, tagless: bool = False) -> Pattern | None:
        """`tagless`: a pattern that names no tag may stand (one of several in listen mode,
        matching a device's normal non-data lines: a header, a keep-alive; README, Patterns)."""
        if not isinstance(src, str):
            problems.add(key, f"found {src!r}, expected a regular expression (a string)")
            return None
        try:
            rx = re.compile(src)
        except re.error as e:
            problems.add(key, f"invalid regular expression: {e}")
            return None
        slots = []
        for name, gi in rx.groupindex.items():
            t = tag_by_group.get(name)
            if t is None:
                continue
            used.add(name)
            to = t.options
            slots.append(
                TagSlot(
                    t.id,
                    t.name,
                    gi,
                    to.get("type", "number"),
                    to.get("scale", 1.0),
                    to.get("offset", 0.0),
                    frozenset(v.lower() for v in to.get("true_values", TRUE_VALUES)),
                )
            )
        tsi = None
        if ts_group:
            tsi = rx.groupindex.get(ts_group)
        if not slots and not tagless:
            problems.add(key, f"no named group of this pattern is a tag: groups {sorted(rx.groupindex) or 'none'}")
        return Pattern(src, rx, tuple(slots), tsi)

    patterns: list[Pattern] = []
    requests: list[Request] = []
    raw = o.get("pattern")
    if o["mode"] != "listen" and o.get("silence_timeout") is not None:
        problems.add(f"{p}silence_timeout", 'applies to mode = "listen" (in poll mode each request has its timeout)')
    if o["mode"] == "listen":
        if o.get("requests") is not None:
            problems.add(f"{p}requests", 'applies to mode = "poll"')
        if raw is None:
            problems.add(f"{p}pattern", "missing: a regular expression whose named groups are the tags")
        srcs = raw if isinstance(raw, list) else [raw] if raw is not None else []
        for k, src in enumerate(srcs):
            pat = compile_pattern(src, f"{p}pattern" + (f"[{k}]" if isinstance(raw, list) else ""), len(srcs) > 1)
            if pat is not None:
                patterns.append(pat)
        if patterns and not any(pt.slots for pt in patterns):
            problems.add(f"{p}pattern", "no named group of any pattern is a tag")
    else:
        if isinstance(raw, list):
            problems.add(f"{p}pattern", "in poll mode give one pattern (each request may have its own)")
            raw = None
        device_pat = compile_pattern(raw, f"{p}pattern") if raw is not None else None
        rr = o.get("requests")
        if not rr or not isinstance(rr, list):
            problems.add(f"{p}requests", 'missing: mode = "poll" needs requests = [{ send = "..." }, ...]')
            rr = []
        for k, r in enumerate(rr):
            rpath = f"{p}requests[{k}]"
            rt = parse_table(r, REQUEST_FIELDS, rpath, problems)
            if "send" not in rt:
                continue
            try:
                send = parse_bytes(rt["send"], enc)
            except (ValueError, UnicodeEncodeError) as e:
                problems.add(f"{rpath}.send", str(e))
                continue
            if rt.get("pattern") is not None:
                pat = compile_pattern(rt["pattern"], f"{rpath}.pattern")
            elif device_pat is not None:
                pat = device_pat
            else:
                problems.add(f"{rpath}.pattern", "missing: neither the request nor the device has a pattern")
                pat = None
            if pat is None:
                continue
            patterns.append(pat)
            requests.append(Request(send, pat, rt["interval"] or default_interval_ns, rt["timeout"], rt["send"]))
        if device_pat is not None and rr and device_pat not in patterns:
            problems.add(f"{p}pattern", "no request uses it: every request has its own pattern")
    for i, t in enumerate(tags):
        g = t.options.get("group") or t.name
        if g in tag_by_group and tag_by_group[g] is t and g not in used and patterns:
            problems.add(f"{p}tags[{i}].group", f'no pattern has a group named "{g}"{_where(t)}')
    if ts_group:
        if any(pt.ts_group is None for pt in patterns if pt.slots):  # a tagless line has no samples to stamp
            problems.add(f"{p}timestamp_group", f'found "{ts_group}", but a pattern has no group of that name')
        if ts_group in tag_by_group:
            problems.add(f"{p}timestamp_group", f'"{ts_group}" is also a tag\'s group')
    fmt = o["timestamp_format"]

    cs = None
    if o["checksum"] != "none":
        width = WIDTH[o["checksum"]]
        binary = o["checksum_format"] == "binary"
        order = o.get("checksum_order") or (DEFAULT_ORDER.get(o["checksum"], "big") if binary else "big")
        cs = Checksum(o["checksum"], binary, o["checksum_from"], o["checksum_gap"], order)
        if o["framing"] == "fixed" and o.get("frame_length") and o["frame_length"] < cs.size + cs.gap + cs.start:
            problems.add(
                f"{p}checksum", f"a frame of {o['frame_length']} bytes cannot hold its {cs.size}-byte checksum"
            )
        if o.get("checksum_order") and width == 1:
            problems.add(f"{p}checksum_order", f"applies to 16-bit checksums, not to {o['checksum']}")
    else:
        for key in ("checksum_from", "checksum_gap", "checksum_order"):
            if o.get(key) not in (None, 0, DEVICE_FIELDS[key].default):
                problems.add(f"{p}{key}", 'applies only with a checksum (checksum = "xor", ...)')

    if len(problems.items) > before:
        if own:
            problems.raise_if_any()
        return None
    return Spec(
        port=o["port"],
        baudrate=o["baudrate"],
        parity=o["parity"],
        bytesize=o["bytesize"],
        stopbits=o["stopbits"],
        rtscts=o["rtscts"],
        xonxoff=o["xonxoff"],
        framing=o["framing"],
        terminator=terminator,
        frame_length=o.get("frame_length") or 0,
        start=start,
        end=end,
        max_frame=o["max_frame"],
        trailer=o["trailer"],
        encoding=enc,
        mode=o["mode"],
        patterns=tuple(dict.fromkeys(patterns)),
        requests=tuple(requests),
        checksum=cs,
        ts_format=fmt,
        timezone=o["timezone"],
        ts_fill=strptime_fill(fmt),
        options=o,
    )


def _where(t: Any) -> str:
    return f' (tag "{t.name}")'
