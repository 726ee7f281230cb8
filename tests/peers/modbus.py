"""A real pymodbus server for tests: TCP or RTU-over-TCP on a random loopback port, or RTU on
one end of a socat pty pair. It counts every request it receives and can be told to refuse,
stay silent, shorten or garble answers, so faults are those of a real peer on a real wire.

Also shared by the Modbus tests: `wire_registers` (how a device puts a value on the wire) and
`Collect` (a runtime sink). Load it by path (tests have no package): see `load_peer_module()`
in tests/modbus/conftest.py; test modules import it as `edgeos_test_peers_modbus`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import struct
import subprocess
import tty
from collections import Counter
from dataclasses import dataclass, field

from pymodbus import FramerType
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

TABLE_OF_FC = {1: "coil", 2: "di", 3: "hr", 4: "ir", 5: "coil", 15: "coil", 6: "hr", 16: "hr"}
BLOCK = {"coil": "c", "di": "d", "hr": "h", "ir": "i"}


@dataclass
class UnitMap:
    """Which addresses a unit implements: (start, count) ranges per table; others are illegal."""

    hr: list[tuple[int, int]] = field(default_factory=lambda: [(0, 1000)])
    ir: list[tuple[int, int]] = field(default_factory=lambda: [(0, 1000)])
    coil: int = 1024  # bits 0..coil-1
    di: int = 1024


def _regs(ranges: list[tuple[int, int]]) -> list[SimData]:
    return [SimData(start, count=count, values=0, datatype=DataType.REGISTERS) for start, count in ranges]


def _bits(n: int) -> list[SimData]:
    return [SimData(0, count=max(16, (n + 15) // 16 * 16), values=False, datatype=DataType.BITS)]


class ModbusPeer:
    """Units behind one server. Start with `start_tcp()` or `start_rtu(path)`; always `stop()`."""

    def __init__(self, units: dict[int, UnitMap] | None = None, framer: str = "socket") -> None:
        self.units = units or {1: UnitMap()}
        self.framer = FramerType(framer)
        self.requests: list[tuple[int, str, int, int]] = []  # (unit, table, address, count)
        self.silent: set[int] = set()  # units that never answer
        self.busy: dict[int, int] = {}  # unit -> number of next requests answered "device busy"
        self.refuse: dict[tuple[int, str, int], int] = {}  # (unit, table, address) -> exception code
        self.max_count: int | None = None  # reads of more registers (bits) are refused with exception 3
        self.short: set[int] = set()  # units whose register answers lose their last register
        self.garble: set[int] = set()  # units whose answers are replaced by garbage
        self.connections = 0  # client connections accepted
        self.server: ModbusTcpServer | ModbusSerialServer | None = None
        self.port = 0
        self._task: asyncio.Task | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def _devices(self) -> list[SimDevice]:
        return [
            SimDevice(
                uid,
                simdata=(_bits(m.coil), _bits(m.di), _regs(m.hr), _regs(m.ir)),
                action=self._action,
            )
            for uid, m in self.units.items()
        ]

    async def start_tcp(self, port: int = 0) -> ModbusPeer:
        self.server = ModbusTcpServer(
            self._devices(),
            framer=self.framer,
            address=("127.0.0.1", port),
            trace_pdu=self._trace_pdu,
            trace_packet=self._trace_packet,
            trace_connect=self._trace_connect,
        )
        await self.server.serve_forever(background=True)
        self.port = self.server.transport.sockets[0].getsockname()[1]
        return self

    async def start_rtu(self, path: str, baudrate: int = 115200) -> ModbusPeer:
        self.server = ModbusSerialServer(
            self._devices(),
            framer=FramerType.RTU,
            port=path,
            baudrate=baudrate,
            trace_pdu=self._trace_pdu,
            trace_packet=self._trace_packet,
        )
        await self.server.serve_forever(background=True)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.shutdown(), 5)
            await asyncio.sleep(0.01)  # let the transports finish closing

    # -- memory ----------------------------------------------------------------------------

    def _block(self, unit: int, table: str):
        # The simulator keeps each table as (start, count, words, flags); words are 16-bit.
        return self.server.context.devices[unit].block[BLOCK[table]]

    def set_registers(self, unit: int, table: str, address: int, values: list[int]) -> None:
        start, _, words, _ = self._block(unit, table)
        words[address - start : address - start + len(values)] = [v & 0xFFFF for v in values]

    def registers(self, unit: int, table: str, address: int, count: int) -> list[int]:
        start, _, words, _ = self._block(unit, table)
        return list(words[address - start : address - start + count])

    def set_bits(self, unit: int, table: str, address: int, values: list[bool]) -> None:
        start, _, words, _ = self._block(unit, table)
        for i, v in enumerate(values):
            a = address + i
            w, b = a // 16 - start, a % 16
            words[w] = (words[w] | (1 << b)) if v else (words[w] & ~(1 << b))

    def bits(self, unit: int, table: str, address: int, count: int) -> list[bool]:
        start, _, words, _ = self._block(unit, table)
        return [bool((words[(address + i) // 16 - start] >> ((address + i) % 16)) & 1) for i in range(count)]

    # -- counting and faults ---------------------------------------------------------------

    def count(self, unit: int | None = None, table: str | None = None) -> int:
        return sum(1 for u, t, _, _ in self.requests if (unit is None or u == unit) and (table is None or t == table))

    def reads(self, unit: int | None = None) -> list[tuple[str, int, int]]:
        return [(t, a, c) for u, t, a, c in self.requests if unit is None or u == unit]

    def _trace_connect(self, connected: bool) -> None:
        self.connections += connected

    def _trace_pdu(self, sending: bool, pdu):
        if not sending:
            fc = pdu.function_code
            count = getattr(pdu, "count", 0) or len(getattr(pdu, "registers", []) or getattr(pdu, "bits", []) or [1])
            self.requests.append((pdu.dev_id, TABLE_OF_FC.get(fc, str(fc)), getattr(pdu, "address", 0), count))
        elif pdu.dev_id in self.short and getattr(pdu, "registers", None) and pdu.function_code in (3, 4):
            pdu.registers = pdu.registers[:-1]
        return pdu

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending or not data:
            return data
        unit = data[6] if self.framer == FramerType.SOCKET else data[0]
        if unit in self.silent:
            return b""
        if unit in self.garble:
            return bytes((b * 7 + 13) & 0xFF for b in data[: len(data) // 2])
        return data

    async def _action(self, fc, start_address, address, count, registers, set_values):
        uid = self._current_unit()
        if self.busy.get(uid, 0) > 0:
            self.busy[uid] -= 1
            return ExcCodes.DEVICE_BUSY
        table = TABLE_OF_FC.get(fc)
        if self.max_count is not None and fc in (1, 2, 3, 4) and count > self.max_count:
            return ExcCodes.ILLEGAL_VALUE
        for (u, t, a), code in self.refuse.items():
            if u == uid and t == table and address <= a < address + count:
                return ExcCodes(code)
        return None

    def _current_unit(self) -> int:
        # The action hook is not told the unit; the request being served is the last counted.
        return self.requests[-1][0] if self.requests else 0


# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PtyPair:
    """Two connected pseudo-terminals from socat; `close()` ends socat."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["/usr/bin/socat", "-d", "-d", "pty,raw,echo=0", "pty,raw,echo=0"],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        paths: list[str] = []
        assert self.proc.stderr is not None
        while len(paths) < 2:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("socat ended before opening two ptys")
            m = re.search(r"PTY is (\S+)", line)
            if m:
                paths.append(m.group(1))
        self.a, self.b = paths

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stderr:
            self.proc.stderr.close()


FMT = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "int64": "q", "uint64": "Q"}
FMT |= {"float16": "e", "float32": "f", "float64": "d"}


def wire_registers(typ: str, order: str, value) -> list[int]:
    """Registers as a device with this byte order puts a value on the wire (reference: struct)."""
    big = struct.pack(">" + FMT[typ], value)  # A B C D ... most significant first
    words = [big[i : i + 2] for i in range(0, len(big), 2)]
    if order in ("CDAB", "DCBA"):
        words = words[::-1]
    if order in ("BADC", "DCBA"):
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]


def counts_by_table(requests: list[tuple[int, str, int, int]]) -> Counter:
    return Counter(t for _, t, _, _ in requests)


def device(
    port: int,
    tags: str,
    extra: str = "",
    name: str = "plc",
    unit: int = 1,
    timeout: str = "300ms",
    retries: int | None = None,
) -> str:
    """A Modbus TCP device section for a test config: fast polls and reconnects on loopback;
    `retries` None keeps the config's default."""
    retry_line = "" if retries is None else f"retries = {retries}\n"
    return f"""
[[devices]]
name = "{name}"
protocol = "modbus"
host = "127.0.0.1"
port = {port}
unit_id = {unit}
poll_interval = "50ms"
timeout = "{timeout}"
{retry_line}reconnect_min = "20ms"
reconnect_max = "100ms"
{extra}
tags = [
{tags}
]
"""


class Collect:
    """A runtime sink keeping tag key -> [(ts, value, quality)] as batches arrive."""

    GOOD = 0  # edgeos.Quality.GOOD; this module imports nothing from edgeos

    def __init__(self, cfg) -> None:
        self.keys = [m.key for m in cfg.tags]
        self.rows: dict[str, list[tuple[int, float, int]]] = {}

    async def put(self, b) -> None:
        for t, ts, v, q in zip(b.tags.tolist(), b.ts.tolist(), b.values.tolist(), b.quality.tolist(), strict=True):
            self.rows.setdefault(self.keys[t], []).append((ts, v, q))

    async def flush(self) -> None:
        return None

    def good(self, key: str) -> list[tuple[int, float, int]]:
        return [r for r in self.rows.get(key, []) if r[2] == self.GOOD]

    def recovered(self, key: str) -> bool:
        """A Good sample after a non-Good one."""
        qs = [q for _, _, q in self.rows.get(key, [])]
        return any(q != self.GOOD for q in qs) and qs[-1] == self.GOOD


# --------------------------------------------------------------------------------------------
# A hand-written Modbus server, for faults pymodbus's server cannot produce.


def crc16(data: bytes) -> int:
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


class RawModbusPeer:
    """A small Modbus server written here, not pymodbus: Modbus TCP (`framing="socket"`) or RTU
    frames, over TCP on a random loopback port (`start_tcp`) or on a pty (`start_pty`). Any unit
    answers; holding register a holds `hr.get(a, 1000 + a)`. Faults:

    - `late`: request number (1-based, counted over all connections) -> seconds to wait before
      answering it; requests that follow wait behind it, as on a real single-threaded device;
    - `hang_after`: connection number (1-based) -> requests answered on it, after which that
      connection stays open but silent (a hung gateway, a half-open socket);
    - `tid_zero`: True to answer every request with transaction id 0 (as some devices and
      gateways do), or the request numbers answered so; other answers echo the request's id.
      `tids` records the transaction id of every request received.
    - `garble`: request numbers answered with a wrong CRC (RTU framing);
    - `as_unit`: request number -> the unit id its answer carries instead of the request's;
    - `tid_shift`: request numbers answered with the request's transaction id + 1000 (an id
      never sent: a device's bug, not a late answer);
    - `stray_after`: request numbers whose answer is followed, in the same write, by a copy with
      the transaction id + 500 (a stray frame in the answer's segment).
    """

    def __init__(self, framing: str = "socket") -> None:
        self.rtu = framing == "rtu"
        self.hr: dict[int, int] = {}
        self.late: dict[int, float] = {}
        self.hang_after: dict[int, int] = {}
        self.tid_zero: bool | set[int] = False
        self.garble: set[int] = set()
        self.as_unit: dict[int, int] = {}
        self.tid_shift: set[int] = set()
        self.stray_after: set[int] = set()
        self.tids: list[int] = []
        self.requests: list[tuple[int, int, int, int, int]] = []  # (connection, unit, fc, address, count)
        self.connections = 0
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._fd: int | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start_tcp(self) -> RawModbusPeer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def start_pty(self, path: str) -> RawModbusPeer:
        fd = self._fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(fd)
        reader = asyncio.StreamReader()

        def readable() -> None:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                reader.feed_data(data)
            else:
                reader.feed_eof()

        asyncio.get_running_loop().add_reader(fd, readable)
        self._spawn(self._serve(reader, lambda b: os.write(fd, b), None))
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._spawn(self._serve(reader, writer.write, writer))

    async def _serve(self, reader, send, writer) -> None:
        self.connections += 1
        conn = self.connections
        answered = 0
        try:
            while True:
                unit, pdu, tid = await (self._read_rtu(reader) if self.rtu else self._read_mbap(reader))
                if pdu is None:
                    continue
                self.requests.append((conn, unit, pdu[0], *struct.unpack(">HH", pdu[1:5])))
                self.tids.append(tid)
                number = len(self.requests)
                if self.tid_zero is True or (self.tid_zero and number in self.tid_zero):
                    tid = 0
                if number in self.tid_shift:
                    tid = (tid + 1000) & 0xFFFF
                delay = self.late.get(number, 0.0)
                if delay:
                    await asyncio.sleep(delay)
                if conn in self.hang_after and answered >= self.hang_after[conn]:
                    continue
                reply = self._reply(pdu)
                unit = self.as_unit.get(number, unit)
                if self.rtu:
                    frame = bytes([unit]) + reply
                    send(frame + struct.pack("<H", crc16(frame) ^ (0xFF00 if number in self.garble else 0)))
                else:
                    frame = struct.pack(">HHHB", tid, 0, len(reply) + 1, unit) + reply
                    if number in self.stray_after:
                        frame += struct.pack(">HHHB", (tid + 500) & 0xFFFF, 0, len(reply) + 1, unit) + reply
                    send(frame)
                answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if writer is not None:
                writer.close()

    @staticmethod
    async def _read_mbap(reader):
        tid, _, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
        return unit, await reader.readexactly(length - 1), tid

    @staticmethod
    async def _read_rtu(reader):
        head = await reader.readexactly(2)
        if head[1] in (15, 16):
            rest = await reader.readexactly(5)
            rest += await reader.readexactly(rest[4] + 2)
        else:
            rest = await reader.readexactly(6)
        frame = head + rest
        if crc16(frame[:-2]) != struct.unpack("<H", frame[-2:])[0]:
            return head[0], None, 0
        return head[0], frame[1:-2], 0

    def _reply(self, pdu: bytes) -> bytes:
        fc = pdu[0]
        start, count = struct.unpack(">HH", pdu[1:5])
        if fc in (3, 4):
            data = b"".join(struct.pack(">H", self.hr.get(start + i, 1000 + start + i) & 0xFFFF) for i in range(count))
            return bytes([fc, len(data)]) + data
        if fc in (1, 2):
            n = (count + 7) // 8
            return bytes([fc, n]) + bytes(n)
        if fc == 6:
            self.hr[start] = count
            return pdu[:5]
        if fc == 16:
            for i in range(count):
                self.hr[start + i] = struct.unpack(">H", pdu[6 + 2 * i : 8 + 2 * i])[0]
            return pdu[:5]
        if fc == 5:
            return pdu[:5]
        return bytes([fc | 0x80, 1])
