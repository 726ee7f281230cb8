"""Plain-Python twin of ext/_frame.pyx (edgeos.sync._frame): the specification, byte for byte,
with the same refusals (a compiled build and a pure one accept the same calls)."""

from __future__ import annotations

import numpy as np


def _column(a: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != np.int64 or a.ndim != 1 or not a.flags.c_contiguous:
        raise TypeError(f"{name} must be a contiguous 1-D int64 array")
    return a


def assemble(head: bytes, blob: bytes | memoryview, offsets: np.ndarray, idx: np.ndarray) -> bytes:
    """head, then for each i of idx the unit blob[offsets[i]:offsets[i + 1]] as msgpack bin 32."""
    if type(head) is not bytes:
        raise TypeError("head must be bytes")
    if blob is None:
        raise TypeError("blob must be a bytes-like object")
    bounds = _column(offsets, "offsets").tolist()
    units = len(bounds) - 1
    view = memoryview(blob)
    parts = [head]
    total = len(head)
    for i in _column(idx, "idx").tolist():
        if not 0 <= i < units:
            raise IndexError(f"unit {i} is not in a run of {units}")
        a, b = bounds[i], bounds[i + 1]
        if a < 0 or b < a or b > len(view) or b - a > 0xFFFFFFFF:
            raise ValueError(f"unit {i} spans [{a}, {b}) of a run of {len(view)} bytes")
        total += 5 + b - a
        if total > 0x7FFFFFFF * 64:
            raise ValueError(f"a message of {total} bytes or more")
        parts.append(b"\xc6" + (b - a).to_bytes(4, "big"))
        parts.append(view[a:b])
    return b"".join(parts)
