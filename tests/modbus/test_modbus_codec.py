"""The codec without a wire: every type and byte order against struct, written independently."""

from __future__ import annotations

import math
import struct

import edgeos_test_peers_modbus as peers  # tests/peers/modbus.py, loaded by conftest.py
import numpy as np
import pytest
from edgeos.protocols.modbus.codec import Decoder, encode_registers, merge_into_register, permutation, raw_number
from edgeos.protocols.modbus.config import BYTE_ORDERS, NUMERIC, TagSpec
from hypothesis import given
from hypothesis import strategies as st

SAMPLES = {
    "int16": [-32768, -1, 0, 12345, 32767],
    "uint16": [0, 1, 0xBEEF, 65535],
    "int32": [-(2**31), -123456789, 0, 2**31 - 1],
    "uint32": [0, 0xDEADBEEF, 2**32 - 1],
    "int64": [-(2**53), -1, 2**53],
    "uint64": [0, 2**53, 2**40 + 5],
    "float16": [-2.5, 0.0, 65504.0],
    "float32": [-1.5e-3, 3.25, 1.0e30],
    "float64": [-math.pi, 0.0, 6.02214076e23],
}


def decode(specs: list[TagSpec], regs: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
    dec = Decoder(specs, [s.start for s in specs])
    buf = np.array(regs, ">u2")
    return dec.decode(buf, np.zeros(0, bool))


@pytest.mark.parametrize("order", BYTE_ORDERS)
@pytest.mark.parametrize("typ", list(NUMERIC))
def test_every_type_and_byte_order_decodes_and_encodes_like_struct(typ: str, order: str) -> None:
    n = NUMERIC[typ][0]
    specs, regs, expected = [], [], []
    for k, v in enumerate(SAMPLES[typ]):
        specs.append(TagSpec("hr", k * n, n, typ, order))
        regs += peers.wire_registers(typ, order, v)
        expected.append(struct.unpack(">" + peers.FMT[typ], struct.pack(">" + peers.FMT[typ], v))[0])  # as stored
        assert encode_registers(specs[-1], v) == peers.wire_registers(typ, order, v)
    values, text = decode(specs, regs)
    assert text is None
    np.testing.assert_array_equal(values, np.array(expected))


def test_permutations_name_the_bytes_on_the_wire() -> None:
    assert permutation("ABCD", 4).tolist() == [0, 1, 2, 3]
    assert permutation("CDAB", 4).tolist() == [2, 3, 0, 1]
    assert permutation("BADC", 4).tolist() == [1, 0, 3, 2]
    assert permutation("DCBA", 4).tolist() == [3, 2, 1, 0]
    assert permutation("CDAB", 8).tolist() == [6, 7, 4, 5, 2, 3, 0, 1]
    assert permutation("CDAB", 2).tolist() == [0, 1] and permutation("DCBA", 2).tolist() == [1, 0]


def test_bits_bytes_strings_and_scale_in_one_group() -> None:
    specs = [
        TagSpec("hr", 0, 1, "bool", bit=0),
        TagSpec("hr", 0, 1, "bool", bit=15),
        TagSpec("hr", 1, 1, "int8", byte="high"),
        TagSpec("hr", 1, 1, "uint8", byte="low"),
        TagSpec("hr", 2, 3, "string", length=5),
        TagSpec("hr", 5, 2, "string", "BADC", length=4),
        TagSpec("hr", 7, 1, "int16", scale=0.1, offset=-40.0),
    ]
    regs = [0x8001, 0xFE7F, *struct.unpack(">3H", b"Hello\x00"), *struct.unpack(">2H", b"iHih"), 650]
    values, text = decode(specs, regs)
    assert values[:4].tolist() == [1.0, 1.0, -2.0, 127.0]
    assert text[4] == "Hello" and text[5] == "Hihi" and math.isnan(values[4])
    assert values[6] == pytest.approx(25.0)


def test_writes_convert_and_check_ranges() -> None:
    u16 = TagSpec("hr", 0, 1, "uint16", scale=0.1)
    assert encode_registers(u16, 12.34) == [123]
    with pytest.raises(ValueError, match="out of range for uint16"):
        encode_registers(u16, 7000)
    with pytest.raises(ValueError, match="out of range for int16"):
        encode_registers(TagSpec("hr", 0, 1, "int16"), -40000)
    with pytest.raises(ValueError, match="expected a number"):
        raw_number(u16, "lots")
    with pytest.raises(ValueError, match="at most 4"):
        encode_registers(TagSpec("hr", 0, 2, "string", length=4), "too long")
    with pytest.raises(ValueError, match="finite"):
        encode_registers(TagSpec("hr", 0, 2, "float32"), float("nan"))
    bit = TagSpec("hr", 0, 1, "bool", bit=3)
    assert merge_into_register(bit, 0x00F0, True) == 0x00F8
    assert merge_into_register(bit, 0xFFFF, "off") == 0xFFF7
    hi = TagSpec("hr", 0, 1, "int8", byte="high")
    assert merge_into_register(hi, 0x1234, -1) == 0xFF34


@given(st.floats(allow_nan=False, allow_infinity=False, width=32), st.sampled_from(BYTE_ORDERS))
def test_float32_round_trips(value: float, order: str) -> None:
    spec = TagSpec("hr", 0, 2, "float32", order)
    values, _ = decode([spec], encode_registers(spec, value))
    assert values[0] == value


@given(st.integers(-(2**31), 2**31 - 1), st.sampled_from(BYTE_ORDERS))
def test_int32_round_trips(value: int, order: str) -> None:
    spec = TagSpec("hr", 0, 2, "int32", order)
    regs = encode_registers(spec, value)
    assert regs == peers.wire_registers("int32", order, value)
    assert decode([spec], regs)[0][0] == value


def test_integers_are_written_exactly_beyond_float64() -> None:
    u64, i64 = TagSpec("hr", 0, 4, "uint64"), TagSpec("hr", 0, 4, "int64", "DCBA")
    for spec, value in [(u64, 2**64 - 1), (u64, 2**53 + 1), (i64, -(2**63)), (i64, -(2**53) - 1)]:
        assert raw_number(spec, value) == value and raw_number(spec, str(value)) == value
        assert encode_registers(spec, value) == peers.wire_registers(spec.type, spec.byte_order, value)
    assert raw_number(u64, "0xFFFFFFFFFFFFFFFF") == 2**64 - 1
    with pytest.raises(ValueError, match="out of range for uint64"):
        raw_number(u64, 2**64)
    # Scaled, or a float: the float path (and its range check) as before.
    assert raw_number(TagSpec("hr", 0, 4, "int64", scale=0.5), 3) == 6
    assert raw_number(u64, 2.0**40) == 2**40
