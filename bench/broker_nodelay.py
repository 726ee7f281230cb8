"""What mosquitto's Nagle setting costs in latency: `python bench/broker_nodelay.py`.

Not a figure of edgeos (run.py does not run it): it backs the advice in docs/config.md. A
mosquitto on a random loopback port, once with its default (`set_tcp_nodelay false`) and once
with `set_tcp_nodelay true`; one aiomqtt publisher sends 400 small QoS 1 messages in bursts of
four (a poll round of several devices), one subscriber stamps their arrival. Printed per broker
and per setting of TCP_NODELAY on the publisher's socket: p50, p99 and max latency.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt

MESSAGES = 400


def _broker(tmp: Path, nodelay: bool):
    """bench_sync's broker (one definition of how the benches start mosquitto)."""
    path = Path(__file__).with_name("bench_sync.py")
    spec = importlib.util.spec_from_file_location("edgeos_bench_sync", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod._broker(tmp, nodelay)


async def _round(port: int, client_nodelay: bool) -> tuple[float, float, float]:
    lat: list[float] = []
    v5 = aiomqtt.ProtocolVersion.V5
    async with aiomqtt.Client("127.0.0.1", port, identifier="sub", protocol=v5) as sub:
        await sub.subscribe("t/#", qos=1)
        async with aiomqtt.Client("127.0.0.1", port, identifier="pub", protocol=v5) as pub:
            if client_nodelay:
                pub._client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            async def receive() -> None:
                async for m in sub.messages:
                    lat.append(time.perf_counter() - float(bytes(m.payload[:20])))
                    if len(lat) >= MESSAGES:
                        return

            rx = asyncio.create_task(receive())
            async with asyncio.TaskGroup() as tg:
                for i in range(MESSAGES):
                    payload = (b"%20.6f" % time.perf_counter()) + b"x" * (1500 if i % 3 else 300)
                    tg.create_task(pub.publish(f"t/{i % 4}", payload, qos=1))
                    await asyncio.sleep(0.0 if i % 4 else 0.03)
            async with asyncio.timeout(20):
                await rx
    lat.sort()
    return lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3, lat[-1] * 1e3


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="edgeos-bench-nodelay-") as d:
        for nodelay in (False, True):
            proc, port = _broker(Path(d), nodelay)
            try:
                for client_nodelay in (False, True, False, True):
                    p50, p99, top = asyncio.run(_round(port, client_nodelay))
                    print(
                        f"broker set_tcp_nodelay {str(nodelay).lower():5} client TCP_NODELAY "
                        f"{'on ' if client_nodelay else 'off'}: p50 {p50:.2f} p99 {p99:.2f} max {top:.2f} ms"
                    )
            finally:
                proc.terminate()
                proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
