"""Plain-Python twin of ext/_frame.pyx (edgeos.sync._frame): the specification, byte for byte."""

from __future__ import annotations

import numpy as np


def assemble(head: bytes, blob: bytes | memoryview, offsets: np.ndarray, idx: np.ndarray) -> bytes:
    """head, then for each i of idx the unit blob[offsets[i]:offsets[i + 1]] as msgpack bin 32."""
    units = len(offsets) - 1
    view = memoryview(blob)
    parts = [head]
    for i in idx.tolist():
        if not 0 <= i < units:
            raise IndexError(f"unit {i} is not in a run of {units}")
        a, b = int(offsets[i]), int(offsets[i + 1])
        if a < 0 or b < a or b > len(view) or b - a > 0xFFFFFFFF:
            raise ValueError(f"unit {i} spans [{a}, {b}) of a run of {len(view)} bytes")
        parts.append(b"\xc6" + (b - a).to_bytes(4, "big"))
        parts.append(view[a:b])
    return b"".join(parts)
