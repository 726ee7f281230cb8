"""Modbus end to end: 10 pymodbus servers (in another process) polled by the edgeos runtime.

Load: 10 devices x 1,000 tags of mixed types (float32 in two byte orders, int32/uint32, int16
and uint16 with scale, register bits, int8/uint8 bytes) packed into holding registers
0..999, all polled every 100 ms: 100,000 samples/s offered. The servers run in a separate
process so the CPU figure is the daemon's alone (poll, decode, pipeline and store thread).
Figures: samples/s stored, requests/s, CPU % of one core, poll-cycle lateness p50/p99; then
the same load with `coalesce = false` (one request per tag): what it delivers, and the
coalescing gain (requests per poll without coalescing / with).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

DEVICES, INTERVAL_MS = 10, 100

# One 20-register block of 20 tags; repeated 50 times it fills registers 0..999 with 1,000 tags.
_BLOCK = [
    ("float32", "ABCD", 0, ""),
    ("float32", "CDAB", 2, ""),
    ("float32", "ABCD", 4, ""),
    ("float32", "CDAB", 6, ""),
    ("int32", "ABCD", 8, ""),
    ("uint32", "CDAB", 10, ""),
    ("int16", "ABCD", 12, "0.1"),
    ("uint16", "ABCD", 13, ""),
    ("int16", "ABCD", 14, ""),
    ("uint16", "ABCD", 15, "0.01"),
    ("int16", "BADC", 16, ""),
    *[("bool", "", f"17.{b}", "") for b in range(4)],
    ("int8", "high", 18, ""),
    ("uint8", "low", 18, ""),
    *[("bool", "", f"19.{b}", "") for b in (0, 7, 15)],
]


def _csv() -> str:
    rows = ["name,address,type,byte_order,byte,scale"]
    for k in range(50):
        for i, (typ, order, off, scale) in enumerate(_BLOCK):
            if isinstance(off, str):
                reg, bit = off.split(".")
                address = f"hr{20 * k + int(reg)}.{bit}"
            else:
                address = f"hr{20 * k + off}"
            byte_order = order if order in ("ABCD", "CDAB", "BADC", "DCBA") else ""
            byte = order if order in ("high", "low") else ""
            rows.append(f"t{20 * k + i},{address},{'' if typ == 'bool' else typ},{byte_order},{byte},{scale}")
    return "\n".join(rows) + "\n"


def _serve(ports: mp.Queue, stop: mp.Event) -> None:
    """The 10 devices: pymodbus servers on loopback, registers filled with varied words."""
    import logging

    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

    async def main() -> None:
        rng = np.random.default_rng(1)
        servers = []
        for _ in range(DEVICES):
            words = [int(x) for x in rng.integers(0, 0x3F80, 1000)]  # small positive floats, finite
            dev = SimDevice(
                1,
                simdata=(
                    [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                    [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                    [SimData(0, values=words, datatype=DataType.REGISTERS)],
                    [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)],
                ),
            )
            srv = ModbusTcpServer(dev, address=("127.0.0.1", 0))
            await srv.serve_forever(background=True)
            servers.append(srv)
        ports.put([s.transport.sockets[0].getsockname()[1] for s in servers])
        await asyncio.to_thread(stop.wait)
        for s in servers:
            await s.shutdown()

    asyncio.run(main())


def _config(tmp: Path, ports: list[int], coalesce: bool) -> Path:
    (tmp / "registers.csv").write_text(_csv())
    devices = "".join(
        f'[[devices]]\nname = "d{d}"\nprotocol = "modbus"\nhost = "127.0.0.1"\nport = {port}\n'
        f'poll_interval = "{INTERVAL_MS}ms"\ncoalesce = {str(coalesce).lower()}\ntimeout = "2s"\n'
        'tags_csv = "registers.csv"\n'
        for d, port in enumerate(ports)
    )
    p = tmp / f"edgeos-{coalesce}.toml"
    p.write_text(f'[gateway]\nid = "bench"\ndata_dir = "data-{coalesce}"\n{devices}')
    return p


def _measure(cfg_path: Path, seconds: float) -> dict[str, float]:
    from edgeos.config import load_config
    from edgeos.runtime import Runtime

    cfg = load_config(cfg_path)
    rt = Runtime(cfg)

    def requests() -> int:
        return sum(d.adapter.counters.requests for d in rt.devices.values() if d.adapter is not None)

    async def main() -> dict[str, float]:
        task = asyncio.create_task(rt.run())
        await rt.running.wait()
        await asyncio.sleep(1.0)  # warm-up: connections, first ticks, store pages
        for d in rt.devices.values():  # lateness of the measuring window only
            for s in d.adapter.stats.values():
                s.lateness_ns.clear()
        s0, r0, c0, t0 = rt.counters.stored, requests(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        await asyncio.sleep(seconds)
        s1, r1, c1, t1 = rt.counters.stored, requests(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        rt.stop()
        await task
        cpu = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
        late = np.concatenate(
            [np.array(s.lateness_ns, float) for d in rt.devices.values() for s in d.adapter.stats.values()]
        )
        plan = sum(len(g.plan.current.requests) for d in rt.devices.values() for g in d.adapter.poll_groups())
        return {
            "samples_per_s": (s1 - s0) / (t1 - t0),
            "requests_per_s": (r1 - r0) / (t1 - t0),
            "cpu_pct": 100 * cpu / (t1 - t0),
            "p50": float(np.percentile(late, 50)) / 1e6 if late.size else float("nan"),
            "p99": float(np.percentile(late, 99)) / 1e6 if late.size else float("nan"),
            "requests_per_cycle": plan,
        }

    return asyncio.run(main())


def run(quick: bool):
    seconds = 5.0 if quick else 20.0
    ctx = mp.get_context("fork")  # the bench module is loaded by path: not importable by a spawned child
    ports_q, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(ports_q, stop), daemon=True)
    server.start()
    try:
        ports = ports_q.get(timeout=60)
        with tempfile.TemporaryDirectory(prefix="edgeos-bench-modbus-") as tmp:
            on = _measure(_config(Path(tmp), ports, True), seconds)
            off = _measure(_config(Path(tmp), ports, False), 3.0 if quick else 10.0)
    finally:
        stop.set()
        server.join(10)
        if server.is_alive():
            server.terminate()
            server.join(5)
    offered = DEVICES * 1000 * 1000 / INTERVAL_MS
    yield "samples_per_s", on["samples_per_s"], "samples/s"
    yield "delivered_vs_offered", on["samples_per_s"] / offered, "ratio"
    yield "requests_per_s", on["requests_per_s"], "requests/s"
    yield "cpu_pct", on["cpu_pct"], "% of one core"
    yield "p50_lateness_ms", on["p50"], "ms"
    yield "p99_lateness_ms", on["p99"], "ms"
    yield "uncoalesced_samples_per_s", off["samples_per_s"], "samples/s"
    yield "uncoalesced_requests_per_s", off["requests_per_s"], "requests/s"
    yield "uncoalesced_cpu_pct", off["cpu_pct"], "% of one core"
    yield "coalescing_gain", off["requests_per_cycle"] / on["requests_per_cycle"], "x fewer requests per poll"
