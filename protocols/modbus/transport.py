"""Connections to Modbus endpoints: the only module that imports pymodbus.

One `Link` per endpoint (host:port and framing, or serial port), shared by every device
configured on it and counted by reference: the last device to let go closes it. A link's lock
makes each request/response exchange atomic, so requests to different units on a serial line
are serialised and never interleaved (pymodbus also allows one outstanding request per
client). pymodbus's own reconnect and "close after n silent requests" logic is switched off:
a dead unit behind a shared gateway must cost only its own timeouts, and reconnection
(with backoff and jitter) belongs to the runtime's supervisor.

Every pymodbus exception is wrapped here into an `edgeos.errors.DeviceError` subclass with
a low-cardinality `code`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from struct import error as struct_error
from typing import Any

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from edgeos.errors import DeviceError

log = logging.getLogger("edgeos.protocols.modbus")
# Every failure is reported by the adapter (counted, rate-limited, with the device named);
# pymodbus's own lines ("No response received...") would repeat them unthrottled.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    7: "negative acknowledge",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
ILLEGAL_ADDRESS = 2
_BUSY = (5, 6)
_FC = {"coil": 1, "di": 2, "hr": 3, "ir": 4}


class ExceptionResponse(DeviceError):
    """The device answered with a Modbus exception (refused this request, not the connection)."""

    def __init__(self, device: str, exception_code: int, what: str) -> None:
        self.exception_code = exception_code
        self.reason = f"exception {exception_code} ({EXCEPTION_NAMES.get(exception_code, 'unknown')})"
        super().__init__(device, f"{what}: {self.reason}", code="exception")


class ResponseTimeout(DeviceError):
    def __init__(self, device: str, what: str, timeout_s: float) -> None:
        super().__init__(device, f"{what}: no response within {timeout_s:g}s", code="timeout")


class BadResponse(DeviceError):
    """A response of the wrong length, function or shape: rejected, never turned into values."""

    def __init__(self, device: str, what: str, why: str) -> None:
        super().__init__(device, f"{what}: rejected response: {why}", code="bad_response")


class ConnectionLost(DeviceError):
    def __init__(self, device: str, why: str, stage: str = "read") -> None:
        super().__init__(device, why, code="connection_lost", stage=stage)


@dataclass(frozen=True)
class Endpoint:
    """What identifies one physical connection; devices with equal endpoints share it."""

    kind: str  # "tcp" | "rtu_over_tcp" | "rtu"
    target: str  # host or serial port path
    port: int = 0
    serial: tuple[int, str, int, int] = (0, "N", 0, 0)  # baudrate, parity, bytesize, stopbits
    inter_frame_s: float = 0.0

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.kind, self.target, self.port) if self.kind != "rtu" else ("rtu", self.target, 0)

    def __str__(self) -> str:
        if self.kind == "rtu":
            baud, parity, size, stop = self.serial
            return f"rtu {self.target} {baud} {size}{parity}{stop}"
        return f"{self.kind} {self.target}:{self.port}"


def endpoint_of(options: dict[str, Any]) -> Endpoint:
    kind = options["transport"]
    if kind == "rtu":
        baud = options["baudrate"]
        parity = {"none": "N", "even": "E", "odd": "O"}[options["parity"]]
        char_s = (1 + options["bytesize"] + (parity != "N") + options["stopbits"]) / baud
        # Modbus over serial line 2.5.1.1: 3.5 character times, fixed at 1.75 ms above 19200 baud.
        default_gap = 3.5 * char_s if baud <= 19200 else 0.00175
        gap = options["inter_frame"] / 1e9 if options.get("inter_frame") is not None else default_gap
        return Endpoint("rtu", options["serial_port"], 0, (baud, parity, options["bytesize"], options["stopbits"]), gap)
    return Endpoint(kind, options["host"], options["port"])


class Link:
    """One shared connection; every exchange holds `lock`."""

    def __init__(self, endpoint: Endpoint, connect_timeout_s: float) -> None:
        self.endpoint = endpoint
        self.connect_timeout_s = connect_timeout_s
        self.lock = asyncio.Lock()
        self.write_lock = asyncio.Lock()  # read-modify-write of register bits and bytes
        self.refs = 0
        self.client: Any = None
        self._idle_since = 0.0
        self.requests = 0

    @property
    def connected(self) -> bool:
        return self.client is not None and bool(self.client.connected)

    def _new_client(self) -> Any:
        ep = self.endpoint
        # retries=0 and reconnect_delay=0: retries, timeouts and reconnection are ours.
        common: dict[str, Any] = {"timeout": self.connect_timeout_s, "retries": 0, "reconnect_delay": 0}
        if ep.kind == "rtu":
            baud, parity, size, stop = ep.serial
            client = AsyncModbusSerialClient(
                ep.target,
                framer=FramerType.RTU,
                baudrate=baud,
                parity=parity,
                bytesize=size,
                stopbits=stop,
                **common,
            )
        else:
            framer = FramerType.SOCKET if ep.kind == "tcp" else FramerType.RTU
            client = AsyncModbusTcpClient(ep.target, port=ep.port, framer=framer, **common)
        # Never let pymodbus drop a shared connection because one unit stays silent.
        client.set_max_no_responses(1 << 30)
        return client

    async def connect(self, device: str) -> None:
        """Connect unless already connected (another device on this endpoint may have)."""
        async with self.lock:
            if self.connected:
                return
            self._close_client()
            self.client = self._new_client()
            try:
                async with asyncio.timeout(self.connect_timeout_s + 1.0):
                    ok = await self.client.connect()
            except (TimeoutError, OSError, ModbusException) as e:
                ok = False
                why = f"{type(e).__name__}: {e}"
            else:
                why = "connection refused or port unavailable"
            if not ok:
                self._close_client()
                raise DeviceError(device, f"cannot connect to {self.endpoint}: {why}", code="connect", stage="connect")
            self._idle_since = asyncio.get_running_loop().time()

    def _close_client(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None

    async def _exchange(self, device: str, what: str, call: Any, timeout_s: float) -> Any:
        """One request/response under the lock, with the serial line's silent interval."""
        async with self.lock:
            client = self.client
            if client is None or not client.connected:
                raise ConnectionLost(device, f"connection to {self.endpoint} lost")
            if self.endpoint.inter_frame_s:
                loop = asyncio.get_running_loop()
                wait = self._idle_since + self.endpoint.inter_frame_s - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            self.requests += 1
            try:
                async with asyncio.timeout(timeout_s):
                    return await call(client)
            except TimeoutError:
                raise ResponseTimeout(device, what, timeout_s) from None
            except ConnectionException as e:
                raise ConnectionLost(device, f"connection to {self.endpoint} lost: {e}") from None
            except ModbusIOException as e:
                if "No response" in str(e):
                    raise ResponseTimeout(device, what, timeout_s) from None
                raise BadResponse(device, what, str(e)) from None
            except ModbusException as e:
                raise BadResponse(device, what, str(e)) from None
            except (struct_error, ValueError, IndexError) as e:  # a frame pymodbus could not decode
                raise BadResponse(device, what, f"{type(e).__name__}: {e}") from None
            finally:
                if self.endpoint.inter_frame_s:
                    self._idle_since = asyncio.get_running_loop().time()

    async def request(
        self, device: str, unit: int, what: str, call: Any, timeout_s: float, retries: int, check: Any
    ) -> Any:
        """`call(client)` with retries on timeouts and busy answers; `check(response)` validates."""
        attempt = 0
        while True:
            try:
                resp = await self._exchange(device, what, call, timeout_s)
                if resp.isError():
                    code = int(getattr(resp, "exception_code", 0))
                    if code in _BUSY and attempt < retries:
                        attempt += 1
                        continue
                    raise ExceptionResponse(device, code, what)
                if getattr(resp, "dev_id", unit) not in (unit, 0):
                    raise BadResponse(device, what, f"answer from unit {resp.dev_id}, expected unit {unit}")
                return check(resp)
            except ResponseTimeout:
                if attempt >= retries:
                    raise
                attempt += 1

    async def read(
        self, device: str, unit: int, table: str, start: int, count: int, timeout_s: float, retries: int
    ) -> list[int] | list[bool]:
        """Registers (ints) or bits (bools) start..start+count-1, validated for length and function."""
        what = f"read {table} {start}+{count} unit {unit}"
        fc = _FC[table]

        def call(client: Any) -> Any:
            if table == "hr":
                return client.read_holding_registers(start, count=count, device_id=unit)
            if table == "ir":
                return client.read_input_registers(start, count=count, device_id=unit)
            if table == "coil":
                return client.read_coils(start, count=count, device_id=unit)
            return client.read_discrete_inputs(start, count=count, device_id=unit)

        def check(resp: Any) -> list[int] | list[bool]:
            if resp.function_code != fc:
                raise BadResponse(device, what, f"function code {resp.function_code}, expected {fc}")
            if fc >= 3:
                regs = resp.registers
                if len(regs) != count:
                    raise BadResponse(device, what, f"{len(regs)} registers, expected {count}")
                return regs
            bits = resp.bits
            if len(bits) != (count + 7) // 8 * 8:
                raise BadResponse(device, what, f"{len(bits)} bits, expected {count}")
            return bits[:count]

        return await self.request(device, unit, what, call, timeout_s, retries, check)

    async def write_registers(
        self, device: str, unit: int, start: int, values: list[int], timeout_s: float, retries: int
    ) -> None:
        what = f"write hr {start}+{len(values)} unit {unit}"

        def call(client: Any) -> Any:
            if len(values) == 1:
                return client.write_register(start, values[0], device_id=unit)
            return client.write_registers(start, values, device_id=unit)

        await self.request(device, unit, what, call, timeout_s, retries, lambda r: None)

    async def write_coil(self, device: str, unit: int, address: int, value: bool, timeout_s: float, retries: int):
        what = f"write coil {address} unit {unit}"
        await self.request(
            device,
            unit,
            what,
            lambda client: client.write_coil(address, value, device_id=unit),
            timeout_s,
            retries,
            lambda r: None,
        )

    def close(self) -> None:
        self._close_client()


# --------------------------------------------------------------------------------------------
# The registry: one link per endpoint per event loop, counted by reference.

_LINKS: dict[tuple, Link] = {}


def acquire(device: str, endpoint: Endpoint, connect_timeout_s: float) -> Link:
    """The shared link for `endpoint` (created on first use); release it with `release`."""
    key = (id(asyncio.get_running_loop()), endpoint.key)
    link = _LINKS.get(key)
    if link is None:
        link = _LINKS[key] = Link(endpoint, connect_timeout_s)
    elif link.endpoint != endpoint:
        raise DeviceError(
            device,
            f"{endpoint.target} is already open as {link.endpoint}, not {endpoint}: "
            "devices on one serial line must use the same line settings",
            code="config",
            stage="connect",
        )
    link.refs += 1
    return link


def release(link: Link) -> None:
    """Drop one reference; the last one closes the connection. Never raises."""
    link.refs -= 1
    if link.refs <= 0:
        for key, value in list(_LINKS.items()):
            if value is link:
                del _LINKS[key]
        link.close()


def open_links() -> int:
    """Links currently open in this process (for tests and status)."""
    return len(_LINKS)
