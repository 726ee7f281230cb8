"""The local durable store: every sample the gateway reads, kept on the gateway.

docs/store.md states what "stored" means and what a crash can lose. OEMs read history with
`StoreReader(data_dir).history("device/tag", since_ns, until_ns)` (numpy columns).
"""

from edgeos.store.reader import History, StoreReader, TagInfo, aggregate
from edgeos.store.writer import (
    StoreCorrupt,
    StoreCounters,
    StoreFsyncFailed,
    StoreFull,
    StoreSettings,
    StoreWriter,
    default_max_size,
    estimate_write_bytes_per_day,
)

__all__ = [
    "History",
    "StoreCorrupt",
    "StoreCounters",
    "StoreFsyncFailed",
    "StoreFull",
    "StoreReader",
    "StoreSettings",
    "StoreWriter",
    "TagInfo",
    "aggregate",
    "default_max_size",
    "estimate_write_bytes_per_day",
]
