"""Peers for the serial adapter: a socat pty pair at fixed paths (which can be killed and started
again at the same paths, like a USB adapter unplugged and plugged back), a device writing
frames on its end, and a TCP serial device server for socket:// URLs.

Load it by path (tests have no package): see tests/serial/conftest.py; test modules import it
as `edgeos_test_peers_serial`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import tty
from pathlib import Path


class Line:
    """Two ptys joined by socat, at `device` (the peer's end) and `adapter` (edgeos's end)."""

    def __init__(self, directory: Path) -> None:
        self.device = str(directory / "device-end")
        self.adapter = str(directory / "adapter-end")
        self.proc: subprocess.Popen | None = None
        self.fd: int | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "/usr/bin/socat",
                f"pty,raw,echo=0,link={self.device}",
                f"pty,raw,echo=0,link={self.adapter}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while not (os.path.exists(self.device) and os.path.exists(self.adapter)):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("socat did not create its ptys")
            time.sleep(0.01)
        self.fd = os.open(self.device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)

    def kill(self) -> None:
        """The line goes away: socat ends, both ptys vanish (the adapter's reads fail)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None
        deadline = time.monotonic() + 5
        while os.path.lexists(self.adapter) and time.monotonic() < deadline:
            time.sleep(0.01)

    def send(self, data: bytes) -> None:
        """Write bytes from the device's end (all of them; the pty may take them in parts)."""
        assert self.fd is not None
        view = memoryview(data)
        deadline = time.monotonic() + 10
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError("the adapter does not read") from None
                time.sleep(0.001)

    def receive(self) -> bytes:
        """What the adapter wrote to the device (requests), without waiting."""
        assert self.fd is not None
        try:
            return os.read(self.fd, 65536)
        except BlockingIOError:
            return b""


class Responder:
    """Poll mode's device: answers each request (bytes ending in `suffix`) with `reply(request)`
    (None: stays silent), from an asyncio reader on the device's end."""

    def __init__(self, line: Line, reply, suffix: bytes = b"\r\n") -> None:
        self.line, self.reply, self.suffix = line, reply, suffix
        self.requests: list[bytes] = []
        self._buf = b""
        loop = asyncio.get_running_loop()
        loop.add_reader(line.fd, self._readable)
        self._loop = loop

    def _readable(self) -> None:
        self._buf += self.line.receive()
        while self.suffix in self._buf:
            req, _, self._buf = self._buf.partition(self.suffix)
            self.requests.append(req)
            answer = self.reply(req)
            if answer is not None:
                self.line.send(answer)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.line.fd)


class TcpSerialServer:
    """A raw-TCP serial device server (socket://): sends what `send` is given to every client,
    and records what clients write."""

    def __init__(self, reply=None, suffix: bytes = b"\r") -> None:
        self.server: asyncio.Server | None = None
        self.clients: list[asyncio.StreamWriter] = []
        self.received = b""
        self.reply, self.suffix = reply, suffix  # answer each request ending in suffix (None: silent)
        self.connections = 0
        self.port = 0

    async def start(self, port: int = 0) -> TcpSerialServer:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.clients.append(writer)
        with contextlib.suppress(OSError):
            pending = b""
            while data := await reader.read(65536):
                self.received += data
                pending += data
                while self.reply is not None and self.suffix in pending:
                    req, _, pending = pending.partition(self.suffix)
                    answer = self.reply(req)
                    if answer is not None:
                        writer.write(answer)

    async def send(self, data: bytes) -> None:
        for w in list(self.clients):
            if w.is_closing():
                self.clients.remove(w)
                continue
            w.write(data)
            with contextlib.suppress(OSError):
                await w.drain()

    async def wait_client(self, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not [w for w in self.clients if not w.is_closing()]:
                await asyncio.sleep(0.01)

    def drop_clients(self) -> None:
        for w in self.clients:
            w.close()
        self.clients.clear()

    async def stop(self) -> None:
        self.drop_clients()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self.server.wait_closed()


class Rfc2217Server:
    """An RFC 2217 server (pyserial's PortManager, as in pyserial's example server) in front of
    a `loop://` port: what `send` writes comes out at the client, negotiation included."""

    def __init__(self) -> None:
        import socket
        import threading

        import serial
        import serial.rfc2217

        self._serial = serial
        self.port_obj = serial.serial_for_url("loop://", timeout=0.05)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop_flag = threading.Event()
        self.conn = None
        self.manager = None
        self._rfc = serial.rfc2217
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        self._threads[0].start()

    def _serve(self) -> None:
        import socket
        import threading

        while not self.stop_flag.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(0.2)
            self.conn = conn
            self.manager = self._rfc.PortManager(self.port_obj, _Writer(conn))
            t = threading.Thread(target=self._to_client, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)
            while not self.stop_flag.is_set():
                try:
                    data = conn.recv(1024)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                b"".join(self.manager.filter(data))  # negotiation; requests are not forwarded
            conn.close()

    def _to_client(self, conn) -> None:
        while not self.stop_flag.is_set():
            try:
                data = self.port_obj.read(4096)
                if data:
                    conn.sendall(b"".join(self.manager.escape(data)))
            except OSError:
                return

    def send(self, data: bytes) -> None:
        self.port_obj.write(data)

    def stop(self) -> None:
        self.stop_flag.set()
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()
        self.sock.close()
        for t in self._threads:
            t.join(2)
        self.port_obj.close()


class _Writer:
    """What PortManager writes its telnet answers to."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def write(self, data: bytes) -> None:
        self.conn.sendall(data)
