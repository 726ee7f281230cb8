"""Opening and reading serial ports: the only module that imports pyserial.

- A device path (`/dev/ttyUSB0`, a pty) is opened with pyserial (line settings, flow control,
  `exclusive` so a second process cannot become a second reader) and then read and written
  on its file descriptor from the event loop (`add_reader`): no thread per port.
- `socket://host:port` (raw TCP serial device servers) uses asyncio streams directly.
- `rfc2217://host:port` and pyserial's other URLs go through `serial_for_url`; their reads
  run in a worker thread with a short timeout, since pyserial's RFC 2217 client is threaded.

Every pyserial and OS error is wrapped into `PortError` (a `DeviceError`) with a low-cardinality
code: `missing` (no such device: unplugged), `in_use`, `open`, `lost` (the device went away
while open), `closed` (the peer closed the connection), `write`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from typing import Any

import serial

from edgeos.errors import DeviceError

READ_SIZE = 65536
"""Bytes asked per read: what arrived together is parsed (and emitted) together."""

_PARITY = {
    "none": serial.PARITY_NONE,
    "even": serial.PARITY_EVEN,
    "odd": serial.PARITY_ODD,
    "mark": serial.PARITY_MARK,
    "space": serial.PARITY_SPACE,
}
_STOP = {1.0: serial.STOPBITS_ONE, 1.5: serial.STOPBITS_ONE_POINT_FIVE, 2.0: serial.STOPBITS_TWO}


class PortError(DeviceError):
    """A port that cannot be opened, or was lost while open."""

    def __init__(self, device: str, message: str, code: str, stage: str = "read") -> None:
        super().__init__(device, message, code=code, stage=stage)


class Port:
    """An open port: `read` returns the bytes available (at least one), `write` sends all."""

    async def read(self) -> bytes:
        raise NotImplementedError

    async def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _settings(spec: Any) -> dict[str, Any]:
    return {
        "baudrate": spec.baudrate,
        "parity": _PARITY[spec.parity],
        "bytesize": spec.bytesize,
        "stopbits": _STOP[float(spec.stopbits)],
        "rtscts": spec.rtscts,
        "xonxoff": spec.xonxoff,
    }


async def open_port(device: str, spec: Any) -> Port:
    """Open the spec's port; PortError when it cannot be."""
    url = spec.port
    if url.startswith("socket://"):
        host, _, port = url[len("socket://") :].partition(":")
        port = port.split("/")[0].split("?")[0]
        try:
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection(host, int(port))
        except (OSError, TimeoutError) as e:
            raise PortError(device, f"{url}: cannot connect: {e or 'timed out'}", "open", "connect") from None
        return _StreamPort(device, url, reader, writer)
    if "://" in url:
        try:
            ser = await asyncio.to_thread(serial.serial_for_url, url, timeout=0.1, **_settings(spec))
        except (serial.SerialException, ValueError, OSError) as e:
            raise PortError(device, f"{url}: cannot open: {e}", "open", "connect") from None
        return _ThreadPort(device, url, ser)
    try:
        ser = serial.Serial(url, timeout=0, exclusive=True, **_settings(spec))
    except serial.SerialException as e:
        err = getattr(e, "errno", None)
        if err in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            raise PortError(device, f"{url}: no such device (unplugged?)", "missing", "connect") from None
        if err in (errno.EAGAIN, errno.EWOULDBLOCK) or "exclusively lock" in str(e):
            raise PortError(
                device, f"{url} is in use: another process holds it open (a second daemon?)", "in_use", "connect"
            ) from None
        raise PortError(device, f"{url}: cannot open: {e}", "open", "connect") from None
    except (ValueError, OSError) as e:
        raise PortError(device, f"{url}: cannot open: {e}", "open", "connect") from None
    return _FdPort(device, url, ser)


class _FdPort(Port):
    def __init__(self, device: str, url: str, ser: Any) -> None:
        self.device, self.url, self.ser = device, url, ser
        self.fd = ser.fileno()
        os.set_blocking(self.fd, False)
        self._loop = asyncio.get_running_loop()

    async def _wait(self, add: Any, remove: Any) -> None:
        fut = self._loop.create_future()
        add(self.fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            remove(self.fd)

    async def read(self) -> bytes:
        # A tty read without data returns b"" (VMIN = VTIME = 0), not EAGAIN: only nothing to
        # read right after the loop reported the port readable means it is gone (hang-up).
        ready = False
        while True:
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                data = None
            except OSError as e:  # EIO: the USB adapter was unplugged, the pty's other end went away
                raise PortError(self.device, f"{self.url}: lost: {e.strerror or e}", "lost") from None
            if data:
                return data
            if ready and data == b"":
                raise PortError(self.device, f"{self.url}: lost (hang-up)", "lost")
            await self._wait(self._loop.add_reader, self._loop.remove_reader)
            ready = True

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                await self._wait(self._loop.add_writer, self._loop.remove_writer)
                continue
            except OSError as e:
                raise PortError(self.device, f"{self.url}: write failed: {e.strerror or e}", "write", "write") from None
            view = view[n:]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.fd)
            self._loop.remove_writer(self.fd)
        with contextlib.suppress(Exception):
            self.ser.close()


class _StreamPort(Port):
    def __init__(self, device: str, url: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.device, self.url, self.reader, self.writer = device, url, reader, writer

    async def read(self) -> bytes:
        try:
            data = await self.reader.read(READ_SIZE)
        except OSError as e:
            raise PortError(self.device, f"{self.url}: lost: {e}", "lost") from None
        if not data:
            raise PortError(self.device, f"{self.url}: closed by the device server", "closed")
        return data

    async def write(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except OSError as e:
            raise PortError(self.device, f"{self.url}: write failed: {e}", "write", "write") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class _ThreadPort(Port):
    """pyserial URL handlers (rfc2217://) are blocking: each read runs in a worker thread for at
    most the port's 0.1 s timeout, so cancellation is never held up for long."""

    def __init__(self, device: str, url: str, ser: Any) -> None:
        self.device, self.url, self.ser = device, url, ser

    def _read(self) -> bytes:
        n = max(1, min(READ_SIZE, self.ser.in_waiting))
        return self.ser.read(n)

    async def read(self) -> bytes:
        while True:
            try:
                data = await asyncio.to_thread(self._read)
            except (serial.SerialException, OSError, AttributeError, TypeError) as e:
                raise PortError(self.device, f"{self.url}: lost: {e}", "lost") from None
            if data:
                return data
            if not self.ser.is_open:
                raise PortError(self.device, f"{self.url}: closed", "closed")

    async def write(self, data: bytes) -> None:
        try:
            await asyncio.to_thread(self.ser.write, data)
        except (serial.SerialException, OSError) as e:
            raise PortError(self.device, f"{self.url}: write failed: {e}", "write", "write") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ser.close()
