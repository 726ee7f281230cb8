"""Register bytes <-> values, vectorised: no pymodbus here, and no Python object per sample.

A poll group's responses are laid side by side in one buffer of big-endian registers (the
bytes as they came off the wire) and one buffer of bits. Tags of the same type and byte order
form a class; decoding a class is one fancy-index gather of its bytes, one `view` as a
big-endian numpy dtype and one cast to float64, whatever the number of tags.

Byte orders name the four bytes of a 32-bit value as they appear on the wire, A the most
significant: ABCD is big-endian (the Modbus convention), CDAB swaps the two registers, BADC
swaps the bytes within each register, DCBA is little-endian. For 64-bit values the same rule
applies to four registers (CDAB reverses the register order); for 16-bit values only the byte
swap matters (CDAB = ABCD, DCBA = BADC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from edgeos.protocols.modbus.config import NUMERIC, TagSpec


def permutation(order: str, nbytes: int) -> np.ndarray:
    """Wire position of each byte of the big-endian value, most significant first."""
    words = [[2 * k, 2 * k + 1] for k in range(max(1, nbytes // 2))]
    if order in ("CDAB", "DCBA"):
        words = words[::-1]
    if order in ("BADC", "DCBA"):
        words = [w[::-1] for w in words]
    return np.array([b for w in words for b in w][:nbytes] if nbytes > 1 else [0], np.intp)


class Decoder:
    """Decodes a poll group's buffers into value columns; built once per request plan."""

    def __init__(self, specs: Sequence[TagSpec], placements: Sequence[int]) -> None:
        n = len(specs)
        self.n = n
        classes: dict[tuple, tuple[list[int], list[int]]] = {}
        self.strings: list[tuple[int, int, int, bool]] = []  # (pos, byte start, nbytes, swap bytes)
        for pos, (s, at) in enumerate(zip(specs, placements, strict=True)):
            if s.is_bits:
                key: tuple = ("bits",)
            elif s.type == "bool":
                key = ("regbit", s.bit)
            elif s.type in ("int8", "uint8"):
                key = ("byte", s.type, s.byte)
            elif s.type == "string":
                self.strings.append((pos, 2 * at, s.length, s.byte_order in ("BADC", "DCBA")))
                continue
            else:
                key = ("num", s.type, s.byte_order)
            classes.setdefault(key, ([], []))
            classes[key][0].append(pos)
            classes[key][1].append(at)
        self.classes: list[tuple[str, np.ndarray, np.ndarray, object]] = []
        for key, (pos, at) in classes.items():
            p = np.array(pos, np.intp)
            a = np.array(at, np.intp)
            if key[0] == "bits":
                self.classes.append(("bits", p, a, None))
            elif key[0] == "regbit":
                self.classes.append(("regbit", p, a, np.uint16(key[1])))
            elif key[0] == "byte":
                dtype = np.dtype(np.int8 if key[1] == "int8" else np.uint8)
                self.classes.append(("byte", p, 2 * a + (0 if key[2] == "high" else 1), dtype))
            else:
                nregs, dt = NUMERIC[key[1]]
                idx = (2 * a)[:, None] + permutation(key[2], 2 * nregs)[None, :]
                self.classes.append(("num", p, idx, np.dtype(dt)))
        self.scale = np.array([s.scale for s in specs])
        self.offset = np.array([s.offset for s in specs])
        self.scaled = bool((self.scale != 1.0).any() or (self.offset != 0.0).any())
        self.is_text = bool(self.strings)

    def decode(self, regs: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """regs: big-endian uint16 buffer ('>u2'); bits: bool buffer. Returns (values, text)."""
        raw = regs.view(np.uint8)
        out = np.empty(self.n, np.float64)
        for kind, pos, idx, extra in self.classes:
            if kind == "num":
                out[pos] = raw[idx].view(extra).ravel()
            elif kind == "bits":
                out[pos] = bits[idx]
            elif kind == "regbit":
                out[pos] = (regs[idx] >> extra) & np.uint16(1)
            else:
                out[pos] = raw[idx].view(extra)
        if self.scaled:
            out = out * self.scale + self.offset
        text = None
        if self.strings:
            text = np.full(self.n, None, object)
            for pos, start, nbytes, swap in self.strings:
                text[pos] = decode_string(raw[start : start + 2 * ((nbytes + 1) // 2)], nbytes, swap)
                out[pos] = np.nan
        return out, text


def decode_string(raw: np.ndarray, nbytes: int, swap: bool) -> str:
    b = raw.reshape(-1, 2)[:, ::-1].ravel() if swap else raw
    return bytes(b[:nbytes]).split(b"\x00", 1)[0].decode("utf-8", "replace").rstrip()


# --------------------------------------------------------------------------------------------
# Writes: one value -> registers, with type conversion and range checks


_INT_RANGES = {
    "int8": (-(2**7), 2**7 - 1),
    "uint8": (0, 2**8 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}


def to_bool(value: float | bool | str) -> bool:
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "on", "yes"):
            return True
        if low in ("0", "false", "off", "no"):
            return False
        raise ValueError(f"found {value!r}, expected true/false, on/off or 1/0")
    if value in (0, 1):
        return bool(value)
    raise ValueError(f"found {value!r}, expected true/false, on/off or 1/0")


def raw_number(spec: TagSpec, value: float | int | bool | str) -> int | float:
    """The raw register value for an engineering value: (value - offset) / scale, checked.

    An integer (a Python int, or text that is one) for an integer type without scale and offset
    is kept exact: float64 holds integers exactly only up to 2**53, int64/uint64 reach 2**64 - 1.
    """
    if isinstance(value, str):
        value = _number(value, spec)
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int) and spec.type in _INT_RANGES and spec.scale == 1.0 and spec.offset == 0.0:
        lo, hi = _INT_RANGES[spec.type]
        if not lo <= value <= hi:
            raise ValueError(f"found {value!r}, out of range for {spec.type} (accepts {lo}..{hi})")
        return value
    try:
        v = float(value)
    except OverflowError:
        raise ValueError(f"found {value!r}, out of range for {spec.type}") from None
    if not math.isfinite(v):
        raise ValueError(f"found {value!r}, expected a finite number")
    raw = (v - spec.offset) / spec.scale
    if not math.isfinite(raw):  # a finite value can overflow through scale and offset (fuzzed)
        raise ValueError(f"found {value!r}, out of range for {spec.type} after scale and offset")
    if spec.type in _INT_RANGES:
        lo, hi = _INT_RANGES[spec.type]
        r = round(raw)
        if not lo <= r <= hi:
            span = f"{lo * spec.scale + spec.offset:g}..{hi * spec.scale + spec.offset:g}"
            raise ValueError(f"found {value!r}, out of range for {spec.type} (accepts {span})")
        return r
    finfo = np.finfo(np.dtype(NUMERIC[spec.type][1]))
    if abs(raw) > float(finfo.max):
        raise ValueError(f"found {value!r}, out of range for {spec.type} (|raw| <= {float(finfo.max):g})")
    return raw


def _number(text: str, spec: TagSpec) -> int | float:
    """Text as an int when it is one (decimal or 0x hex, exact), else as a float."""
    t = text.strip().lower()
    try:
        return int(t, 16) if t.startswith(("0x", "-0x")) else int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        raise ValueError(f"found {text!r}, expected a number for a {spec.type} tag") from None


def encode_registers(spec: TagSpec, value: float | int | bool | str) -> list[int]:
    """Registers for a whole-register tag (numbers of 1..4 registers, strings)."""
    if spec.type == "string":
        data = str(value).encode("utf-8")
        if len(data) > spec.length:
            raise ValueError(f"found {len(data)} bytes, expected at most {spec.length} (the tag's length)")
        data = data.ljust(2 * spec.count, b"\x00")
        arr = np.frombuffer(data, np.uint8)
        if spec.byte_order in ("BADC", "DCBA"):
            arr = arr.reshape(-1, 2)[:, ::-1].ravel()
        return [int(x) for x in np.ascontiguousarray(arr).view(">u2")]
    raw = raw_number(spec, value)
    nregs, dt = NUMERIC[spec.type]
    canon = np.array([raw], np.dtype(dt)).view(np.uint8)
    wire = np.empty(2 * nregs, np.uint8)
    wire[permutation(spec.byte_order, 2 * nregs)] = canon
    return [int(x) for x in wire.view(">u2")]


def written_value(spec: TagSpec, value: float | int | bool | str) -> float | int | bool | str:
    """The engineering value the device holds after a write of `value`: rounded to the register's
    integer steps (scale and offset applied back) or to float32, so `edgeos write` can say what
    was written, not echo what was asked."""
    if spec.type == "string":
        return str(value)
    if spec.table == "coil" or spec.type == "bool":
        return to_bool(value)
    raw = raw_number(spec, value)
    if isinstance(raw, int) and spec.scale == 1.0 and spec.offset == 0.0:
        return raw
    if spec.type in ("float16", "float32"):
        raw = float(np.array(raw, NUMERIC[spec.type][1]))  # what the register holds
    return raw * spec.scale + spec.offset


def merge_into_register(spec: TagSpec, current: int, value: float | int | bool | str) -> int:
    """Read-modify-write of a register bit or byte: the new register value."""
    if spec.type == "bool":
        mask = 1 << (spec.bit or 0)
        return (current | mask) if to_bool(value) else (current & ~mask & 0xFFFF)
    raw = int(raw_number(spec, value)) & 0xFF
    if spec.byte == "high":
        return (current & 0x00FF) | (raw << 8)
    return (current & 0xFF00) | raw
