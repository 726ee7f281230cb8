"""Writer under libfiu (started by `fiu-run -x`): commits numbered units while write, pwrite
and fsync fail at random, and behaves as the daemon does (docs/reliability.md, "I/O errors"):

- a commit that raises StoreFull/StoreError is not acknowledged; the same unit is retried;
- a failed fsync (StoreFsyncFailed) ends the process with exit code 3, for systemd to restart
  it: after a failed fsync the page cache cannot be trusted (fsyncgate);
- "k" is printed only after its commit returned: acknowledged.

The failure points are enabled (through libfiu's C API, ctypes) only around store calls, so
the report on stdout is never what fails. argv: data_dir first_k seconds probability errno
points [--ack-failed]. With --ack-failed (the negative control) a failed commit is reported
as acknowledged anyway, and the parent must find the loss.
"""

import ctypes
import sys
import time

import numpy as np

from edgeos import Batch, TagMeta
from edgeos.errors import StoreError
from edgeos.store import StoreSettings, StoreWriter
from edgeos.store.writer import StoreFsyncFailed

data_dir, k, seconds, prob, err = (
    sys.argv[1],
    int(sys.argv[2]),
    float(sys.argv[3]),
    float(sys.argv[4]),
    int(sys.argv[5]),
)
points = sys.argv[6].split(",")
ack_failed = "--ack-failed" in sys.argv

fiu = ctypes.CDLL("libfiu.so.0")
fiu.fiu_enable_random.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_float]
fiu.fiu_disable.argtypes = [ctypes.c_char_p]
assert fiu.fiu_init(0) == 0


def faults(on: bool) -> None:
    for p in points:
        if on:
            fiu.fiu_enable_random(p.encode(), 1, ctypes.c_void_p(err), 0, prob)
        else:
            fiu.fiu_disable(p.encode())


tags = [TagMeta(i, "dev", f"t{i}") for i in range(10)]
settings = StoreSettings(time_resolution_ns=1, compact_min_samples=20_000, compact_slice_samples=20_000)
try:
    w = StoreWriter(data_dir, tags, settings)
except StoreError as e:
    print(f"open-failed {e}", flush=True)
    sys.exit(4)
print("ready", flush=True)
i = np.arange(1000)
end = time.monotonic() + seconds
failures = 0
while time.monotonic() < end:
    batch = Batch(
        "dev", (i % 10).astype(np.int32), k * 1000 + i, (k * 1000 + i).astype(float), np.zeros(1000, np.uint32)
    )
    faults(True)
    try:
        w.write([batch])
    except StoreFsyncFailed as e:
        faults(False)
        print(f"fsync-failed {e}", flush=True)
        sys.exit(3)
    except StoreError:
        faults(False)
        failures += 1
        if ack_failed:
            print(k, flush=True)
            k += 1
        time.sleep(0.002)
        continue
    faults(False)
    print(k, flush=True)
    k += 1
    if k % 7 == 0:  # housekeeping (compaction, checkpoints) under the same faults
        faults(True)
        try:
            w.maintain(now_ns=k * 1000)
        except StoreFsyncFailed as e:
            faults(False)
            print(f"fsync-failed {e}", flush=True)
            sys.exit(3)
        except StoreError:
            failures += 1
        faults(False)
print(f"failures {failures}", flush=True)
w.close()
print("closed", flush=True)
