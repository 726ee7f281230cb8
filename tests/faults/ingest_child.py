"""Writer process for the crash test: commits numbered units and reports each after its commit.

Unit k holds 1000 samples over 10 tags with values k*1000 + i, so a reader can tell exactly
which units are present and whether any is partial or duplicated.
"""

import sys

import numpy as np

from edgeos import Batch, TagMeta
from edgeos.store import StoreSettings, StoreWriter

data_dir, k = sys.argv[1], int(sys.argv[2])
fsync_ns = int(sys.argv[3]) if len(sys.argv) > 3 else 0  # > 0: synchronous=NORMAL, flush() on a timer
tags = [TagMeta(i, "dev", f"t{i}") for i in range(10)]
settings = StoreSettings(
    time_resolution_ns=1, compact_min_samples=20_000, compact_slice_samples=20_000, fsync_interval_ns=fsync_ns
)
w = StoreWriter(data_dir, tags, settings)
print("ready", flush=True)
i = np.arange(1000)
while True:
    batch = Batch(
        "dev", (i % 10).astype(np.int32), k * 1000 + i, (k * 1000 + i).astype(float), np.zeros(1000, np.uint32)
    )
    w.write([batch])
    print(k, flush=True)  # only after the commit returned: "reported as committed"
    k += 1
    if k % 5 == 0:
        w.maintain(now_ns=k * 1000)  # compactions too get killed mid-way
    if fsync_ns and k % 7 == 0:
        w.flush()  # a kill needs no fsync to keep a commit; the flushes get killed mid-way too
