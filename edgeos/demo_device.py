"""A simulated machine that speaks Modbus TCP on 127.0.0.1, for `edgeos demo`.

A deliberately small server in plain asyncio (MBAP framing; functions 3, 4, 6 and 16;
exception 2 for addresses it does not have), so the demo exercises the real Modbus adapter
over a real socket without a second importer of pymodbus.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import struct
import time

REGISTERS = 32


class DemoMachine:
    """A filling line: temperature, pressure, a parts counter, a running bit, a setpoint."""

    def __init__(self) -> None:
        self.regs = [0] * REGISTERS
        self.regs[6] = 1200  # speed setpoint, writable
        self.parts = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._task: asyncio.Task | None = None

    def _tick(self) -> None:
        t = time.time()
        running = (t % 40) < 30
        temp = 65 + 8 * math.sin(2 * math.pi * t / 50) + random.gauss(0, 0.05)
        self.regs[0] = int(round(temp * 100)) & 0xFFFF  # int16, 0.01 degC
        self.regs[1] = int(round((4.2 + 0.3 * math.sin(t / 7) + random.gauss(0, 0.01)) * 100))  # uint16, 0.01 bar
        if running:
            self.parts += random.randint(1, 3)
        self.regs[2], self.regs[3] = (self.parts >> 16) & 0xFFFF, self.parts & 0xFFFF  # uint32, ABCD
        self.regs[4] = (1 if running else 0) | (2 if temp > 72 else 0)  # bit 0 running, bit 1 over-temperature

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._tick()
        self._task = asyncio.create_task(self._run(), name="demo-machine")
        return self.port

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self._tick()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(7)
                tid, proto, length, unit = struct.unpack(">HHHB", head)
                pdu = await reader.readexactly(length - 1)
                reply = self._answer(pdu)
                writer.write(struct.pack(">HHHB", tid, proto, len(reply) + 1, unit) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, pdu: bytes) -> bytes:
        fc = pdu[0]
        if fc in (3, 4) and len(pdu) == 5:
            start, count = struct.unpack(">HH", pdu[1:5])
            if not 1 <= count <= 125 or start + count > REGISTERS:
                return bytes([fc | 0x80, 2])
            return bytes([fc, 2 * count]) + struct.pack(f">{count}H", *self.regs[start : start + count])
        if fc == 6 and len(pdu) == 5:
            addr, value = struct.unpack(">HH", pdu[1:5])
            if addr != 6:
                return bytes([fc | 0x80, 2])
            self.regs[addr] = value
            return pdu
        if fc == 16 and len(pdu) >= 6:
            start, count = struct.unpack(">HH", pdu[1:5])
            if start != 6 or count != 1:
                return bytes([fc | 0x80, 2])
            self.regs[6] = struct.unpack(">H", pdu[6:8])[0]
            return pdu[:5]
        return bytes([fc | 0x80, 1])
