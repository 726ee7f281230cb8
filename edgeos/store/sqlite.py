"""SQLite store: WAL, one row per stored unit. Blocking calls; the runtime runs them in one thread.

See docs/store.md for what "stored" means.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from edgeos.errors import StoreError
from edgeos.model import Batch, TagMeta
from edgeos.store import unit as unitcodec

SCHEMA_VERSION = 1
DB_NAME = "edgeos.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tags(
    id INTEGER PRIMARY KEY, device TEXT NOT NULL, name TEXT NOT NULL,
    kind TEXT NOT NULL, unit TEXT NOT NULL DEFAULT '', UNIQUE(device, name));
CREATE TABLE IF NOT EXISTS units(
    id INTEGER PRIMARY KEY, device TEXT NOT NULL, t_min INTEGER NOT NULL, t_max INTEGER NOT NULL,
    n INTEGER NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS units_device_time ON units(device, t_max);
"""


class Store:
    """One gateway's history. Not thread-safe: use from one thread at a time."""

    def __init__(self, data_dir: Path, tags: Sequence[TagMeta] = ()) -> None:
        self.path = Path(data_dir) / DB_NAME
        try:
            Path(data_dir).mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit survives power loss, not only a process crash (docs/store.md).
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            self.db.execute("INSERT OR IGNORE INTO meta VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot open store: {e}") from e
        self.lut = self._map_tags(tags)
        self.committed_samples = 0
        self.committed_units = 0

    def _map_tags(self, tags: Sequence[TagMeta]) -> np.ndarray:
        """runtime tag id -> store tag id, adding new tags; ids never change once given."""
        lut = np.full(max((t.id for t in tags), default=-1) + 1, -1, np.int32)
        with self.db:
            for t in tags:
                self.db.execute(
                    "INSERT INTO tags(device, name, kind, unit) VALUES(?,?,?,?) "
                    "ON CONFLICT(device, name) DO UPDATE SET kind=excluded.kind, unit=excluded.unit",
                    (t.device, t.name, t.kind.value, t.unit),
                )
                (sid,) = self.db.execute("SELECT id FROM tags WHERE device=? AND name=?", (t.device, t.name)).fetchone()
                lut[t.id] = sid
        return lut

    def write(self, batches: Sequence[Batch]) -> int:
        """Commit batches as one transaction, one unit per device; returns samples committed."""
        by_device: dict[str, list[Batch]] = {}
        for b in batches:
            if len(b):
                by_device.setdefault(b.device, []).append(b)
        rows = []
        total = 0
        for device, parts in by_device.items():
            b = Batch.concat(device, parts)
            data = unitcodec.encode(device, self.lut[b.tags], b.ts, b.values, b.quality, b.text)
            rows.append((device, int(b.ts.min()), int(b.ts.max()), len(b), data))
            total += len(b)
        if not rows:
            return 0
        try:
            with self.db:
                self.db.executemany("INSERT INTO units(device, t_min, t_max, n, data) VALUES(?,?,?,?,?)", rows)
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: write failed: {e}") from e
        self.committed_samples += total
        self.committed_units += len(rows)
        return total

    def tag_ids(self) -> dict[str, int]:
        return {f"{d}/{n}": i for i, d, n in self.db.execute("SELECT id, device, name FROM tags")}

    def units(self, device: str | None = None) -> Iterator[unitcodec.Unit]:
        sql = "SELECT data FROM units" + (" WHERE device=?" if device else "") + " ORDER BY id"
        for (data,) in self.db.execute(sql, (device,) if device else ()):
            yield unitcodec.decode(data)

    def history(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ts, values, quality) of one tag (`device/tag`), in stored order."""
        sid = self.tag_ids()[key]
        device = key.split("/", 1)[0]
        ts, vals, qs = [], [], []
        for u in self.units(device):
            m = u.tags == sid
            ts.append(u.ts[m])
            vals.append(u.values[m])
            qs.append(u.quality[m])
        if not ts:
            return np.empty(0, np.int64), np.empty(0), np.empty(0, np.uint32)
        return np.concatenate(ts), np.concatenate(vals), np.concatenate(qs)

    def count(self) -> int:
        (n,) = self.db.execute("SELECT COALESCE(SUM(n), 0) FROM units").fetchone()
        return int(n)

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass


def open_store(data_dir: str | os.PathLike[str], tags: Sequence[TagMeta] = ()) -> Store:
    return Store(Path(data_dir), tags)
