"""Writer for the power-cut test: commits numbered units and reports each after its commit.

Like ingest_child.py (unit k: 1000 samples, values k*1000 + i), run under the power-cut shim.
argv: data_dir first_k [--sync-off] [--normal [--ack-on-commit]]. --sync-off (a negative
control) sets SQLite's synchronous=OFF: commits return without an fsync, so a power cut must
lose reported ones. --normal: synchronous=NORMAL (store.fsync_interval), a unit is reported
only once a flush() covered it ("durable"); with --ack-on-commit (its negative control) it is
reported when its commit returns, before any fsync.
"""

import sys

import numpy as np

from edgeos import Batch, TagMeta
from edgeos.store import StoreSettings, StoreWriter

data_dir, k = sys.argv[1], int(sys.argv[2])
tags = [TagMeta(i, "dev", f"t{i}") for i in range(10)]
normal = "--normal" in sys.argv
ack_on_commit = "--ack-on-commit" in sys.argv
settings = StoreSettings(
    time_resolution_ns=1,
    compact_min_samples=20_000,
    compact_slice_samples=20_000,
    fsync_interval_ns=50_000_000 if normal else 0,
)
w = StoreWriter(data_dir, tags, settings)
if "--sync-off" in sys.argv:
    w.db.execute("PRAGMA synchronous=OFF")
print("ready", flush=True)
i = np.arange(1000)
pending: list[int] = []
while True:
    batch = Batch(
        "dev", (i % 10).astype(np.int32), k * 1000 + i, (k * 1000 + i).astype(float), np.zeros(1000, np.uint32)
    )
    w.write([batch])
    if normal:
        pending.append(k)
        if ack_on_commit:
            print(k, flush=True)  # the negative control: before its fsync
        if k % 4 == 3:
            w.flush()  # fsync the WAL: every commit so far is durable
            if not ack_on_commit:
                print("\n".join(map(str, pending)), flush=True)
            pending.clear()
    else:
        print(k, flush=True)  # after the commit returned: under synchronous=FULL, durable
    k += 1
    if k % 5 == 0:
        w.maintain(now_ns=k * 1000)  # compactions and checkpoints get cut too
