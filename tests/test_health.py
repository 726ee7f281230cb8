"""/healthz over real HTTP: 200 while devices poll and the store writes; 503 naming the device
when a real Modbus server goes away for longer than the bound, and when the store refuses writes."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from edgeos.config import load_config
from edgeos.runtime import Runtime


def _peers():
    name = "edgeos_test_peers_modbus"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "peers" / "modbus.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


GATEWAY = """
[gateway]
id = "gw"
data_dir = "data"
shutdown_timeout = "5s"

[http]
port = 0

[health]
device_down = "1s"
{health}
"""


async def healthz(rt: Runtime) -> tuple[int, dict]:
    def get() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{rt.http.port}/healthz", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    return await asyncio.to_thread(get)


async def started(rt: Runtime) -> asyncio.Task:
    task = asyncio.create_task(rt.run())
    async with asyncio.timeout(15):
        await rt.running.wait()
        while rt.http is None or not rt.http.started.is_set():
            await asyncio.sleep(0.02)
    return task


async def test_healthz_turns_503_when_a_modbus_device_is_down_past_its_bound(write_config) -> None:
    peers = _peers()
    peer = await peers.ModbusPeer().start_tcp()
    tags = '{ name = "speed", address = "hr0", type = "uint16" }'
    body = GATEWAY.format(health="") + peers.device(peer.port, tags, name="plc")
    body += """
[[devices]]
name = "sim"
protocol = "simulated"
poll_interval = "50ms"
tags = [{ name = "t" }]
"""
    rt = Runtime(load_config(write_config(body)))
    task = await started(rt)
    try:
        async with asyncio.timeout(20):
            await rt.wait_connected()
            status, doc = await healthz(rt)
            assert (status, doc["status"], doc["problems"]) == (200, "ok", [])
            assert doc["checked"]["devices_up"] == 2

            await peer.stop()  # the PLC goes away
            while rt.devices["plc"].state == "running":
                await asyncio.sleep(0.05)
            # Down, but 200 until it has been down for longer than its bound (1 s).
            while (status := (await healthz(rt))[0]) == 200:
                await asyncio.sleep(0.1)
            status, doc = await healthz(rt)
            assert status == 503 and doc["status"] == "unhealthy"
            (problem,) = doc["problems"]
            assert problem["check"] == "device_down" and problem["device"] == "plc"
            assert problem["down_seconds"] >= 1.0 and problem["bound_seconds"] == 1.0
            assert problem["last_error_code"]
            assert doc["checked"] == {"devices_up": 1, "devices_down": 1, "sync_lag_seconds": None}

            peer = await peers.ModbusPeer().start_tcp(peer.port)  # back on the same port
            await rt.wait_connected("plc")
            while (await healthz(rt))[0] != 200:
                await asyncio.sleep(0.05)
    finally:
        rt.stop()
        await asyncio.wait_for(task, 15)
        await peer.stop()


async def test_per_device_bound(write_config) -> None:
    """[health.devices] gives one device a longer bound: its outage is not (yet) a problem."""
    body = (
        GATEWAY.format(health='[health.devices]\nslow = "10m"')
        + """
[[devices]]
name = "slow"
protocol = "simulated"
fail_connect = true
tags = [{ name = "t" }]

[[devices]]
name = "fast"
protocol = "simulated"
fail_connect = true
tags = [{ name = "t" }]
"""
    )
    rt = Runtime(load_config(write_config(body)))
    task = await started(rt)
    try:
        async with asyncio.timeout(15):
            while (await healthz(rt))[0] == 200:
                await asyncio.sleep(0.1)
            status, doc = await healthz(rt)
    finally:
        rt.stop()
        await asyncio.wait_for(task, 15)
    assert status == 503
    assert [p["device"] for p in doc["problems"]] == ["fast"]


async def test_healthz_503_while_the_store_refuses_writes(write_config, monkeypatch) -> None:
    from edgeos.store import StoreFull, StoreWriter

    body = (
        GATEWAY.format(health="")
        + """
[[devices]]
name = "sim"
protocol = "simulated"
poll_interval = "20ms"
tags = [{ name = "t" }]
"""
    )
    refuse = {"on": False}
    real_write = StoreWriter.write

    def write(self, batches):  # a disk that fills up, then has room again
        if refuse["on"]:
            raise StoreFull("disk full (test)")
        return real_write(self, batches)

    monkeypatch.setattr(StoreWriter, "write", write)
    rt = Runtime(load_config(write_config(body)))
    task = await started(rt)
    try:
        async with asyncio.timeout(15):
            while rt.counters.stored < 5:
                await asyncio.sleep(0.05)
            assert (await healthz(rt))[0] == 200
            refuse["on"] = True
            while not rt.store_failing:
                await asyncio.sleep(0.05)
            status, doc = await healthz(rt)
            assert status == 503
            assert [p["check"] for p in doc["problems"]] == ["store_refuses_writes"]
            refuse["on"] = False
            while rt.store_failing:
                await asyncio.sleep(0.05)
            assert (await healthz(rt))[0] == 200
    finally:
        rt.stop()
        await asyncio.wait_for(task, 15)


async def test_healthz_503_when_the_upstream_lag_passes_its_bound(write_config) -> None:
    """Upstream enabled towards a port where nothing listens: stored samples are never
    acknowledged, the lag grows past `sync_lag` and /healthz says so; /metrics shows the lag."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    body = (
        GATEWAY.format(health='sync_lag = "1s"')
        + f"""
[upstream]
enabled = true
host = "127.0.0.1"
port = {dead}
reconnect_min = "100ms"
reconnect_max = "200ms"

[[devices]]
name = "sim"
protocol = "simulated"
poll_interval = "50ms"
tags = [{{ name = "t" }}]
"""
    )
    rt = Runtime(load_config(write_config(body)))
    task = await started(rt)
    try:
        async with asyncio.timeout(20):
            while (await healthz(rt))[0] == 200:
                await asyncio.sleep(0.2)
            status, doc = await healthz(rt)

            def lag_of(text: str) -> float:
                line = next(ln for ln in text.splitlines() if ln.startswith("edgeos_sync_lag_seconds "))
                return float(line.split()[1])

            # /healthz may say so first: no session for over the bound while units wait (on the
            # monotonic clock); the lag gauge is refreshed once a second (up to 1 s behind).
            while True:
                metrics = await asyncio.to_thread(
                    lambda: (
                        urllib.request.urlopen(f"http://127.0.0.1:{rt.http.port}/metrics", timeout=5).read().decode()
                    )
                )
                if lag_of(metrics) > 1.0:
                    break
                await asyncio.sleep(0.2)
    finally:
        rt.stop()
        await asyncio.wait_for(task, 15)
    assert status == 503
    (problem,) = doc["problems"]
    assert problem["check"] == "sync_lag" and problem["lag_seconds"] >= 1.0 and problem["bound_seconds"] == 1.0
    assert doc["checked"]["sync_lag_seconds"] > 1.0
    assert "edgeos_sync_connected 0" in metrics
