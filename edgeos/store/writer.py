"""The daemon's side of the store: one writer per data directory.

Blocking calls, made from the runtime's single store thread. The invariants they keep are
numbered in docs/store.md; the comments below cite them as (I1), (I2), ...
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import itertools
import json
import logging
import math
import os
import shutil
import sqlite3
import threading
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
from edgeos.store.wal import check as check_wal

log = logging.getLogger("edgeos.store")

DB_NAME = "edgeos.db"
LOCK_NAME = "edgeos.lock"
SEQ_NAME = "edgeos.seq"
TAGS_NAME = "edgeos.tags"  # (I16) a copy of the tags table, so a new store keeps the tag ids
PAGE_SIZE = 1024  # new stores; a commit writes whole pages, so small pages write less
WAL_LIMIT = 64 * 1024 * 1024
FILE_MODE = 0o640  # (I17) the service user writes; its group (operators) may read
DIR_MODE = 0o750
# (I14) Unit ids never exceed the bound reserved in edgeos.seq; raised by SEQ_RESERVE when the
# ids come within SEQ_MARGIN of it, so the sidecar is written about once per million units.
SEQ_RESERVE = 1_000_000
SEQ_MARGIN = 10_000
# (I15) Bounds on one unit (one upstream message at most): samples, and encoded bytes.
MAX_UNIT_SAMPLES = 10_000
MAX_UNIT_BYTES = 128 * 1024
# (I19) The sync cursor is written at most this often while it moves (and at every stop): a
# crash re-sends at most this much, which the consumer's sequence check drops as duplicates.
CURSOR_SAVE_S = 10.0
MAX_DROP_STEPS = 200  # budget drops per maintenance round (each about 5% of what is left)
_CORRUPT = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


DEFAULT_SHARE = 0.25  # of the file system holding the data directory
DEFAULT_FLOOR = 64 * 1024 * 1024


def default_max_size(data_dir: str | os.PathLike[str]) -> tuple[int, str]:
    """(I6) The size budget when `store.max_size` is not set: a quarter of the file system the
    data directory is on, at least 64 MiB, so a store left to itself never fills the gateway's
    disk (the system, its logs and updates share it). Returns (bytes, how it was reckoned)."""
    probe = Path(data_dir).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return DEFAULT_FLOOR, "64 MiB (the file system could not be measured)"
    total = st.f_blocks * st.f_frsize
    size = max(DEFAULT_FLOOR, int(total * DEFAULT_SHARE))
    return size, f"a quarter of the {total / 2**30:.1f} GiB file system at {probe}, at least 64 MiB"


def estimate_write_bytes_per_day(
    samples_per_s: float, cycles_per_s: float, commit_interval_s: float, fsync_interval_s: float = 0.0
) -> float:
    """(I19) What the store will write to the disk a day, from the load (docs/store.md, "Writes
    to the disk"): one commit per poll cycle (group commit), at most one per `commit_interval`
    when set; a commit appends its WAL frames (the unit's pages, about 3 bytes a sample for
    register-like values, plus page 1 / the freelist of a multi-page unit). The kernel counts
    4 KiB pages dirtied: a page written again after an fsync counts again, so each fsync costs
    about one page more than the frames it covers (every commit, or every `fsync_interval`).
    Compaction and checkpoints add about 4 bytes a sample. Calibrated on this project's
    machine within about 30%; plain float noise makes units about three times larger."""
    if samples_per_s <= 0 or cycles_per_s <= 0:
        return 0.0
    commits = cycles_per_s if commit_interval_s <= 0 else min(cycles_per_s, 1.0 / commit_interval_s)
    unit = 100 + 3 * samples_per_s / commits
    frames = 1 + (math.ceil((unit - 900) / 1020) + 1 if unit > 900 else 0)
    fsyncs = commits if fsync_interval_s <= 0 else min(commits, 1.0 / fsync_interval_s)
    per_s = fsyncs * 4096 + commits * frames * (PAGE_SIZE + 24)
    return (per_s + 4 * samples_per_s) * 86_400


class StoreFull(StoreError):
    """The disk refused a write (ENOSPC / SQLITE_FULL); retry when space returns."""


def fsync_failed(e: BaseException) -> bool:
    """(issue 28) True for an fsync that SQLite itself did and that failed (IOERR_FSYNC,
    IOERR_DIR_FSYNC: a commit under synchronous=FULL, a checkpoint): the same verdict as a failed
    flush() (StoreFsyncFailed, docs/reliability.md), never a retry in this process."""
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code in (sqlite3.SQLITE_IOERR_FSYNC, sqlite3.SQLITE_IOERR_DIR_FSYNC)
    return isinstance(e, StoreFsyncFailed)


class StoreCorrupt(StoreError):
    """SQLite found the open database damaged (SQLITE_CORRUPT / NOTADB): call `recover()`."""


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
    # (I20) Forwarded units stay replayable (kept raw, compacted=1) until their newest sample
    # is this old; within the size budget, which drops raw copies first (I6).
    replay_window_ns: int = 0
    # (I19) Version-3 units (deflated columns): a third of the bytes a commit writes, and of
    # what goes upstream. False writes version 2, for consumers whose edgeos.wire predates 3.
    compress_units: bool = True
    # (I3) 0: SQLite fsyncs the WAL at every commit (synchronous=FULL). Otherwise commits are
    # written without an fsync (synchronous=NORMAL: they survive a kill, not a power cut) and
    # the owner calls flush() at most this often; only then do they count as durable.
    fsync_interval_ns: int = 0


class StoreFsyncFailed(StoreError):
    """fsync of the WAL failed: what the page cache holds can no longer be trusted to reach the
    disk (PostgreSQL's "fsyncgate"); the process must stop and start again (docs/store.md I3)."""


@dataclass
class StoreCounters:
    committed_samples: int = 0
    committed_units: int = 0
    compacted_samples: int = 0
    dropped_retention: int = 0
    dropped_budget: int = 0
    dropped_unsent: int = 0  # samples upstream will never get (raw copies or hot units dropped unsent)
    quarantined_units: int = 0
    quarantined_samples: int = 0
    written_bytes: int = 0  # (I19) what the store's thread wrote to the disk (write_bytes of /proc)
    durable_samples: int = 0  # (I3) committed and fsynced: survive a power cut
    fsyncs: int = 0


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    else:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout=5000")
    return db


def _is_corruption(e: BaseException) -> bool:
    return isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorcode", 0) & 0xFF in _CORRUPT


def _create_file(path: Path, mode: int = FILE_MODE) -> None:
    """Create `path` empty with `mode` if absent (SQLite then gives -wal/-shm the same mode)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))


def _tighten(path: Path) -> None:
    """Files of an older edgeos were created 0644: take others' access and group write away."""
    with contextlib.suppress(OSError):
        st = path.stat()
        if st.st_mode & 0o037 and st.st_uid == os.geteuid():
            os.chmod(path, st.st_mode & 0o7740)


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
        self.seq_path = self.dir / SEQ_NAME
        self.tags_path = self.dir / TAGS_NAME
        self.settings = settings or StoreSettings()
        self.counters = StoreCounters()
        self.generation = 0  # +1 at each recover(): readers of the old file must reopen
        self._tags = list(tags)
        self._budget_episode = False
        self._stale_logged = False
        self._corrupt = False  # SQLite reported damage: never mark this file clean
        self._broken = False  # a recover() failed half-way: refuse work until one succeeds
        self._bad_logged = 0
        self._tags_per_device: dict[str, int] = {}
        self._max_id = 0  # highest unit id given so far
        self._top_saved = 0  # meta.top_id: the highest id, kept when the newest units are deleted
        self._hot_from = 0  # meta.hot_from: every hot (uncompacted) unit has an id at or above it
        self._reserved = 0  # (I14) the bound in edgeos.seq
        self._cursor = 0  # the sync cursor last known: units above it were never forwarded
        self._cursor_saved = 0  # the one in meta.sync_cursor (at most CURSOR_SAVE_S behind)
        self._cursor_saved_at = 0  # now_ns of maintain() when it was last written
        self._seq_warned = False
        self._undurable = 0  # (I3) samples committed since the last flush()
        self.durable_id = 0  # the highest unit id known to survive a power cut
        self._fsync_failed = False  # (I3) a failed fsync: refuse further work, never mark clean
        self._power_cut = False  # set by _open: the last run stopped uncleanly and the machine rebooted
        self._wal_damaged = False  # set by _open: committed transactions a damaged WAL hid (store/wal.py)
        self._io_thread = -1  # (I19) the thread whose /proc write_bytes is counted, and its last figure
        self._io_seen = 0
        if not self.dir.exists():
            try:
                self.dir.mkdir(DIR_MODE, parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"{self.dir}: cannot create data directory: {e.strerror}") from e
        self._lock_fd = self._lock()
        try:
            self.db = self._open()
            try:
                self._after_open()
            except StoreError:
                if not self._corrupt:
                    raise
                # Damage quick_check was not asked to find (the last stop was clean): same as
                # damage found while running.
                self.recover()
        except BaseException:
            with contextlib.suppress(Exception):
                self.db.close()
            os.close(self._lock_fd)
            raise

    def _after_open(self) -> None:
        """Ids, the cursor and the tag map of the file just opened."""
        try:
            self._max_id = _top_id(self.db)
            self._top_saved = _meta_int(self.db, "top_id") or 0
            row = self.db.execute("SELECT value FROM meta WHERE key='sync_cursor'").fetchone()
            self._cursor = self._cursor_saved = int(row[0]) if row else 0
            hot = _meta_int(self.db, "hot_from")
            self._hot_from = 0 if hot is None else hot
            if hot is None:  # a new or migrated store: one scan, then kept up to date
                with self._txn():
                    self._mark_units()
            self._reserved = self._read_seq() or 0
            self.durable_id = self._max_id
            if (self._power_cut or self._wal_damaged) and self._reserved > self._max_id:
                # (I14) Units committed in the last fsync_interval before the machine went down
                # (or hidden by a damaged WAL) may have been forwarded upstream and lost here:
                # their ids must not be given again. Every id given was below the fsynced
                # bound, so continue above it.
                why = "its WAL was damaged" if self._wal_damaged else "the machine went down without a clean stop"
                self._jump_to(self._reserved, why if self._wal_damaged else why + " (power cut?)")
                self._power_cut = self._wal_damaged = False
            elif self._max_id < self._reserved - SEQ_RESERVE:
                # The file is older than the bound: ids above its top may have been given by a
                # later file (a restored backup, a file swapped by hand). Continue above every id
                # the bound allowed, as after a quarantine: a jump, never a reuse.
                self._jump_to(self._reserved)
            if self._reserved < self._max_id + SEQ_MARGIN:
                # A store older than the sidecar (or a sidecar behind the file): reserve now.
                self._raise_reserve(self._max_id, strict=False)
            self.lut = self._map_tags(self._tags)
        except sqlite3.Error as e:
            if _is_corruption(e):
                self._corrupt = True
            raise StoreError(self._failure("read the store's tags and sequence", e)) from e

    @contextlib.contextmanager
    def _txn(self) -> Iterator[None]:
        """One explicit transaction. (The connection is in autocommit mode, where `with db:`
        would commit each statement on its own: not atomic, and one fsync per row.)

        (issue 28) A failed statement or COMMIT (an I/O error) rolls back, and the in-memory
        marks set inside the transaction (`_mark_units`) go back with it: a `_hot_from` kept
        past a rolled-back compaction hid every unit below it from queries (found by libfiu)."""
        marks = (self._hot_from, self._top_saved)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self._hot_from, self._top_saved = marks
            raise

    # -- opening --------------------------------------------------------------------------

    def _lock(self) -> int:
        """(I8) One writer per data directory: a second daemon is refused, never interleaved."""
        path = self.dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as e:
            raise StoreError(f"{path}: cannot open the lock file: {e.strerror}") from e
        _tighten(path)
        for attempt in range(5):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # `edgeos status` holds a shared lock for a few microseconds to ask whether a
                # daemon runs; a daemon starting just then tries again before it gives up.
                if attempt < 4:
                    time.sleep(0.05)
        else:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreError(
                f"{self.dir} is in use by another edgeos process (pid {other}); "
                "two daemons must not share a data directory"
            ) from None
        with contextlib.suppress(OSError):  # the pid is for the message above; a full disk may refuse it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _open(self) -> sqlite3.Connection:
        """(I9) Open the store; move it aside only when it is really damaged or not ours. Any
        other failure (disk full, I/O error, permissions, a lock held by another program)
        raises StoreError and leaves the file as it is, for systemd to retry."""
        try:
            why = _is_ours(self.path)
        except OSError as e:
            raise StoreError(f"{self.path}: cannot read the store file: {e.strerror}; left untouched") from e
        old_top = 0
        if why is None:
            step = "open the database"
            db = None
            try:
                if not self.path.exists():
                    _create_file(self.path)
                else:
                    for suffix in ("", "-wal", "-shm"):
                        _tighten(Path(str(self.path) + suffix))
                db = _connect(self.path)
                step = "read the schema version"
                found = schema.version(db)
                if found is not None and found > schema.SCHEMA_VERSION:
                    db.close()
                    raise StoreError(
                        f"{self.path}: schema version {found} was written by a newer edgeos; this edgeos reads "
                        f"up to {schema.SCHEMA_VERSION}. Upgrade edgeos, or move the data directory aside."
                    )
                if found == -1:
                    why = "an SQLite database without edgeos tables"
                elif self._needs_check(db, found):
                    # (I14) Commits not yet fsynced die with the machine, not with the process;
                    # a changed boot id says the machine went down too.
                    prev_boot = db.execute("SELECT value FROM meta WHERE key='boot_id'").fetchone()
                    self._power_cut = prev_boot is not None and prev_boot[0] != _boot_id()
                    log.warning(
                        "store %s: the last run did not stop cleanly (killed, crashed or power cut); "
                        "checking its integrity",
                        self.path,
                    )
                    step = "check its WAL"
                    self._check_wal()
                    step = "check its integrity (PRAGMA quick_check)"
                    if (res := db.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
                        why = f"integrity check failed after an unclean shutdown: {res}"
                if why is None:
                    if found is None:
                        db.close()
                        return self._create_fresh(0, [])
                    step = "configure it"
                    self._configure(db, found)
                    return db
                old_top = _top_id(db, quiet=True)
                db.close()
            except OSError as e:
                raise StoreError(f"{self.path}: cannot {step}: {e.strerror}; the store was left untouched") from e
            except sqlite3.Error as e:
                if db is not None:
                    with contextlib.suppress(sqlite3.Error):
                        db.close()
                if not _is_corruption(e):
                    raise StoreError(self._failure(step, e)) from e
                why = f"unreadable ({step}): {e}"
        old_top = max(old_top, _peek_top_id(self.path))
        old_tags = _peek_tags(self.path) if self.path.exists() else []
        try:
            moved = self._move_aside(why)
        except OSError as e:
            raise StoreError(
                f"{self.path} is {why}, and cannot be moved aside: {e.strerror}; the store was left untouched"
            ) from e
        log.error("store %s is %s; moved it to %s (kept, never deleted) and started a new store", self.path, why, moved)
        return self._create_fresh(old_top, old_tags)

    def _check_wal(self) -> None:
        """(I9, I14) Committed transactions SQLite will not replay from a WAL damaged in its
        middle (store/wal.py): said, the WAL's bytes kept beside it before SQLite overwrites
        them, and their unit ids never given again. Run before the first write."""
        wal = Path(str(self.path) + "-wal")
        damage = check_wal(wal)
        if damage is None:
            return
        self._wal_damaged = True
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        copy = wal.with_name(f"{wal.name}.bad-{stamp}")
        try:
            shutil.copyfile(wal, copy)
            kept = f"its bytes are kept in {copy}"
        except OSError as e:
            copy.unlink(missing_ok=True)
            kept = f"a copy could not be kept ({e.strerror})"
        log.critical(
            "store %s: its WAL is damaged at frame %d of %d (a bad sector or a stray write, not a crash): "
            "%d committed transactions after it cannot be read and are lost here; %s. Unit ids continue "
            "above the sequence bound, so none is given again",
            self.path,
            damage.bad,
            damage.frames,
            damage.hidden,
            kept,
        )

    def _failure(self, step: str, e: sqlite3.Error) -> str:
        """A clear start-up error: the path, the step, SQLite's words and the OS's."""
        code = getattr(e, "sqlite_errorcode", 0) & 0xFF
        name = getattr(e, "sqlite_errorname", "") or "SQLITE_ERROR"
        cause = ""
        free = None
        with contextlib.suppress(OSError):
            st = os.statvfs(self.dir)
            free = st.f_bavail * st.f_frsize
        if code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR) and (code == sqlite3.SQLITE_FULL or free == 0):
            # SQLite reports a full disk met while growing its -shm file as an I/O error.
            cause = f"; {os.strerror(errno.ENOSPC)} ({free} bytes free in {self.dir})"
        elif code == sqlite3.SQLITE_IOERR:
            cause = f"; {os.strerror(errno.EIO)} (a failing disk or file system?)"
        elif code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            cause = "; another program holds a lock on the database (an sqlite3 shell, a backup tool?)"
        elif code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_READONLY):
            try:
                os.close(os.open(self.path, os.O_RDWR))
                cause = "; the file opens, its directory may refuse creating the -wal/-shm files"
            except OSError as oe:
                cause = f"; {oe.strerror}"
        return (
            f"{self.path}: cannot {step}: {e} ({name}){cause}. The store was left untouched "
            "(this is not a damaged file); edgeos exits for its service manager to retry"
        )

    def _needs_check(self, db: sqlite3.Connection, found: int | None) -> bool:
        if found is None:
            return False
        row = db.execute("SELECT value FROM meta WHERE key='clean_shutdown'").fetchone()
        return row is None or row[0] != "1"

    def _configure(self, db: sqlite3.Connection, found: int | None, floor: int = 0) -> None:
        if found is None:
            db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        db.execute("PRAGMA journal_mode=WAL")
        # (I3) FULL: the WAL is fsynced at every commit. NORMAL: commits are written to the WAL
        # (a kill cannot lose them) and flush() fsyncs it every fsync_interval; checkpoints
        # still fsync the WAL before and the database after.
        grouped = self.settings.fsync_interval_ns > 0
        db.execute(f"PRAGMA synchronous={'NORMAL' if grouped else 'FULL'}")
        # (I19) Deleted units are not overwritten with zeros (Debian's SQLite defaults to
        # secure_delete=ON, which rewrote every compacted unit's pages once more).
        db.execute("PRAGMA secure_delete=OFF")
        # The WAL counts against max_size: keep it to a tenth of the budget. A large WAL means
        # rare checkpoints, each writing a page once however often commits rewrote it.
        wal_limit = WAL_LIMIT if not self.settings.max_size else min(WAL_LIMIT, self.settings.max_size // 10)
        page = db.execute("PRAGMA page_size").fetchone()[0] if found is not None else PAGE_SIZE
        db.execute(f"PRAGMA wal_autocheckpoint={max(16, wal_limit // page)}")
        db.execute(f"PRAGMA journal_size_limit={wal_limit}")
        if found is None:
            schema.create(db)
            if floor:
                # (I14) A new store of a gateway that had one: ids continue above the old ones.
                db.execute("INSERT OR REPLACE INTO meta VALUES('top_id', ?)", (str(floor),))
                # Nothing at or below the floor is stored here: the sync starts after it.
                db.execute("INSERT OR REPLACE INTO meta VALUES('sync_cursor', ?)", (str(floor),))
                log.warning("store %s: new store; unit ids continue after %d (never reused)", self.path, floor)
        elif found < schema.SCHEMA_VERSION:
            log.warning("store %s: migrating schema %d -> %d", self.path, found, schema.SCHEMA_VERSION)
            schema.migrate(db, found)
        db.execute("INSERT OR REPLACE INTO meta VALUES('clean_shutdown', '0')")
        if grouped:  # (I14) lets the next start tell a killed process from a machine that went down
            db.execute("INSERT OR REPLACE INTO meta VALUES('boot_id', ?)", (_boot_id(),))
        else:
            db.execute("DELETE FROM meta WHERE key='boot_id'")

    def _floor(self, old_top: int) -> int:
        """(I14) Where a new store's ids start: above every id this gateway may have given."""
        return max(self._read_seq() or 0, old_top)

    def _create_fresh(self, old_top: int, old_tags: list[tuple]) -> sqlite3.Connection:
        """A new store in place of one moved aside: ids above the old ones (I14), and the old
        tag ids with their meaning (I16), from the old file if readable, else edgeos.tags."""
        floor = self._floor(old_top)
        tags = old_tags or self._read_tags_copy()
        step = "create a new store"
        db = None
        try:
            _create_file(self.path)
            db = _connect(self.path)
            self._configure(db, None, floor)
            if tags:
                db.execute("BEGIN IMMEDIATE")
                db.executemany("INSERT INTO tags(id, device, name, kind, unit, retired) VALUES(?,?,?,?,?,?)", tags)
                db.execute("COMMIT")
        except (sqlite3.Error, OSError) as e:
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
            if isinstance(e, OSError):
                raise StoreError(f"{self.path}: cannot {step}: {e.strerror}") from e
            raise StoreError(self._failure(step, e)) from e
        return db

    def _read_tags_copy(self) -> list[tuple]:
        try:
            return [tuple(r) for r in json.loads(self.tags_path.read_text())]
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            log.error("store %s: cannot read %s (%s); tag ids start afresh", self.path, self.tags_path, e)
            return []

    def _save_tags_copy(self) -> None:
        """(I16) Written when the tags table changes (rarely: at a start with a new config)."""
        rows = self.db.execute("SELECT id, device, name, kind, unit, retired FROM tags ORDER BY id").fetchall()
        try:
            _write_atomic(self.tags_path, json.dumps(rows).encode())
        except OSError as e:
            log.warning("store %s: cannot write %s: %s", self.path, self.tags_path, e.strerror)

    def _move_aside(self, why: str) -> Path:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.path.with_name(f"{DB_NAME}.bad-{stamp}")
        k = 1
        while any(Path(str(target) + sfx).exists() for sfx in ("", "-wal", "-shm")):
            k += 1
            target = self.path.with_name(f"{DB_NAME}.bad-{stamp}-{k}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                src.rename(Path(str(target) + suffix))
        return target

    # -- the sequence bound (edgeos.seq) ---------------------------------------------------

    def _read_seq(self) -> int | None:
        try:
            return int(self.seq_path.read_text().strip())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.error("store %s: cannot read %s (%s); using the database's own ids", self.path, self.seq_path, e)
            return None

    def _jump_to(self, floor: int, why: str = "a restored backup or a replaced file?") -> None:
        log.warning(
            "store %s: the file's unit ids (up to %d) are behind its sequence bound %s (%s); new units "
            "continue after %d, so no sequence number is reused",
            self.path,
            self._max_id,
            self.seq_path.name,
            why,
            floor,
        )
        with self._txn():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES('top_id', ?)", (str(floor),))
        self._max_id = self._top_saved = floor

    def _raise_reserve(self, top: int, *, strict: bool) -> None:
        """Write R = top + SEQ_RESERVE atomically (tmp, fsync, rename, fsync the directory).
        With `strict`, a failure raises; otherwise it is logged and retried at the next write."""
        value = top + SEQ_RESERVE
        try:
            _write_atomic(self.seq_path, f"{value}\n".encode())
        except OSError as e:
            msg = f"{self.seq_path}: cannot reserve unit ids up to {value}: {e.strerror}"
            if strict:
                cls = StoreFull if e.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT) else StoreError
                raise cls(msg) from e
            if not self._seq_warned:
                log.warning("%s; retried at the next commit", msg)
                self._seq_warned = True
            return
        self._reserved = value
        self._seq_warned = False

    def _reserve(self, k: int) -> None:
        """(I14) Before `k` new ids are given: they must stay within the reserved bound."""
        need = self._max_id + k
        if need + SEQ_MARGIN > self._reserved:
            self._raise_reserve(need, strict=need > self._reserved)

    # -- tags -----------------------------------------------------------------------------

    def _map_tags(self, tags: Sequence[TagMeta]) -> np.ndarray:
        """Runtime tag id -> store tag id. (I16) A store id is given once and keeps its kind and
        unit: when a tag's kind or unit changes it gets a new id, and the old one is retired."""
        lut = np.full(max((t.id for t in tags), default=-1) + 1, -1, np.int32)
        changed = not self.tags_path.exists()
        with self._txn():
            active = {
                (d, n): (i, k, u)
                for i, d, n, k, u in self.db.execute("SELECT id, device, name, kind, unit FROM tags WHERE retired=0")
            }
            for t in tags:
                cur = active.get((t.device, t.name))
                if cur is not None and (cur[1], cur[2]) == (t.kind.value, t.unit):
                    lut[t.id] = cur[0]
                    continue
                if cur is not None:
                    self.db.execute("UPDATE tags SET retired=1 WHERE id=?", (cur[0],))
                sid = self.db.execute(
                    "INSERT INTO tags(device, name, kind, unit) VALUES(?,?,?,?)",
                    (t.device, t.name, t.kind.value, t.unit),
                ).lastrowid
                assert sid is not None
                active[(t.device, t.name)] = (sid, t.kind.value, t.unit)
                lut[t.id] = sid
                changed = True
                if cur is not None:
                    log.warning(
                        "tag %s: kind/unit changed (%s %r -> %s %r): new store id %d; id %d keeps the "
                        "samples stored before, with their kind and unit",
                        t.key,
                        cur[1],
                        cur[2],
                        t.kind.value,
                        t.unit,
                        sid,
                        cur[0],
                    )
        if changed:
            self._save_tags_copy()
        self._tags_per_device = {}
        return lut

    def add_tags(self, tags: Sequence[TagMeta]) -> None:
        """Tags a config reload added, with runtime ids above every earlier one: the map only
        grows, and ids mapped before keep their store id for the batches still on their way."""
        self._check_usable()
        try:
            lut = self._map_tags(tags)
        except sqlite3.Error as e:
            raise self._error("add tags", e) from e
        grown = np.full(max(len(self.lut), len(lut)), -1, np.int32)
        grown[: len(self.lut)] = self.lut
        mapped = lut >= 0
        grown[: len(lut)][mapped] = lut[mapped]
        self._tags.extend(tags)
        self.lut = grown

    # -- writing --------------------------------------------------------------------------

    def encode(self, batches: Sequence[Batch]) -> list[tuple[str, int, int, int, bytes]]:
        """Batches -> unit rows, per device. Timestamps are rounded to the store's resolution.
        (I15) A device's samples go in one unit, or, past MAX_UNIT_SAMPLES samples or about
        MAX_UNIT_BYTES encoded, in several, in time order."""
        by_device: dict[str, list[Batch]] = {}
        for b in batches:
            if len(b):
                by_device.setdefault(b.device, []).append(b)
        res = self.settings.time_resolution_ns
        rows: list[tuple[str, int, int, int, bytes]] = []
        for device, parts in by_device.items():
            b = Batch.concat(device, parts)
            ts = b.ts if res == 1 else (b.ts + res // 2) // res * res
            tags = self.lut[b.tags]
            values, quality, text = b.values, b.quality, b.text
            cuts = _unit_cuts(device, tags, quality, text)
            # Split (or maybe split: long strings are halved once encoded): in time order.
            may_split = len(cuts) > 2 or text is not None
            if may_split and len(ts) > 1 and bool((np.diff(ts) < 0).any()):
                order = np.argsort(ts, kind="stable")
                ts, tags, values, quality = ts[order], tags[order], values[order], quality[order]
                text = None if text is None else text[order]
                cuts = _unit_cuts(device, tags, quality, text)
            for a, z in itertools.pairwise(cuts):
                self._encode_piece(rows, device, tags[a:z], ts[a:z], values[a:z], quality[a:z], text, a, z)
        return rows

    def _encode_piece(self, rows: list, device: str, tags, ts, values, quality, text, a: int, z: int) -> None:
        txt = None if text is None else text[a:z].tolist()
        data = wire.encode_unit(device, tags, ts, values, quality, txt, compress=self.settings.compress_units)
        if len(data) > MAX_UNIT_BYTES and z - a > 1:  # the estimate fell short (long strings): halve
            m = (z - a) // 2
            self._encode_piece(rows, device, tags[:m], ts[:m], values[:m], quality[:m], text, a, a + m)
            self._encode_piece(rows, device, tags[m:], ts[m:], values[m:], quality[m:], text, a + m, z)
            return
        rows.append((device, int(ts.min()), int(ts.max()), z - a, data))

    def write(self, batches: Sequence[Batch]) -> int:
        """(I1) Commit the batches as one transaction; returns the samples now stored."""
        self._check_usable()
        rows = self.encode(batches)
        if not rows:
            return 0
        try:
            self._reserve(len(rows))
            # (I14) The writer gives the ids: above every id this file ever held (meta.top_id
            # keeps the highest across deletes), so no sqlite_sequence page per commit.
            first = self._max_id + 1
            top = self._max_id + len(rows)
            with self._txn():
                self.db.executemany(
                    "INSERT INTO units(id, device, t_min, t_max, n, data) VALUES(?,?,?,?,?,?)",
                    [(first + i, *r) for i, r in enumerate(rows)],
                )
                if top > self._reserved:  # cannot happen while _reserve ran: never commit past R
                    raise StoreError(f"{self.path}: unit id {top} would pass the reserved bound {self._reserved}")
        except sqlite3.Error as e:
            raise self._error("write", e) from e
        self._max_id = top
        self._count_io()
        n = sum(r[3] for r in rows)
        self.counters.committed_samples += n
        self.counters.committed_units += len(rows)
        if self.settings.fsync_interval_ns > 0:
            self._undurable += n
        else:
            self.durable_id = top
            self.counters.durable_samples += n
        return n

    @property
    def undurable(self) -> int:
        """(I3) Samples committed since the last fsync: a kill cannot lose them, a power cut can."""
        return self._undurable

    def flush(self) -> int:
        """(I3) fsync the WAL: every commit so far now survives a power cut. Returns the samples
        this made durable. Raises StoreFsyncFailed if the fsync fails: after that the page
        cache cannot be trusted, only a restart that reads the disk again can (I3)."""
        if not self._undurable and self.durable_id == self._max_id:
            return 0
        n, top = self._undurable, self._max_id
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            fd = -1  # no WAL: the last checkpoint (which fsyncs) put everything in the database
        except OSError as e:
            raise StoreFsyncFailed(f"{self.path}-wal: cannot open it to fsync: {e.strerror}") from e
        if fd >= 0:
            try:
                os.fsync(fd)
            except OSError as e:
                self._fsync_failed = True
                raise StoreFsyncFailed(
                    f"{self.path}-wal: fsync failed: {e.strerror}; commits since the last fsync may not be on the disk "
                    "and the page cache can no longer be trusted: edgeos stops for its service manager to restart it"
                ) from e
            finally:
                os.close(fd)
        self._undurable = 0
        self.durable_id = top
        self.counters.durable_samples += n
        self.counters.fsyncs += 1
        self._count_io()
        return n

    def _check_usable(self) -> None:
        if self._fsync_failed:
            raise StoreFsyncFailed(f"{self.path}: an fsync failed earlier; restart to read the disk again")
        if self._broken:
            raise StoreCorrupt(f"{self.path}: no usable store (a recovery failed); call recover() again")

    def _error(self, what: str, e: sqlite3.Error) -> StoreError:
        if fsync_failed(e):  # (issue 28) never retried in this process
            self._fsync_failed = True
            log.critical(
                "store %s: %s failed at fsync (%s): exiting for a restart; the page cache is not trusted",
                self.path,
                what,
                e,
            )
            return StoreFsyncFailed(f"{self.path}: {what} failed at fsync: {e}; restart the process")
        code = getattr(e, "sqlite_errorcode", 0) & 0xFF
        if code in _CORRUPT:
            self._corrupt = True
            return StoreCorrupt(f"{self.path}: {what} failed, the database is damaged: {e}")
        if code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
            return StoreFull(f"{self.path}: {what} failed, disk full or failing: {e}")
        return StoreError(f"{self.path}: {what} failed: {e}")

    # -- recovery -------------------------------------------------------------------------

    def recover(self) -> Path:
        """(I9) After StoreCorrupt: move the damaged file aside (with its -wal/-shm; never
        deleted), start a fresh store whose unit ids continue above the old ones (I14), and map
        the tags again. The writer stays usable; returns where the damaged file went."""
        self._broken = True
        with contextlib.suppress(sqlite3.Error):
            self.db.close()  # not marked clean: it is not
        try:
            old_top = max(self._max_id, _peek_top_id(self.path))
            old_tags = _peek_tags(self.path)
            moved = self._move_aside("damaged while running (SQLite reported corruption)")
        except OSError as e:
            raise StoreError(f"{self.path}: cannot move the damaged store aside: {e.strerror}") from e
        log.error("store %s was damaged while running; moved it to %s (kept, never deleted)", self.path, moved)
        self.db = self._create_fresh(old_top, old_tags)
        self._corrupt = False
        self._budget_episode = False
        self._after_open()
        self._broken = False
        self.generation += 1
        return moved

    # -- maintenance ----------------------------------------------------------------------

    def maintain(self, now_ns: int | None = None, *, compact_all: bool = False, sync_cursor: int | None = None) -> None:
        """One bounded round of housekeeping: the sync cursor, a compaction slice, retention,
        the size budget."""
        self._check_usable()
        if now_ns is None:  # (issue 28) a wall-clock step must not age (and so delete) history
            now_ns = self._housekeeping_now()
        try:
            if sync_cursor is not None:
                # (I19) Counted at once (I12's dropped_unsent uses it); written every
                # CURSOR_SAVE_S while it moves, and at close.
                self._cursor = sync_cursor
                # abs(): a clock stepped back saves at once rather than stalling.
                if sync_cursor != self._cursor_saved and abs(now_ns - self._cursor_saved_at) >= CURSOR_SAVE_S * 1e9:
                    self.save_cursor(sync_cursor)
                    self._cursor_saved_at = now_ns
            if not self.settings.keep_until_synced:
                self._drop_stale_copies()
            elif self.settings.replay_window_ns:
                self._expire_replayable(now_ns)
            while self.compact(now_ns, force=compact_all) and compact_all:
                pass  # compact_all: every device, every slice (tools and tests)
            self.trim(now_ns)
        except sqlite3.Error as e:
            raise self._error("maintenance", e) from e
        finally:
            self._count_io()

    def _housekeeping_now(self) -> int:
        """The wall clock for retention, compaction and the replay window, guarded against
        steps (HousekeepingClock)."""
        return self.__dict__.setdefault("_clock", HousekeepingClock()).now()

    def _count_io(self) -> None:
        """(I19) Add what this thread wrote to the disk since the last call to `written_bytes`
        (the kernel's write_bytes, per thread: the daemon calls the store from one thread; a
        call from another thread starts counting afresh there)."""
        tid = threading.get_native_id()
        try:
            with open(f"/proc/self/task/{tid}/io", "rb") as f:
                text = f.read()
        except OSError:
            return
        i = text.find(b"\nwrite_bytes:")
        if i < 0:
            return
        now = int(text[i + 13 : text.index(b"\n", i + 1)])
        if tid == self._io_thread:
            self.counters.written_bytes += max(0, now - self._io_seen)
        self._io_thread, self._io_seen = tid, now

    def compact(self, now_ns: int, *, force: bool = False) -> int:
        """Turn one device's oldest hot units into per-tag chunks; returns the samples handled.

        A device is due when about `chunk_samples` samples per tag wait (big chunks compress
        well and amortise the per-chunk cost) or its oldest unit waited `compact_after`; one
        device and one bounded slice per call keep commits flowing. (I5) Chunks are inserted
        and their units retired in one transaction: a query never sees both or neither.
        (I13) A unit that does not decode is moved to bad_units in that same transaction.
        """
        s = self.settings
        due = None
        rows = self.db.execute(
            "SELECT device, SUM(n), MIN(t_max), MIN(id) FROM units WHERE id>=? AND compacted=0 "
            "GROUP BY device ORDER BY MIN(id)",
            (self._hot_from,),
        ).fetchall()
        for device, waiting, oldest, _ in rows:
            want = max(s.compact_min_samples, s.chunk_samples * self._tag_count(device))
            if force or waiting >= want or oldest <= now_ns - s.compact_after_ns:
                due = (device, min(max(want, s.compact_slice_samples), s.compact_max_samples))
                break
        if due is None:
            return 0
        device, limit = due
        ids, units, bad, total, good = [], [], [], 0, 0
        for uid, n, t_min, t_max, data in self.db.execute(
            "SELECT id, n, t_min, t_max, data FROM units WHERE id>=? AND compacted=0 AND device=? ORDER BY id",
            (self._hot_from, device),
        ):
            total += n
            try:
                u = wire.decode_unit(data)
                _check_unit(u, device, n, t_min, t_max)
            except Exception as e:  # noqa: BLE001 - any failure to decode is a bad unit, never a crash
                bad.append((uid, device, f"{type(e).__name__}: {e}"[:500], data, n))
            else:
                ids.append(uid)
                units.append(u)
                good += n
            if total >= limit:
                break
        rows = self._chunk_rows(units) if units else []
        with self._txn():
            self.db.executemany("INSERT INTO chunks(tag, t_min, t_max, n, data) VALUES(?,?,?,?,?)", rows)
            marks = [(i,) for i in ids]
            if s.keep_until_synced:
                self.db.executemany("UPDATE units SET compacted=1 WHERE id=?", marks)
            else:
                self.db.executemany("DELETE FROM units WHERE id=?", marks)
            for uid, dev, reason, data, _ in bad:
                self.db.execute("INSERT OR REPLACE INTO bad_units VALUES(?,?,?,?)", (uid, dev, reason, data))
                self.db.execute("DELETE FROM units WHERE id=?", (uid,))
            self._mark_units()
        self.counters.compacted_samples += good
        for uid, dev, reason, _, n in bad:
            self.counters.quarantined_units += 1
            self.counters.quarantined_samples += n
            self._bad_logged += 1
            if self._bad_logged <= 10:
                log.error(
                    "store %s: unit %d of %s (%d samples) does not decode (%s); moved to bad_units "
                    "(kept, counted in quarantined_units)",
                    self.path,
                    uid,
                    dev,
                    n,
                    reason,
                )
            elif self._bad_logged == 11:
                log.error("store %s: more undecodable units; no longer logged one by one", self.path)
        return total

    def _chunk_rows(self, units: list[wire.Unit]) -> list[tuple[int, int, int, int, bytes]]:
        s = self.settings
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
        return rows

    def _tag_count(self, device: str) -> int:
        n = self._tags_per_device.get(device)
        if n is None:
            n = self.db.execute("SELECT COUNT(*) FROM tags WHERE device=? AND retired=0", (device,)).fetchone()[0] or 1
            self._tags_per_device[device] = n
        return n

    def save_cursor(self, cursor: int) -> None:
        """Persist the sync cursor; compacted units at or below it are no longer needed hot.
        (I19) Nothing is written when the cursor did not move."""
        self._cursor = cursor
        if cursor == self._cursor_saved:
            return
        with self._txn():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES('sync_cursor', ?)", (str(cursor),))
            if self.settings.replay_window_ns:  # (I20) kept for replay until the window passes
                # On the housekeeping clock, as retention: a wall-clock step forward (a first NTP
                # sync after a boot in 1970) deleted every kept copy at once (independent tester).
                cut = self._housekeeping_now() - self.settings.replay_window_ns
                self.db.execute("DELETE FROM units WHERE compacted=1 AND id<=? AND t_max<?", (cursor, cut))
            else:
                self.db.execute("DELETE FROM units WHERE compacted=1 AND id<=?", (cursor,))
            self._mark_units()
        self._cursor_saved = cursor

    def _mark_units(self) -> None:
        """Inside a transaction that deleted or compacted units: keep meta.top_id (the highest
        id ever given, which MAX(id) forgets once the newest units are deleted: I14) and
        meta.hot_from (every hot unit's id is at or above it, so hot units are found by id
        without an index: I19). Each is written only when it changed."""
        if self._max_id > self._top_saved:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES('top_id', ?)", (str(self._max_id),))
            self._top_saved = self._max_id
        row = self.db.execute("SELECT MIN(id) FROM units WHERE id>=? AND compacted=0", (self._hot_from,)).fetchone()
        hot = self._max_id + 1 if row[0] is None else int(row[0])
        if hot != self._hot_from or _meta_int(self.db, "hot_from") is None:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES('hot_from', ?)", (str(hot),))
            self._hot_from = hot

    def _expire_replayable(self, now_ns: int) -> None:
        """(I20) Forwarded raw copies whose window passed, at most once a minute; writes only
        when there is one (on the t_max index of raw copies)."""
        if abs(now_ns - getattr(self, "_expired_at", 0)) < 60e9:
            return
        self._expired_at = now_ns
        cut = now_ns - self.settings.replay_window_ns
        if not self._exists("units WHERE compacted=1 AND t_max < ? AND +id <= ?", (cut, self._cursor_saved)):
            return
        with self._txn():
            self.db.execute("DELETE FROM units WHERE compacted=1 AND t_max < ? AND +id <= ?", (cut, self._cursor_saved))
            self._mark_units()

    def _drop_stale_copies(self) -> None:
        """(I6) Upstream is off: raw copies kept for it will never be forwarded. Delete them."""
        if self.db.execute("SELECT 1 FROM units WHERE compacted=1 LIMIT 1").fetchone() is None:
            return
        with self._txn():
            unsent = self._sum("units WHERE compacted=1 AND id>?", (self._cursor,))
            self.db.execute("DELETE FROM units WHERE compacted=1")
            self._mark_units()
        self.counters.dropped_unsent += unsent
        if not self._stale_logged:
            self._stale_logged = True
            log.warning(
                "store %s: upstream is disabled: deleted the raw copies of compacted units kept for it "
                "(%d samples never forwarded, counted in dropped_unsent; they stay in the history)",
                self.path,
                unsent,
            )

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

    def stats(self) -> dict[str, int]:
        """Read-only figures for metrics and status, in the store's thread: bytes used and the
        budget, hot units (not yet compacted) and compacted chunks, and the oldest sample's
        time (the retention horizon; 0 when empty). Counting walks an index, so callers cache."""
        db = self.db
        hot = db.execute("SELECT count(*) FROM units WHERE id>=? AND compacted=0", (self._hot_from,)).fetchone()[0]
        copies = db.execute("SELECT count(*) FROM units WHERE compacted=1").fetchone()[0]
        chunks = db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        oldest = [
            db.execute("SELECT min(t_min) FROM chunks WHERE t_max=(SELECT min(t_max) FROM chunks)").fetchone()[0],
            db.execute(
                "SELECT t_min FROM units WHERE compacted=0 AND id>=? ORDER BY id LIMIT 1", (self._hot_from,)
            ).fetchone(),
        ]
        times = [t for t in (oldest[0], oldest[1][0] if oldest[1] else None) if t]
        return {
            "used_bytes": self.used_bytes(),
            "max_size": self.settings.max_size or 0,
            "hot_units": hot,
            "copied_units": copies,
            "chunks": chunks,
            "oldest_ns": min(times) if times else 0,
        }

    def trim(self, now_ns: int) -> None:
        """(I6) Retention by age, then the size budget: hidden raw copies first, then the oldest
        history; whole units and chunks; each sample counted once (I12)."""
        s = self.settings
        if s.retention_ns:
            self._retention(now_ns - s.retention_ns)
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
        before = (self.counters.dropped_budget, self.counters.dropped_unsent)
        for _ in range(MAX_DROP_STEPS):
            if self.used_bytes() <= target:
                break
            if not (self._drop_copies() or self._drop_oldest()):
                break
            # PASSIVE never waits for readers; the one TRUNCATE below ends the round.
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        history = self.counters.dropped_budget - before[0]
        copies = self.counters.dropped_unsent - before[1]
        if (history or copies) and not self._budget_episode:
            log.warning(
                "store reached its %d-byte budget: dropping unsent raw copies first (%d samples so far, "
                "counted in dropped_unsent), then the oldest history (%d samples so far, counted in dropped_budget)",
                s.max_size,
                copies,
                history,
            )
        self._budget_episode = True

    def _exists(self, source: str, args: tuple) -> bool:
        return self.db.execute(f"SELECT 1 FROM {source} LIMIT 1", args).fetchone() is not None

    def _sum(self, source: str, args: tuple) -> int:
        return int(self.db.execute(f"SELECT COALESCE(SUM(n), 0) FROM {source}", args).fetchone()[0])

    def _retention(self, cutoff: int) -> None:
        """(I6, I12) Drop what ended before `cutoff`: chunks and hot units count in
        dropped_retention; units above the cursor upstream still wanted count in dropped_unsent."""
        keep = 1 if self.settings.keep_until_synced else 0
        hot = "units WHERE id >= ? AND compacted=0 AND t_max < ?"  # (I19) hot units, by id
        hf = self._hot_from
        with self._txn():
            kept = self._sum("chunks WHERE t_max < ?", (cutoff,))
            kept += self._sum(hot, (hf, cutoff))
            unsent = self._sum(hot + " AND id > ? AND ?", (hf, cutoff, self._cursor, keep))
            # Raw copies through their partial index on t_max.
            unsent += self._sum("units WHERE compacted=1 AND t_max < ? AND +id > ?", (cutoff, self._cursor))
            if kept or unsent or self._exists("units WHERE compacted=1 AND t_max < ?", (cutoff,)):
                self.db.execute("DELETE FROM chunks WHERE t_max < ?", (cutoff,))
                self.db.execute("DELETE FROM " + hot, (hf, cutoff))
                self.db.execute("DELETE FROM units WHERE compacted=1 AND t_max < ?", (cutoff,))
                self._mark_units()
        self.counters.dropped_retention += kept
        self.counters.dropped_unsent += unsent
        if kept or unsent:
            log.info("retention: dropped %d samples older than %s", kept, _iso(cutoff))

    def _drop_copies(self) -> int:
        """Budget, first: the oldest 5% (at least one) of the hidden raw copies (compacted units
        kept for upstream). Their samples stay in the history; unsent ones count in dropped_unsent."""
        count = self.db.execute("SELECT COUNT(*) FROM units WHERE compacted=1").fetchone()[0]
        if not count:
            return 0
        sql = "SELECT id FROM units WHERE compacted=1 ORDER BY id LIMIT 1 OFFSET ?"
        (cut,) = self.db.execute(sql, (max(1, count // 20) - 1,)).fetchone()
        with self._txn():
            unsent = self._sum("units WHERE compacted=1 AND id <= ? AND id > ?", (cut, self._cursor))
            rows = self.db.execute("DELETE FROM units WHERE compacted=1 AND id <= ?", (cut,)).rowcount
            self._mark_units()
        self.counters.dropped_unsent += unsent
        return max(1, rows)

    def _drop_oldest(self) -> int:
        """Budget, then: the oldest 5% (at least one) of the history, chunks and hot units
        together by time. Hot units never forwarded count in dropped_unsent as well."""
        hf = self._hot_from
        count = self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        count += self.db.execute("SELECT COUNT(*) FROM units WHERE id>=? AND compacted=0", (hf,)).fetchone()[0]
        if not count:
            return 0
        row = self.db.execute(
            "SELECT t_max FROM (SELECT t_max FROM chunks "
            "UNION ALL SELECT t_max FROM units WHERE id>=? AND compacted=0) ORDER BY t_max LIMIT 1 OFFSET ?",
            (hf, max(1, count // 20) - 1),
        ).fetchone()
        (cut,) = row
        keep = 1 if self.settings.keep_until_synced else 0
        with self._txn():
            hot = "units WHERE id >= ? AND compacted=0 AND t_max <= ?"
            n = self._sum("chunks WHERE t_max <= ?", (cut,))
            n += self._sum(hot, (hf, cut))
            unsent = self._sum(hot + " AND id > ? AND ?", (hf, cut, self._cursor, keep))
            self.db.execute("DELETE FROM chunks WHERE t_max <= ?", (cut,))
            self.db.execute("DELETE FROM " + hot, (hf, cut))
            self._mark_units()
        self.counters.dropped_budget += n
        self.counters.dropped_unsent += unsent
        return max(1, n)

    # -- closing --------------------------------------------------------------------------

    def close(self) -> None:
        """Mark a clean shutdown (so the next start skips the integrity check) and release the
        lock. A file SQLite reported damaged is not marked clean: the next start checks it."""
        try:
            if self._corrupt:
                log.error("store %s: closing a damaged store unmarked; the next start checks it", self.path)
            elif self._fsync_failed:
                log.error("store %s: closing unmarked after a failed fsync; the next start checks it", self.path)
            elif not self._broken:
                if self._cursor != self._cursor_saved:
                    self.save_cursor(self._cursor)
                self.db.execute("INSERT OR REPLACE INTO meta VALUES('clean_shutdown', '1')")
                # With synchronous=NORMAL this checkpoint fsyncs the WAL, then the database.
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self.counters.durable_samples += self._undurable
                self._undurable = 0
                self.durable_id = self._max_id
            self.db.close()
        except sqlite3.Error as e:
            log.warning("store %s: close: %s", self.path, e)
        finally:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1


class HousekeepingClock:
    """(issue 28) The wall clock for retention and compaction, guarded against steps: it moves
    with the monotonic clock, and follows the wall clock only when that is behind it.

    A step forward (+1 h: an RTC set wrong, a first NTP sync) would otherwise make every sample
    an hour older at once and let retention delete an hour of history that is not due; with
    this clock the step is ignored for housekeeping (history is kept up to that much longer,
    the size budget still bounds the disk). A step back is followed at once: retention then
    deletes later, never earlier. Samples keep the real wall clock (docs/reliability.md). A new
    process starts from the wall clock as it then is."""

    def __init__(self) -> None:
        self._wall0, self._mono0 = time.time_ns(), time.monotonic_ns()

    def now(self) -> int:
        wall, mono = time.time_ns(), time.monotonic_ns()
        guarded = self._wall0 + (mono - self._mono0)
        if wall <= guarded:
            self._wall0, self._mono0 = wall, mono
            return wall
        return guarded


def _boot_id() -> str:
    """This boot of the machine (changes when it restarts); '?' where the kernel does not say."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "?"


def _write_atomic(path: Path, data: bytes) -> None:
    """Temporary file, fsync, rename, fsync the directory: the old content or the new, whole."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _peek_tags(path: Path) -> list[tuple]:
    """Best effort: the tags table of a file about to be moved aside (it may be damaged)."""
    if not path.exists():
        return []
    try:
        db = _connect(path, readonly=True)
    except sqlite3.Error:
        return []
    try:
        cols = {r[1] for r in db.execute("PRAGMA table_info(tags)")}
        retired = "retired" if "retired" in cols else "0"
        return db.execute(f"SELECT id, device, name, kind, unit, {retired} FROM tags ORDER BY id").fetchall()
    except sqlite3.Error:
        return []
    finally:
        db.close()


def _meta_int(db: sqlite3.Connection, key: str) -> int | None:
    row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return None if row is None else int(row[0])


def _top_id(db: sqlite3.Connection, *, quiet: bool = False) -> int:
    """The highest unit id ever given in this file: the newest unit, or meta.top_id when the
    newest units were deleted (and sqlite_sequence, in stores from before schema 4). With
    `quiet` (a damaged file about to be moved aside), whatever can still be read."""
    sources = [
        "SELECT CAST(value AS INTEGER) FROM meta WHERE key='top_id'",
        "SELECT MAX(id) FROM units",
        "SELECT MAX(id) FROM bad_units",
        "SELECT seq FROM sqlite_sequence WHERE name='units'",
    ]
    top = 0
    for i, sql in enumerate(sources):
        try:
            row = db.execute(sql).fetchone()
        except sqlite3.Error as e:
            # bad_units and sqlite_sequence are absent from some stores: not an error.
            if quiet or (i >= 2 and "no such table" in str(e)):
                continue
            raise
        if row and row[0] is not None:
            top = max(top, int(row[0]))
    return top


def _peek_top_id(path: Path) -> int:
    """Best effort: the highest unit id of a file about to be moved aside (it may be damaged)."""
    if not path.exists():
        return 0
    try:
        db = _connect(path, readonly=True)
    except sqlite3.Error:
        return 0
    try:
        return _top_id(db, quiet=True)
    finally:
        db.close()


def _check_unit(u: wire.Unit, device: str, n: int, t_min: int, t_max: int) -> None:
    """A unit's columns must agree with its row: a flipped bit that still decodes often does not."""
    if u.device != device or len(u) != n:
        raise ValueError(f"unit says device {u.device!r} with {len(u)} samples, its row {device!r} with {n}")
    if u.text is not None and len(u.text) != n:
        raise ValueError("text column length disagrees")
    if n and (int(u.ts.min()) != t_min or int(u.ts.max()) != t_max):
        raise ValueError("timestamps outside the unit's recorded span")
    if n and int(u.tags.min()) < 0:
        raise ValueError("negative tag id")


def _unit_cuts(device: str, tags: np.ndarray, quality: np.ndarray, text: np.ndarray | None) -> list[int]:
    """Where to split one device's samples so each unit stays within the bounds (I15), from the
    fixed bytes per sample; text is measured only once encoded (see _encode_piece)."""
    n = len(tags)
    room = MAX_UNIT_BYTES - 128 - len(device.encode())
    if n * 25 <= room and n <= MAX_UNIT_SAMPLES:  # the common case: one unit, whatever the columns
        return [0, n]
    fixed = (4 if n and int(tags.max()) > 0xFFFF else 2) + 16 + (4 if quality.any() else 0)
    if text is not None:
        fixed += 1  # at least msgpack's nil; longer strings are caught after encoding (halved)
    per = max(1, min(MAX_UNIT_SAMPLES, room // fixed))
    return [*range(0, n, per), n]


def _iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
