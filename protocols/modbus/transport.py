"""Connections to Modbus endpoints: the only module that imports pymodbus.

One `Link` per endpoint (host:port and framing, or serial port), shared by every device
configured on it and counted by reference: the last device to let go closes it. A link's lock
makes each request/response exchange atomic, so requests to different units on a serial line
are serialised and never interleaved (pymodbus also allows one outstanding request per
client). pymodbus's own reconnect and "close after n silent requests" logic is switched off:
a dead unit behind a shared gateway must cost only its own timeouts, and reconnection
(with backoff and jitter) belongs to the runtime's supervisor.

Timeouts are per request and per device (`asyncio.timeout` around each exchange); the client
itself gets a long backstop, since one client serves devices with different timeouts. RTU
frames carry no transaction id, so after a timeout on RTU framing the link drains the line
(one response timeout, and until it has been quiet) before sending anything else: a late
answer is discarded, never taken for the answer to the next request. A link that no device
gets an answer from any more is rebuilt (`mark_stale`): every device on it gets a fresh socket.

Modbus TCP answers carry the request's transaction id, and the answer is checked here against
the id sent (pymodbus itself lets an answer with id 0 through for any request, and silently
skips one with another id). The link never sends id 0. An answer with the id of an earlier
request on this connection that timed out is that request's late answer: skipped (counted,
`late_answers`) while the request in flight awaits its own, which the ids tell apart. Any
other id, 0 included, fails the request at once (`StaleAnswer`: the received bytes are looked
at as they arrive, so it does not wait out the timeout as if the device were silent), and the
connection is reset before the next request, so the answer that was really meant for that
one cannot be taken either. Devices that always answer with id 0 are read only when a device on
the link sets `zero_transaction_id`: then every timeout or rejected answer resets the
connection (one request is in flight at a time anyway), so a late answer never meets a later
request.

Every pymodbus exception is wrapped here into an `edgeos.errors.DeviceError` subclass with
a low-cardinality `code`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import termios
import time
import traceback
from dataclasses import dataclass
from struct import error as struct_error
from typing import Any

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from edgeos.aio import within
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
ILLEGAL_DATA_VALUE = 3
SERVER_DEVICE_FAILURE = 4
SPLIT_CODES = (ILLEGAL_ADDRESS, ILLEGAL_DATA_VALUE, SERVER_DEVICE_FAILURE)
"""Refusals that may concern one address or the range rather than the whole request: the
request is split until the refused tags are isolated (adapter)."""
GATEWAY_CODES = (10, 11)
"""A TCP-to-RTU gateway answering for its unit: path unavailable, target failed to respond.
The unit itself did not answer (adapter: as a timeout on a line of our own)."""
_BUSY = (5, 6)
BUSY_DELAY_S = 0.05  # pause before re-sending after "busy" / "acknowledge" (the lock is free meanwhile)
CLIENT_TIMEOUT_S = 600.0  # pymodbus's own response timeout: a backstop; each request has its device's
MIN_CONNECT_TIMEOUT_S = 2.0  # a device's short response timeout must not make connecting impossible
QUIET_S = 0.02  # RTU drain: the line counts as quiet after this long without a byte (plus inter_frame)
_FC = {"coil": 1, "di": 2, "hr": 3, "ir": 4}


class ExceptionResponse(DeviceError):
    """The device answered with a Modbus exception (refused this request, not the connection)."""

    def __init__(self, device: str, exception_code: int, what: str, stage: str = "read") -> None:
        self.exception_code = exception_code
        self.reason = f"exception {exception_code} ({EXCEPTION_NAMES.get(exception_code, 'unknown')})"
        super().__init__(device, f"{what}: {self.reason}", code="exception", stage=stage)


class ResponseTimeout(DeviceError):
    def __init__(self, device: str, what: str, timeout_s: float, stage: str = "read") -> None:
        super().__init__(device, f"{what}: no response within {timeout_s:g}s", code="timeout", stage=stage)


class BadResponse(DeviceError):
    """A response of the wrong length, function or shape: rejected, never turned into values."""

    def __init__(self, device: str, what: str, why: str, stage: str = "read") -> None:
        super().__init__(device, f"{what}: rejected response: {why}", code="bad_response", stage=stage)


class StaleAnswer(BadResponse):
    """A Modbus TCP answer whose transaction id is not the request's: never turned into values."""

    def __init__(self, device: str, what: str, sent: int, got: int, stage: str = "read") -> None:
        why = f"transaction id {got}, expected {sent}"
        if got == 0:
            why += (
                " (the answer to an earlier request that timed out, or a device that always answers with "
                "transaction id 0: then set zero_transaction_id = true on it)"
            )
        super().__init__(device, what, why, stage)
        self.code = "transaction_id"


class _OtherTid(Exception):
    """Raised into pymodbus's wait for an answer when a complete frame with another
    transaction id arrived (pymodbus would skip it and wait out the timeout)."""

    def __init__(self, tid: int) -> None:
        super().__init__(tid)
        self.tid = tid


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

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.lock = asyncio.Lock()
        self.write_lock = asyncio.Lock()  # read-modify-write of register bits and bytes
        self.refs = 0
        self.client: Any = None
        self._idle_since = 0.0
        self.requests = 0
        self.last_answer = 0.0  # monotonic time of the last exchange that got any answer
        self.rebuilds = 0  # fresh clients made because the link had gone silent
        self.drained = 0  # RTU drains after a timeout or a rejected frame
        self.resets = 0  # Modbus TCP: fresh connections after a stale answer (or a timeout, zero_transaction_id)
        self.zero_tid: set[str] = set()  # devices on this link that accept answers with transaction id 0
        self._tcp = endpoint.kind == "tcp"
        self._sent_tid = 0  # transaction id of the request in flight (Modbus TCP)
        self._in_flight: str | None = None  # Modbus TCP: the device whose request awaits its answer
        self._timed_out: set[int] = set()  # Modbus TCP: ids of this connection's requests that timed out
        self.late_answers = 0  # Modbus TCP: answers to requests that had timed out (skipped)
        self._reset = False  # Modbus TCP: open a fresh connection before the next request
        self._stale = False
        self._last_timeout: dict[str, float] = {}  # device -> monotonic time of its last timeout
        self._drain_until = 0.0  # RTU: no request before this (a late answer may still come)
        self._last_rx = 0.0  # monotonic time bytes last arrived
        self._rtu = endpoint.kind != "tcp"

    @property
    def connected(self) -> bool:
        return self.client is not None and bool(self.client.connected)

    def _trace_pdu(self, sending: bool, pdu: Any) -> Any:
        """Modbus TCP: the transaction id of each request sent (pymodbus numbers them 1..65000);
        never 0, which would match any answer."""
        if sending:
            if pdu.transaction_id == 0:
                pdu.transaction_id = self.client.ctx.request_transaction_id = 1
            self._sent_tid = pdu.transaction_id
        return pdu

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self._last_rx = time.monotonic()
        return data

    def _trace_tcp_packet(self, sending: bool, data: bytes) -> bytes:
        """Modbus TCP, bytes received (pymodbus passes what it has not framed yet): a complete
        frame whose transaction id is neither the request's nor 0 (0 is pymodbus's to pass and
        `_exchange`'s to judge) fails the awaited answer now. Between requests, the connection
        is reset before the next one."""
        if sending:
            return data
        i, n = 0, len(data)
        while n - i >= 7:
            end = i + 6 + ((data[i + 4] << 8) | data[i + 5])
            if end > n:
                break
            tid = (data[i] << 8) | data[i + 1]
            if tid == self._sent_tid:
                # pymodbus takes this one and keeps what follows for the next arrival, when it
                # is looked at (once: the frames before this one it has skipped for good).
                break
            if tid in self._timed_out:
                self._timed_out.discard(tid)  # a late answer: pymodbus skips it
                self.late_answers += 1
            elif tid and tid != self._sent_tid:
                self._reset = True
                fut = getattr(getattr(self.client, "ctx", None), "response_future", None)
                if self._in_flight is not None and fut is not None and not fut.done():
                    fut.set_exception(_OtherTid(tid))
            i = end
        return data

    def _new_client(self) -> Any:
        ep = self.endpoint
        # retries=0 and reconnect_delay=0: retries, timeouts and reconnection are ours. The
        # client's own timeout is only a backstop: it serves devices with different timeouts,
        # and each request is bounded by its own device's (`_exchange`), connects by `connect`.
        common: dict[str, Any] = {"timeout": CLIENT_TIMEOUT_S, "retries": 0, "reconnect_delay": 0}
        if self._rtu:
            common["trace_packet"] = self._trace_packet  # arrival times, for the drain
        else:
            common["trace_pdu"] = self._trace_pdu  # transaction ids, checked in `_exchange`
            common["trace_packet"] = self._trace_tcp_packet  # ids pymodbus would skip
        if ep.kind == "rtu":
            baud, parity, size, stop = ep.serial
            # pymodbus's serial transport opens the port with pyserial's exclusive=True (flock):
            # a second master on the line (`edgeos write` beside the daemon) is refused.
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

    async def connect(self, device: str, timeout_s: float) -> None:
        """Connect unless already connected (another device on this endpoint may have)."""
        async with self.lock:
            if self.connected and not self._stale and not self._reset:
                return
            why = await self._open(device, timeout_s)
            if why is not None:
                raise DeviceError(device, f"cannot connect to {self.endpoint}: {why}", code="connect", stage="connect")

    async def _open(self, device: str, timeout_s: float) -> str | None:
        """A fresh client (the old one, if any, closed); the caller holds the lock. Returns why
        it failed, or None."""
        if self._stale:
            self.rebuilds += 1
            log.info("%s: no device got an answer from %s: opening a fresh connection", device, self.endpoint)
        elif self._reset:
            self.resets += 1
        self._stale = self._reset = False
        self._timed_out.clear()  # ids start again at 1 on a new connection
        self._close_client()
        self.client = self._new_client()
        try:
            ok = await within(self.client.connect(), max(timeout_s, MIN_CONNECT_TIMEOUT_S))
        except (TimeoutError, OSError, ModbusException) as e:
            ok = False
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        except termios.error as e:
            # The port opened (and locked), then refused its line settings (a pty refuses
            # parity; an adapter, a baud rate). pymodbus lost the half-made port in its failed
            # constructor: its frames hold the only reference, so the fd and its lock lived on
            # until a garbage collection, and every reconnect read "in use by the running
            # daemon" (an independent tester's finding). Cleared now, the port closes now.
            traceback.clear_frames(e.__traceback__)
            ok = False
            code = e.args[1] if len(e.args) > 1 else e
            why = f"the port refuses these line settings ({code})"
        else:
            why = "connection refused" if self.endpoint.kind != "rtu" else "port unavailable"
        if not ok:
            self._close_client()
            if self.endpoint.kind == "rtu" and _missing(self.endpoint.target):
                why = f"{self.endpoint.target}: no such device (unplugged?)"
            elif self.endpoint.kind == "rtu" and _held_by_another(self.endpoint.target):
                why = (
                    f"{self.endpoint.target} is in use (by the running daemon?): another process holds it open, "
                    "and a second master on one serial line would garble both"
                )
            return why
        self._idle_since = self.last_answer = time.monotonic()
        self._drain_until = 0.0
        return None

    def mark_stale(self, device: str, silent_since: float) -> bool:
        """`device` got no answer since `silent_since`. If no device on this link got one either,
        and another device timed out meanwhile too, the connection itself is suspect (a hung
        gateway, a half-open socket): the next exchange or connect, by any device, opens a fresh
        one. A dead unit beside neighbours that answer (or were not asked) keeps the connection.
        True when the link was marked."""
        if self.client is None or self.last_answer >= silent_since:
            return False
        if not any(t >= silent_since for d, t in self._last_timeout.items() if d != device):
            return False
        self._stale = True
        return True

    def _close_client(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None

    def _expect_late(self, timeout_s: float) -> None:
        """After a timeout or a rejected answer, the real (or another late) answer may still
        arrive after the next request has gone out and pass for its answer. RTU frames carry no
        transaction id: nothing is sent until one more response timeout has passed and the line
        has been quiet (libmodbus waits a response timeout and flushes, too). On Modbus TCP with
        a device that answers with transaction id 0, the connection is reset instead."""
        if self._rtu:
            self._drain_until = max(self._drain_until, time.monotonic() + timeout_s)
        elif self.zero_tid:
            self._reset = True
        else:
            self._timed_out.add(self._sent_tid)  # its answer, if it comes, is known by its id
            if len(self._timed_out) > 1024:
                self._reset = True  # a fresh connection forgets them all

    async def _drain(self) -> None:
        """Wait out a late answer (`_expect_late`); pymodbus discards what arrives meanwhile, as
        no request is outstanding, and clears its buffer when the next one is sent."""
        quiet = QUIET_S + self.endpoint.inter_frame_s
        while True:
            now = time.monotonic()
            until = max(self._drain_until, self._last_rx + quiet)
            if now >= until:
                break
            await asyncio.sleep(until - now)
        self._drain_until = 0.0
        self.drained += 1

    async def _exchange(self, device: str, what: str, call: Any, timeout_s: float, stage: str) -> Any:
        """One request/response under the lock, with the serial line's silent interval."""
        async with self.lock:
            if (self._stale or self._reset) and self.client is not None:
                why = await self._open(device, timeout_s)
                if why is not None:
                    raise ConnectionLost(device, f"reconnecting to {self.endpoint} failed: {why}", stage=stage)
            client = self.client
            if client is None or not client.connected:
                raise ConnectionLost(device, f"connection to {self.endpoint} lost", stage=stage)
            if self._drain_until:
                await self._drain()
            if self.endpoint.inter_frame_s:
                wait = self._idle_since + self.endpoint.inter_frame_s - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            self.requests += 1
            answered = False
            self._in_flight = device
            try:
                resp = await within(call(client), timeout_s)
                answered = True
                if self._tcp:
                    sent, got = self._sent_tid, resp.transaction_id
                    if got != sent and not (got == 0 and device in self.zero_tid):
                        # The answer to another request (one that timed out): ours may follow it,
                        # and would be taken by the next request. A fresh connection drops both.
                        self._reset = True
                        raise StaleAnswer(device, what, sent, got, stage)
                return resp
            except _OtherTid as e:
                answered = True
                self._reset = True
                raise StaleAnswer(device, what, self._sent_tid, e.tid, stage) from None
            except asyncio.CancelledError:
                self._expect_late(timeout_s)  # the answer may still come, for someone else's request
                raise
            except TimeoutError:
                self._last_timeout[device] = time.monotonic()
                self._expect_late(timeout_s)
                raise ResponseTimeout(device, what, timeout_s, stage) from None
            except ConnectionException as e:
                raise ConnectionLost(device, f"connection to {self.endpoint} lost: {e}", stage=stage) from None
            except ModbusIOException as e:
                if "No response" in str(e):
                    self._last_timeout[device] = time.monotonic()
                    self._expect_late(timeout_s)
                    raise ResponseTimeout(device, what, timeout_s, stage) from None
                answered = True
                self._expect_late(timeout_s)
                raise BadResponse(device, what, str(e), stage) from None
            except ModbusException as e:
                answered = True
                self._expect_late(timeout_s)
                raise BadResponse(device, what, str(e), stage) from None
            except (struct_error, ValueError, IndexError) as e:  # a frame pymodbus could not decode
                answered = True
                self._expect_late(timeout_s)
                raise BadResponse(device, what, f"{type(e).__name__}: {e}", stage) from None
            finally:
                self._in_flight = None
                now = time.monotonic()
                if answered:
                    self.last_answer = now
                if self.endpoint.inter_frame_s:
                    self._idle_since = now

    async def request(
        self,
        device: str,
        unit: int,
        what: str,
        call: Any,
        timeout_s: float,
        retries: int,
        check: Any,
        stage: str = "read",
    ) -> Any:
        """`call(client)` with retries on timeouts and busy answers; `check(response)` validates."""
        attempt = 0
        while True:
            try:
                resp = await self._exchange(device, what, call, timeout_s, stage)
                if getattr(resp, "dev_id", unit) not in (unit, 0):
                    self._expect_late(timeout_s)
                    raise BadResponse(device, what, f"answer from unit {resp.dev_id}, expected unit {unit}", stage)
                if resp.isError():
                    code = int(getattr(resp, "exception_code", 0))
                    if code in _BUSY and attempt < retries:
                        attempt += 1
                        await asyncio.sleep(BUSY_DELAY_S)  # outside the lock: neighbours go first
                        continue
                    if code in GATEWAY_CODES and attempt < retries:
                        attempt += 1  # its unit did not answer the gateway: as a timeout, re-sent
                        continue
                    raise ExceptionResponse(device, code, what, stage)
                try:
                    return check(resp)
                except BadResponse:
                    self._expect_late(timeout_s)  # perhaps a stale answer: ours may follow
                    raise
            except ResponseTimeout:
                if attempt >= retries:
                    raise
                attempt += 1

    async def read(
        self,
        device: str,
        unit: int,
        table: str,
        start: int,
        count: int,
        timeout_s: float,
        retries: int,
        stage: str = "read",
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
                raise BadResponse(device, what, f"function code {resp.function_code}, expected {fc}", stage)
            if fc >= 3:
                regs = resp.registers
                if len(regs) != count:
                    raise BadResponse(device, what, f"{len(regs)} registers, expected {count}", stage)
                return regs
            bits = resp.bits
            if len(bits) != (count + 7) // 8 * 8:
                raise BadResponse(device, what, f"{len(bits)} bits, expected {count}", stage)
            return bits[:count]

        return await self.request(device, unit, what, call, timeout_s, retries, check, stage)

    async def write_registers(
        self, device: str, unit: int, start: int, values: list[int], timeout_s: float, retries: int
    ) -> None:
        what = f"write hr {start}+{len(values)} unit {unit}"
        fc = 6 if len(values) == 1 else 16

        def call(client: Any) -> Any:
            if len(values) == 1:
                return client.write_register(start, values[0], device_id=unit)
            return client.write_registers(start, values, device_id=unit)

        def check(resp: Any) -> None:
            # The answer echoes the request: address and value (6) or address and count (16).
            expected = (fc, start, values[0] if fc == 6 else len(values))
            value = (getattr(resp, "registers", None) or [None])[0] if fc == 6 else getattr(resp, "count", None)
            echo = (resp.function_code, getattr(resp, "address", None), value)
            if echo != expected:
                raise BadResponse(device, what, f"echo (function, address, value) {echo}, expected {expected}", "write")

        await self.request(device, unit, what, call, timeout_s, retries, check, "write")

    async def write_coil(
        self, device: str, unit: int, address: int, value: bool, timeout_s: float, retries: int
    ) -> None:
        what = f"write coil {address} unit {unit}"

        def check(resp: Any) -> None:
            bits = getattr(resp, "bits", None) or [None]
            if resp.function_code != 5 or getattr(resp, "address", None) != address or bits[0] != value:
                raise BadResponse(device, what, f"not the echo of the request: {resp}", "write")

        await self.request(
            device,
            unit,
            what,
            lambda client: client.write_coil(address, value, device_id=unit),
            timeout_s,
            retries,
            check,
            "write",
        )

    def close(self) -> None:
        self._close_client()


def _missing(path: str) -> bool:
    """A serial port that is not there (a USB adapter unplugged, a pty gone): a stat, no open."""
    return not os.path.exists(path)


def _held_by_another(path: str) -> bool:
    """Whether another open file holds the exclusive lock pyserial takes (exclusive=True)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# The registry: one link per endpoint per event loop, counted by reference.

_LINKS: dict[tuple, Link] = {}


def acquire(device: str, endpoint: Endpoint, *, zero_transaction_id: bool = False) -> Link:
    """The shared link for `endpoint` (created on first use); release it with `release`.
    `zero_transaction_id`: this device answers with transaction id 0 (Modbus TCP)."""
    key = (id(asyncio.get_running_loop()), endpoint.key)
    link = _LINKS.get(key)
    if link is None:
        link = _LINKS[key] = Link(endpoint)
    elif link.endpoint != endpoint:
        raise DeviceError(
            device,
            f"{endpoint.target} is already open as {link.endpoint}, not {endpoint}: "
            "devices on one serial line must use the same line settings",
            code="config",
            stage="connect",
        )
    link.refs += 1
    if zero_transaction_id:
        link.zero_tid.add(device)
    return link


def release(link: Link, device: str | None = None) -> None:
    """Drop one reference (`device`'s); the last one closes the connection. Never raises."""
    link.zero_tid.discard(device or "")
    link.refs -= 1
    if link.refs <= 0:
        for key, value in list(_LINKS.items()):
            if value is link:
                del _LINKS[key]
        link.close()


def open_links() -> int:
    """Links currently open in this process (for tests and status)."""
    return len(_LINKS)
