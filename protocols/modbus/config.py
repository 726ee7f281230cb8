"""Options of the modbus protocol (device and tag keys) and the address syntax.

Addresses are strings a plant engineer can read off a register map:

- Modicon notation, always 1-based: ``"40001"`` (first holding register), ``"30001"`` (input
  register), ``"10001"`` (discrete input), ``"00001"`` (coil); six digits (``"400001"``) reach
  register 65536.
- A table prefix and a number: ``"hr100"``, ``"ir 7"``, ``"coil:0x10"``, ``"di3"``. The number is
  0-based (the address on the wire) unless the device sets ``address_base = 1``.
- Either form takes ``.N`` for bit N (0 = least significant) of a register: ``"40001.3"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgeos.config.schema import Field

TABLES = ("coil", "di", "hr", "ir")
"""Coils, discrete inputs, holding registers, input registers (function codes 1, 2, 3, 4)."""
BIT_TABLES = ("coil", "di")

# name -> (registers, big-endian numpy dtype); bool/string/int8 are handled separately.
NUMERIC = {
    "int16": (1, ">i2"),
    "uint16": (1, ">u2"),
    "int32": (2, ">i4"),
    "uint32": (2, ">u4"),
    "int64": (4, ">i8"),
    "uint64": (4, ">u8"),
    "float16": (1, ">f2"),
    "float32": (2, ">f4"),
    "float64": (4, ">f8"),
}
BYTE_TYPES = ("int8", "uint8")
TYPES = ("bool", *BYTE_TYPES, *NUMERIC, "string")
BYTE_ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
_ORDER = {o: o for o in BYTE_ORDERS}  # one string per order, not one per tag (`upper()` copies)
MAX_REGISTERS = 125  # per read request, Modbus application protocol spec 6.3
MAX_BITS = 2000  # per read request, spec 6.1
MAX_STRING = 2 * MAX_REGISTERS
MAX_WRITE_REGISTERS = 123  # per write request (function 16), spec 6.12: a writable tag must fit in one

_PREFIX = {
    "hr": "hr",
    "holding": "hr",
    "ir": "ir",
    "input": "ir",
    "coil": "coil",
    "co": "coil",
    "di": "di",
    "discrete": "di",
}
_MODICON = {"0": "coil", "1": "di", "3": "ir", "4": "hr"}
_PREFIXED = re.compile(r"^([a-z]+)[\s:_]*((?:0x[0-9a-f]+)|\d+)(?:\.(\d+))?$")
_NUMERIC = re.compile(r"^(\d{5,6})(?:\.(\d+))?$")

ADDRESS_HELP = 'a register address such as "40001", "40001.3", "hr100", "ir0x10", "coil5" or "di0"'


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed address: table, number as written, whether that number is 1-based, bit."""

    table: str
    number: int
    one_based: bool  # True for Modicon notation, whatever the device's address_base
    bit: int | None = None

    def wire(self, address_base: int) -> int:
        """The 0-based protocol address sent on the wire."""
        return self.number - (1 if self.one_based else address_base)


def parse_address(text: str) -> Address:
    """Parse an address string; ValueError with a message in the house format."""
    s = text.strip().lower()
    m = _NUMERIC.match(s)
    if m:
        digits, bit = m.group(1), m.group(2)
        table = _MODICON.get(digits[0])
        number = int(digits[1:])
        if table is None:
            raise ValueError(
                f'found "{text}", expected Modicon notation starting with 0 (coil), 1 (discrete input), '
                f"3 (input register) or 4 (holding register), or {ADDRESS_HELP}"
            )
        if number < 1 or number > 65536:
            raise ValueError(f'found "{text}", expected a register number 1..65536 after the leading {digits[0]}')
        return Address(table, number, True, _bit(text, table, bit))
    m = _PREFIXED.match(s)
    if m:
        prefix, num, bit = m.groups()
        table = _PREFIX.get(prefix)
        if table is None:
            raise ValueError(f'found "{text}", unknown table "{prefix}": expected hr, ir, coil or di')
        number = int(num, 0)
        if number > 65536:
            raise ValueError(f'found "{text}", expected an address up to 65535 (65536 when 1-based)')
        return Address(table, number, False, _bit(text, table, bit))
    raise ValueError(f'found "{text}", expected {ADDRESS_HELP}')


def _bit(text: str, table: str, bit: str | None) -> int | None:
    if bit is None:
        return None
    if table in BIT_TABLES:
        raise ValueError(f'found "{text}", a bit number applies to registers only (coils and inputs are bits)')
    b = int(bit)
    if b > 15:
        raise ValueError(f'found "{text}", expected a bit number 0..15')
    return b


def _check_address(value: str) -> str | None:
    try:
        parse_address(value)
    except ValueError as e:
        return str(e)
    return None


DEVICE_FIELDS = {
    "transport": Field(
        "choice", "tcp", choices=("tcp", "rtu", "rtu_over_tcp"), help="Modbus TCP, RTU on a serial port, RTU over TCP"
    ),
    "host": Field("str", None, help="device or gateway address (tcp, rtu_over_tcp)"),
    "port": Field("int", 502, min=1, max=65535, help="TCP port"),
    "serial_port": Field("str", None, help="serial device, e.g. /dev/ttyUSB0 (rtu)"),
    "baudrate": Field("int", 19200, min=50, max=4_000_000),
    "parity": Field("choice", "none", choices=("none", "even", "odd")),
    "stopbits": Field("int", 1, min=1, max=2),
    "bytesize": Field("int", 8, min=7, max=8),
    "inter_frame": Field(
        "duration", None, max=1_000_000_000, help="silence before each request on a serial line (default 3.5 chars)"
    ),
    "unit_id": Field("int", None, min=0, max=255, help="unit id (slave id) of the device on this connection"),
    # The first name of unit_id; kept working. On a tag, `unit` is the engineering unit.
    "unit": Field("int", 1, min=0, max=255, help="the older name of unit_id"),
    "timeout": Field("duration", "1s", min=1_000_000, max=60_000_000_000, help="response timeout of one request"),
    "retries": Field("int", 1, min=0, max=10, help="re-sends after a timeout or a busy answer"),
    "reconnect_after": Field(
        "int", 3, min=1, max=1000, help="polls in a row without any answer before the device counts as lost"
    ),
    "address_base": Field("int", 0, min=0, max=1, help="base of prefixed addresses (hr100); Modicon is 1-based"),
    "coalesce": Field("bool", True, help="read neighbouring tags with one request"),
    "max_registers": Field("int", MAX_REGISTERS, min=1, max=MAX_REGISTERS, help="registers per read request"),
    "max_bits": Field("int", MAX_BITS, min=1, max=MAX_BITS, help="coils or discrete inputs per read request"),
    "max_gap": Field("int", None, min=0, max=MAX_BITS, help="unused registers (bits) a request may bridge"),
    "retry_refused": Field(
        "duration",
        "1m",
        min=1_000_000,
        max=86_400_000_000_000,
        help="first re-probe of a refused address (then doubling, up to an hour)",
    ),
    "zero_transaction_id": Field(
        "bool", False, help="the device answers every request with transaction id 0 (Modbus TCP)"
    ),
}


def _check_byte_order(value: str) -> str | None:
    if value.upper() in BYTE_ORDERS:
        return None
    return f'found "{value}", expected one of {", ".join(BYTE_ORDERS)} (any case)'


TAG_FIELDS = {
    "address": Field("str", help=ADDRESS_HELP, check=_check_address),
    "type": Field("choice", None, choices=TYPES),
    "byte_order": Field("str", "ABCD", check=_check_byte_order),
    "byte": Field("choice", "low", choices=("high", "low"), help="which byte of the register an int8/uint8 is"),
    "length": Field("int", None, min=1, max=MAX_STRING, help="characters of a string tag"),
    "scale": Field("float", 1.0),
    "offset": Field("float", 0.0),
}


@dataclass(frozen=True, slots=True)
class TagSpec:
    """A tag's checked Modbus layout: where it sits and how its bytes become a value."""

    table: str
    start: int  # 0-based wire address of its first register or bit
    count: int  # registers (hr/ir) or bits (coil/di) it occupies
    type: str
    byte_order: str = "ABCD"
    bit: int | None = None
    byte: str = "low"
    length: int = 0
    scale: float = 1.0
    offset: float = 0.0

    @property
    def is_bits(self) -> bool:
        return self.table in BIT_TABLES


def tag_type(options: dict) -> str:
    """The effective type: bool for coils, inputs and register bits, uint16 for a bare register."""
    if options.get("type"):
        return options["type"]
    try:
        a = parse_address(options["address"])
    except (KeyError, ValueError):
        return "uint16"
    return "bool" if a.table in BIT_TABLES or a.bit is not None else "uint16"


def tag_spec(options: dict, address_base: int) -> tuple[TagSpec | None, list[tuple[str, str]]]:
    """A tag's layout, or the problems (key, message) that prevent one."""
    problems: list[tuple[str, str]] = []
    try:
        a = parse_address(options["address"])
    except ValueError as e:
        return None, [("address", str(e))]
    typ = tag_type(options)
    start = a.wire(address_base)
    if start < 0:
        problems.append(("address", f'found "{options["address"]}", expected at least {address_base} (address_base)'))
    if a.table in BIT_TABLES:
        count = 1
        if typ != "bool":
            problems.append(("type", f'found "{typ}", expected bool: a {_table_name(a.table)} is a single bit'))
    elif a.bit is not None:
        count = 1
        if typ != "bool":
            problems.append(("type", f'found "{typ}", expected bool for a register bit ({options["address"]})'))
    elif typ == "bool":
        count = 1
        problems.append(("address", f'found "{options["address"]}", a bool in a register needs a bit, e.g. "40001.0"'))
    elif typ == "string":
        length = options.get("length")
        if not length:
            problems.append(("length", "missing: a string tag needs its length in characters"))
            length = 2
        count = (length + 1) // 2
    elif typ in BYTE_TYPES:
        count = 1
    else:
        count = NUMERIC[typ][0]
    if typ in ("bool", "string") and (options.get("scale", 1.0) != 1.0 or options.get("offset", 0.0) != 0.0):
        problems.append(("scale", f"scale and offset apply to numbers, not to a {typ} tag"))
    if options.get("length") and typ != "string":
        problems.append(("length", f"length applies to string tags, not to {typ}"))
    if options.get("scale", 1.0) == 0.0:
        problems.append(("scale", "found 0.0, expected a non-zero factor"))
    if start >= 0 and start + count > 65536:
        problems.append(("address", f'found "{options["address"]}": the tag ends past the last address 65535'))
    if problems:
        return None, problems
    return (
        TagSpec(
            table=a.table,
            start=start,
            count=count,
            type=typ,
            byte_order=_ORDER[options.get("byte_order", "ABCD").upper()],
            bit=a.bit,
            byte=options.get("byte", "low"),
            length=options.get("length") or 0,
            scale=options.get("scale", 1.0),
            offset=options.get("offset", 0.0),
        ),
        [],
    )


def _table_name(table: str) -> str:
    return {"coil": "coil", "di": "discrete input", "hr": "holding register", "ir": "input register"}[table]


def unit_id(options: Mapping[str, Any]) -> int:
    """The device's unit id: `unit_id`, or its older name `unit`."""
    return options["unit_id"] if options.get("unit_id") is not None else options["unit"]
