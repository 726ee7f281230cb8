"""Serial line end to end: a TCP serial device server (in another process) sends 40-byte lines
with 3 fields and an XOR checksum as fast as the connection takes them; the edgeos runtime
reads them through `socket://` and the whole adapter path (bytes, frames, checksum, regex,
Batch), the pipeline and the store. Figures: frames/s stored (3 samples a frame) and CPU % of
one core of the daemon process alone, flat out; the same with the server paced at the target
(50,000 lines/s), where the CPU figure is the cost of that load; the adapter's bad frames (0).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import resource
import socket
import tempfile
import time
from pathlib import Path

TARGET = 50_000


def line(k: int) -> bytes:
    body = f"T=+{k % 100000 / 100:08.2f},P=+{1013 + k % 7:07.2f},C={k % 10**10:010d}"
    x = 0
    for c in body.encode():
        x ^= c
    out = f"{body}*{x:02X}\r\n".encode()
    assert len(out) == 40, out
    return out


def _serve(ports: mp.Queue, stop: mp.Event, rate: int) -> None:
    """Lines as fast as the connection takes them (rate 0), or `rate` lines/s in 10 ms bursts."""
    block = b"".join(line(k) for k in range(20_000))  # 800 kB of distinct lines, sent again and again
    burst = 40 * rate // 100
    srv = socket.create_server(("127.0.0.1", 0))
    ports.put(srv.getsockname()[1])
    srv.settimeout(0.5)
    while not stop.is_set():
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        conn.settimeout(0.5)
        view = memoryview(block)
        due, pos = time.monotonic(), 0
        try:
            while not stop.is_set():
                try:
                    if not rate:
                        conn.sendall(view)
                        continue
                    chunk = view[pos : pos + burst]
                    pos = (pos + burst) % len(block)
                    conn.sendall(chunk)
                    due += 0.01
                    time.sleep(max(0.0, due - time.monotonic()))
                except TimeoutError:
                    continue
        except OSError:
            pass
        finally:
            conn.close()


CONFIG = """
[gateway]
id = "bench"
data_dir = "data"

[[devices]]
name = "line"
protocol = "serial"
port = "socket://127.0.0.1:{port}"
pattern = '^T=(?P<t>[+-]\\d+\\.\\d+),P=(?P<p>[+-]\\d+\\.\\d+),C=(?P<c>\\d+)$'
checksum = "xor"
checksum_gap = 1
tags = [{{ name = "t" }}, {{ name = "p" }}, {{ name = "c", type = "integer" }}]
"""


def _measure(tmp: Path, port: int, seconds: float) -> dict[str, float]:
    from edgeos.config import load_config
    from edgeos.runtime import Runtime

    p = tmp / "edgeos.toml"
    p.write_text(CONFIG.format(port=port))
    rt = Runtime(load_config(p))

    async def main() -> dict[str, float]:
        task = asyncio.create_task(rt.run())
        await rt.running.wait()
        await asyncio.sleep(1.0)  # warm-up: connection, first pages of the store
        s0, c0, t0 = rt.counters.stored, resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        await asyncio.sleep(seconds)
        s1, c1, t1 = rt.counters.stored, resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        health = dict(rt.devices["line"].adapter.health())
        rt.stop()
        await task
        cpu = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
        return {
            "frames_per_s": (s1 - s0) / 3 / (t1 - t0),
            "cpu_pct": 100 * cpu / (t1 - t0),
            "bad_frames": health.get("bad_frames", 0),
            "frames": health.get("frames", 0),
        }

    return asyncio.run(main())


def _with_server(rate: int, seconds: float) -> dict[str, float]:
    ctx = mp.get_context("fork")  # the bench module is loaded by path: not importable by a spawned child
    ports_q, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(ports_q, stop, rate), daemon=True)
    server.start()
    try:
        port = ports_q.get(timeout=60)
        with tempfile.TemporaryDirectory(prefix="edgeos-bench-serial-") as tmp:
            return _measure(Path(tmp), port, seconds)
    finally:
        stop.set()
        server.join(10)
        if server.is_alive():
            server.terminate()
            server.join(5)


def run(quick: bool):
    seconds = 5.0 if quick else 20.0
    got = _with_server(0, seconds)
    paced = _with_server(TARGET, seconds)
    yield "frames_per_s", got["frames_per_s"], "frames/s"
    yield "vs_target", got["frames_per_s"] / TARGET, f"ratio (target {TARGET:,} frames/s)"
    yield "samples_per_s", 3 * got["frames_per_s"], "samples/s"
    yield "cpu_pct", got["cpu_pct"], "% of one core"
    yield "bad_frames", got["bad_frames"] + paced["bad_frames"], "frames"
    yield "at_target_frames_per_s", paced["frames_per_s"], f"frames/s ({TARGET:,} offered)"
    yield "at_target_cpu_pct", paced["cpu_pct"], "% of one core"
