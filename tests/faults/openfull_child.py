"""Opens an existing store on a real full tmpfs (see test_store_open_errors): must refuse, not quarantine."""

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from edgeos import Batch, TagMeta
from edgeos.errors import StoreError
from edgeos.store import StoreReader, StoreWriter

mount = Path(sys.argv[1])
data = mount / "data"
tags = [TagMeta(i, "dev", f"t{i}") for i in range(10)]
w = StoreWriter(data, tags)
for k in range(20):
    i = np.arange(1000)
    w.write([Batch("dev", (i % 10).astype(np.int32), k * 1000 + i, i.astype(float), np.zeros(1000, np.uint32))])
w.close()
before = hashlib.sha256((data / "edgeos.db").read_bytes()).hexdigest()
top = 20
# Fill the file system to the last byte.
fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
for size in (65536, 4096, 1):
    try:
        while True:
            os.write(fd, b"\0" * size)
    except OSError:
        pass
os.close(fd)
result = {}
try:
    StoreWriter(data, tags).close()
    result["opened"] = True
except StoreError as e:
    result["error"] = str(e)
except Exception as e:  # noqa: BLE001 - reported to the test, which expects a StoreError
    result["error_type"] = f"{type(e).__name__}: {e}"
result["moved"] = sorted(p.name for p in data.glob("edgeos.db.bad-*"))
result["unchanged"] = hashlib.sha256((data / "edgeos.db").read_bytes()).hexdigest() == before
(mount / "filler").unlink()  # space returns: the same store opens, ids continue
w = StoreWriter(data, tags)
i = np.arange(10)
w.write([Batch("dev", i.astype(np.int32), 10**9 + i, i.astype(float), np.zeros(10, np.uint32))])
result["next_id"] = w.db.execute("SELECT MAX(id) FROM units").fetchone()[0]
w.close()
with StoreReader(data) as r:
    result["count"] = r.count()
print(json.dumps(result), flush=True)
