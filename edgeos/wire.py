"""The stored unit's byte format, shared by the store and the upstream payload.

Imports nothing of the daemon: a consumer installs edgeos and imports `edgeos.wire` alone.
A unit holds one device's samples from one commit as packed little-endian columns in a msgpack
map; it is encoded once, when committed, and forwarded as stored. docs/payload.md specifies it.
"""

from __future__ import annotations

import bisect
import json
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import msgpack
import numpy as np

UNIT_VERSION = 3
"""3: columns byte-shuffled and deflated (docs/payload.md); 2: plain columns, still written on
request (`compress=False`) and read; 1: edgeos 0.1.0 development format (int32 tags, quality
always present), read."""


@dataclass(frozen=True)
class Unit:
    """Decoded columns of one unit. `tags` are the store's tag ids (see the tag dictionary)."""

    device: str
    tags: np.ndarray
    ts: np.ndarray
    values: np.ndarray
    quality: np.ndarray
    text: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.tags)


def encode_unit(
    device: str,
    tags: np.ndarray,
    ts: np.ndarray,
    values: np.ndarray,
    quality: np.ndarray,
    text: list[str | None] | None = None,
    *,
    compress: bool = True,
) -> bytes:
    """Columns -> bytes. Tag ids go as uint16 when they fit; an all-Good quality column is omitted.
    `compress` (version 3) deflates the byte-shuffled columns: a unit is written to flash once
    as a hot unit and again at a checkpoint, so its size is most of what a commit writes."""
    if compress:
        return _encode_v3(device, tags, ts, values, quality, text)
    n = len(tags)
    wide = n and int(tags.max()) > 0xFFFF
    doc: dict = {
        "v": 2,
        "d": device,
        "n": n,
        "tag": np.ascontiguousarray(tags, "<i4" if wide else "<u2").tobytes(),
        "tw": 4 if wide else 2,
        "ts": np.ascontiguousarray(ts, "<i8").tobytes(),
        "val": np.ascontiguousarray(values, "<f8").tobytes(),
    }
    if n and quality.any():
        doc["q"] = np.ascontiguousarray(quality, "<u4").tobytes()
    if text is not None:
        doc["txt"] = list(text)
    return msgpack.packb(doc, use_bin_type=True)


def decode_unit(data: bytes) -> Unit:
    """bytes -> columns (zero-copy views where possible). Reads every version this edgeos wrote.

    Raises ValueError, and only ValueError, for bytes that are not a well-formed unit: a
    consumer decodes what any broker client could publish, and a garbled unit must be refused,
    never read as other values (docs/payload.md, "A unit")."""
    try:
        doc = msgpack.unpackb(data, raw=False)
        if not isinstance(doc, dict):
            raise ValueError(f"a unit is a msgpack map, not {type(doc).__name__}")
        version = doc.get("v")
        if type(version) is not int or version < 1:
            raise ValueError(f"unit version {version!r} is not one edgeos writes")
        if version > UNIT_VERSION:
            raise ValueError(f"unit version {version} is newer than this edgeos understands (up to {UNIT_VERSION})")
        n = doc["n"]
        if type(n) is not int or n < 0:
            raise ValueError(f"unit sample count {n!r} is not a count")
        if not isinstance(doc["d"], str):
            raise ValueError("unit device is not a string")
        text = doc.get("txt")
        if text is not None and not (
            isinstance(text, list) and len(text) == n and all(t is None or isinstance(t, str) for t in text)
        ):
            raise ValueError(f"unit text is not {n} entries of a string or nil")
        if version == 3:
            return _check(_decode_v3(doc, n), n)
        if version == 1:
            tags = np.frombuffer(doc["tag"], "<i4")
            quality = np.frombuffer(doc["q"], "<u4")
        else:
            if type(doc["tw"]) is not int or doc["tw"] not in (2, 4):
                raise ValueError(f"unit tag width {doc['tw']!r} is neither 2 nor 4")
            tags = np.frombuffer(doc["tag"], "<i4" if doc["tw"] == 4 else "<u2").astype(np.int32)
            quality = np.frombuffer(doc["q"], "<u4") if "q" in doc else np.zeros(n, np.uint32)
        unit = Unit(
            device=doc["d"],
            tags=tags,
            ts=np.frombuffer(doc["ts"], "<i8"),
            values=np.frombuffer(doc["val"], "<f8"),
            quality=quality,
            text=text,
        )
        return _check(unit, n)
    except ValueError:
        raise
    except (LookupError, TypeError, AttributeError, ArithmeticError, msgpack.UnpackException) as exc:
        raise ValueError(f"malformed unit: {type(exc).__name__}: {exc}") from exc


def _check(unit: Unit, n: int) -> Unit:
    if not (len(unit.tags) == len(unit.ts) == len(unit.values) == len(unit.quality) == n):
        raise ValueError("unit columns disagree in length")
    if unit.text is not None and "" in unit.text:
        # edgeos before 2026-12-04 wrote "" as the text of the numbers of a serial device that
        # also has string tags. A string sample's value is NaN, so an empty text beside any other
        # value is a number (docs/payload.md).
        text = [None if t == "" and v == v else t for t, v in zip(unit.text, unit.values.tolist(), strict=False)]
        unit = replace(unit, text=text)
    return unit


_WIDTHS = ("<i1", "<i2", "<i4", "<i8")


def _narrow(a: np.ndarray) -> tuple[str, np.ndarray]:
    """An int64 column in the narrowest little-endian signed type that holds it."""
    if not len(a):
        return "<i1", a.astype("<i1")
    lo, hi = int(a.min()), int(a.max())
    for dt in _WIDTHS:
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return dt, a.astype(dt)
    raise AssertionError("unreachable: int64 fits <i8")


def _pack(a: np.ndarray) -> bytes:
    """Byte-shuffle (bytes of equal significance together), then deflate (level 1: fast)."""
    w = a.dtype.itemsize
    raw = np.frombuffer(np.ascontiguousarray(a).tobytes(), np.uint8)
    return zlib.compress(raw.reshape(-1, w).T.tobytes() if w > 1 and len(a) else raw.tobytes(), 1)


def _unpack(data: bytes, dtype: str, n: int) -> np.ndarray:
    if dtype not in _WIDTHS + ("<u2", "<u4", "<f8"):
        raise ValueError(f"unit column type {dtype!r} unknown")
    w = np.dtype(dtype).itemsize
    # Bounded: a column never inflates past what its header says (a consumer decodes what any
    # broker client could publish; an unbounded inflate would be a memory bomb).
    z = zlib.decompressobj()
    out = z.decompress(data, n * w + 1)
    if len(out) != n * w or not z.eof or z.unconsumed_tail or z.unused_data:
        # One complete zlib stream of exactly n x w bytes, nothing after it.
        raise ValueError("unit column has the wrong length")
    raw = np.frombuffer(out, np.uint8)
    if w > 1 and n:
        raw = raw.reshape(w, n).T
    return np.ascontiguousarray(raw).view(dtype).reshape(n)


_SCALES = [10.0**k for k in range(7)]


def _decimal_scale(values: np.ndarray) -> int | None:
    """The smallest k <= 6 such that every value is exactly an integer / 10**k (bit for bit,
    so -0.0, NaN and inf never qualify), or None."""
    v = np.ascontiguousarray(values, "<f8")
    if not len(v) or not np.isfinite(v).all() or float(np.abs(v).max()) >= 2.0**53 / 1e6:
        return None
    # The first values tell where to start (the whole column needs at least their k): one
    # pass over the column in the common case.
    start = 0 if len(v) <= 16 else (_decimal_scale(v[:16]) or 0)
    bits = v.view("<i8")
    for k in range(start, len(_SCALES)):
        f = _SCALES[k]
        # Exactly what the decoder computes: an integer back to float, divided (-0.0 fails).
        if np.array_equal((np.round(v * f).astype("<i8").astype("<f8") / f).view("<i8"), bits):
            return k
    return None


def _encode_v3(device, tags, ts, values, quality, text) -> bytes:
    n = len(tags)
    ts = np.ascontiguousarray(ts, "<i8")
    t0 = int(ts.min()) if n else 0
    off = ts - t0
    # Timestamps rounded to the store's resolution share a step: store offsets in steps.
    step = int(np.gcd.reduce(off)) if n and off.any() else 1
    step = step if 0 < step < 2**62 else 1
    tsd, off = _narrow(off // step)
    # Tag ids as differences from the previous one: a poll's tags mostly step by one.
    td, dtags = _narrow(np.diff(np.asarray(tags, "<i8"), prepend=0))
    doc: dict = {"v": 3, "d": device, "n": n, "t0": t0, "tst": step, "tsd": tsd, "tgd": td}
    doc["tag"] = _pack(dtags)
    doc["ts"] = _pack(off)
    k = _decimal_scale(values)
    if k is None:
        doc["vd"] = "<f8"
        doc["val"] = _pack(np.ascontiguousarray(values, "<f8"))
    else:  # register values scaled by 0.1 or 0.01: small integers
        doc["vs"] = k
        doc["vd"], scaled = _narrow(np.round(np.asarray(values, "<f8") * _SCALES[k]).astype("<i8"))
        # Narrowed, not deflated: their low bytes hardly compress, and deflate costs the time.
        doc["val"] = scaled.tobytes()
    if n and quality.any():
        doc["q"] = _pack(np.ascontiguousarray(quality, "<u4"))
    if text is not None:
        doc["txt"] = list(text)
    return msgpack.packb(doc, use_bin_type=True)


def _decode_v3(doc: dict, n: int) -> Unit:
    for key in ("tgd", "tsd"):  # the integer types of tag differences and time steps
        if doc[key] not in _WIDTHS:
            raise ValueError(f"unit column type {key} = {doc[key]!r} is not one of {', '.join(_WIDTHS)}")
    for key in ("t0", "tst"):
        if type(doc[key]) is not int:
            raise ValueError(f"unit {key} is not an integer")
    try:
        tags = np.cumsum(_unpack(doc["tag"], doc["tgd"], n), dtype="<i8").astype(np.int32)
        ts = _unpack(doc["ts"], doc["tsd"], n).astype("<i8") * np.int64(doc["tst"]) + np.int64(doc["t0"])
        vd = doc["vd"]
        if "vs" in doc:
            vs = doc["vs"]
            if type(vs) is not int or not 0 <= vs < len(_SCALES):
                raise ValueError(f"unit value scale vs = {vs!r} is not 0 to {len(_SCALES) - 1}")
            if vd not in _WIDTHS or len(doc["val"]) != n * np.dtype(vd).itemsize:
                raise ValueError("unit value column has the wrong type or length")
            values = np.frombuffer(doc["val"], vd).astype("<f8") / _SCALES[vs]
        else:
            if vd != "<f8":
                raise ValueError(f"unit value type vd = {vd!r} is not <f8 (without vs)")
            values = _unpack(doc["val"], vd, n).astype("<f8")
        quality = _unpack(doc["q"], "<u4", n) if "q" in doc else np.zeros(n, np.uint32)
    except zlib.error as e:
        raise ValueError(f"unit column does not inflate: {e}") from e
    return Unit(device=doc["d"], tags=tags, ts=ts, values=values, quality=quality, text=doc.get("txt"))


# -- upstream messages ---------------------------------------------------------------------

PAYLOAD_VERSION = 1


def encode_message(
    gateway: str,
    device: str,
    seqs: list[int],
    units: list[bytes],
    dictionary: int,
    *,
    prev: int = 0,
    replay: bool = False,
    part: tuple[int, int] | None = None,
) -> bytes:
    """One MQTT payload: consecutive stored units of one device, embedded as they are stored.

    The units' bytes are copied into the envelope, never decoded or re-encoded. `prev` is the
    seq of the device's previous unit (0: none known), `replay` marks a unit sent again on
    request, `part` = (index, count) when `units` holds one slice of a unit larger than the
    message size cap (docs/payload.md, "Continuation").
    """
    parts = [_message_head(gateway, device, seqs, dictionary, prev, replay, part, len(units))]
    for u in units:
        parts.append(b"\xc6" + len(u).to_bytes(4, "big"))  # bin 32
        parts.append(u)
    return b"".join(parts)


def _message_head(
    gateway: str,
    device: str,
    seqs: list[int],
    dictionary: int,
    prev: int,
    replay: bool,
    part: tuple[int, int] | None,
    n: int,
) -> bytes:
    """`encode_message`'s bytes before its units' items: the envelope's map up to its last
    entry, "units", and that array's header for `n` items. Each item follows as bin 32
    (0xc6, the length in 4 bytes big-endian, the unit's bytes): the same bytes msgpack would
    write, assembled without packing the units again."""
    doc: dict = {"v": PAYLOAD_VERSION, "gw": gateway, "dev": device, "seq": seqs, "td": dictionary, "pv": prev}
    if replay:
        doc["rp"] = True
    if part is not None:
        doc["pt"] = list(part)
    doc["units"] = []
    head = msgpack.packb(doc, use_bin_type=True)
    # The map's last entry is "units": its empty-array byte is replaced by the array header.
    return head[:-1] + (bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big"))


def message_overhead(gateway: str, device: str, units: int, *, part: bool = False) -> int:
    """An upper bound of an envelope's bytes beside its units' own (for the size cap)."""
    base = 64 + len(gateway.encode()) + len(device.encode())
    return base + 14 * units + (12 if part else 0)


@dataclass(frozen=True)
class Message:
    """A decoded data message. `units[i]` has sequence number `seqs[i]`. `prev` is the seq of
    the device's previous unit the gateway held when it sent this one (0: none known);
    `replay` is True for units sent again on request."""

    gateway: str
    device: str
    seqs: list[int]
    dictionary: int
    units: list[Unit]
    prev: int = 0
    replay: bool = False


@dataclass(frozen=True)
class Envelope:
    """A data message with its units still as bytes (`part` set for a slice of a split unit)."""

    gateway: str
    device: str
    seqs: list[int]
    dictionary: int
    units: list[bytes]
    prev: int = 0
    replay: bool = False
    part: tuple[int, int] | None = None


def decode_envelope(payload: bytes) -> Envelope:
    """A data message's envelope, units left as bytes; checks its shape."""
    return _envelope(msgpack.unpackb(payload, raw=False))


def _envelope(doc: object) -> Envelope:
    if not isinstance(doc, dict) or doc.get("v") != PAYLOAD_VERSION:
        got = doc.get("v") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"not an edgeos data message of version {PAYLOAD_VERSION} (got {got!r})")
    try:
        seqs, units = list(doc["seq"]), list(doc["units"])
        gw, dev, td = doc["gw"], doc["dev"], doc["td"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"data message lacks {e}") from e
    if len(units) != len(seqs):
        raise ValueError("message carries a different number of units and sequence numbers")
    # Names and numbers a consumer keys on (fuzzed: tests/cases/fuzz_consumer_*).
    if not (isinstance(gw, str) and isinstance(dev, str) and type(td) is int):
        raise ValueError("data message's gw, dev or td has the wrong type")
    if not gw or not dev:
        raise ValueError("data message's gw and dev must name a gateway and a device")
    if not all(type(s) is int and 0 < s < 2**63 for s in seqs) or not all(isinstance(u, bytes) for u in units):
        raise ValueError("data message's seqs must be store row ids (1 to 2**63 - 1), its units bytes")
    pv = doc.get("pv") or 0
    if type(pv) is not int or not 0 <= pv < 2**63:
        raise ValueError("data message's pv must be a store row id or 0")
    part = doc.get("pt")
    if part is not None:
        if len(seqs) != 1 or not (
            isinstance(part, list) and len(part) == 2 and all(type(x) is int for x in part) and 0 <= part[0] < part[1]
        ):
            raise ValueError("a part message carries one slice of one unit")
        part = (int(part[0]), int(part[1]))
    return Envelope(gw, dev, seqs, td, units, pv, bool(doc.get("rp")), part)


def decode(payload: bytes) -> Message:
    """Decode a data message (any payload version up to PAYLOAD_VERSION). A slice of a unit
    split for the size cap raises ValueError: `Consumer` reassembles those.

    Raises ValueError, and only ValueError, for any payload that is not a well-formed message:
    a consumer decodes whatever any broker client published (fuzzed: tests/fuzz)."""
    try:
        e = decode_envelope(payload)
        if e.part is not None:
            raise ValueError("a part of a unit split for the size cap: reassemble it with wire.Consumer")
        units = [decode_unit(u) for u in e.units]
        return Message(e.gateway, e.device, e.seqs, e.dictionary, units, e.prev, e.replay)
    except ValueError:
        raise
    except (LookupError, TypeError, AttributeError, ArithmeticError, msgpack.UnpackException) as exc:
        raise ValueError(f"malformed edgeos data message: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class TagEntry:
    id: int
    device: str
    name: str
    kind: str
    unit: str

    @property
    def key(self) -> str:
        return f"{self.device}/{self.name}"


def encode_dictionary(gateway: str, tags: list[tuple[int, str, str, str, str]]) -> bytes:
    """The retained tag dictionary: store tag id -> (device, name, kind, unit).

    Ids are never reused or renamed, so the dictionary only grows; its version is its length.
    """
    return msgpack.packb({"v": PAYLOAD_VERSION, "gw": gateway, "version": len(tags), "tags": [list(t) for t in tags]})


def decode_dictionary(payload: bytes) -> dict[int, TagEntry]:
    doc = msgpack.unpackb(payload, raw=False)
    return {t[0]: TagEntry(*t) for t in doc["tags"]}


class Deduplicator:
    """At-least-once in, exactly-once out: remembers which (gateway, seq) were seen.

    Seen sequence numbers are kept per gateway as sorted runs [start, end], so memory grows
    with the number of gaps, not with the number of units, and nothing is ever forgotten: a
    backlog unit arriving a day behind the live ones is still recognised as new. A consumer of
    every device of a gateway sees contiguous seqs (gaps only where the gateway dropped data, or
    where units are still on their way); a consumer of some devices sees the others' seqs as
    gaps, one run per stretch of its own units, and is better served by a database key on
    (gateway, seq).
    """

    def __init__(self) -> None:
        self._runs: dict[str, tuple[list[int], list[int]]] = {}  # gateway -> (starts, ends)

    def first_time(self, gateway: str, seq: int) -> bool:
        """True the first time (gateway, seq) is offered, False for every repeat."""
        runs = self._runs.get(gateway)
        if runs is None:
            runs = self._runs[gateway] = ([], [])
        starts, ends = runs
        i = bisect.bisect_right(starts, seq) - 1  # the run starting at or before seq
        if i >= 0 and seq <= ends[i]:
            return False
        joins_left = i >= 0 and ends[i] == seq - 1
        joins_right = i + 1 < len(starts) and starts[i + 1] == seq + 1
        if joins_left and joins_right:
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]
        elif joins_left:
            ends[i] = seq  # the usual case: the next seq after the last one
        elif joins_right:
            starts[i + 1] = seq
        else:
            starts.insert(i + 1, seq)
            ends.insert(i + 1, seq)
        return True

    def ranges(self, gateway: str) -> list[tuple[int, int]]:
        """The seen seqs of `gateway` as inclusive (first, last) runs, ascending."""
        starts, ends = self._runs.get(gateway, ([], []))
        return list(zip(starts, ends, strict=True))

    def gaps(self, gateway: str) -> list[tuple[int, int]]:
        """Inclusive (first, last) runs of seqs not seen between the lowest and highest seen:
        units still on their way, other devices' units, or data the gateway dropped."""
        starts, ends = self._runs.get(gateway, ([], []))
        return [(e + 1, s - 1) for e, s in zip(ends, starts[1:], strict=False)]


# -- replay on request ---------------------------------------------------------------------

REPLAY_MAX_SPAN = 10_000_000
"""The widest seq range one request may name; a wider one is malformed (ask in pieces)."""
REPLAY_MAX_BYTES = 1024
_SEQ_MAX = 2**62
_DEVICE_MAX = 128


@dataclass(frozen=True)
class ReplayRequest:
    """Send again the units with first <= seq <= last (of `device` only, when given)."""

    gateway: str
    first: int
    last: int
    device: str | None = None


def encode_replay_request(
    gateway: str, first: int, last: int, device: str | None = None, *, form: str = "msgpack"
) -> bytes:
    """A replay request, to publish on the gateway's replay topic; `form` "msgpack" or "json"."""
    doc: dict = {"v": PAYLOAD_VERSION, "gw": gateway, "first": first, "last": last}
    if device is not None:
        doc["dev"] = device
    if form == "json":
        return json.dumps(doc, separators=(",", ":")).encode()
    if form != "msgpack":
        raise ValueError(f"form {form!r}: expected msgpack or json")
    return msgpack.packb(doc, use_bin_type=True)


def _int(v: object, what: str) -> int:
    if type(v) is not int or not 1 <= v <= _SEQ_MAX:
        raise ValueError(f"{what} must be an integer from 1 to 2**62")
    return v


class _KeyTwice(ValueError):
    pass


def _unique_keys(pairs: list[tuple[object, object]]) -> dict:
    """A map with a key twice is ambiguous (which `first`?): malformed, not "the last wins"."""
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise _KeyTwice("a key appears twice in the replay request")
    return doc


def decode_replay_request(payload: bytes) -> ReplayRequest:
    """A replay request in either form; ValueError for anything else (the gateway counts it)."""
    if not isinstance(payload, (bytes, bytearray)) or not payload or len(payload) > REPLAY_MAX_BYTES:
        raise ValueError(f"a replay request is 1 to {REPLAY_MAX_BYTES} bytes")
    try:
        # JSON may start with blanks (a hand-typed `mosquitto_pub -m`); a msgpack map never does.
        if payload.lstrip(b" \t\r\n")[:1] == b"{":
            doc = json.loads(bytes(payload).decode("utf-8"), object_pairs_hook=_unique_keys)
        else:
            doc = msgpack.unpackb(
                payload,
                raw=False,
                max_str_len=256,
                max_bin_len=0,
                max_array_len=0,
                max_map_len=8,
                object_pairs_hook=_unique_keys,
            )
    except _KeyTwice:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to parse is a malformed request
        raise ValueError(f"not msgpack or JSON: {type(e).__name__}") from None
    # type() and not ==: True == 1 and 1.0 == 1 in Python, and neither is the integer 1.
    if not isinstance(doc, dict) or type(doc.get("v")) is not int or doc["v"] != PAYLOAD_VERSION:
        raise ValueError("not a replay request of version 1")
    if set(doc) - {"v", "gw", "first", "last", "dev"}:
        raise ValueError("unknown keys in the replay request")
    gw, dev = doc.get("gw"), doc.get("dev")
    if not isinstance(gw, str) or not gw:
        raise ValueError("gw must name the gateway")
    first, last = _int(doc.get("first"), "first"), _int(doc.get("last"), "last")
    if last < first:
        raise ValueError("last is below first")
    if last - first >= REPLAY_MAX_SPAN:
        raise ValueError(f"the range spans more than {REPLAY_MAX_SPAN} seqs")
    if dev is not None and (not isinstance(dev, str) or not 0 < len(dev) <= _DEVICE_MAX):
        raise ValueError("dev must be a device name")
    return ReplayRequest(gw, first, last, dev)


@dataclass(frozen=True)
class Gone:
    """The gateway's answer for what a replay request named and it no longer holds: `ranges`
    are inclusive (first, last) seq runs within [first, last] (of any device)."""

    gateway: str
    first: int
    last: int
    device: str | None
    ranges: list[tuple[int, int]]


def encode_gone(gateway: str, first: int, last: int, device: str | None, ranges: list[tuple[int, int]]) -> bytes:
    doc = {"v": PAYLOAD_VERSION, "gw": gateway, "first": first, "last": last, "dev": device}
    doc["gone"] = [list(r) for r in ranges]
    return msgpack.packb(doc, use_bin_type=True)


def decode_gone(payload: bytes) -> Gone:
    return _gone(msgpack.unpackb(payload, raw=False))


def _gone(doc: object) -> Gone:
    if not isinstance(doc, dict) or doc.get("v") != PAYLOAD_VERSION or "gone" not in doc:
        raise ValueError("not an edgeos gone message of version 1")
    # As strict as a request: a broker may carry anything, and a reversed or foreign run would
    # break the sorted runs a consumer keeps.
    try:
        first, last = _int(doc.get("first"), "first"), _int(doc.get("last"), "last")
        ranges = [(_int(a, "a gone run's first"), _int(b, "a gone run's last")) for a, b in doc["gone"]]
    except (TypeError, ValueError) as e:
        raise ValueError(f"malformed gone message: {e}") from None
    gw, dev = doc.get("gw"), doc.get("dev")
    if not isinstance(gw, str) or not gw:
        raise ValueError("gone message's gw is not a name")
    if dev is not None and not isinstance(dev, str):
        raise ValueError("gone message's dev is not a name")
    if last < first or any(not first <= a <= b <= last for a, b in ranges):
        raise ValueError("gone message's runs are not within first..last, first <= last")
    return Gone(gw, first, last, dev, ranges)


class _Runs:
    """A set of ints as sorted, disjoint, non-touching inclusive runs."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def __contains__(self, x: int) -> bool:
        i = bisect.bisect_right(self.starts, x) - 1
        return i >= 0 and x <= self.ends[i]

    def add(self, a: int, b: int) -> None:
        """Add [a, b]; merges with touching or overlapping runs."""
        starts, ends = self.starts, self.ends
        i = bisect.bisect_left(ends, a - 1)  # the first run that may touch [a, b]
        j = i
        while j < len(starts) and starts[j] <= b + 1:
            a, b = min(a, starts[j]), max(b, ends[j])
            j += 1
        starts[i:j] = [a]
        ends[i:j] = [b]

    def below(self, x: int) -> int | None:
        """The highest member < x, or None."""
        i = bisect.bisect_left(self.starts, x) - 1
        if i < 0:
            return None
        return min(self.ends[i], x - 1)

    def runs(self) -> list[tuple[int, int]]:
        return list(zip(self.starts, self.ends, strict=True))

    def missing(self, a: int, b: int) -> list[tuple[int, int]]:
        """The runs of [a, b] not in the set."""
        out, x = [], a
        i = max(0, bisect.bisect_right(self.starts, a) - 1)
        while x <= b and i < len(self.starts):
            s, e = self.starts[i], self.ends[i]
            if e >= x:
                if s > x:
                    out.append((x, min(b, s - 1)))
                x = max(x, e + 1)
            i += 1
        if x <= b:
            out.append((x, b))
        return out


@dataclass(frozen=True)
class Delivered:
    """A unit seen for the first time: its gateway, device, seq, columns, and whether it came
    as a replay."""

    gateway: str
    device: str
    seq: int
    unit: Unit
    replay: bool = False


@dataclass
class _Gap:
    """Units of `device` with low <= seq <= anchor are missing: `anchor` is a seq the gateway
    named as a previous unit (`pv`) and that never arrived; `then` is the unit that named it.

    When the gateway says the anchor is gone, the units below it may still be held, and which
    seqs between are the device's only a unit's `pv` can tell: the gap then asks for
    [low, then] (`rechain`; if `then` is gone too, the newest unit seen, else the next to
    arrive), and closes when a replay of a unit above the anchor names a unit below it as its
    `pv` (the device's previous unit held now, docs/payload.md). With no such unit known, it
    asks [low, anchor] until the device's next unit arrives: it never gives up on units the
    gateway may still hold."""

    low: int
    anchor: int
    noticed: float
    then: int = 0
    rechain: bool = False
    requested: float = 0.0
    attempts: int = 0

    def high(self) -> int:
        return self.then if self.rechain and self.then else self.anchor


def _one_split(count: int, pieces: dict[int, bytes]) -> bool:
    """Whether `pieces` can all come from one split of a unit into `count` parts: every piece
    but the last of one size (the split's; the last may differ)."""
    return len({len(p) for i, p in pieces.items() if i < count - 1}) <= 1


class Consumer:
    """Exactly-once, gap-free units from any MQTT client: feed it every payload received on the
    data topics and on `edgeos/+/replay/gone`, publish what `requests()` returns.

    Per gateway it keeps the seqs seen (sorted runs, as `Deduplicator`) and drops repeats.
    Per device it follows the chain each message states (`pv`, the seq of the device's previous
    unit): a `pv` never seen means that device's units up to it were lost on the way (a broker
    that forgot what it acknowledged). After `reorder_wait` seconds (units of the backlog and
    live lanes, and replays, arrive out of order) it asks the gateway to send that range
    again, for that device only, and again every `retry_after` seconds until the units arrive
    or the gateway answers that they are gone (`take_gone()`). The chain makes no difference
    between devices a consumer subscribes to and those it does not: seqs of other devices are
    never taken for gaps. Memory follows the number of gaps and devices, not of units.

    The first message of a device sets where its chain starts: nothing before it is asked for,
    unless `from_start` (then everything the gateway still holds of that device is wanted).
    Units split for the size cap arrive as parts; they are joined here (at most `max_partial`
    bytes held; beyond it the other incomplete units are dropped, oldest first, and asked for
    again by their gaps; a unit that alone is larger is not joined).

    A unit that cannot be decoded, or whose device is not its message's, is counted in
    `undecodable` and not delivered (its gap asks for it again); `on_refused(gateway, device,
    seq, unit_bytes, why)`, if given, is called with it, so that a consumer that must keep
    everything (the plant collector parks it) does not lose a unit it joined from parts.
    """

    def __init__(
        self,
        *,
        reorder_wait: float = 5.0,
        retry_after: float = 30.0,
        replay_topic: str = "edgeos/{gateway}/replay",
        max_partial: int = 64 * 1024 * 1024,
        from_start: bool = False,
        clock: Callable[[], float] = time.monotonic,
        on_refused: Callable[[str, str, int, bytes, str], None] | None = None,
    ) -> None:
        self.reorder_wait = reorder_wait
        self.retry_after = retry_after
        self.replay_topic = replay_topic
        self.max_partial = max_partial
        self.from_start = from_start
        self.clock = clock
        self.on_refused = on_refused
        self._own: dict[tuple[str, str], _Runs] = {}  # (gateway, device) -> its seqs seen
        self._start: dict[tuple[str, str], int] = {}  # the first pv seen: nothing asked below it
        self._gone: dict[str, _Runs] = {}
        self._gaps: dict[tuple[str, str], dict[int, _Gap]] = {}  # keyed by anchor
        self._reported: list[Gone] = []
        # (gateway, seq) -> the parts of one split of a unit: (count, {index: piece})
        self._parts: dict[tuple[str, int], tuple[int, dict[int, bytes]]] = {}
        self._partial_bytes = 0
        self.duplicates = 0
        self.undecodable = 0

    def resume(self, gateway: str, device: str, seq: int) -> None:
        """Continue where a previous run of this consumer stopped: `seq` is the last unit of
        `device` it kept (from its own database). What the device sent after it and the broker
        lost meanwhile (a restart without persistence, an expired session) is then a gap,
        found when the device's next unit arrives, and asked for again; without it a fresh
        Consumer takes the first unit it sees as the device's start. Call before feeding
        anything of that device; units below `seq` sent again are delivered again (a database
        keyed on (gateway, seq) drops them), `seq` itself is taken as kept and is not."""
        if type(seq) is not int or not 1 <= seq <= _SEQ_MAX:
            raise ValueError("seq must be an integer from 1 to 2**62")
        key = (gateway, device)
        if key in self._start:
            raise ValueError(f"{gateway}/{device}: units were fed before resume()")
        self._start[key] = seq
        self._own.setdefault(key, _Runs()).add(seq, seq)

    # -- input ------------------------------------------------------------------------------

    def feed(self, payload: bytes, now: float | None = None) -> list[Delivered]:
        """A data message or a gone message; returns the units seen for the first time.
        A payload that is neither raises ValueError (and changes nothing)."""
        now = self.clock() if now is None else now
        try:
            doc = msgpack.unpackb(payload, raw=False)
        except Exception as e:  # noqa: BLE001 - msgpack raises several types
            raise ValueError(f"not msgpack: {type(e).__name__}: {e}") from None
        if isinstance(doc, dict) and "gone" in doc:
            self._on_gone(_gone(doc))
            return []
        env = _envelope(doc)
        if env.part is not None:
            return self._on_part(env, now)
        return self._on_units(env, env.seqs, env.units, now)

    def _on_units(self, env: Envelope, seqs: list[int], blobs: list[bytes], now: float) -> list[Delivered]:
        gw, dev = env.gateway, env.device
        own = self._own.setdefault((gw, dev), _Runs())
        key = (gw, dev)
        if key not in self._start:
            # A consumer starting mid-stream asks nothing before the first unit it sees, unless
            # it wants each device's history from its first unit (`from_start`).
            self._start[key] = 0 if self.from_start else env.prev
        out = []
        for seq, blob in zip(seqs, blobs, strict=True):
            if seq in own:  # a seq is one device's: repeats are found among that device's
                self.duplicates += 1
                continue
            try:
                unit = decode_unit(blob)
            except ValueError as e:  # decode_unit refuses a garbled unit with ValueError only
                self._refuse(gw, dev, seq, blob, f"undecodable unit: {type(e).__name__}: {e}")
                continue
            if unit.device != dev:
                # Repeats are looked for among the envelope device's seqs: a garbled `dev` would
                # deliver the seq again when it comes under its own device.
                self._refuse(gw, dev, seq, blob, f"a unit of device {unit.device!r} in a message of {dev!r}")
                continue
            own.add(seq, seq)
            if self._parts:  # parts of a split of this unit, now whole (sent under a larger cap)
                self._drop_parts((gw, seq))
            out.append(Delivered(gw, dev, seq, unit, env.replay))
        self._follow(env, seqs, now)
        return out

    def _follow(self, env: Envelope, seqs: list[int], now: float) -> None:
        """The chain: the message names the device's unit before its first; inside a message
        each unit's predecessor is the one before it. The seqs between are other devices':
        counted as accounted for in this device's runs, so they stay few (one per gap). A repeat
        tells it as well as a first sending (a replay's `pv` is the unit held now)."""
        key = (env.gateway, env.device)
        own = self._own[key]
        if seqs:
            if env.prev and env.prev + 1 < seqs[0]:
                self._between(key, own, env.prev + 1, seqs[0] - 1)
            for a, b in zip(seqs, seqs[1:], strict=False):
                if a + 1 < b:
                    self._between(key, own, a + 1, b - 1)
        if seqs and self._gaps.get(key):
            gaps = self._gaps[key]
            for anchor, gap in list(gaps.items()):
                if not gap.rechain:
                    continue
                if env.replay and env.prev < anchor < seqs[0]:
                    # A replay of a unit above a gone anchor whose `pv` (the device's previous
                    # unit held now) lies below it: the chain goes on from there (checked below).
                    del gaps[anchor]
                elif not gap.then and seqs[-1] > anchor:
                    gap.then, gap.attempts, gap.noticed = seqs[-1], 0, -math.inf  # one to ask up to
        self._check(key, env.prev, seqs[0] if seqs else 0, now)
        self._settle(key)

    def _between(self, key: tuple[str, str], own: _Runs, a: int, b: int) -> None:
        """Seqs a..b, which a message says hold none of the device's units (the gateway's
        units between two consecutive ones of the device, held now): other devices' units, or
        the device's that are gone. Accounted for, but for the top of a gap not yet answered:
        a unit of this device a message named, so the gateway no longer holds it. That gap
        asks at once, so that the gateway's answer reports it gone; taken as accounted for,
        it would have been neither delivered nor reported (a replay asked by another consumer
        names the unit before it held now)."""
        gaps = self._gaps.get(key)
        if gaps:
            gone = self._gone.get(key[0])
            for anchor in sorted(x for x in gaps if a <= x <= b):
                gap = gaps[anchor]
                if gap.rechain or (gone is not None and anchor in gone):
                    continue  # answered already: reported gone
                if a < anchor:
                    own.add(a, anchor - 1)
                a = anchor + 1
                gap.attempts, gap.noticed = 0, -math.inf
        if a <= b:
            own.add(a, b)

    def _refuse(self, gw: str, dev: str, seq: int, blob: bytes, why: str) -> None:
        self.undecodable += 1
        if self.on_refused is not None:
            self.on_refused(gw, dev, seq, blob, why[:300])

    def _check(self, key: tuple[str, str], prev: int, first: int, now: float) -> None:
        if prev <= self._start.get(key, 0) or prev in self._own[key]:
            return
        gaps = self._gaps.setdefault(key, {})
        if prev in gaps:
            return
        below = self._own[key].below(prev)
        low = max(below if below is not None else 0, self._start.get(key, 0)) + 1
        gaps[prev] = _Gap(low, prev, now, then=first)  # settled by the caller: an anchor said gone asks at once

    def _settle(self, key: tuple[str, str]) -> None:
        """Close the gaps whose anchor arrived; a gap whose anchor is gone asks for the unit that
        named it, to learn the device's unit before it held now, unless that is gone too."""
        gaps = self._gaps.get(key)
        if not gaps:
            return
        own, gone = self._own[key], self._gone.get(key[0], _Runs())
        for anchor, gap in list(gaps.items()):
            if anchor in own:
                del gaps[anchor]
            elif gap.rechain or anchor in gone:
                unknown = [r for a, b in own.missing(gap.low, anchor - 1) for r in gone.missing(a, b)]
                if gap.then and gap.then in gone:
                    # Gone as well: the device's newest unit seen (else the next to come) names
                    # what is held below it.
                    newest = own.ends[-1] if own.ends else 0
                    gap.then = newest if newest > gap.then and newest not in gone else 0
                if not unknown:
                    del gaps[anchor]  # nothing below it is still to come
                elif not gap.rechain:
                    gap.rechain = True
                    gap.attempts = 0  # a new question: asked at the next requests()
                    gap.noticed = -math.inf

    def _on_part(self, env: Envelope, now: float) -> list[Delivered]:
        seq = env.seqs[0]
        if seq in self._own.get((env.gateway, env.device), ()):
            self.duplicates += 1
            self._follow(env, [seq], now)  # its `pv` may be what a gap waits for
            return []
        index, count = env.part or (0, 1)
        piece = env.units[0]
        key = (env.gateway, seq)
        held = self._parts.get(key)
        # A unit sent again under another size cap (the gateway's session with another broker)
        # is split otherwise: the parts of the other split are dropped, never joined with these.
        if held is not None and (
            held[0] != count
            or not _one_split(count, {**held[1], index: piece})
            or (index in held[1] and len(held[1][index]) != len(piece))
        ):
            self._drop_parts(key)
            held = None
        if held is None:
            held = self._parts[key] = (count, {})
        got = held[1]
        if index not in got:
            got[index] = piece
            self._partial_bytes += len(piece)
        # The bound holds for the unit being joined too: a unit larger than max_partial is never
        # joined (edgeos's units are at most about 256 KiB; the default is 64 MiB), and parts
        # published by anyone with an endless count cannot grow memory past it.
        for other in [k for k in self._parts if k != key]:
            if self._partial_bytes <= self.max_partial:
                break
            self._drop_parts(other)
        if self._partial_bytes > self.max_partial:
            self._drop_parts(key)
            return []
        if len(got) < count:
            return []
        del self._parts[key]
        blob = b"".join(got[i] for i in range(count))
        self._partial_bytes -= len(blob)
        return self._on_units(env, [seq], [blob], now)

    def _drop_parts(self, key: tuple[str, int]) -> None:
        held = self._parts.pop(key, None)
        if held is not None:
            self._partial_bytes -= sum(map(len, held[1].values()))

    def _on_gone(self, g: Gone) -> None:
        gone = self._gone.setdefault(g.gateway, _Runs())
        for a, b in g.ranges:
            gone.add(a, b)
        self._reported.append(g)
        for key in [k for k in self._gaps if k[0] == g.gateway]:
            self._settle(key)

    # -- output -----------------------------------------------------------------------------

    def requests(self, now: float | None = None) -> list[tuple[str, bytes]]:
        """(topic, payload) replay requests due now: gaps older than `reorder_wait` not asked
        for in the last `retry_after` seconds. Publish each (QoS 1); call this about once a
        second."""
        now = self.clock() if now is None else now
        out = []
        for (gw, dev), gaps in self._gaps.items():
            for gap in gaps.values():
                if now - gap.noticed < self.reorder_wait:
                    continue
                if gap.attempts and now - gap.requested < self.retry_after:
                    continue
                gap.requested = now
                gap.attempts += 1
                topic = self.replay_topic.format(gateway=gw)
                # A gateway takes at most REPLAY_MAX_SPAN seqs a request: a wider gap (a
                # consumer `from_start` on a gateway past 10 M seqs, a long outage) is asked
                # for in several, newest first (the anchor's answer moves the chain on).
                high = gap.high()
                while high >= gap.low:
                    low = max(gap.low, high - REPLAY_MAX_SPAN + 1)
                    out.append((topic, encode_replay_request(gw, low, high, dev)))
                    high = low - 1
        return out

    def gaps(self, gateway: str) -> list[tuple[str, int, int]]:
        """(device, low, high): units known missing and not yet answered, per device."""
        mine = [(dev, gaps) for (gw, dev), gaps in self._gaps.items() if gw == gateway]
        return sorted((dev, g.low, g.anchor) for dev, gaps in mine for g in gaps.values())

    def take_gone(self) -> list[Gone]:
        """What gateways answered they no longer hold, since the last call."""
        out, self._reported = self._reported, []
        return out

    def seen(self, gateway: str) -> list[tuple[int, int]]:
        """The seqs of `gateway` accounted for, as inclusive runs: delivered, or known from a
        device's chain to be another device's."""
        union = _Runs()
        for (gw, _dev), own in self._own.items():
            if gw == gateway:
                for a, b in own.runs():
                    union.add(a, b)
        return union.runs()
