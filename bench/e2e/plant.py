"""The plant of the end-to-end bench, in one process of its own: Modbus TCP devices (pymodbus
servers whose registers wander every second) and serial line devices behind TCP device servers.

Run as a script with a JSON spec: {"modbus": [registers per device, ...], "serial": N,
"lines_per_s": R}. It prints one JSON line {"modbus": [ports], "serial": [ports]} when it
listens, then obeys one command per line on stdin, answering one JSON line each:
`stats` (successful Modbus reads and registers served, per device, since start), `pause` /
`resume` (while paused every Modbus request is answered "device busy" and the lines are
silent, so a gateway reads nothing and what it read before can be counted exactly), `quit`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

import numpy as np


def line(k: int) -> bytes:
    """A 40-byte line with 3 fields and an XOR checksum (as bench_serial sends)."""
    body = f"T=+{k % 100000 / 100:08.2f},P=+{1013 + k % 7:07.2f},C={k % 10**10:010d}"
    x = 0
    for c in body.encode():
        x ^= c
    return f"{body}*{x:02X}\r\n".encode()


async def main(spec: dict) -> None:
    from pymodbus.constants import ExcCodes
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    rng = np.random.default_rng(1)
    paused = False
    reads: list[int] = []
    registers: list[int] = []
    servers, arrays = [], []

    def hook(k: int):
        async def action(fc, start_address, address, count, regs, set_values):
            if paused:
                return ExcCodes.DEVICE_BUSY
            reads[k] += 1
            registers[k] += count
            return None

        return action

    for k, n in enumerate(spec["modbus"]):
        # Small positive words: every float32 decodes finite, every integer type is varied.
        words = rng.integers(0x3000, 0x3F00, n)
        arrays.append(words)
        reads.append(0)
        registers.append(0)
        dev = SimDevice(
            1,
            simdata=(
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, values=[int(w) for w in words], datatype=DataType.REGISTERS)],
                [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)],
            ),
            action=hook(k),
        )
        srv = ModbusTcpServer(dev, address=("127.0.0.1", 0))
        await srv.serve_forever(background=True)
        servers.append(srv)

    async def wander() -> None:
        """Every second, half of each device's registers step by -3..+3 (within bounds)."""
        while True:
            await asyncio.sleep(1.0 - time.time() % 1.0)
            for srv, words in zip(servers, arrays, strict=True):
                step = rng.integers(-3, 4, len(words)) * (rng.random(len(words)) < 0.5)
                np.clip(words + step, 0x3000, 0x3F00, out=words)
                block = srv.context.devices[1].block["h"]  # (start, count, words, flags)
                block[2][: len(words)] = words.tolist()

    async def serial_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        period = 1.0 / spec.get("lines_per_s", 20)
        k = 0
        due = time.monotonic()
        try:
            while True:
                if not paused:
                    writer.write(line(k))
                    await writer.drain()
                    k += 1
                due += period
                await asyncio.sleep(max(0.0, due - time.monotonic()))
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    serials = [await asyncio.start_server(serial_client, "127.0.0.1", 0) for _ in range(spec.get("serial", 0))]
    ports = {
        "modbus": [s.transport.sockets[0].getsockname()[1] for s in servers],
        "serial": [s.sockets[0].getsockname()[1] for s in serials],
    }
    print(json.dumps(ports), flush=True)
    wanderer = asyncio.create_task(wander())
    loop = asyncio.get_running_loop()
    try:
        while True:
            cmd = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if cmd in ("", "quit"):
                break
            if cmd == "pause":
                paused = True
            elif cmd == "resume":
                paused = False
            print(json.dumps({"reads": reads, "registers": registers, "paused": paused}), flush=True)
    finally:
        wanderer.cancel()
        for s in serials:
            s.close()
        for srv in servers:
            await srv.shutdown()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
