"""`edgeos demo`: the whole runtime on simulated machines, with a live view in the terminal."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import sys
from pathlib import Path

from edgeos.config import load_config
from edgeos.demo_device import DemoMachine
from edgeos.logs import setup as setup_logging
from edgeos.model import Quality, ValueKind
from edgeos.runtime import Runtime

DEMO_CONFIG = """\
[gateway]
id = "demo"
data_dir = "."
log_level = "warning"

[store]
commit_interval = "200ms"

# The local HTTP server: the read-only web console (docs/console.md), /metrics and /healthz.
[http]
port = @HTTP_PORT@

[[devices]]
name = "press"
protocol = "simulated"
poll_interval = "500ms"
seed = 1
tags = [
  { name = "temperature", signal = "sine", amplitude = 20.0, offset = 60.0, period = "30s", noise = 0.05, resolution = 0.01, unit = "degC", filters = [{ type = "deadband", abs = 0.1, max_silence = "10s" }] },
  { name = "pressure", signal = "random_walk", amplitude = 5.0, offset = 120.0, resolution = 0.1, unit = "bar" },
  { name = "running", signal = "bool", period = "20s" },
  { name = "parts", signal = "counter", period = "2s", unit = "pcs" },
  { name = "state", signal = "text", period = "15s", states = ["RUN", "IDLE", "ALARM"] },
]

[[devices]]
name = "filler"
protocol = "modbus"
host = "127.0.0.1"
port = @FILLER_PORT@
poll_interval = "500ms"
tags = [
  { name = "temperature", address = "40001", type = "int16", scale = 0.01, unit = "degC" },
  { name = "pressure", address = "40002", type = "uint16", scale = 0.01, unit = "bar" },
  { name = "parts", address = "40003", type = "uint32", unit = "pcs" },
  { name = "running", address = "40005.0" },
  { name = "overtemp", address = "40005.1" },
  { name = "speed_setpoint", address = "40007", type = "uint16", unit = "bph", writable = true },
]

[[devices]]
name = "oven"
protocol = "simulated"
poll_interval = "1s"
seed = 2
tags = [
  { name = "zone1", signal = "ramp", amplitude = 150.0, offset = 50.0, period = "40s", resolution = 0.1, unit = "degC" },
  { name = "zone2", signal = "sine", amplitude = 30.0, offset = 180.0, period = "25s", noise = 0.2, resolution = 0.1, unit = "degC" },
  { name = "fan", signal = "square", amplitude = 1400.0, offset = 100.0, period = "12s", unit = "rpm" },
]

[[devices]]
name = "packer"
protocol = "simulated"
poll_interval = "250ms"
seed = 3
tags = [
  { name = "weight", signal = "sine", amplitude = 0.2, offset = 25.0, period = "3s", noise = 0.01, resolution = 0.001, unit = "kg" },
  { name = "speed", signal = "step", amplitude = 60.0, offset = 20.0, period = "16s", unit = "ppm" },
]
"""


def _fmt(value: float | str, kind: ValueKind) -> str:
    if isinstance(value, str):
        return value
    if value != value:  # NaN
        return "-"
    if kind is ValueKind.BOOL:
        return "true" if value else "false"
    return f"{value:.3f}".rstrip("0").rstrip(".")


def render(rt: Runtime, tty: bool) -> str:
    now = dt.datetime.now(dt.UTC)
    lines = []
    if tty:
        lines.append("\x1b[H\x1b[2J")
    lines.append(f"edgeos demo — gateway {rt.config.gateway.id} — {now:%H:%M:%S} UTC — Ctrl-C to stop")
    lines.append(f"store: {rt.config.gateway.data_dir}")
    if rt.console_url:
        lines.append(f"console: {rt.console_url} (open it in a browser: live values and trends)")
    for d in rt.config.devices:
        if d.protocol == "modbus":
            lines.append(f"{d.name}: a machine speaking Modbus TCP on {d.options['host']}:{d.options['port']}")
    lines.append("")
    lines.append(f"{'TAG':<22} {'VALUE':>12} {'UNIT':<6} {'QUALITY':<10} {'AGE':>6}")
    for meta, ts, value, q in rt.latest.rows():
        age = f"{(now.timestamp() * 1e9 - ts) / 1e9:.1f}s" if ts else "-"
        lines.append(f"{meta.key:<22} {_fmt(value, meta.kind):>12} {meta.unit:<6} {Quality.severity(q):<10} {age:>6}")
    c = rt.counters
    lines.append("")
    lines.append(f"samples read {c.read}, dropped by filters {c.filtered_out}, stored {c.stored}")
    states = ", ".join(f"{n}: {s.state}" for n, s in rt.devices.items())
    lines.append(f"devices: {states}")
    return "\n".join(lines)


def _http_port() -> int:
    """The HTTP server's usual port (the console's), or any free one when it is taken (a
    daemon already runs)."""
    from edgeos.service.http import HttpSettings

    port = HttpSettings().port
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


def run_demo(data_dir: Path, duration: float = 0.0, *, temporary: bool = False) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = data_dir / "demo.toml"
    tty = sys.stdout.isatty()

    async def main() -> None:
        # A machine on loopback that speaks Modbus TCP, read through the real Modbus adapter.
        machine = DemoMachine()
        port = await machine.start()
        text = DEMO_CONFIG.replace("@FILLER_PORT@", str(port)).replace("@HTTP_PORT@", str(_http_port()))
        cfg_path.write_text(text, encoding="utf-8")
        cfg = load_config(cfg_path)
        setup_logging(cfg.gateway.log_level)
        rt = Runtime(cfg)
        try:
            await _run(rt)
        finally:
            await machine.stop()

    async def _run(rt: Runtime) -> None:
        async def show() -> None:
            await rt.running.wait()
            t0 = asyncio.get_running_loop().time()
            for _ in range(50):  # up to 1 s: the console's URL in the first screen, once it listens
                if rt.console_url is not None:
                    break
                await asyncio.sleep(0.02)
            while rt.running.is_set():
                print(render(rt, tty), flush=True)
                if duration and asyncio.get_running_loop().time() - t0 >= duration:
                    rt.stop()
                    return
                await asyncio.sleep(1.0)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(show(), name="demo-view")
            await rt.run(handle_signals=True)
        where = "a temporary directory, now removed (keep it with --dir)" if temporary else data_dir
        print(f"\nstopped; {rt.counters.stored} samples were stored in {where}", flush=True)

    asyncio.run(main())
