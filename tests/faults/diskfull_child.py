"""Runs the daemon on a tiny file system until it is full, then frees space (see test_disk_full)."""

import asyncio
import json
import os
import sqlite3
import sys
from pathlib import Path

from edgeos.config import load_config
from edgeos.runtime import Runtime

mount = Path(sys.argv[1])
data = mount / "data"
data.mkdir()
filler = mount / "filler"
# Leave about 2 MiB for the store.
free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
with filler.open("wb") as f:
    f.write(b"\0" * max(0, free - 2 * 1024 * 1024))
cfg_path = mount / "edgeos.toml"
cfg_path.write_text(
    f"""
[gateway]
id = "g"
data_dir = "{data}"
[store]
memory_buffer = "1MiB"
[[devices]]
name = "m"
protocol = "simulated"
poll_interval = "10ms"
tags_csv = "tags.csv"
"""
)
(mount / "tags.csv").write_text("name,signal,noise\n" + "".join(f"t{i},random_walk,1.0\n" for i in range(200)))


async def main() -> dict:
    rt = Runtime(load_config(cfg_path))
    task = asyncio.create_task(rt.run())
    c = rt.counters
    async with asyncio.timeout(60):
        while not (c.store_errors and c.dropped_store_unavailable):
            await asyncio.sleep(0.05)
        full_errors, full_dropped = c.store_errors, c.dropped_store_unavailable
        running = rt.devices["m"].state == "running"
        filler.unlink()  # space returns
        stored_at_return = c.stored
        while c.stored < stored_at_return + 20_000:
            await asyncio.sleep(0.05)
        errors_after = c.store_errors
        await asyncio.sleep(0.5)
    rt.stop()
    await task
    db = sqlite3.connect(data / "edgeos.db")
    integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    db.close()
    from edgeos.store import StoreReader

    with StoreReader(data) as r:
        count = r.count()
    return {
        "read": c.read,
        "stored": c.stored,
        "dropped": c.dropped_store_unavailable,
        "dropped_when_full": full_dropped,
        "errors_when_full": full_errors,
        "errors_after_recovery": c.store_errors - errors_after,
        "running_while_full": running,
        "integrity": integrity,
        "count": count,
    }


print(json.dumps(asyncio.run(main())), flush=True)
