"""Fuzz targets: each takes one generated input and may raise only its documented error types.

A target is (strategy, function, allowed exceptions). `run.py` drives them with hypothesis for
a time budget; `test_fuzz.py` runs a 30 s smoke of each, and the negative controls (BROKEN)
that the fuzzer must catch. Inputs are structured (configs built from the real field tables,
messages built from a valid one, then mutated): pure random bytes rarely get past the first
parse, so the generators aim at the code behind it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from hypothesis import strategies as st

from edgeos import plugins, wire
from edgeos.errors import ConfigError

# -- helpers -----------------------------------------------------------------------------------


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (op, position, byte) edits: 0 replace, 1 insert, 2 delete, 3 truncate."""
    b = bytearray(data)
    for op, pos, byte in edits:
        if not b:
            b.append(byte)
            continue
        i = pos % len(b)
        if op == 0:
            b[i] = byte
        elif op == 1:
            b.insert(i, byte)
        elif op == 2:
            del b[i]
        else:
            del b[i:]
    return bytes(b)


EDITS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6)

_INTERESTING_INTS = st.sampled_from(
    [0, 1, -1, 2, 7, 8, 15, 16, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, -(2**63)]
)
SCALARS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    _INTERESTING_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["", "1s", "250ms", "0s", "-1s", "1e400", "nan", "inf", "64MiB", "1KiB", "hex:0D0A", "\\x02"]),
)


# -- TOML writer (tomllib reads only) ------------------------------------------------------------


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml_doc(doc: dict[str, Any]) -> str:
    out = []
    for key, table in doc.items():
        if key == "devices" and isinstance(table, list):
            for dev in table:
                out.append("[[devices]]")
                out += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in dev.items()]
        elif isinstance(table, dict):
            out.append(f"[{key}]")
            out += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items()]
        else:
            out.insert(0, f"{json.dumps(key)} = {toml_value(table)}")
    return "\n".join(out) + "\n"


# -- config (TOML and tags CSV) ---------------------------------------------------------------


def _field_value(f: Any) -> st.SearchStrategy[Any]:
    """Values near what the field accepts, and values of the wrong type."""
    kind = getattr(f, "kind", "any")
    near: list[st.SearchStrategy[Any]] = []
    choices = getattr(f, "choices", None)
    if choices:
        near.append(st.sampled_from(list(choices)))
    if kind in ("duration", "size"):
        units = ["ns", "us", "ms", "s", "m", "h", "d", "B", "KiB", "MiB", "GiB", "x", ""]
        near.append(
            st.builds(lambda n, u: f"{n}{u}", st.one_of(st.integers(-5, 10**12), st.floats()), st.sampled_from(units))
        )
    if kind in ("int", "float"):
        near.append(st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats()))
    if kind == "list":
        near.append(st.lists(st.text(max_size=6), max_size=4))
    if kind == "str":
        near.append(st.text(max_size=20))
        near.append(st.sampled_from(["CRLF", "LF", "STX", "ETX", "hex:0D0A", "hex:zz", "\\x02", "40001", "hr1:uint32"]))
    near.append(SCALARS)
    near.append(st.lists(SCALARS, max_size=3))
    return st.one_of(near)


def _table(fields: dict[str, Any], extra_keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    keys = sorted(fields) + extra_keys
    return st.dictionaries(st.sampled_from(keys), st.none(), max_size=len(keys)).flatmap(
        lambda chosen: st.fixed_dictionaries(
            {k: _field_value(fields.get(k)) for k in chosen if k in fields}
            | {k: SCALARS for k in chosen if k not in fields}
        )
    )


def _filters_text() -> st.SearchStrategy[str]:
    names = ["deadband", "swinging_door", "moving_average", "ewma", "rate", "counter_delta", "window", "spike", "range"]
    params = ["abs", "rel", "max_silence", "deviation", "n", "alpha", "every", "min", "max", "x", ""]
    one = st.builds(
        lambda n, kv: f"{n}(" + ", ".join(f"{k}={v}" for k, v in kv) + ")",
        st.sampled_from([*names, "nope", "9bad", ""]),
        st.lists(
            st.tuples(st.sampled_from(params), st.sampled_from(["0.5", "60s", "-1", "x", "", "1e999", "3"])), max_size=3
        ),
    )
    return st.one_of(st.lists(one, max_size=3).map("; ".join), st.text(max_size=20))


@st.composite
def config_input(draw) -> tuple[str, str | None]:
    """(edgeos.toml text, tags.csv text or None)."""
    from edgeos.config import load as L

    mode = draw(st.sampled_from(["structured", "structured", "mutated_sample"]))
    protos = ["simulated", "modbus", "serial", "opcua", "nope"]
    if mode == "mutated_sample":
        proto = draw(st.sampled_from(protos[:4]))
        sample = (_sample_dir(proto) / "sample.toml").read_text()
        text = '[gateway]\nid = "gw"\ndata_dir = "data"\n' + sample
        return mutate(text.encode(), draw(EDITS)).decode("utf-8", "replace"), None
    doc: dict[str, Any] = {}
    gw = draw(_table(L.GATEWAY_FIELDS, ["bogus"]))
    if draw(st.booleans()):
        gw.setdefault("id", "gw")
        gw.setdefault("data_dir", "data")
    doc["gateway"] = gw
    if draw(st.booleans()):
        doc["store"] = draw(_table(L.STORE_FIELDS, ["retension"]))
    if draw(st.booleans()):
        doc["upstream"] = draw(_table(L.UPSTREAM_FIELDS, ["hots"]))
    devices = []
    csv_text = None
    for _ in range(draw(st.integers(0, 2))):
        proto = draw(st.sampled_from(protos))
        try:
            plugin = plugins.load(plugins.PROTOCOLS, proto)
            dfields, tfields = (
                dict(L.DEVICE_FIELDS) | dict(plugin.device_fields),
                dict(L.TAG_FIELDS) | dict(plugin.tag_fields),
            )
        except KeyError:
            dfields, tfields = dict(L.DEVICE_FIELDS), dict(L.TAG_FIELDS)
        dev = draw(_table({k: v for k, v in dfields.items() if k not in ("tags", "tags_csv")}, ["nmae"]))
        dev.setdefault("name", draw(st.sampled_from(["d1", "d2", "bad name"])))
        dev["protocol"] = proto
        tags = []
        for _ in range(draw(st.integers(0, 3))):
            t = draw(_table({k: v for k, v in tfields.items() if k != "filters"}, ["adress"]))
            t.setdefault("name", draw(st.sampled_from(["t1", "t2", "t1"])))
            if draw(st.integers(0, 3)) == 0:
                t["filters"] = draw(
                    st.lists(
                        st.fixed_dictionaries({"type": st.sampled_from(["deadband", "ewma", "range", "x"])})
                        | st.just({}),
                        max_size=2,
                    )
                )
            tags.append(t)
        if tags:
            dev["tags"] = tags
        if csv_text is None and draw(st.booleans()):
            dev["tags_csv"] = "tags.csv"
            cols = draw(st.lists(st.sampled_from([*sorted(tfields), "bogus"]), min_size=1, max_size=6, unique=True))
            delim = draw(st.sampled_from([",", ";", "\t"]))
            rows = [delim.join(cols)]
            for _ in range(draw(st.integers(0, 4))):
                cells = [
                    draw(_filters_text()) if c == "filters" else draw(st.one_of(st.text(max_size=10), SCALARS.map(str)))
                    for c in cols
                ]
                rows.append(delim.join(cells))
            csv_text = "\n".join(rows) + "\n"
            if draw(st.booleans()):
                csv_text = mutate(csv_text.encode(), draw(EDITS)).decode("utf-8", "replace")
        devices.append(dev)
    if devices:
        doc["devices"] = devices
    text = toml_doc(doc)
    if draw(st.integers(0, 4)) == 0:
        text = mutate(text.encode(), draw(EDITS)).decode("utf-8", "replace")
    return text, csv_text


def _sample_dir(proto: str) -> Path:
    import edgeos.protocols

    return Path(edgeos.protocols.__file__).parent / proto


_CFG_DIR: list[Path] = []


def _cfg_dir() -> Path:
    if not _CFG_DIR:
        _CFG_DIR.append(Path(tempfile.mkdtemp(prefix="edgeos-fuzz-")))
    return _CFG_DIR[0]


def load_config_text(toml_text: str, csv_text: str | None) -> Any:
    from edgeos.config import load_config

    d = _cfg_dir()
    (d / "edgeos.toml").write_text(toml_text, encoding="utf-8", errors="surrogatepass")
    csv = d / "tags.csv"
    if csv_text is None:
        csv.unlink(missing_ok=True)
    else:
        csv.write_text(csv_text, encoding="utf-8", errors="surrogatepass")
    return load_config(d / "edgeos.toml")


def fuzz_config(inp: tuple[str, str | None]) -> None:
    load_config_text(*inp)


# -- serial framing and parsing ----------------------------------------------------------------


@st.composite
def serial_input(draw) -> tuple[str, list[bytes]]:
    """(device TOML, the byte stream in reads)."""
    framing = draw(st.sampled_from(["terminator", "fixed", "start_end"]))
    opts: dict[str, Any] = {"framing": framing, "max_frame": draw(st.sampled_from([1, 2, 8, 64, 1024]))}
    delims = ["CRLF", "LF", "CR", "STX", "ETX", "hex:00", "hex:0D0A0D", "#", "ab"]
    if framing == "terminator":
        opts["terminator"] = draw(st.sampled_from(delims))
    elif framing == "fixed":
        opts["frame_length"] = draw(st.integers(1, 40))
        if draw(st.booleans()):
            opts["start"] = draw(st.sampled_from(delims))
    else:
        opts["start"] = draw(st.sampled_from(delims))
        opts["end"] = draw(st.sampled_from(delims))
        opts["trailer"] = draw(st.integers(0, 2))
    if draw(st.booleans()):
        opts["checksum"] = draw(st.sampled_from(["xor", "lrc", "sum8", "crc16_modbus", "crc16_ccitt", "crc16_xmodem"]))
        opts["checksum_format"] = draw(st.sampled_from(["hex", "binary"]))
        opts["checksum_from"] = draw(st.integers(0, 3))
        opts["checksum_gap"] = draw(st.integers(0, 2))
    opts["encoding"] = draw(st.sampled_from(["ascii", "utf-8", "latin-1", "utf-16"]))
    ts = draw(st.sampled_from([None, "iso8601", "unix", "unix_ms", "unix_ns", "%d.%m.%Y %H:%M:%S"]))
    pattern = r"^(?P<a>[^,]*),(?P<b>[^,]*),?(?P<c>.*)$"
    tags = [
        {"name": "a", "type": draw(st.sampled_from(["number", "integer", "string", "bool"]))},
        {
            "name": "b",
            "type": draw(st.sampled_from(["number", "integer", "string", "bool"])),
            "scale": draw(st.sampled_from([1.0, 1e-300, 1e300, -2.5])),
        },
    ]
    if ts:
        opts["timestamp_group"] = "c"
        opts["timestamp_format"] = ts
        opts["timezone"] = draw(st.sampled_from(["UTC", "Europe/Berlin"]))
    else:
        tags.append({"name": "c", "type": "string"})
    dev = {"name": "s", "protocol": "serial", "port": "/dev/ttyS9", "pattern": pattern, **opts, "tags": tags}
    toml = toml_doc({"gateway": {"id": "gw", "data_dir": "data"}, "devices": [dev]})
    cells = st.one_of(
        st.sampled_from(["", "1", "-0", "1e308", "1e999", "nan", "inf", "0x1F", "true", "ST", "9" * 40, "1.5", "  2 "]),
        st.sampled_from(
            [
                "2026-12-04T07:00:00Z",
                "1700000000",
                "99999999999999999999",
                "04.12.2026 07:00:00",
                "31.02.2026 25:61:00",
                "-1",
            ]
        ),
        st.text(max_size=8),
    )
    frame = st.builds(lambda a, b, c: f"{a},{b},{c}".encode("utf-8", "surrogatepass"), cells, cells, cells)
    chunk = st.one_of(
        st.binary(max_size=64), frame, frame.map(lambda f: f + b"\r\n"), frame.map(lambda f: b"\x02" + f + b"\x03")
    )
    stream = b"".join(draw(st.lists(chunk, max_size=12)))
    cuts = sorted(draw(st.lists(st.integers(0, max(0, len(stream))), max_size=5)))
    reads, last = [], 0
    for c in [*cuts, len(stream)]:
        reads.append(stream[last:c])
        last = c
    return toml, reads


_SERIAL_CACHE: dict[str, Any] = {}


def fuzz_serial(inp: tuple[str, list[bytes]], framer_cls: Any = None) -> None:
    from edgeos.protocols.serial.adapter import spec_of
    from edgeos.protocols.serial.framing import framer_for
    from edgeos.protocols.serial.parse import Parser

    toml, reads = inp
    if toml not in _SERIAL_CACHE:
        try:
            dev = load_config_text(toml, None).devices[0]
        except ConfigError:
            _SERIAL_CACHE[toml] = None
        else:
            _SERIAL_CACHE[toml] = (dev, spec_of(dev))
    got = _SERIAL_CACHE[toml]
    if got is None:
        return
    dev, spec = got
    framer = framer_cls(spec) if framer_cls else framer_for(spec)
    parser = Parser(dev.name, spec)
    bound = (
        spec.max_frame
        + len(spec.start or b"")
        + len(getattr(spec, "end", b"") or b"")
        + len(spec.terminator or b"")
        + spec.trailer
        + 64
    )
    for data in reads:
        frames = framer.feed(data)
        # Framing invariants: memory bounded, frames inside the data.
        assert framer.buffered <= max(bound, getattr(spec, "frame_length", 0) or 0), (framer.buffered, bound)
        for s, e in zip(frames.starts, frames.ends, strict=True):
            assert 0 <= s <= e <= len(frames.data)
        res = parser.parse(frames, 1_765_000_000_000_000_000)
        b = res.batch
        assert len(b.tags) == len(b.ts) == len(b.values) == len(b.quality)


# -- edgeos.wire.decode --------------------------------------------------------------------------


def _valid_payloads() -> list[bytes]:
    n = 5
    tags = np.arange(n, dtype=np.int32)
    ts = np.arange(n, dtype=np.int64) * 1_000_000 + 1_765_000_000_000_000_000
    vals = np.array([1.5, 2.0, np.nan, -3.25, 1e300])
    q = np.array([0, 0, 0x80000000, 0, 0], np.uint32)
    units = [
        wire.encode_unit("dev", tags, ts, vals, q, None, compress=True),
        wire.encode_unit("dev", tags, ts, vals, q, ["a", None, "b", None, "c"], compress=False),
        # decimal values: the scaled-integer value column ("vs")
        wire.encode_unit("dev", tags[:2], ts[:2], np.array([1.25, 2.5]), np.zeros(2, np.uint32), None, compress=True),
    ]
    return [wire.encode_message("gw", "dev", [7, 8, 9], units, 1), wire.encode_message("gw", "dev", [1], units[:1], 0)]


_MSGPACK_VALUES = st.recursive(
    st.one_of(SCALARS, st.binary(max_size=40), st.none()),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)),
    max_leaves=8,
)


def _tweak_doc(doc: Any, path: list[str | int], value: Any, delete: bool) -> Any:
    """Replace or delete the item at `path` (keys/indices taken modulo what exists)."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        return value
    keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
    k = keys[hash(path[0]) % len(keys)] if isinstance(path[0], str) else keys[path[0] % len(keys)]
    if delete and len(path) == 1:
        del doc[k]
        return doc
    doc[k] = _tweak_doc(doc[k], path[1:], value, delete)
    return doc


@st.composite
def wire_input(draw) -> bytes:
    base = draw(st.sampled_from(_valid_payloads()))
    how = draw(st.sampled_from(["bytes", "doc", "unit", "raw"]))
    if how == "raw":
        return draw(st.binary(max_size=200))
    if how == "bytes":
        return mutate(base, draw(EDITS))
    doc = msgpack.unpackb(base, raw=False)
    if how == "unit":
        i = draw(st.integers(0, len(doc["units"]) - 1))
        unit = msgpack.unpackb(doc["units"][i], raw=False)
        key = draw(st.sampled_from(sorted(unit)))
        if draw(st.booleans()):
            del unit[key]
        else:
            unit[key] = draw(
                st.one_of(_MSGPACK_VALUES, st.sampled_from([2, 3, 1, -1, 10**6, 2**40, "<f8", "<i1", "<u4", "|O"]))
            )
        doc["units"][i] = msgpack.packb(unit, use_bin_type=True)
    else:
        path = draw(st.lists(st.one_of(st.integers(0, 9), st.text(max_size=3)), min_size=1, max_size=3))
        doc = _tweak_doc(doc, path, draw(_MSGPACK_VALUES), draw(st.booleans()))
    return msgpack.packb(doc, use_bin_type=True)


def fuzz_wire(payload: bytes, decode: Callable[[bytes], Any] | None = None) -> None:
    msg = (decode or wire.decode)(payload)
    for u in msg.units:
        assert len(u.tags) == len(u.ts) == len(u.values) == len(u.quality)


# -- Modbus response decoding (and the write-side conversions) --------------------------------


@st.composite
def modbus_input(draw) -> tuple[list[Any], bytes, bytes, list[Any]]:
    from edgeos.protocols.modbus.config import BYTE_ORDERS, NUMERIC, TagSpec

    specs, at = [], 0
    for _ in range(draw(st.integers(1, 8))):
        typ = draw(st.sampled_from(["bool", "int8", "uint8", *NUMERIC, "string", "coil"]))
        table = "coil" if typ == "coil" else "hr"
        typ = "bool" if typ == "coil" else typ
        length = draw(st.integers(1, 12)) if typ == "string" else 0
        count = (length + 1) // 2 if typ == "string" else NUMERIC.get(typ, (1,))[0]
        specs.append(
            TagSpec(
                table=table,
                start=at,
                count=count,
                type=typ,
                byte_order=draw(st.sampled_from(BYTE_ORDERS)),
                bit=draw(st.integers(0, 15)) if typ == "bool" and table == "hr" else None,
                byte=draw(st.sampled_from(["low", "high"])),
                length=length,
                scale=draw(st.sampled_from([1.0, 0.1, -2.0, 1e-300, 1e300])),
                offset=draw(st.sampled_from([0.0, 273.15, -1e308])),
            )
        )
        at += count
    regs = draw(st.binary(min_size=2 * at, max_size=2 * at))
    bits = draw(st.binary(min_size=at, max_size=at))
    values = draw(
        st.lists(
            st.one_of(SCALARS, st.sampled_from(["0x7fffffff", "-0x1", "1e309", " 12 ", "true", "off", "9" * 400])),
            min_size=len(specs),
            max_size=len(specs),
        )
    )
    return specs, regs, bits, values


def fuzz_modbus(inp: tuple[list[Any], bytes, bytes, list[Any]], raw_number: Callable[..., Any] | None = None) -> None:
    from edgeos.protocols.modbus import codec

    specs, regs, bits, values = inp
    dec = codec.Decoder(specs, [s.start for s in specs])
    with np.errstate(all="ignore"):
        out, text = dec.decode(np.frombuffer(regs, ">u2"), np.frombuffer(bits, np.uint8).astype(bool))
    assert out.shape == (len(specs),)
    for s, v in zip(specs, values, strict=True):
        try:
            if raw_number is not None:
                raw_number(s, v)
            elif s.type == "bool" or s.type in ("int8", "uint8"):
                codec.merge_into_register(s, 0x1234, v)
            else:
                codec.encode_registers(s, v)
                codec.written_value(s, v)
        except ValueError:
            pass  # the documented refusal of a value that does not fit


# -- replay requests (wire.decode_replay_request; the gateway's sync calls only it) ------------


_REPLAY_VALUES = st.one_of(
    _INTERESTING_INTS,
    st.integers(),
    st.sampled_from([0, 1, 2**62, 2**62 + 1, 2**64, -(2**64), 10_000_000, 9_999_999, True, False, 1.0, 1e300]),
    st.text(max_size=8),
    st.none(),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=2),
)


@st.composite
def replay_input(draw) -> bytes:
    """A request document with fields replaced, removed or added, in either form; or mutated
    bytes of a valid request; or raw bytes."""
    how = draw(st.sampled_from(["doc", "doc", "bytes", "raw"]))
    form = draw(st.sampled_from(["msgpack", "json"]))
    valid = wire.encode_replay_request("gw", 5, 9, draw(st.sampled_from([None, "dev"])), form=form)
    if how == "raw":
        return draw(st.binary(max_size=draw(st.sampled_from([16, 64, 2048]))))
    if how == "bytes":
        return mutate(valid, draw(EDITS))
    doc: dict[Any, Any] = {"v": 1, "gw": "gw", "first": 5, "last": 9}
    for key in draw(st.lists(st.sampled_from(["v", "gw", "first", "last", "dev", "x", 1]), max_size=4)):
        if draw(st.integers(0, 3)) == 0:
            doc.pop(key, None)
        else:
            doc[key] = draw(_REPLAY_VALUES)
    if form == "json":
        try:
            return json.dumps({str(k): v for k, v in doc.items()}, default=repr).encode()
        except (ValueError, TypeError):
            return b"{"
    try:
        return msgpack.packb(doc, use_bin_type=True)
    except (OverflowError, ValueError):  # an int msgpack cannot carry: no client can send it
        return b"\xc1"


def fuzz_replay(payload: bytes, decode: Callable[[bytes], Any] | None = None) -> None:
    req = (decode or wire.decode_replay_request)(payload)
    # What the gateway acts on is in range, and it round-trips through both forms.
    assert isinstance(req.gateway, str) and req.gateway
    assert type(req.first) is int and type(req.last) is int and 1 <= req.first <= req.last <= 2**62
    assert req.last - req.first < wire.REPLAY_MAX_SPAN
    assert req.device is None or (isinstance(req.device, str) and req.device)
    for form in ("msgpack", "json"):
        again = wire.encode_replay_request(req.gateway, req.first, req.last, req.device, form=form)
        if len(again) <= wire.REPLAY_MAX_BYTES:
            assert wire.decode_replay_request(again) == req


# -- wire.Consumer: garbled, duplicated, reordered, split streams ---------------------------------


def _stream_units(n: int) -> list[tuple[str, int, bytes]]:
    """(device, seq, unit bytes) of a gateway with two devices; seqs interleave."""
    out = []
    for seq in range(1, n + 1):
        dev = "a" if seq % 3 else "b"
        k = np.arange(2, dtype=np.int32)
        out.append(
            (
                dev,
                seq,
                wire.encode_unit(
                    dev, k, 1_765_000_000_000_000_000 + seq + k.astype(np.int64), k + float(seq), np.zeros(2, np.uint32)
                ),
            )
        )
    return out


@st.composite
def consumer_input(draw) -> tuple[bool, list[bytes], set[int]]:
    """(clean, payloads in arrival order, the seqs those payloads carry when clean).

    The gateway's messages (one or more consecutive units of a device, `pv` chaining each
    device's units, some units split into parts, some gone answers) are duplicated, dropped and
    reordered; unless `clean`, some are garbled (byte edits, or a field replaced)."""
    units = _stream_units(draw(st.integers(1, 14)))
    msgs: list[tuple[bytes, set[int]]] = []
    prev: dict[str, int] = {}
    i = 0
    while i < len(units):
        dev = units[i][0]
        run = [units[i]]
        while i + len(run) < len(units) and units[i + len(run)][0] == dev and len(run) < draw(st.integers(1, 3)):
            run.append(units[i + len(run)])
        seqs = [s for _, s, _ in run]
        pv = prev.get(dev, 0)
        replay = draw(st.booleans()) and draw(st.booleans())
        if len(run) == 1 and draw(st.integers(0, 3)) == 0:
            blob = run[0][2]
            count = draw(st.integers(2, 4))
            size = -(-len(blob) // count)
            pieces = [blob[j * size : (j + 1) * size] for j in range(count)]
            for j, piece in enumerate(pieces):
                msgs.append(
                    (wire.encode_message("gw", dev, seqs, [piece], 1, prev=pv, replay=replay, part=(j, count)), set())
                )
            msgs[-1] = (msgs[-1][0], set(seqs))  # the unit arrives with its last part (when all arrive)
        else:
            msgs.append(
                (wire.encode_message("gw", dev, seqs, [b for _, _, b in run], 1, prev=pv, replay=replay), set(seqs))
            )
        prev[dev] = seqs[-1]
        i += len(run)
    if draw(st.booleans()):
        a = draw(st.integers(1, len(units)))
        msgs.append((wire.encode_gone("gw", a, a + 3, None, [(a, a + draw(st.integers(0, 3)))]), set()))
    # Drop whole unsplit messages, then duplicate and reorder.
    kept = [m for m in msgs if not (m[1] and draw(st.integers(0, 7)) == 0)]
    kept += [kept[j % len(kept)] for j in draw(st.lists(st.integers(0, 50), max_size=6))] if kept else []
    order = draw(st.permutations(range(len(kept))))
    payloads = [kept[j] for j in order]
    clean = draw(st.booleans())
    out = [p for p, _ in payloads]
    if not clean:
        for j in draw(st.lists(st.integers(0, max(0, len(out) - 1)), max_size=4)):
            if not out:
                break
            if draw(st.booleans()):
                out[j] = mutate(out[j], draw(EDITS))
            else:
                try:
                    doc = msgpack.unpackb(out[j], raw=False)
                except ValueError:  # garbled by an earlier edit already
                    continue
                path = draw(st.lists(st.one_of(st.integers(0, 9), st.text(max_size=3)), min_size=1, max_size=2))
                out[j] = msgpack.packb(
                    _tweak_doc(doc, path, draw(_MSGPACK_VALUES), draw(st.booleans())), use_bin_type=True
                )
        out += draw(st.lists(st.binary(max_size=24), max_size=2))
    # Split units complete only when all their parts were kept (a part set is all-or-nothing above).
    expected = set().union(*[s for _, s in payloads]) if clean else set()
    return clean, out, expected


def fuzz_consumer(inp: tuple[bool, list[bytes], set[int]], consumer_cls: Any = None) -> None:
    clean, payloads, expected = inp
    c = (consumer_cls or wire.Consumer)(reorder_wait=0.0, retry_after=0.0, max_partial=4096, clock=lambda: 0.0)
    delivered: list[tuple[str, int]] = []  # a seq is unique per gateway (docs/payload.md)
    for k, payload in enumerate(payloads):
        try:
            got = c.feed(payload, now=float(k))
        except ValueError:
            assert not clean, "a well-formed payload was refused"
            continue
        delivered += [(d.gateway, d.seq) for d in got]
        for topic, request in c.requests(now=float(k) + 100.0):
            assert isinstance(topic, str)
            if clean:
                wire.decode_replay_request(request)  # what a consumer asks for, the gateway takes
        c.gaps("gw")
        c.seen("gw")
        c.take_gone()
    assert len(delivered) == len(set(delivered)), f"delivered twice: {sorted(delivered)}"
    if clean:
        assert {seq for _, seq in delivered} == expected, (sorted(delivered), sorted(expected))


# -- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    strategy: st.SearchStrategy[Any]
    run: Callable[[Any], None]
    allowed: tuple[type[BaseException], ...]


TARGETS: dict[str, Target] = {
    "config": Target(config_input(), fuzz_config, (ConfigError,)),
    "serial": Target(serial_input(), fuzz_serial, ()),
    "wire": Target(wire_input(), fuzz_wire, (ValueError,)),
    "modbus": Target(modbus_input(), fuzz_modbus, ()),
    "replay": Target(replay_input(), fuzz_replay, (ValueError,)),
    "consumer": Target(consumer_input(), fuzz_consumer, ()),
}


# -- negative controls: deliberately broken variants the fuzzer must catch ---------------------


def _broken_decode(payload: bytes) -> Any:
    """wire.decode as a first draft would write it: trusts the document's shape."""
    doc = msgpack.unpackb(payload, raw=False)
    units = [wire.decode_unit(u) for u in doc["units"]]
    return wire.Message(doc["gw"], doc["dev"], list(doc["seq"]), doc["td"], units)


def _broken_framer(spec: Any) -> Any:
    """A terminator framer that forgets to bound a frame that never ends (memory grows)."""
    from edgeos.protocols.serial.framing import Frames, framer_for

    inner = framer_for(spec)

    class Unbounded:
        def __init__(self) -> None:
            self.rest = b""

        @property
        def buffered(self) -> int:
            return len(self.rest)

        def feed(self, data: bytes) -> Frames:
            b = self.rest + data
            term = getattr(inner, "term", b"\n")
            out = Frames(b)
            pos = 0
            while (i := b.find(term, pos)) >= 0:
                out.starts.append(pos)
                out.ends.append(i)
                pos = i + len(term)
            self.rest = b[pos:]
            return out

    return Unbounded()


def _broken_raw_number(spec: Any, value: Any) -> Any:
    """raw_number without its overflow guard: float() of a huge integer raises OverflowError."""
    from edgeos.protocols.modbus import codec

    if isinstance(value, str):
        value = codec._number(value, spec)
    v = float(value)
    if not math.isfinite(v):
        raise ValueError("not finite")
    return (v - spec.offset) / spec.scale


def _broken_config(inp: tuple[str, str | None]) -> None:
    """A loader that lets the TOML parser's own error escape (the first draft of every loader)."""
    import tomllib

    from edgeos.config import load as L

    def loads(text: str) -> object:
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RuntimeError(f"unguarded: {e}") from e

    original = L.tomllib
    L.tomllib = type("T", (), {"loads": staticmethod(loads), "TOMLDecodeError": type("Never", (Exception,), {})})
    try:
        load_config_text(*inp)
    finally:
        L.tomllib = original


def _broken_replay(payload: bytes) -> Any:
    """decode_replay_request as a first draft would write it: trusts the document's types."""
    doc = msgpack.unpackb(payload, raw=False) if payload[:1] != b"{" else json.loads(payload)
    if doc.get("v") != 1 or not 0 < doc["first"] <= doc["last"]:
        raise ValueError("bad request")
    return wire.ReplayRequest(doc["gw"], doc["first"], doc["last"], doc.get("dev"))


class _ForgetfulConsumer(wire.Consumer):
    """A consumer that forgets a device's seqs when a replay arrives: repeats go out again."""

    def _on_units(self, env: Any, seqs: list[int], blobs: list[bytes], now: float) -> list[Any]:
        if env.replay:
            self._own.pop((env.gateway, env.device), None)
        return super()._on_units(env, seqs, blobs, now)


BROKEN: dict[str, Target] = {
    "config": Target(config_input(), _broken_config, (ConfigError,)),
    "serial": Target(serial_input(), lambda inp: fuzz_serial(inp, _broken_framer), ()),
    "wire": Target(wire_input(), lambda p: fuzz_wire(p, _broken_decode), (ValueError,)),
    "modbus": Target(modbus_input(), lambda inp: fuzz_modbus(inp, _broken_raw_number), (ValueError,)),
    "replay": Target(replay_input(), lambda p: fuzz_replay(p, _broken_replay), (ValueError,)),
    "consumer": Target(consumer_input(), lambda inp: fuzz_consumer(inp, _ForgetfulConsumer), ()),
}

os.environ.setdefault("EDGEOS_FUZZ", "1")
