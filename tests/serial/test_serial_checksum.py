"""Checksums against their published check values, and the columnar form against the scalar one."""

from __future__ import annotations

import numpy as np
from edgeos.protocols.serial.checksum import KINDS, compute, compute_many
from hypothesis import given
from hypothesis import strategies as st


def test_check_values():
    # The catalogue of parametrised CRC algorithms gives each CRC's value over "123456789".
    data = b"123456789"
    assert compute("crc16_modbus", data) == 0x4B37
    assert compute("crc16_ccitt", data) == 0x29B1  # CRC-16/CCITT-FALSE
    assert compute("crc16_xmodem", data) == 0x31C3
    assert compute("sum8", data) == 0xDD
    assert compute("lrc", data) == 0x23
    # Modbus ASCII's LRC is over the bytes the hex digits encode: the request ":1103006B0003"
    # (unit 0x11, read 3 holding registers from 0x6B) ends with LRC 7E.
    assert compute("lrc_hex", b"1103006B0003") == 0x7E and compute("lrc", b"1103006B0003") != 0x7E
    assert compute("lrc_hex", b"1103006B000") == -1 and compute("lrc_hex", b"11G3") == -1
    # NMEA's own example sentence: XOR of the bytes between $ and *.
    assert compute("xor", b"GPGLL,5300.97914,N,00259.98174,E,125926,A") == 0x28


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=80))
def test_columnar_equals_scalar(frames):
    buf = b"".join(frames)
    ends = np.cumsum([len(f) for f in frames]).astype(np.int64)
    starts = ends - np.array([len(f) for f in frames], np.int64)
    arr = np.frombuffer(buf, np.uint8)
    for kind in KINDS:
        got = compute_many(kind, arr, starts, ends).tolist()
        want = [compute(kind, f) for f in frames]
        assert got == want, kind


def test_columnar_crc_over_many_frames_of_mixed_lengths():
    rng = np.random.default_rng(7)
    frames = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in rng.integers(0, 300, 200)]
    buf = b"".join(frames)
    ends = np.cumsum([len(f) for f in frames]).astype(np.int64)
    starts = ends - np.array([len(f) for f in frames], np.int64)
    got = compute_many("crc16_modbus", np.frombuffer(buf, np.uint8), starts, ends).tolist()
    assert got == [compute("crc16_modbus", f) for f in frames]
