"""Per-tag compressed chunks: what compaction turns hot units into.

Timestamps: delta-of-delta of ts // resolution. Values: when every finite value is exactly a
decimal with k <= 6 digits (as register values scaled by 0.1, 0.01 are), the deltas of the
scaled integers; otherwise XOR of each float's bits with the previous one. Integers are
zigzagged, narrowed to the smallest width that holds them, byte-shuffled and zlib-compressed.
Encoding is lossless, bit for bit (-0.0 and NaN payloads included): a mode is used only if
decoding gives the same bits back.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import msgpack
import numpy as np

CHUNK_VERSION = 1
_LEVEL = 6


def _zigzag(x: np.ndarray) -> np.ndarray:
    return ((x << 1) ^ (x >> 63)).view(np.uint64)


def _unzigzag(u: np.ndarray) -> np.ndarray:
    u = u.astype(np.uint64)
    return ((u >> np.uint64(1)).view(np.int64)) ^ -((u & np.uint64(1)).view(np.int64))


def _pack_uints(u: np.ndarray) -> tuple[int, bytes]:
    """Narrow, byte-shuffle (same-significance bytes together) and deflate."""
    top = int(u.max()) if len(u) else 0
    width = 1 if top < 1 << 8 else 2 if top < 1 << 16 else 4 if top < 1 << 32 else 8
    a = u.astype(f"<u{width}")
    return width, zlib.compress(a.view(np.uint8).reshape(-1, width).T.tobytes(), _LEVEL)


def _unpack_uints(width: int, data: bytes, n: int) -> np.ndarray:
    raw = np.frombuffer(zlib.decompress(data), np.uint8).reshape(width, n).T
    return np.ascontiguousarray(raw).view(f"<u{width}").reshape(n).astype(np.uint64)


def _pack_ints(x: np.ndarray) -> tuple[int, bytes]:
    return _pack_uints(_zigzag(x.astype(np.int64)))


def _unpack_ints(width: int, data: bytes, n: int) -> np.ndarray:
    return _unzigzag(_unpack_uints(width, data, n))


@dataclass(frozen=True)
class Chunk:
    ts: np.ndarray
    values: np.ndarray
    quality: np.ndarray
    text: list[str | None] | None = None


def _encode_values(v: np.ndarray) -> dict:
    # -0.0 goes with NaN/inf: the decimal mode's integers have no negative zero.
    finite = np.isfinite(v) & ~((v == 0) & np.signbit(v))
    doc: dict = {}
    if not finite.all():
        # Rare (Bad samples, strings, -0.0): keep the exact bits of the exceptions on the side
        # and carry the previous ordinary value through them so the main stream stays smooth.
        idx = np.flatnonzero(~finite)
        doc["xi"] = _pack_ints(np.diff(idx, prepend=0))
        doc["xv"] = v[idx].astype("<f8").tobytes()
        filled = v.copy()
        if finite.any():
            last = np.maximum.accumulate(np.where(finite, np.arange(len(v)), -1))
            first = int(np.argmax(finite))
            last[last < 0] = first
            filled = v[last]
        else:
            filled = np.zeros_like(v)
        v = filled
    bits = v.view(np.uint64)
    for k in range(7):
        scale = 10.0**k
        r = np.round(v * scale)
        if np.abs(r).max(initial=0) >= 2**52:
            break
        # Checked the way _decode_values computes it: int64, back to float, divided.
        if np.array_equal((r.astype(np.int64).astype(np.float64) / scale).view(np.uint64), bits):
            doc["k"] = k
            doc["iv"] = _pack_ints(np.diff(r.astype(np.int64), prepend=0))
            return doc
    doc["k"] = -1
    doc["xv64"] = _pack_uints(bits ^ np.concatenate([[np.uint64(0)], bits[:-1]]))
    return doc


def _decode_values(doc: dict, n: int) -> np.ndarray:
    if doc["k"] >= 0:
        w, data = doc["iv"]
        v = np.cumsum(_unpack_ints(w, data, n)).astype(np.float64) / 10.0 ** doc["k"]
    else:
        w, data = doc["xv64"]
        v = np.bitwise_xor.accumulate(_unpack_uints(w, data, n)).view(np.float64)
    if "xi" in doc:
        w, data = doc["xi"]
        idx = np.cumsum(_unpack_ints(w, data, len(doc["xv"]) // 8))
        v = v.copy()
        v[idx] = np.frombuffer(doc["xv"], "<f8")
    return v


def encode_chunk(ts: np.ndarray, values: np.ndarray, quality: np.ndarray, text=None, resolution: int = 1) -> bytes:
    """One tag's samples -> bytes. `ts` must be multiples of `resolution` (ns)."""
    n = len(ts)
    q = ts // resolution
    d = np.diff(q, prepend=q[:1])
    doc = {
        "v": CHUNK_VERSION,
        "n": n,
        "res": resolution,
        "t0": int(q[0]) if n else 0,
        "dd": _pack_ints(np.diff(d, prepend=0)),
        "val": _encode_values(np.asarray(values, np.float64)),
    }
    if quality.any():
        doc["q"] = _pack_uints(quality.astype(np.uint64))
    if text is not None and any(t is not None for t in text):
        doc["txt"] = zlib.compress(msgpack.packb(list(text)), _LEVEL)
    return msgpack.packb(doc, use_bin_type=True)


def decode_chunk(data: bytes) -> Chunk:
    doc = msgpack.unpackb(data, raw=False)
    if doc.get("v") != CHUNK_VERSION:
        raise ValueError(f"chunk version {doc.get('v')!r} unknown")
    n = doc["n"]
    w, dd = doc["dd"]
    ts = (doc["t0"] + np.cumsum(np.cumsum(_unpack_ints(w, dd, n)))) * doc["res"]
    quality = np.zeros(n, np.uint32)
    if "q" in doc:
        quality = _unpack_uints(*doc["q"], n).astype(np.uint32)
    text = msgpack.unpackb(zlib.decompress(doc["txt"])) if "txt" in doc else None
    return Chunk(ts.astype(np.int64), _decode_values(doc["val"], n), quality, text)
