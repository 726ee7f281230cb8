"""The stored unit's byte format, shared by the store and the upstream payload.

Imports nothing of the daemon: a consumer installs edgeos and imports `edgeos.wire` alone.
A unit holds one device's samples from one commit as packed little-endian columns in a msgpack
map; it is encoded once, when committed, and forwarded as stored. docs/payload.md specifies it.
"""

from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass

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
    """bytes -> columns (zero-copy views where possible). Reads every version this edgeos wrote."""
    doc = msgpack.unpackb(data, raw=False)
    version = doc.get("v")
    if version not in (1, 2, 3):
        raise ValueError(f"unit version {version!r} is newer than this edgeos understands (up to {UNIT_VERSION})")
    n = doc["n"]
    if version == 3:
        return _check(_decode_v3(doc, n), n)
    if version == 1:
        tags = np.frombuffer(doc["tag"], "<i4")
        quality = np.frombuffer(doc["q"], "<u4")
    else:
        tags = np.frombuffer(doc["tag"], "<i4" if doc["tw"] == 4 else "<u2").astype(np.int32)
        quality = np.frombuffer(doc["q"], "<u4") if "q" in doc else np.zeros(n, np.uint32)
    unit = Unit(
        device=doc["d"],
        tags=tags,
        ts=np.frombuffer(doc["ts"], "<i8"),
        values=np.frombuffer(doc["val"], "<f8"),
        quality=quality,
        text=doc.get("txt"),
    )
    return _check(unit, n)


def _check(unit: Unit, n: int) -> Unit:
    if not (len(unit.tags) == len(unit.ts) == len(unit.values) == len(unit.quality) == n):
        raise ValueError("unit columns disagree in length")
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
    if len(out) != n * w or not z.eof or z.unconsumed_tail:
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
    try:
        tags = np.cumsum(_unpack(doc["tag"], doc["tgd"], n), dtype="<i8").astype(np.int32)
        ts = _unpack(doc["ts"], doc["tsd"], n).astype("<i8") * np.int64(doc["tst"]) + np.int64(doc["t0"])
        vd = doc["vd"]
        if "vs" in doc:
            if vd not in _WIDTHS or len(doc["val"]) != n * np.dtype(vd).itemsize:
                raise ValueError("unit value column has the wrong type or length")
            values = np.frombuffer(doc["val"], vd).astype("<f8") / _SCALES[doc["vs"]]
        else:
            values = _unpack(doc["val"], vd, n).astype("<f8")
        quality = _unpack(doc["q"], "<u4", n) if "q" in doc else np.zeros(n, np.uint32)
    except zlib.error as e:
        raise ValueError(f"unit column does not inflate: {e}") from e
    return Unit(device=doc["d"], tags=tags, ts=ts, values=values, quality=quality, text=doc.get("txt"))


# -- upstream messages ---------------------------------------------------------------------

PAYLOAD_VERSION = 1


def encode_message(gateway: str, device: str, seqs: list[int], units: list[bytes], dictionary: int) -> bytes:
    """One MQTT payload: consecutive stored units of one device, embedded as they are stored.

    The units' bytes are copied into the envelope, never decoded or re-encoded.
    """
    head = msgpack.packb(
        {"v": PAYLOAD_VERSION, "gw": gateway, "dev": device, "seq": seqs, "td": dictionary, "units": []},
        use_bin_type=True,
    )
    # The same bytes msgpack would write, assembled in one allocation: the map's last entry
    # is "units", so its empty-array byte is replaced by the array header and the bin items.
    n = len(units)
    array = bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
    parts = [head[:-1], array]
    for u in units:
        parts.append(b"\xc6" + len(u).to_bytes(4, "big"))  # bin 32
        parts.append(u)
    return b"".join(parts)


@dataclass(frozen=True)
class Message:
    """A decoded data message. `units[i]` has sequence number `seqs[i]`."""

    gateway: str
    device: str
    seqs: list[int]
    dictionary: int
    units: list[Unit]


def decode(payload: bytes) -> Message:
    """Decode a data message (any payload version up to PAYLOAD_VERSION).

    Raises ValueError, and only ValueError, for any payload that is not a well-formed message:
    a consumer decodes whatever any broker client published (fuzzed: tests/fuzz)."""
    try:
        doc = msgpack.unpackb(payload, raw=False)
        if not isinstance(doc, dict) or doc.get("v") != PAYLOAD_VERSION:
            got = doc.get("v") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"not an edgeos data message of version {PAYLOAD_VERSION} (got {got!r})")
        units = [decode_unit(u) for u in doc["units"]]
        if len(units) != len(doc["seq"]):
            raise ValueError("message carries a different number of units and sequence numbers")
        return Message(doc["gw"], doc["dev"], list(doc["seq"]), doc["td"], units)
    except ValueError:
        raise
    except (LookupError, TypeError, AttributeError, ArithmeticError, msgpack.UnpackException) as e:
        raise ValueError(f"malformed edgeos data message: {type(e).__name__}: {e}") from e


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
