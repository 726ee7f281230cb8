"""A small asyncio TCP fault proxy: put it between the gateway and a peer (Modbus device, OPC UA
server, MQTT broker) and change its mode while traffic flows.

Modes (`FaultProxy.mode`), applied to both directions and to new connections:
- "pass":    forward everything.
- "stall":   hold every byte (connections stay open, nothing arrives: a cable pulled behind a
             switch, a peer hung); bytes held go on, late, when the stall ends (TCP retransmits).
- "reset":   close every connection with a TCP RST as soon as bytes flow (mid-message).
- "cut":     forward `cut_after` more bytes per connection and direction, then reset.
- "trickle": forward one byte per `trickle_s` (a saturated radio link).
- "flip":    invert the last byte of every read from the peer (corruption TCP does not catch;
             for negative controls: a value check must notice it).
The proxy counts bytes and connections; it never holds more than one read (64 KiB) per
direction, so it is not the thing whose memory grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.cut_after = 0
        self.trickle_s = 0.02
        self.port = 0
        self.connections = 0
        self.resets = 0
        self.bytes = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self._changed = asyncio.Event()

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def set(self, mode: str, **kw: float) -> None:
        """Change the mode now; open connections follow at their next byte."""
        self.mode = mode
        for k, v in kw.items():
            setattr(self, k, v)
        self._changed.set()
        self._changed = asyncio.Event()
        if mode == "reset":
            for w in list(self._writers):
                self._rst(w)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            self._rst(w)
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _rst(self, w: asyncio.StreamWriter) -> None:
        sock = w.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()
        self._writers.discard(w)

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode == "reset":
            self.resets += 1
            self._rst(cw)
            return
        try:
            ur, uw = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except (OSError, TimeoutError):
            self._rst(cw)
            return
        self._writers.update((cw, uw))
        pair = (cw, uw)
        for r, w, down in ((cr, uw, False), (ur, cw, True)):
            t = asyncio.get_running_loop().create_task(self._pipe(r, w, pair, down), name="proxy:pipe")
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, pair, down: bool) -> None:
        budget: int | None = None
        try:
            while True:
                data = await r.read(65536)
                if not data:
                    break
                while data:
                    mode = self.mode
                    if mode == "stall":
                        changed = self._changed
                        await changed.wait()
                        continue
                    if mode == "reset":
                        raise ConnectionResetError
                    if mode == "cut":
                        budget = self.cut_after if budget is None else budget
                        if budget <= 0:
                            raise ConnectionResetError
                        chunk, data = data[:budget], data[budget:]
                        budget -= len(chunk)
                    elif mode == "flip" and down:
                        chunk, data = data[:-1] + bytes([data[-1] ^ 0xFF]), b""
                    elif mode == "trickle":
                        chunk, data = data[:1], data[1:]
                        await asyncio.sleep(self.trickle_s)
                    else:
                        budget = None
                        chunk, data = data, b""
                    w.write(chunk)
                    self.bytes += len(chunk)
                    await w.drain()
        except (ConnectionResetError, OSError, asyncio.IncompleteReadError):
            self.resets += 1
        finally:
            for x in pair:
                self._rst(x)
