"""ops.reload_gap_ms: the largest poll gap of an untouched device across 10 reloads.

A daemon (store on, in a temporary directory) polls `steady` every 100 ms beside a device that
each reload adds or removes (with `extra_tags` tags, some with filters), the reload asked for
through the control socket as `edgeos reload` does. The gap is read back from the store: the
largest interval between two stored samples of `steady` from the first reload to the last.
Target: under two poll intervals (200 ms). Called by bench_ops.py; `python bench/ops_reload.py`
runs it alone.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

POLL_MS = 100
RELOADS = 10

HEAD = f"""
[gateway]
id = "bench"
data_dir = "data"
shutdown_timeout = "10s"

[http]
port = 0  # the endpoint on, as by default, on any free port

[[devices]]
name = "steady"
protocol = "simulated"
poll_interval = "{POLL_MS}ms"
tags = [{{ name = "a", signal = "ramp" }}]
"""


def _extra(n_tags: int, generation: int) -> str:
    rows = []
    for i in range(n_tags):
        filt = ', filters = [{ type = "deadband", abs = 0.5 }]' if i % 2 else ""
        rows.append(f'  {{ name = "t{i}", signal = "sine", period = "{10 + generation}s"{filt} }},')
    body = "\n".join(rows)
    return f"""
[[devices]]
name = "extra"
protocol = "simulated"
poll_interval = "250ms"
tags = [
{body}
]
"""


async def _measure(directory: Path, extra_tags: int, pause: float) -> tuple[float, float, int]:
    from edgeos.config import load_config
    from edgeos.runtime import Runtime
    from edgeos.service import control
    from edgeos.store import StoreReader

    path = directory / "edgeos.toml"
    path.write_text(HEAD)
    rt = Runtime(load_config(path))
    gc.freeze()  # as `edgeos run` does
    task = asyncio.create_task(rt.run())
    durations = []
    try:
        await asyncio.wait_for(rt.running.wait(), 30)
        await asyncio.sleep(1.0)
        first = time.time_ns()
        for k in range(RELOADS):
            path.write_text(HEAD + (_extra(extra_tags, k) if k % 2 == 0 else ""))
            t0 = time.perf_counter()
            reply = await control.request(rt.config.gateway.data_dir, {"op": "reload"}, within=60)
            durations.append(time.perf_counter() - t0)
            if not reply or not reply.get("ok"):
                raise RuntimeError(f"reload {k} failed: {reply}")
            await asyncio.sleep(pause)
        last = time.time_ns()
    finally:
        rt.stop()
        await asyncio.wait_for(task, 60)
    with StoreReader(rt.config.gateway.data_dir) as store:
        ts = store.history("steady/a").ts
    # From the sample before the first reload to the one after the last.
    lo = max(0, int(np.searchsorted(ts, first)) - 1)
    hi = min(len(ts), int(np.searchsorted(ts, last)) + 1)
    window = ts[lo:hi]
    gap_ms = float(np.diff(window).max() / 1e6) if len(window) > 1 else float("nan")
    return gap_ms, float(np.median(durations) * 1e3), len(window)


def run(quick: bool) -> Iterator[tuple[str, float, str]]:
    extra_tags, pause = (100, 0.3) if quick else (1000, 1.0)
    with tempfile.TemporaryDirectory(prefix="edgeos-bench-reload-") as tmp:
        gap_ms, reload_ms, n = asyncio.run(_measure(Path(tmp), extra_tags, pause))
    yield "reload_gap_ms", gap_ms, f"ms (largest gap of a {POLL_MS} ms poll over {RELOADS} reloads; target < 200)"
    yield "reload_ms", reload_ms, f"ms (median time of one reload adding or removing {extra_tags} tags)"


if __name__ == "__main__":
    for name, value, unit in run("--quick" in sys.argv):
        print(f"ops.{name}: {value:.4g} {unit}")
