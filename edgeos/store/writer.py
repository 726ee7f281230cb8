"""The daemon's side of the store: one writer per data directory.

Blocking calls, made from the runtime's single store thread. The invariants they keep are
numbered in docs/store.md; the comments below cite them as (I1), (I2), ...
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeos import wire
from edgeos.errors import StoreError
from edgeos.model import Batch, TagMeta
from edgeos.store import schema
from edgeos.store.chunk import encode_chunk

log = logging.getLogger("edgeos.store")

DB_NAME = "edgeos.db"
LOCK_NAME = "edgeos.lock"
PAGE_SIZE = 16384
WAL_LIMIT = 64 * 1024 * 1024


class StoreFull(StoreError):
    """The disk refused a write (ENOSPC / SQLITE_FULL); retry when space returns."""


@dataclass
class StoreSettings:
    """What the writer needs from config (kept apart so tools can open a store without one)."""

    time_resolution_ns: int = 1_000_000
    retention_ns: int | None = None
    max_size: int | None = None
    compact_after_ns: int = 600_000_000_000
    compact_min_samples: int = 50_000
    chunk_samples: int = 1_000  # samples per tag a device's compaction waits for
    compact_slice_samples: int = 1_000_000
    compact_max_samples: int = 4_000_000  # bound on one compaction's memory and time
    keep_until_synced: bool = False


@dataclass
class StoreCounters:
    committed_samples: int = 0
    committed_units: int = 0
    compacted_samples: int = 0
    dropped_retention: int = 0
    dropped_budget: int = 0


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    else:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout=5000")
    return db


def _is_ours(path: Path) -> str | None:
    """None if `path` looks like an edgeos store (or is absent/empty), else why it does not."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    with path.open("rb") as f:
        head = f.read(100)
    if not head.startswith(schema.HEADER):
        return "not an SQLite database"
    if len(head) >= 72 and int.from_bytes(head[68:72], "big") not in (0, schema.APPLICATION_ID):
        return "an SQLite database of another application"
    return None


class StoreWriter:
    """Opens (creating, migrating or replacing a bad file as needed), writes, compacts, trims."""

    def __init__(
        self, data_dir: str | os.PathLike[str], tags: Sequence[TagMeta] = (), settings: StoreSettings | None = None
    ):
        self.dir = Path(data_dir)
        self.path = self.dir / DB_NAME
        self.settings = settings or StoreSettings()
        self.counters = StoreCounters()
        self._budget_episode = False
        self._tags_per_device: dict[str, int] = {}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{self.dir}: cannot create data directory: {e.strerror}") from e
        self._lock_fd = self._lock()
        try:
            self.db = self._open()
            self.lut = self._map_tags(tags)
        except BaseException:
            os.close(self._lock_fd)
            raise

    @contextlib.contextmanager
    def _txn(self) -> Iterator[None]:
        """One explicit transaction. (The connection is in autocommit mode, where `with db:`
        would commit each statement on its own: not atomic, and one fsync per row.)"""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- opening --------------------------------------------------------------------------

    def _lock(self) -> int:
        """(I8) One writer per data directory: a second daemon is refused, never interleaved."""
        path = self.dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreError(
                f"{self.dir} is in use by another edgeos process (pid {other}); "
                "two daemons must not share a data directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _open(self) -> sqlite3.Connection:
        why = _is_ours(self.path)
        if why is None:
            try:
                db = _connect(self.path)
                found = schema.version(db)
                if found is not None and found > schema.SCHEMA_VERSION:
                    db.close()
                    raise StoreError(
                        f"{self.path}: schema version {found} was written by a newer edgeos; this edgeos reads "
                        f"up to {schema.SCHEMA_VERSION}. Upgrade edgeos, or move the data directory aside."
                    )
                if found == -1:
                    why = "an SQLite database without edgeos tables"
                elif self._needs_check(db, found) and (res := db.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
                    why = f"integrity check failed after an unclean shutdown: {res}"
                if why is None:
                    self._configure(db, found)
                    return db
                db.close()
            except sqlite3.DatabaseError as e:
                why = f"unreadable: {e}"
        moved = self._move_aside(why)
        log.error("store %s is %s; moved it to %s (kept, never deleted) and started a new store", self.path, why, moved)
        db = _connect(self.path)
        self._configure(db, None)
        return db

    def _needs_check(self, db: sqlite3.Connection, found: int | None) -> bool:
        if found is None:
            return False
        row = db.execute("SELECT value FROM meta WHERE key='clean_shutdown'").fetchone()
        return row is None or row[0] != "1"

    def _configure(self, db: sqlite3.Connection, found: int | None) -> None:
        if found is None:
            db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        db.execute("PRAGMA journal_mode=WAL")
        # (I3) FULL: the WAL is fsynced at every commit, so a commit survives a power cut too.
        db.execute("PRAGMA synchronous=FULL")
        # The WAL counts against max_size: keep it to a tenth of the budget.
        wal_limit = WAL_LIMIT if not self.settings.max_size else min(WAL_LIMIT, self.settings.max_size // 10)
        db.execute(f"PRAGMA wal_autocheckpoint={max(16, wal_limit // PAGE_SIZE)}")
        db.execute(f"PRAGMA journal_size_limit={wal_limit}")
        if found is None:
            schema.create(db)
        elif found < schema.SCHEMA_VERSION:
            log.warning("store %s: migrating schema %d -> %d", self.path, found, schema.SCHEMA_VERSION)
            schema.migrate(db, found)
        db.execute("INSERT OR REPLACE INTO meta VALUES('clean_shutdown', '0')")

    def _move_aside(self, why: str) -> Path:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.path.with_name(f"{DB_NAME}.bad-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                src.rename(Path(str(target) + suffix))
        return target

    def _map_tags(self, tags: Sequence[TagMeta]) -> np.ndarray:
        """Runtime tag id -> store tag id; store ids are given once and never change."""
        lut = np.full(max((t.id for t in tags), default=-1) + 1, -1, np.int32)
        with self._txn():
            for t in tags:
                self.db.execute(
                    "INSERT INTO tags(device, name, kind, unit) VALUES(?,?,?,?) "
                    "ON CONFLICT(device, name) DO UPDATE SET kind=excluded.kind, unit=excluded.unit",
                    (t.device, t.name, t.kind.value, t.unit),
                )
                (sid,) = self.db.execute("SELECT id FROM tags WHERE device=? AND name=?", (t.device, t.name)).fetchone()
                lut[t.id] = sid
        return lut

    # -- writing --------------------------------------------------------------------------

    def encode(self, batches: Sequence[Batch]) -> list[tuple[str, int, int, int, bytes]]:
        """Batches -> unit rows, one per device. Timestamps are rounded to the store's resolution."""
        by_device: dict[str, list[Batch]] = {}
        for b in batches:
            if len(b):
                by_device.setdefault(b.device, []).append(b)
        res = self.settings.time_resolution_ns
        rows = []
        for device, parts in by_device.items():
            b = Batch.concat(device, parts)
            ts = b.ts if res == 1 else (b.ts + res // 2) // res * res
            text = None if b.text is None else b.text.tolist()
            data = wire.encode_unit(device, self.lut[b.tags], ts, b.values, b.quality, text)
            rows.append((device, int(ts.min()), int(ts.max()), len(b), data))
        return rows

    def write(self, batches: Sequence[Batch]) -> int:
        """(I1) Commit the batches as one transaction; returns the samples now stored."""
        rows = self.encode(batches)
        if not rows:
            return 0
        try:
            with self._txn():
                self.db.executemany("INSERT INTO units(device, t_min, t_max, n, data) VALUES(?,?,?,?,?)", rows)
        except sqlite3.Error as e:
            raise self._error("write", e) from e
        n = sum(r[3] for r in rows)
        self.counters.committed_samples += n
        self.counters.committed_units += len(rows)
        return n

    def _error(self, what: str, e: sqlite3.Error) -> StoreError:
        code = getattr(e, "sqlite_errorcode", 0) & 0xFF
        if code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
            return StoreFull(f"{self.path}: {what} failed, disk full or failing: {e}")
        return StoreError(f"{self.path}: {what} failed: {e}")

    # -- maintenance ----------------------------------------------------------------------

    def maintain(self, now_ns: int | None = None, *, compact_all: bool = False, sync_cursor: int | None = None) -> None:
        """One bounded round of housekeeping: the sync cursor, a compaction slice, retention,
        the size budget."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        try:
            if sync_cursor is not None:
                self.save_cursor(sync_cursor)
            while self.compact(now_ns, force=compact_all) and compact_all:
                pass  # compact_all: every device, every slice (tools and tests)
            self.trim(now_ns)
        except sqlite3.Error as e:
            raise self._error("maintenance", e) from e

    def compact(self, now_ns: int, *, force: bool = False) -> int:
        """Turn one device's oldest hot units into per-tag chunks.

        A device is due when about `chunk_samples` samples per tag wait (big chunks compress
        well and amortise the per-chunk cost) or its oldest unit waited `compact_after`; one
        device and one bounded slice per call keep commits flowing. (I5) Chunks are inserted
        and their units retired in one transaction: a query never sees both or neither.
        """
        s = self.settings
        due = None
        rows = self.db.execute(
            "SELECT device, SUM(n), MIN(t_max), MIN(id) FROM units WHERE compacted=0 GROUP BY device ORDER BY MIN(id)"
        ).fetchall()
        for device, waiting, oldest, _ in rows:
            want = max(s.compact_min_samples, s.chunk_samples * self._tag_count(device))
            if force or waiting >= want or oldest <= now_ns - s.compact_after_ns:
                due = (device, min(max(want, s.compact_slice_samples), s.compact_max_samples))
                break
        if due is None:
            return 0
        device, limit = due
        ids, blobs, total = [], [], 0
        for uid, n, data in self.db.execute(
            "SELECT id, n, data FROM units WHERE compacted=0 AND device=? ORDER BY id", (device,)
        ):
            ids.append(uid)
            blobs.append(data)
            total += n
            if total >= limit:
                break
        units = [wire.decode_unit(b) for b in blobs]
        tags = np.concatenate([u.tags for u in units])
        ts = np.concatenate([u.ts for u in units])
        values = np.concatenate([u.values for u in units])
        quality = np.concatenate([u.quality for u in units])
        text = None
        if any(u.text is not None for u in units):
            text = np.array([t for u in units for t in (u.text or [None] * len(u))], dtype=object)
        order = np.argsort(tags, kind="stable")
        tags, ts, values, quality = tags[order], ts[order], values[order], quality[order]
        if text is not None:
            text = text[order]
        starts = np.flatnonzero(np.r_[True, tags[1:] != tags[:-1]])
        ends = np.r_[starts[1:], len(tags)]
        rows = []
        res = s.time_resolution_ns
        # Units written under another resolution (or by an older edgeos) keep full precision.
        mixed = res > 1 and bool((ts % res).any())
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            t = ts[a:b]
            res_here = 1 if res == 1 or (mixed and (t % res).any()) else res
            txt = None if text is None else text[a:b].tolist()
            blob = encode_chunk(t, values[a:b], quality[a:b], txt, resolution=res_here)
            rows.append((int(tags[a]), int(t.min()), int(t.max()), b - a, blob))
        with self._txn():
            self.db.executemany("INSERT INTO chunks(tag, t_min, t_max, n, data) VALUES(?,?,?,?,?)", rows)
            marks = [(i,) for i in ids]
            if s.keep_until_synced:
                self.db.executemany("UPDATE units SET compacted=1 WHERE id=?", marks)
            else:
                self.db.executemany("DELETE FROM units WHERE id=?", marks)
        self.counters.compacted_samples += total
        return total

    def _tag_count(self, device: str) -> int:
        n = self._tags_per_device.get(device)
        if n is None:
            n = self.db.execute("SELECT COUNT(*) FROM tags WHERE device=?", (device,)).fetchone()[0] or 1
            self._tags_per_device[device] = n
        return n

    def save_cursor(self, cursor: int) -> None:
        """Persist the sync cursor; compacted units at or below it are no longer needed hot."""
        with self._txn():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES('sync_cursor', ?)", (str(cursor),))
            self.db.execute("DELETE FROM units WHERE compacted=1 AND id<=?", (cursor,))

    def used_bytes(self) -> int:
        """Live bytes: database pages in use plus the WAL. Free pages are reused before the file grows."""
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        size = self.db.execute("PRAGMA page_size").fetchone()[0]
        try:
            wal = os.path.getsize(str(self.path) + "-wal")
        except OSError:
            wal = 0
        return (pages - free) * size + wal

    def trim(self, now_ns: int) -> None:
        """(I6) Retention by age, then the size budget; oldest first, in whole units and chunks."""
        s = self.settings
        if s.retention_ns:
            cutoff = now_ns - s.retention_ns
            n = self._drop("t_max < ?", (cutoff,))
            if n:
                self.counters.dropped_retention += n
                log.info("retention: dropped %d samples older than %s", n, _iso(cutoff))
        if not s.max_size:
            return
        target = int(s.max_size * 0.85)
        over = self.used_bytes() > s.max_size
        if over:
            # A WAL not yet folded back is not data to drop for: checkpoint, then measure again.
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            over = self.used_bytes() > s.max_size
        if not over:
            if self._budget_episode:
                log.warning("store back under its %d-byte budget", s.max_size)
            self._budget_episode = False
            return
        dropped = 0
        for _ in range(1000):
            if self.used_bytes() <= target:
                break
            n = self._drop_oldest()
            if not n:
                break
            dropped += n
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.counters.dropped_budget += dropped
        if dropped and not self._budget_episode:
            log.warning(
                "store reached its %d-byte budget: dropping the oldest data (%d samples so far this episode; "
                "counted in dropped_budget)",
                s.max_size,
                dropped,
            )
        self._budget_episode = True

    def _sum(self, source: str, args: tuple) -> int:
        return int(self.db.execute(f"SELECT COALESCE(SUM(n), 0) FROM {source}", args).fetchone()[0])

    def _drop(self, where: str, args: tuple) -> int:
        with self._txn():
            n = self._sum(f"chunks WHERE {where}", args)
            n += self._sum(f"units WHERE compacted=0 AND {where}", args)
            self.db.execute(f"DELETE FROM chunks WHERE {where}", args)
            self.db.execute(f"DELETE FROM units WHERE {where}", args)
        return int(n)

    def _drop_oldest(self) -> int:
        """Drop the oldest 5% of chunks (at least one), or the oldest hot units when none remain."""
        count = self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        if count:
            limit = max(1, count // 20)
            sql = "SELECT t_max FROM chunks ORDER BY t_max LIMIT 1 OFFSET ?"
            (cut,) = self.db.execute(sql, (limit - 1,)).fetchone()
            with self._txn():
                n = self._sum("chunks WHERE t_max <= ?", (cut,))
                self.db.execute("DELETE FROM chunks WHERE t_max <= ?", (cut,))
            return int(n)
        rows = self.db.execute("SELECT id, n FROM units ORDER BY id LIMIT 64").fetchall()
        if not rows:
            return 0
        with self._txn():
            self.db.execute("DELETE FROM units WHERE id <= ?", (rows[-1][0],))
        return sum(n for _, n in rows)

    # -- closing --------------------------------------------------------------------------

    def close(self) -> None:
        """Mark a clean shutdown (so the next start skips the integrity check) and release the lock."""
        try:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES('clean_shutdown', '1')")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.db.close()
        except sqlite3.Error as e:
            log.warning("store %s: close: %s", self.path, e)
        finally:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1


def _iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
