"""The store's outbox: what the upstream sync (and replay) may read of the store, and nothing else.

The store is the only room that knows its tables. The sync asks this module for runs of units
after its cursor, units in a seq range, the head, the tag dictionary and the saved cursor; it
never sees SQL. Reads are read-only connections (WAL snapshots: they never block the writer,
docs/store.md I11), without a memory map (a media error under a mapped page is a SIGBUS, which
kills the daemon, where read() returns an error the caller can report and retry). The cursor is
saved by the store's one writer (`StoreWriter.maintain(sync_cursor=...)` / `save_cursor`,
I19): this module only reads it back.

A run of units comes back as columns (ids, devices, sample counts, and one buffer with the
units' bytes exactly as committed, with their offsets): SQLite concatenates the run's units in
one step (about the byte bound's worth at the last run's mean unit size, never more than
RUN_CAP bytes), and the sync frames its messages from that buffer (edgeos.sync._frame). One
step for the whole run, not one per unit, keeps the reader thread off the GIL while SQLite
reads its pages, so the event loop publishes meanwhile (docs/benchmarks.md, twelfth session).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("edgeos.store")

DB_NAME = "edgeos.db"
REPLACED_CHECK_S = 1.0  # how often a connection checks that the store file is still the same
RUN_ROWS = 4096  # bound on one run (the byte bound usually ends it first)
RUN_CAP = 4 << 20  # bytes: the longest run SQLite is let build in one piece (4 x the usual bound)


class UnitRun:
    """Consecutive stored units in id order, as columns: ids, devices, sample counts, and the
    units' bytes exactly as committed, one after the other in `blob`, unit i at
    blob[offsets[i]:offsets[i + 1]]. `last` is the highest id the read covered (units above
    it were not looked at), 0 when nothing was read."""

    __slots__ = ("blob", "devices", "ids", "last", "offsets", "samples")

    def __init__(
        self, ids: list[int], devices: list[str], samples: list[int], blob: bytes, offsets: np.ndarray, last: int = 0
    ) -> None:
        self.ids, self.devices, self.samples, self.blob, self.offsets, self.last = (
            ids,
            devices,
            samples,
            blob,
            offsets,
            last,
        )

    @property
    def data(self) -> list[memoryview]:
        """Each unit's bytes, sliced from the one buffer without a copy."""
        view = memoryview(self.blob)
        bounds = self.offsets.tolist()
        return [view[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def __len__(self) -> int:
        return len(self.ids)


def _columns(rows: list[tuple[int, str, int, bytes]]) -> UnitRun:
    if not rows:
        return UnitRun([], [], [], b"", np.zeros(1, np.int64), 0)
    ids, devices, samples, data = (list(c) for c in zip(*rows, strict=True))
    offsets = np.zeros(len(data) + 1, np.int64)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    return UnitRun(ids, devices, samples, b"".join(data), offsets, ids[-1])


class Outbox:
    """Read-only access to the units a store holds for upstream. Not thread-safe: one per thread.

    Follows the store when it moves a corrupt file aside and starts a new one at the same path
    (docs/store.md I9): `generation` counts the files opened, so a caller can republish what
    depends on the file (the tag dictionary)."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.path = Path(data_dir).absolute() / DB_NAME
        self.generation = 0
        self._db: sqlite3.Connection | None = None
        self._file: tuple[int, int] | None = None
        self._checked = 0.0
        self._tags_key: tuple[int, int | None] | None = None
        self._tags = 0
        # device_before's summary: each device's last id below _summary_bound, of file generation
        # _summary_file (units deleted since may still be named: a consumer then hears "gone").
        self._summary: dict[str, int] = {}
        self._summary_bound = 1
        self._summary_file = -1
        # Bytes, the last run's mean: how many units the next run reads. The first guess is large,
        # so a first run is seldom past its bound (a lane's first read is small, to publish soon).
        self._unit_size = 16 << 10
        self._utf8 = -1  # the file generation known to be UTF-8 (edgeos creates no other)

    # -- the connection ---------------------------------------------------------------------

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _open(self) -> None:
        while True:
            before = self._identity()
            db = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, check_same_thread=False)
            db.execute("PRAGMA busy_timeout=5000")
            if self._identity() == before:
                self._db, self._file = db, before
                self.generation += 1
                return
            db.close()  # replaced while opening: open the new one

    def conn(self) -> sqlite3.Connection:
        """The read connection; reopened when the file at the path is a new one. While the path
        is missing (between a move aside and the new file) the old file is still read."""
        now = time.monotonic()
        if self._db is not None and now - self._checked >= REPLACED_CHECK_S:
            self._checked = now
            ident = self._identity()
            if ident is not None and ident != self._file:
                log.warning("store %s was replaced (quarantined?); reading the new file", self.path)
                self.close()
        if self._db is None:
            self._open()
            self._checked = now
        assert self._db is not None
        return self._db

    def replaced(self) -> bool:
        """True when the path now holds another file than the one open (checked now)."""
        ident = self._identity()
        return self._db is not None and ident is not None and ident != self._file

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- reads ----------------------------------------------------------------------------

    def cursor(self) -> int:
        """The sync cursor the writer last saved (0 if none)."""
        row = self.conn().execute("SELECT value FROM meta WHERE key='sync_cursor'").fetchone()
        return int(row[0]) if row else 0

    def head(self) -> int:
        """The highest unit id stored now (0 when none)."""
        return self.conn().execute("SELECT COALESCE(MAX(id), 0) FROM units").fetchone()[0]

    def top(self) -> int:
        """The highest unit id this file ever gave (stored or since deleted: I14)."""
        db = self.conn()
        row = db.execute("SELECT CAST(value AS INTEGER) FROM meta WHERE key='top_id'").fetchone()
        top = int(row[0]) if row and row[0] is not None else 0
        return max(top, self.head())

    def dictionary(self) -> list[tuple[int, str, str, str, str]]:
        """Every tag row, retired ones included: (id, device, name, kind, unit), by id."""
        return self.conn().execute("SELECT id, device, name, kind, unit FROM tags ORDER BY id").fetchall()

    def tag_count(self) -> int:
        """How many tag rows the store holds (retired ones included). Asked by the sync at every
        live read: a COUNT over 16,000 tags was 14 % of the event loop's busy time at 10,000
        tags, so it is counted again only when the highest id moved (tag rows are never deleted,
        so an unchanged highest id in the same file means an unchanged count)."""
        db = self.conn()
        key = (self.generation, db.execute("SELECT MAX(id) FROM tags").fetchone()[0])
        if key != self._tags_key:
            self._tags_key, self._tags = key, db.execute("SELECT COUNT(*) FROM tags").fetchone()[0]
        return self._tags

    def after(self, cursor: int, end: int | None = None, max_bytes: int = 1 << 20) -> UnitRun:
        """Units with cursor < id (< end), in id order, about `max_bytes` of unit bytes at the
        last run's mean unit size (at least one unit, never over max(RUN_CAP, 4 x max_bytes)).
        One query, or a row per unit to the byte bound when that one refuses."""
        return self._run("id > ?" + (" AND id < ?" if end is not None else ""), (cursor, end), max_bytes)

    def range(self, first: int, last: int, device: str | None = None, max_bytes: int = 1 << 20) -> UnitRun:
        """Units with first <= id <= last (of `device` only, when given), in id order, up to
        about `max_bytes`. `last` of the result is where the next read starts after."""
        return self._range(self.conn(), first, last, device, max_bytes)

    def _range(self, db: sqlite3.Connection, first: int, last: int, device: str | None, max_bytes: int) -> UnitRun:
        where = "id >= ? AND id <= ?" + (" AND device = ?" if device is not None else "")
        return self._run(where, (first, last, device), max_bytes, upto=last, db=db)

    def _run(
        self, where: str, args: tuple, max_bytes: int, upto: int | None = None, db: sqlite3.Connection | None = None
    ) -> UnitRun:
        """The units `where` selects, from the first, up to about `max_bytes`. With `upto` (the
        highest id `where` admits), `last` is `upto` when no unit is left after the run."""
        params = tuple(a for a in args if a is not None)
        db = db if db is not None else self.conn()
        count = min(RUN_ROWS, max_bytes // self._unit_size + 1)  # at the last run's mean unit size
        run = self._concatenated(db, where, params, count, max(RUN_CAP, 4 * max_bytes))
        if run is None:
            return self._rows(db, where, params, max_bytes, upto)
        if upto is not None and len(run) < count:
            run.last = upto  # nothing more in the range
        return run

    def _concatenated(self, db: sqlite3.Connection, where: str, params: tuple, count: int, cap: int) -> UnitRun | None:
        """The first `count` units `where` selects, from one aggregate row, their bytes sliced
        from one buffer. SQLite refuses to build a concatenation longer than `cap` bytes (its
        length limit, set for this statement only), so units larger than the estimate cannot
        make a run of unbounded size. None (read them row by row) past the cap, or if the row
        does not check out: that an aggregate takes its subquery's rows in order is SQLite's
        behaviour, not a documented promise, so the ids must ascend, each column must have as
        many items and the lengths must add up to the bytes."""
        if self._utf8 != self.generation:
            # A blob concatenated as text is passed through untouched only in a UTF-8 file.
            if db.execute("PRAGMA encoding").fetchone()[0] != "UTF-8":
                return None
            self._utf8 = self.generation
        before = db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, cap)
        try:
            row = db.execute(
                "SELECT group_concat(id), group_concat(device, char(10)), group_concat(n),"
                " group_concat(length(data)), CAST(group_concat(data, '') AS BLOB)"
                f" FROM (SELECT id, device, n, data FROM units WHERE {where} ORDER BY id LIMIT {count})",
                params,
            ).fetchone()
        except sqlite3.DataError:  # string or blob too big
            return None
        finally:
            db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, before)
        if row[0] is None:
            return _columns([])
        try:
            ids = np.fromstring(row[0], np.int64, sep=",")
            devices = row[1].split("\n")
            samples = np.fromstring(row[2], np.int64, sep=",")
            sizes = np.fromstring(row[3], np.int64, sep=",")
        except ValueError:
            return None
        blob = row[4]
        n = len(ids)
        if not (
            len(devices) == len(samples) == len(sizes) == n
            and n
            and (sizes >= 0).all()
            and int(sizes.sum()) == len(blob)
            and (n == 1 or bool((ids[1:] > ids[:-1]).all()))
        ):
            return None
        self._unit_size = max(1, len(blob) // n)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        return UnitRun(ids.tolist(), devices, samples.tolist(), blob, offsets, int(ids[-1]))

    def _rows(self, db: sqlite3.Connection, where: str, params: tuple, max_bytes: int, upto: int | None) -> UnitRun:
        """A row per unit, stepped until the bytes pass max_bytes (the aggregate's fallback)."""
        cur = db.execute(f"SELECT id, device, n, data FROM units WHERE {where} ORDER BY id LIMIT {RUN_ROWS}", params)
        rows = []
        total = 0
        try:
            for row in cur:
                rows.append(row)
                total += len(row[3])
                if total >= max_bytes:
                    break
        finally:
            cur.close()
        run = _columns(rows)
        if rows:
            self._unit_size = max(1, total // len(rows))
        if upto is not None and len(rows) < RUN_ROWS and total < max_bytes:
            run.last = upto  # nothing more in the range
        return run

    def held_range(
        self, first: int, last: int, device: str | None = None, max_bytes: int = 1 << 20
    ) -> tuple[UnitRun, list[tuple[int, int]]]:
        """`range(first, last, device, max_bytes)` and `gone(first, run.last)`, read in one
        snapshot: each id of [first, run.last] is then in the run, another device's held unit,
        or gone. (Read apart, a unit the budget or retention deletes between the two reads
        would be in neither: the replay's answer must name it.)"""
        db = self.conn()
        db.execute("BEGIN")
        try:
            run = self._range(db, first, last, device, max_bytes)
            return run, self._holes(db, first, run.last)
        finally:
            db.execute("COMMIT")

    def gone(self, first: int, last: int) -> list[tuple[int, int]]:
        """The ids in [first, last] this store no longer holds, as inclusive runs: one pass
        over the ids (the primary key), returning only the edges of the holes."""
        db = self.conn()
        db.execute("BEGIN")
        try:
            return self._holes(db, first, last)
        finally:
            db.execute("COMMIT")

    @staticmethod
    def _holes(db: sqlite3.Connection, first: int, last: int) -> list[tuple[int, int]]:
        if first > last:
            return []
        holes = db.execute(
            "SELECT p + 1, id - 1 FROM (SELECT id, LAG(id, 1, ?) OVER (ORDER BY id) AS p FROM units "
            "WHERE id >= ? AND id <= ?) WHERE id > p + 1",
            (first - 1, first, last),
        ).fetchall()
        top = db.execute("SELECT MAX(id) FROM units WHERE id >= ? AND id <= ?", (first, last)).fetchone()[0]
        if top is None:
            return [(first, last)]
        out = [(int(a), int(b)) for a, b in holes]
        if top < last:
            out.append((int(top) + 1, last))
        return out

    def device_before(self, device: str, before: int, scan: int = 100_000) -> int:
        """The id of `device`'s last unit below `before` still stored (0 when it has none).

        The last `scan` ids are looked at first (a device polled among others is there).
        Below them, a summary answers: every device's last id below a bound, built with one
        pass over the ids the first time it is needed on this file and brought forward as
        `before` moves on, so a device polled every 15 minutes beside busy ones costs one
        pass per file, not one per session. (Without it, a sparse device's first unit of a
        session named no predecessor, `pv` 0, and a consumer could not see that units before
        it were lost: an independent tester's finding.)"""
        sql = "SELECT id FROM units WHERE id < ? AND id >= ? AND device = ? ORDER BY id DESC LIMIT 1"
        db = self.conn()
        row = db.execute(sql, (before, before - scan, device)).fetchone()
        if row:
            return int(row[0])
        bound = before - scan  # ids below it, not looked at yet
        if bound <= 1:
            return 0
        if self._summary_file != self.generation:
            self._summary, self._summary_bound, self._summary_file = {}, 1, self.generation
        if bound >= self._summary_bound:
            if bound > self._summary_bound:
                for dev, last in db.execute(
                    "SELECT device, MAX(id) FROM units WHERE id >= ? AND id < ? GROUP BY device",
                    (self._summary_bound, bound),
                ):
                    self._summary[dev] = max(self._summary.get(dev, 0), int(last))
                self._summary_bound = bound
            return self._summary.get(device, 0)
        # Below what the summary covers (a replay of older units): valid when the device's
        # last unit there lies below the bound too; else one query for this device.
        known = self._summary.get(device, 0)
        if known < bound:
            return known
        row = db.execute("SELECT MAX(id) FROM units WHERE id < ? AND device = ?", (bound, device)).fetchone()
        return int(row[0]) if row and row[0] is not None else 0


class Backlog:
    """Units and samples above the cursor, counted per block of ids so that a refresh reads only
    what changed: the ids committed since the last one, and the block the cursor is in.

    One per thread (the sync's status thread). Units the store deletes above the cursor
    (retention, the size budget) drop out when they are the oldest, as those are; one deleted
    elsewhere stays counted until the cursor passes its block.
    """

    BLOCK = 1024

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.generation = -1
        self.reset()

    def reset(self) -> None:
        self.blocks: dict[int, list[int]] = {}  # id // BLOCK -> [units, samples]
        self.top = 0  # the highest id counted
        self.front = -1  # the id after which the front block was last counted

    def refresh(self, cursor: int) -> tuple[int, int, int, int | None]:
        """(head, units, samples, t_min of the first unit above the cursor), one snapshot."""
        db = self.outbox.conn()
        if self.outbox.generation != self.generation:
            self.generation = self.outbox.generation
            self.reset()
        db.execute("BEGIN")
        try:
            return self._refresh(db, cursor)
        except BaseException:
            self.reset()  # counts half updated: start over at the next refresh
            raise
        finally:
            if db.in_transaction:
                db.execute("COMMIT")

    def _refresh(self, db: sqlite3.Connection, cursor: int) -> tuple[int, int, int, int | None]:
        b = self.BLOCK
        head = db.execute("SELECT COALESCE(MAX(id), 0) FROM units").fetchone()[0]
        first = db.execute("SELECT id, t_min FROM units WHERE id > ? ORDER BY id LIMIT 1", (cursor,)).fetchone()
        if head < self.top:  # not the file counted so far
            self.reset()
        # Nothing is stored between the cursor and the first unit above it.
        lo = cursor if first is None else max(cursor, first[0] - 1)
        start = max(self.top, lo)
        if head > start:
            for block, units, samples in db.execute(
                "SELECT id / ?, COUNT(*), SUM(n) FROM units WHERE id > ? AND id <= ? GROUP BY id / ?",
                (b, start, head, b),
            ):
                counts = self.blocks.setdefault(block, [0, 0])
                counts[0] += units
                counts[1] += samples
        self.top = max(self.top, head)
        front = (lo + 1) // b
        for block in [k for k in self.blocks if k < front]:
            del self.blocks[block]
        if lo != self.front and front in self.blocks:
            units, samples = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(n), 0) FROM units WHERE id > ? AND id < ? AND id <= ?",
                (lo, (front + 1) * b, head),
            ).fetchone()
            self.blocks[front] = [units, samples]
        self.front = lo
        units = sum(c[0] for c in self.blocks.values())
        samples = sum(c[1] for c in self.blocks.values())
        return head, units, samples, None if first is None else first[1]
