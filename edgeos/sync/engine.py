"""Store-and-forward: publish stored units in order from a persisted cursor.

The store is the source of truth. Units are read from it by id (the per-gateway sequence),
framed without re-encoding (edgeos.wire), published with QoS 1, and the cursor advances only
over units whose PUBACK came back. Everything at or below the cursor is acknowledged (or gone
from the store); a restart resumes after it, so delivery is at-least-once and consumers make
it exactly-once with the (gateway, seq) key. Policy for outages (docs/payload.md):

- After a reconnect with a backlog, two lanes run at once: the **backlog lane** drains the
  units that were waiting, oldest first, under the rate cap; the **live lane** publishes units
  committed from then on, uncapped, so current values are never held behind hours of history.
- Each lane has its own in-flight window, so neither can starve the other.
- A publish the broker refuses (an MQTT 5 PUBACK reason code of 0x80 or more) is not a delivery:
  the session ends with the error, the cursor holds, and the connection is retried with backoff.

Threads: the lanes, the cursor and `status.cursor` live on the event loop. `cursor` is a plain
int assigned there at every acknowledgement, so another thread (the store's, saving it) reads a
value that was true when assigned and never ahead of an unacknowledged unit. The status thread
(`_io`) gets the cursor as an argument and never touches a lane.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgeos import wire
from edgeos.adapter import first_error
from edgeos.errors import SyncError
from edgeos.logs import RateLimited
from edgeos.retry import backoff_delay

log = logging.getLogger("edgeos.sync")

MAX_MESSAGE_BYTES = 256 * 1024
FETCH_ROWS = 256  # per read; fewer would cut messages short when several devices interleave
# No memory map (PRAGMA mmap_size): a media error under a mapped page is a SIGBUS, which kills the
# daemon, where read() returns an error the sync can report and retry.
REPLACED_CHECK_S = 1.0  # how often a connection checks that the store file is still the same


class Session(Protocol):
    """A connected broker session."""

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Return once the broker acknowledged (QoS 1 PUBACK); raise SyncError on failure."""


class Transport(Protocol):
    def session(self) -> contextlib.AbstractAsyncContextManager[Session]:
        """Connect (raising SyncError with a clear reason), yield a session, disconnect."""


@dataclass
class SyncStatus:
    state: str = "starting"  # starting | connecting | connected | backoff
    cursor: int = 0
    head: int = 0
    backlog_units: int = 0
    backlog_samples: int = 0
    lag_seconds: float = 0.0
    published_samples: int = 0
    published_messages: int = 0
    published_bytes: int = 0
    last_publish_ns: int = 0
    connects: int = 0
    failures: int = 0
    last_error: str = ""


class TokenBucket:
    """Rate cap for the backlog lane: bytes/s and messages/s, one second of burst."""

    def __init__(self, bytes_per_s: float | None, messages_per_s: float | None) -> None:
        self.rates = (bytes_per_s, messages_per_s)
        self.tokens = [r or 0.0 for r in self.rates]
        self.stamp = time.monotonic()

    async def take(self, nbytes: int) -> None:
        need = (float(nbytes), 1.0)
        while True:
            now = time.monotonic()
            waits = []
            for i, rate in enumerate(self.rates):
                if not rate:
                    continue
                self.tokens[i] = min(rate, self.tokens[i] + (now - self.stamp) * rate)
                # A message bigger than one second's budget may go once the bucket is full.
                want = min(need[i], rate)
                if self.tokens[i] < want:
                    waits.append((want - self.tokens[i]) / rate)
            self.stamp = now
            if not waits:
                for i, rate in enumerate(self.rates):
                    if rate:
                        self.tokens[i] -= need[i]
                return
            await asyncio.sleep(max(waits))


@dataclass
class _Lane:
    """Units with after < id < end, published in id order (end None: the live lane, unbounded)."""

    name: str
    after: int  # the last id handed to a publish
    end: int | None
    window: asyncio.Semaphore
    bucket: TokenBucket | None = None
    inflight: dict[int, int] = field(default_factory=dict)  # message key -> lowest seq in it

    @property
    def done(self) -> bool:
        return self.end is not None and self.after >= self.end - 1 and not self.inflight


class _Backlog:
    """Units and samples above the cursor, counted per block of ids so that a refresh reads only
    what changed: the ids committed since the last one, and the block the cursor is in.

    Only the status thread uses it. Units the store deletes above the cursor (retention, the size
    budget) drop out when they are the oldest, as those are; one deleted elsewhere stays counted
    until the cursor passes its block.
    """

    BLOCK = 1024

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.blocks: dict[int, list[int]] = {}  # id // BLOCK -> [units, samples]
        self.top = 0  # the highest id counted
        self.front = -1  # the id after which the front block was last counted

    def refresh(self, db: sqlite3.Connection, cursor: int) -> tuple[int, int, int, int | None]:
        """(head, units, samples, t_min of the first unit above the cursor), one snapshot."""
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


class Sync:
    """Runs until cancelled; reconnects with capped full-jitter backoff."""

    def __init__(self, gateway: str, data_dir: Path, options: dict[str, Any], transport: Transport) -> None:
        self.gateway = gateway
        self.path = Path(data_dir) / "edgeos.db"
        self.options = options
        self.transport = transport
        self.status = SyncStatus()
        self.wakeup = asyncio.Event()
        self._acked = asyncio.Event()
        self.errors = RateLimited(log)
        self._cursor = 0  # assigned on the event loop only (see `cursor`)
        self._db: sqlite3.Connection | None = None
        self._db_file: tuple[int, int] | None = None
        self._db_checked = 0.0
        # Only ever used in the _io thread:
        self._status_db: sqlite3.Connection | None = None
        self._status_file: tuple[int, int] | None = None
        self._status_checked = 0.0
        self._backlog = _Backlog()
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgeos-sync")
        self._dictionary_version = -1
        self._key = 0
        self._lanes: list[_Lane] = []
        self._failing_at: int | None = None  # the cursor when the last session failed

    # -- store access (read-only connections of its own) -----------------------------------

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _open(self) -> tuple[sqlite3.Connection, tuple[int, int] | None]:
        """A read-only connection and the identity (device, inode) of the file it opened."""
        while True:
            before = self._identity()
            db = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, check_same_thread=False)
            db.execute("PRAGMA busy_timeout=5000")
            if self._identity() == before:
                return db, before
            db.close()  # replaced while opening: open the new one

    def _replaced(self, opened: tuple[int, int] | None) -> bool:
        """The store moved a corrupt file aside and started a new one at the same path. While
        the path is missing (between the two) the old file is still read."""
        now = self._identity()
        return now is not None and now != opened

    def _conn(self) -> sqlite3.Connection:
        """The event loop's read connection. Reads are short (one batch of units at a time);
        done in a worker thread, they cost the loop more in GIL hand-offs than they take."""
        now = time.monotonic()
        if self._db is not None and now - self._db_checked >= REPLACED_CHECK_S:
            self._db_checked = now
            if self._replaced(self._db_file):
                log.warning(
                    "upstream: %s was replaced (the store quarantined it?); reading the new file from "
                    "after unit %d, which the broker has",
                    self.path,
                    self._cursor,
                )
                self._db.close()
                self._db = None
                self._dictionary_version = -1  # the new file's tags: republished before its units
        if self._db is None:
            self._db, self._db_file = self._open()
            self._db_checked = now
        return self._db

    def _read_cursor(self) -> int:
        row = self._conn().execute("SELECT value FROM meta WHERE key='sync_cursor'").fetchone()
        return int(row[0]) if row else 0

    def _fetch(self, after: int, end: int | None) -> list[tuple[int, str, int, bytes]]:
        sql = "SELECT id, device, n, data FROM units WHERE id > ?" + (" AND id < ?" if end else "")
        args = (after, end) if end else (after,)
        return self._conn().execute(sql + " ORDER BY id LIMIT ?", (*args, FETCH_ROWS)).fetchall()

    def _prepare(self, after: int, end: int | None) -> tuple[int, list[tuple[str, list[int], bytes, int]]]:
        """Read the next run of units and frame them (without re-encoding).
        Returns (last id read or 0, messages)."""
        rows = self._fetch(after, end)
        if not rows:
            return 0, []
        version = self._dictionary_version
        messages = [
            (device, seqs, wire.encode_message(self.gateway, device, seqs, blobs, version), samples)
            for device, seqs, blobs, samples in _pack(rows)
        ]
        return rows[-1][0], messages

    def _head(self) -> int:
        return self._conn().execute("SELECT COALESCE(MAX(id), 0) FROM units").fetchone()[0]

    def _dictionary(self) -> list[tuple[int, str, str, str, str]]:
        return self._conn().execute("SELECT id, device, name, kind, unit FROM tags ORDER BY id").fetchall()

    def refresh_status(self, cursor: int | None = None) -> None:
        """Backlog and lag above `cursor` (captured on the event loop), for status and metrics:
        in the worker thread, on its own connection, reading only what changed since the last
        call. Lag is the age of the oldest sample of the first unit not yet acknowledged."""
        now = time.monotonic()
        if self._status_db is not None and now - self._status_checked >= REPLACED_CHECK_S:
            self._status_checked = now
            if self._replaced(self._status_file):
                self._status_db.close()
                self._status_db = None
        if self._status_db is None:
            self._status_db, self._status_file = self._open()
            self._status_checked = now
            self._backlog = _Backlog()
        if cursor is None:
            cursor = self._cursor
        head, units, samples, oldest = self._backlog.refresh(self._status_db, cursor)
        st = self.status
        st.head = head
        st.backlog_units = units
        st.backlog_samples = samples
        st.lag_seconds = max(0.0, (time.time_ns() - oldest) / 1e9) if oldest else 0.0

    # -- the cursor ----------------------------------------------------------------------

    @property
    def cursor(self) -> int:
        """Every unit with id <= cursor is acknowledged by the broker (or no longer stored).

        A plain int assigned on the event loop at every acknowledgement: reading it from another
        thread is safe, and gives a value that was true when it was assigned."""
        return self._cursor

    def _advance(self) -> None:
        """Recompute the cursor from the lanes; on the event loop, after any change to a lane."""
        frontier = []
        for lane in self._lanes:
            if lane.inflight:
                frontier.append(min(lane.inflight.values()))
            if not lane.done:
                frontier.append(lane.after + 1)
        if frontier:
            self._cursor = min(frontier) - 1
        self.status.cursor = self._cursor

    # -- main loop -----------------------------------------------------------------------

    async def run(self) -> None:
        attempt = 0
        while True:  # a store busy or failing at start must not take the daemon down with the sync
            try:
                self._cursor = self.status.cursor = self._read_cursor()
                break
            except sqlite3.Error as e:
                if self._db is not None:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.close()
                    self._db = None
                self.errors.log(logging.ERROR, "cursor", "upstream: cannot read the sync cursor (%s); retrying", e)
                await asyncio.sleep(
                    backoff_delay(attempt, self.options["reconnect_min"], self.options["reconnect_max"])
                )
                attempt += 1
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch(), name="sync:status")
            tg.create_task(self._connect_loop(), name="sync:connection")

    async def _watch(self) -> None:
        """Backlog and lag, refreshed once a second whether connected or not."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(self._io, self.refresh_status, self._cursor)
            except sqlite3.Error as e:
                log.debug("sync status: %s", e)
            await asyncio.sleep(1.0)

    async def _connect_loop(self) -> None:
        attempt = 0
        lo = self.options["reconnect_min"]
        hi = self.options["reconnect_max"]
        while True:
            self.status.state = "connecting"
            start = self._cursor
            connected_at = None
            try:
                async with self.transport.session() as session:
                    connected_at = time.monotonic()
                    self.status.connects += 1
                    self.status.state = "connected"
                    await self._pump(session)
            except Exception as exc:  # any failure of a session: reconnect, never take the daemon down
                e = first_error(exc)
                if not isinstance(e, SyncError):
                    log.exception("upstream: unexpected error", exc_info=e)
                self._lanes = []  # the cursor stays where the acknowledgements left it
                if self._failing_at is None:
                    self._failing_at = self._cursor
                self.status.failures += 1
                self.status.last_error = str(e)
                self.errors.log(logging.ERROR, str(e)[:80], "upstream: %s; data keeps accumulating locally", e)
            lasted = 0.0 if connected_at is None else time.monotonic() - connected_at
            if self._cursor > start or lasted * 1e9 > hi:
                # The session moved the cursor (or stood) before it failed: a new outage, so
                # backoff starts over. One whose unit is refused again and again cannot move the
                # cursor past it, whatever else is acknowledged meanwhile: it keeps backing off.
                attempt = 0
            self.status.state = "backoff"
            await asyncio.sleep(backoff_delay(attempt, lo, hi))
            attempt += 1

    async def _pump(self, session: Session) -> None:
        await self._publish_dictionary(session)
        cursor = self._cursor
        head = self._head()
        window = self.options["max_inflight"]
        cap = TokenBucket(self.options["rate_limit_bytes"], self.options["rate_limit_messages"])
        if head - cursor > 2 * window:
            # A backlog: drain it under the cap while live units go out beside it.
            self._lanes = [
                _Lane("backlog", cursor, head + 1, asyncio.Semaphore(window), cap),
                _Lane("live", head, None, asyncio.Semaphore(max(2, window // 4))),
            ]
            log.info("upstream: draining a backlog of %d units while forwarding live data", head - cursor)
        else:
            # Live data is never capped (docs/payload.md): the cap is for draining a backlog.
            self._lanes = [_Lane("live", cursor, None, asyncio.Semaphore(window))]
        async with asyncio.TaskGroup() as tg:
            for lane in self._lanes:
                tg.create_task(self._lane(session, lane, tg), name=f"sync:{lane.name}")

    async def _lane(self, session: Session, lane: _Lane, tg: asyncio.TaskGroup) -> None:
        after = lane.after
        while not lane.done:
            last, messages = self._prepare(after, lane.end)  # one batch, a few ms at most
            if not messages:
                if lane.end is not None:
                    lane.after = lane.end - 1  # the rest of the backlog is no longer stored
                    self._advance()
                    if lane.done:
                        break
                self.wakeup.clear()
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
                # arrives as the wait ends, and the lane would outlive its stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await self.wakeup.wait()
                after = lane.after
                continue
            if lane.end is None and self._dictionary_version < self._tag_count():
                # New tags (or a new store file) since the last dictionary: publish it before the
                # units that use it, then read and frame them again so their `td` names it.
                await self._publish_dictionary(session)
                after = lane.after
                continue
            after = last
            for device, seqs, payload, samples in messages:
                if lane.bucket is not None:
                    await lane.bucket.take(len(payload))
                await lane.window.acquire()
                self._key += 1
                lane.inflight[self._key] = seqs[0]
                tg.create_task(self._send(session, lane, self._key, device, payload, samples), name="sync:publish")
            lane.after = last
            self._advance()
        log.info("upstream: backlog drained")

    def _tag_count(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM tags").fetchone()[0]

    async def _send(self, session: Session, lane: _Lane, key: int, device: str, payload: bytes, samples: int) -> None:
        try:
            await session.publish(self.topic(device), payload)
        finally:
            lane.window.release()
        del lane.inflight[key]
        self._advance()
        self._acked.set()
        if self._failing_at is not None and self._cursor > self._failing_at:
            # Delivering again means the cursor moved past where the failure held it; acks of
            # later units beside a unit still refused do not count (nor reset the log's limit).
            self._failing_at = None
            log.warning("upstream: delivering again")
            self.errors.clear("")
        st = self.status
        st.published_samples += samples
        st.published_messages += 1
        st.published_bytes += len(payload)
        st.last_publish_ns = time.time_ns()

    async def _publish_dictionary(self, session: Session) -> None:
        tags = self._dictionary()
        topic = self.options["status_topic"].format(gateway=self.gateway).rsplit("/", 1)[0] + "/tags"
        await session.publish(topic, wire.encode_dictionary(self.gateway, tags), retain=True)
        self._dictionary_version = len(tags)

    async def flush(self, within: float) -> bool:
        """At an orderly stop: forward what is committed, if connected, within `within` s."""
        if self.status.state != "connected":
            return False
        head = self._head()
        self.wakeup.set()
        try:
            async with asyncio.timeout(within):
                while self.cursor < head and self.status.state == "connected":
                    self._acked.clear()
                    await self._acked.wait()
        except TimeoutError:
            return False
        return self.cursor >= head

    def topic(self, device: str) -> str:
        return self.options["topic"].format(gateway=self.gateway, device=device)

    async def final_status(self) -> None:
        """At a stop, after the cursor is saved: backlog, cursor and head as they are now, so the
        status written last does not show them a second old."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._io, self.refresh_status, self._cursor)
        except sqlite3.Error as e:
            log.debug("sync status at stop: %s", e)

    def close(self) -> None:
        def shut() -> None:
            if self._status_db is not None:
                self._status_db.close()
                self._status_db = None

        self._io.submit(shut).result()
        self._io.shutdown(wait=True)
        if self._db is not None:
            self._db.close()
            self._db = None


def _pack(rows: list[tuple[int, str, int, bytes]]) -> list[tuple[str, list[int], list[bytes], int]]:
    """Group a run of units into messages: per device, in id order, up to MAX_MESSAGE_BYTES."""
    by_device: dict[str, list[tuple[int, int, bytes]]] = {}
    for uid, device, n, data in rows:
        by_device.setdefault(device, []).append((uid, n, data))
    out = []
    for device, units in by_device.items():
        seqs: list[int] = []
        blobs: list[bytes] = []
        size = samples = 0
        for uid, n, data in units:
            if blobs and size + len(data) > MAX_MESSAGE_BYTES:
                out.append((device, seqs, blobs, samples))
                seqs, blobs, size, samples = [], [], 0, 0
            seqs.append(uid)
            blobs.append(data)
            size += len(data)
            samples += n
        if blobs:
            out.append((device, seqs, blobs, samples))
    # Publish in the order of each message's first unit, so per device order holds.
    out.sort(key=lambda m: m[1][0])
    return out
