"""The runtime end to end on simulated devices: poll -> pipeline -> store commit.

Load: 10 devices x 1,000 tags at 100 ms (100,000 samples/s offered), the same shape as the
Modbus benchmark, so later figures can be read against the runtime's own cost.
Figures: samples/s stored, the ratio to the offered load, CPU % of one core for the whole
process (store thread included), and poll-cycle lateness p50/p99.
"""

from __future__ import annotations

import asyncio
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeos.config import load_config
from edgeos.runtime import Runtime

DEVICES, TAGS, INTERVAL_MS = 10, 1000, 100


def _config(tmp: Path) -> Path:
    (tmp / "tags.csv").write_text(
        "name,signal,resolution\n"
        + "".join(f"t{i},{('sine', 'random_walk', 'ramp', 'bool')[i % 4]},0.01\n" for i in range(TAGS))
    )
    devices = "".join(
        f'[[devices]]\nname = "d{d}"\nprotocol = "simulated"\npoll_interval = "{INTERVAL_MS}ms"\n'
        f'seed = {d}\ntags_csv = "tags.csv"\n'
        for d in range(DEVICES)
    )
    p = tmp / "edgeos.toml"
    p.write_text(f'[gateway]\nid = "bench"\ndata_dir = "data"\n{devices}')
    return p


def run(quick: bool):
    seconds = 5.0 if quick else 20.0
    with tempfile.TemporaryDirectory(prefix="edgeos-bench-") as tmp:
        cfg = load_config(_config(Path(tmp)))
        rt = Runtime(cfg)

        async def main() -> tuple[float, float, int]:
            task = asyncio.create_task(rt.run())
            await rt.running.wait()
            await asyncio.sleep(1.0)  # warm-up: first ticks, tag tables, store pages
            s0, c0, t0 = rt.counters.stored, resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            await asyncio.sleep(seconds)
            s1, c1, t1 = rt.counters.stored, resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            rt.stop()
            await task
            cpu = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
            return (s1 - s0) / (t1 - t0), 100 * cpu / (t1 - t0), rt.counters.stored

        rate, cpu, _ = asyncio.run(main())
        late = np.concatenate(
            [np.array(s.lateness_ns, float) for d in rt.devices.values() for s in d.adapter.stats.values()]
        )
    offered = DEVICES * TAGS * 1000 / INTERVAL_MS
    yield "samples_per_s", rate, "samples/s"
    yield "delivered_vs_offered", rate / offered, "ratio"
    yield "cpu_pct", cpu, "% of one core"
    yield "p50_lateness_ms", float(np.percentile(late, 50)) / 1e6, "ms"
    yield "p99_lateness_ms", float(np.percentile(late, 99)) / 1e6, "ms"
