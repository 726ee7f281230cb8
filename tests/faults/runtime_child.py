"""The daemon on a tiny file system with one-sample batches: the disk fills, memory must stay
within memory_buffer in real bytes, the status must stay fresh, and a stop while the disk still
refuses writes must account for every sample read (see test_runtime_faults)."""

import asyncio
import gc
import json
import logging
import os
import sys
from pathlib import Path

from edgeos.config import load_config
from edgeos.logs import setup
from edgeos.model import Batch
from edgeos.runtime import Runtime
from edgeos.service.status import read_status

mount = Path(sys.argv[1])
run_dir = Path(sys.argv[2])  # not on the full file system
data = mount / "data"
data.mkdir()
filler = mount / "filler"
free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
with filler.open("wb") as f:
    f.write(b"\0" * max(0, free - 1024 * 1024))
cfg_path = mount / "edgeos.toml"
devices = "".join(
    f"""
[[devices]]
name = "m{i}"
protocol = "simulated"
poll_interval = "1ms"
tags = [{{ name = "t", signal = "random_walk" }}]
"""
    for i in range(12)
)
cfg_path.write_text(
    f"""
[gateway]
id = "g"
data_dir = "{data}"
run_dir = "{run_dir}"
shutdown_timeout = "1s"
[store]
memory_buffer = "1MiB"
{devices}
"""
)
setup("info")
logging.getLogger("edgeos.device").setLevel(logging.ERROR)


def batches_alive() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is Batch)


async def main() -> dict:
    rt = Runtime(load_config(cfg_path))
    task = asyncio.create_task(rt.run())
    c = rt.counters
    async with asyncio.timeout(90):
        while not (c.store_errors and c.dropped_store_unavailable):
            await asyncio.sleep(0.05)
        # Keep the disk full while some 60,000 more one-sample batches arrive: the old
        # 24-bytes-a-sample count would hold 43,690 of them (about 26 MB for a 1 MiB budget).
        start = c.read
        ages = []
        held = 0
        while c.read < start + 60_000:
            await asyncio.sleep(0.5)
            doc, age = read_status(data, run_dir)
            ages.append(age if doc else 1e9)
            # The most alive at any moment, garbage not yet collected included: a failed
            # commit's batches kept by a reference cycle doubled the buffer until a collection.
            held = max(held, batches_alive())
    rt.stop()  # while the disk still refuses writes: shutdown_timeout runs out
    await task
    return {
        "read": c.read,
        "stored": c.stored,
        "filtered_out": c.filtered_out,
        "dropped": c.dropped_store_unavailable,
        "dropped_at_stop": c.dropped_at_stop,
        "store_errors": c.store_errors,
        "batches_held": held,
        "status_ages": ages,
        "final_status": read_status(data, run_dir)[0],
    }


print(json.dumps(asyncio.run(main())), flush=True)
