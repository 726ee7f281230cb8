"""Writes through the running daemon's control socket share the device's connection."""

from __future__ import annotations

import asyncio

from edgeos.config import load_config
from edgeos.runtime import Runtime
from edgeos.service import control
from edgeos.store import StoreReader


async def test_write_through_the_daemon_reaches_the_device_and_the_store(write_config, tmp_path):
    cfg = load_config(
        write_config(
            """
[gateway]
id = "g"
data_dir = "d"
[[devices]]
name = "press"
protocol = "simulated"
poll_interval = "20ms"
tags = [{ name = "setpoint", writable = true }, { name = "temp" }]
"""
        )
    )
    rt = Runtime(cfg)
    task = asyncio.create_task(rt.run())
    try:
        async with asyncio.timeout(10):
            await rt.running.wait()
            while not control.socket_path(cfg.gateway.data_dir).exists():
                await asyncio.sleep(0.02)
        d = cfg.gateway.data_dir
        assert await control.request(d, {"op": "write", "device": "press", "tag": "setpoint", "value": 72.5}) == {
            "ok": True,
            "written": 72.5,
        }
        refused = await control.request(d, {"op": "write", "device": "press", "tag": "temp", "value": 1})
        assert refused["ok"] is False and "not writable" in refused["error"]
        missing = await control.request(d, {"op": "write", "device": "press", "tag": "nope", "value": 1})
        assert missing["ok"] is False and "no such tag" in missing["error"]
        assert (await control.request(d, {"op": "reboot"}))["ok"] is False
        live = await control.request(d, {"op": "status"})
        assert live["status"]["devices"]["press"]["state"] == "running"
        await asyncio.sleep(0.2)
    finally:
        rt.stop()
        await asyncio.wait_for(task, 10)
    assert not control.socket_path(cfg.gateway.data_dir).exists()  # removed at stop
    assert await control.request(cfg.gateway.data_dir, {"op": "status"}) is None
    with StoreReader(cfg.gateway.data_dir) as r:
        assert 72.5 in r.history("press/setpoint").values.tolist()


def test_edgeos_write_goes_through_the_running_daemon(write_config):
    import subprocess
    import sys
    import time
    from pathlib import Path

    cfg_path = write_config(
        """
[gateway]
id = "g"
data_dir = "d"
[[devices]]
name = "press"
protocol = "simulated"
poll_interval = "20ms"
tags = [{ name = "setpoint", writable = true }]
"""
    )
    edgeos = str(Path(sys.executable).with_name("edgeos"))
    sock = control.socket_path(load_config(cfg_path).gateway.data_dir)
    daemon = subprocess.Popen([edgeos, "run", "-c", str(cfg_path)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        out = subprocess.run(
            [edgeos, "write", "press", "setpoint", "61.5", "-c", str(cfg_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0 and "through the running daemon" in out.stdout, out.stderr
        time.sleep(0.2)
    finally:
        daemon.terminate()
        daemon.wait(20)
    with StoreReader(load_config(cfg_path).gateway.data_dir) as r:
        assert 61.5 in r.history("press/setpoint").values.tolist()  # the daemon's own device connection wrote it
