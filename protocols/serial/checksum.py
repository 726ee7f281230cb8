"""Frame checksums: XOR, LRC (over the bytes sent, or over those hex digits encode: Modbus
ASCII), sum mod 256, CRC-16/MODBUS, CRC-16/CCITT-FALSE, CRC-16/XMODEM.

Each kind has a scalar form (`compute`, for `edgeos serial test` and as the reference) and a
columnar one (`compute_many`) that checks every frame of a read at once with numpy: a line
device at full speed delivers thousands of frames per read, and a Python loop over their bytes
would cost more than everything else the adapter does.
"""

from __future__ import annotations

import binascii
from functools import reduce
from operator import xor

import numpy as np

KINDS = ("xor", "lrc", "lrc_hex", "sum8", "crc16_modbus", "crc16_ccitt", "crc16_xmodem")
WIDTH = {"xor": 1, "lrc": 1, "lrc_hex": 1, "sum8": 1, "crc16_modbus": 2, "crc16_ccitt": 2, "crc16_xmodem": 2}
"""Bytes of each checksum; in hex representation it takes twice as many characters."""
DEFAULT_ORDER = {"crc16_modbus": "little"}
COLUMNAR_MIN = 32
"""From this many frames in one read on, CRC-16/MODBUS is computed across frames with numpy."""
"""How a binary 16-bit checksum is sent: Modbus RTU sends its CRC low byte first."""


def _table_modbus() -> np.ndarray:
    t = np.zeros(256, np.uint16)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xA001 if c & 1 else c >> 1
        t[i] = c
    return t


_MODBUS = _table_modbus()
_MODBUS_LIST = [int(x) for x in _MODBUS]


def compute(kind: str, data: bytes) -> int:
    """The checksum of `data` (the reference for `compute_many`)."""
    if kind == "xor":
        return reduce(xor, data, 0)
    if kind == "sum8":
        return sum(data) & 0xFF
    if kind == "lrc":  # the two's complement of the sum of the bytes sent
        return (-sum(data)) & 0xFF
    if kind == "lrc_hex":  # Modbus ASCII: of the bytes the hex digit pairs encode
        try:
            return (-sum(bytes.fromhex(data.decode("ascii")))) & 0xFF
        except ValueError:  # an odd count or a non-hex digit: matches no checksum
            return -1
    if kind == "crc16_modbus":
        crc = 0xFFFF
        for b in data:
            crc = (crc >> 8) ^ _MODBUS_LIST[(crc ^ b) & 0xFF]
        return crc
    if kind == "crc16_ccitt":
        return binascii.crc_hqx(data, 0xFFFF)
    if kind == "crc16_xmodem":
        return binascii.crc_hqx(data, 0)
    raise ValueError(f"unknown checksum {kind!r}")


def compute_many(kind: str, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Checksums of buf[starts[i]:ends[i]] for every i (uint8 buffer, int64 index arrays)."""
    n = len(starts)
    if n == 0:
        return np.zeros(0, np.int64)
    # A range may start past the data (checksum_from beyond a short frame, found by fuzzing):
    # clipped, it is empty, as slicing would make it.
    starts = np.clip(starts, 0, len(buf))
    ends = np.clip(ends, starts, len(buf))
    lengths = ends - starts
    if kind in ("xor", "sum8", "lrc"):
        # reduceat over (start, end) pairs; an empty range would give buf[start], so mask it.
        idx = np.empty(2 * n, np.int64)
        idx[0::2] = starts
        idx[1::2] = ends
        padded = np.concatenate([buf, np.zeros(1, np.uint8)])  # an end may equal len(buf)
        if kind == "xor":
            out = np.bitwise_xor.reduceat(padded, idx)[0::2].astype(np.int64)
        else:
            out = np.add.reduceat(padded.astype(np.int64), idx)[0::2]
            out = (-out) & 0xFF if kind == "lrc" else out & 0xFF
        out[lengths <= 0] = 0
        return out
    if kind in ("lrc_hex", "crc16_ccitt", "crc16_xmodem") or n < COLUMNAR_MIN:
        # binascii's CRC-CCITT is C already; a few frames (poll replies, as Modbus ASCII's) are
        # cheaper one by one.
        data = buf.tobytes()
        return np.array(
            [compute(kind, data[s:e]) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)], np.int64
        )
    # CRC-16/MODBUS: one step per byte position, across all frames at once (short, many frames).
    init = 0xFFFF
    crc = np.full(n, init, np.int64)
    if len(buf) == 0:
        return crc
    for j in range(int(lengths.max()) if n else 0):
        live = lengths > j
        b = buf[np.minimum(starts + j, len(buf) - 1)].astype(np.int64)
        crc = np.where(live, (crc >> 8) ^ _MODBUS[(crc ^ b) & 0xFF], crc)
    return crc
