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

- **Replay on request.** The sync subscribes to the replay topic; a well-formed request for a
  seq range (optionally one device) is answered with the units still held, byte for byte as
  first sent and marked as replays, through the backlog lane's rate cap, and with the exact
  ranges no longer held on `<replay topic>/gone`. Anything else is counted and ignored.
- **Size cap.** No message exceeds `max_message`; a unit too large for it goes as parts
  (docs/payload.md, "Continuation"), one seq all the same.

The store is read only through its outbox API (edgeos.store.outbox): no SQL here.

Threads: the lanes, the cursor and `status.cursor` live on the event loop. `cursor` is a plain
int assigned there at every acknowledgement, so another thread (the store's, saving it) reads a
value that was true when assigned and never ahead of an unacknowledged unit. The status thread
(`_io`) gets the cursor as an argument and never touches a lane.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import random
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeos import filters, wire
from edgeos.adapter import first_error
from edgeos.errors import SyncError
from edgeos.logs import RateLimited
from edgeos.retry import backoff_delay
from edgeos.store.outbox import Backlog, Outbox, UnitRun
from edgeos.sync._reference import assemble as _reference_assemble

try:
    from edgeos.sync._frame import assemble as _assemble  # type: ignore[import-not-found]
except ImportError:  # a pure build (EDGEOS_NO_EXTENSIONS=1): the plain-Python twin
    _assemble = _reference_assemble

log = logging.getLogger("edgeos.sync")

if _assemble is _reference_assemble and filters.COMPILED:
    # One build compiles both: the kernels without the framing is a broken or stale install.
    log.warning("edgeos.sync._frame is missing from a compiled build: messages framed in Python (slower); reinstall")

DEFAULT_MAX_MESSAGE = 128 * 1024
# A PUBLISH packet's bytes beside its payload: fixed header (5 at most), topic (2 + its length),
# packet id (2), property length (1: none sent). 1 KiB leaves room for topics up to ~1,000 bytes.
PUBLISH_ROOM = 1024
# Unit bytes per read of the outbox at most: several messages per GIL hand-off, and a short
# tail (what is left to publish once the last run is read).
READ_BYTES = 1 << 20
READ_FIRST = 256 << 10  # a lane's first read, so publishing starts soon; then doubling
READ_AHEAD = 2  # runs read ahead of the one being published
REPLAY_QUEUE = 16  # requests waiting; more are counted (replay_dropped) and ignored
GONE_RANGES = 1000  # ranges per gone message (a fragmented range goes in several)
# The replay subscription waits for the session's first acknowledged unit, this long at most.
REPLAY_SUBSCRIBE_AFTER = 1.0


class Session(Protocol):
    """A connected broker session."""

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Return once the broker acknowledged (QoS 1 PUBACK); raise SyncError on failure."""

    async def subscribe(self, topic: str) -> None:
        """Subscribe with QoS 1; raise SyncError on failure."""

    def messages(self) -> AsyncIterator[tuple[str, bytes]]:
        """(topic, payload) of what arrives on the subscriptions, until the session ends."""


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
    server: str = ""  # the broker of the current (or last) session
    replay_listening: bool = False  # this session's subscription to the replay topic is in place
    replay_requests: int = 0  # well-formed requests taken
    replay_malformed: int = 0  # ignored: not a request of this gateway's
    replay_dropped: int = 0  # ignored: REPLAY_QUEUE requests were waiting
    replay_units: int = 0  # units sent again
    replay_gone: int = 0  # seqs answered as no longer held
    broker_receive_maximum: int = 0  # MQTT 5 CONNACK limits of the current session (0: none set)
    broker_max_packet: int = 0
    max_message: int = 0  # the cap this session frames messages within


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
    prev: dict[str, int] = field(default_factory=dict)  # device -> its last seq framed here

    @property
    def done(self) -> bool:
        return self.end is not None and self.after >= self.end - 1 and not self.inflight


@dataclass
class _Chain:
    """Where a lane's reader thread reads next: each run starts where the one before it ended.
    Touched only in the reader thread once made."""

    after: int
    prev: dict[str, int]
    size: int = READ_FIRST  # small reads first, so the first messages go out soon; then doubling


def _next_try_delay(attempt: int, servers: int, lo_ns: int, hi_ns: int, *, at_once: bool = False) -> float:
    """Seconds before connection attempt `attempt` + 1 of an outage. With several brokers the
    backoff grows per round of the list, not per broker. Only a round's first try waits the
    jittered backoff (a fleet that lost its broker spreads out there); the next broker of the
    same round is tried after at most a quarter of `lo_ns`: the list is a cluster whose nodes
    electing a leader may each hold a connection for CONNECT_TIMEOUT, and waiting between them
    only adds to the failover (issue 25: `sync.failover_s`). Rounds are counted in attempts
    since the last reset (a session that moved the cursor), not by the transport's index.
    `at_once`: the outage's first try was made without a wait (the daemon's start), so it
    was its first round's first try, and the next broker follows it soon."""
    rounds, nth = divmod(attempt + at_once, max(1, servers))
    if nth:
        return random.uniform(0, lo_ns / 4e9)
    return backoff_delay(rounds - at_once, lo_ns, hi_ns)


class _ReadAhead:
    """A lane's next runs, read and framed in its reader thread up to READ_AHEAD ahead of the
    loop, so that thread goes on to the next run without waiting for the loop to ask for it."""

    def __init__(self, sync: Sync, pool: concurrent.futures.ThreadPoolExecutor, outbox: Outbox, lane: _Lane) -> None:
        self.sync, self.pool, self.outbox, self.lane = sync, pool, outbox, lane
        self.queue: collections.deque[asyncio.Future] = collections.deque()
        self.chain = _Chain(lane.after, {})

    def restart(self, after: int) -> None:
        """Forget what was read ahead (its futures cancelled, if not started); read from `after`."""
        self.drop()
        self.chain = _Chain(after, dict(self.lane.prev))
        self._submit()

    def drop(self) -> None:
        while self.queue:
            self.queue.popleft().cancel()

    def _submit(self) -> None:
        loop = asyncio.get_running_loop()
        if self.lane.end is None:
            # The live lane's wake-up is cleared as a read is submitted, not once one came back
            # empty: a commit that lands meanwhile keeps it set, and the lane re-reads at once.
            self.sync.wakeup.clear()
        fut = loop.run_in_executor(self.pool, self.sync._prepare_next, self.outbox, self.chain, self.lane.end)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved if abandoned
        self.queue.append(fut)

    async def next(self) -> tuple[int, list[tuple[str, list[int], bytes, int]], dict[str, int], int, int]:
        result = await self.queue.popleft()
        if result[1]:
            while len(self.queue) < READ_AHEAD:
                self._submit()
        return result


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
        self.outbox = Outbox(data_dir)  # the event loop's (reads are short: a run of units)
        self._generations: dict[int, int] = {}  # per outbox: the file generation last read
        self._readers: dict[str, tuple[concurrent.futures.ThreadPoolExecutor, Outbox]] = {}
        # Only ever used in the _io thread:
        self._status_outbox = Outbox(data_dir)
        self._backlog = Backlog(self._status_outbox)
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgeos-sync")
        self._dictionary_version = -1
        self._key = 0
        self._lanes: list[_Lane] = []
        self._failing_at: int | None = None  # the cursor when the last session failed
        # Monotonic: since when no session has been up (None while one is). /healthz reads it,
        # so a broker outage shows whatever the wall clock does (`offline_seconds`).
        self._offline_since: float | None = time.monotonic()
        self._max_message = self.max_message = int(options.get("max_message") or DEFAULT_MAX_MESSAGE)
        template = options.get("replay_topic") or "edgeos/{gateway}/replay"
        self.replay_topic = template.format(gateway=gateway)
        self.gone_topic = self.replay_topic + "/gone"
        # The backlog lane's rate cap; replays take from the same bucket.
        self._cap = TokenBucket(options.get("rate_limit_bytes"), options.get("rate_limit_messages"))
        self._replays: asyncio.Queue[wire.ReplayRequest] = asyncio.Queue(REPLAY_QUEUE)
        self._session_acked = asyncio.Event()  # set by the first acknowledgement of a session

    # -- store access (the store's outbox API, read-only connections of its own) -------------

    def _read_cursor(self) -> int:
        return self.outbox.cursor()

    def _head(self) -> int:
        return self.outbox.head()

    def _fresh_file(self, outbox: Outbox) -> None:
        """A new store file since the last dictionary: its tags go out before its units."""
        seen = self._generations.get(id(outbox))
        if seen != outbox.generation:
            self._generations[id(outbox)] = outbox.generation
            if seen is not None:
                self._dictionary_version = -1

    def _prepare(
        self, outbox: Outbox, after: int, end: int | None, prev: dict[str, int], size: int = READ_BYTES
    ) -> tuple[int, list[tuple[str, list[int], bytes, int]], dict[str, int], int]:
        """Read the next run of units (about `size` bytes) and frame them (without re-encoding);
        in a lane's reader thread. Returns (last id read or 0, messages, each device's last seq
        framed, the dictionary version they name)."""
        run = outbox.after(after, end, size)
        self._fresh_file(outbox)
        version = self._dictionary_version
        if not len(run):
            return 0, [], {}, version
        messages, last = self._frame(run, prev, replay=False, outbox=outbox, version=version)
        return run.last, messages, last, version

    def _prepare_next(
        self, outbox: Outbox, chain: _Chain, end: int | None
    ) -> tuple[int, list[tuple[str, list[int], bytes, int]], dict[str, int], int, int]:
        """`_prepare` of the chain's next run, moving the chain past it, and for the live lane
        the store's tag count read after it (-1 otherwise); in the reader thread, so the loop
        runs no query of its own per run."""
        last, messages, framed, version = self._prepare(outbox, chain.after, end, chain.prev, chain.size)
        tags = -1
        if messages:
            chain.after, chain.prev = last, {**chain.prev, **framed}
            chain.size = min(READ_BYTES, chain.size * 2)
            if end is None:
                tags = outbox.tag_count()
        return last, messages, framed, version, tags

    def _frame(
        self,
        run: UnitRun,
        prev: dict[str, int],
        *,
        replay: bool,
        outbox: Outbox | None = None,
        version: int | None = None,
    ) -> tuple[list[tuple[str, list[int], bytes, int]], dict[str, int]]:
        """Messages of at most max_message bytes, per device in id order; each names the
        device's previous unit (`pv`). A unit too large for one message goes as parts."""
        outbox = outbox or self.outbox
        version = self._dictionary_version if version is None else version
        out: list[tuple[str, list[int], bytes, int]] = []
        last: dict[str, int] = {}
        ids, offsets = np.asarray(run.ids, np.int64), run.offsets
        samples_of = np.asarray(run.samples, np.int64)
        for device, idx in _pack(run, self.gateway, self.max_message):
            seqs = ids[idx].tolist()
            samples = int(samples_of[idx].sum())
            pv = last.get(device) or prev.get(device)
            if pv is None:
                pv = outbox.device_before(device, seqs[0])
            a, b = int(offsets[idx[0]]), int(offsets[idx[0] + 1])
            if len(seqs) == 1 and b - a + wire.message_overhead(self.gateway, device, 1) > self.max_message:
                blob = memoryview(run.blob)[a:b]
                out.extend(self._parts(device, seqs[0], blob, samples, version, pv, replay))
            else:
                head = wire._message_head(self.gateway, device, seqs, version, pv, replay, None, len(seqs))
                out.append((device, seqs, _assemble(head, run.blob, offsets, idx), samples))
            last[device] = seqs[-1]
        return out, last

    def _parts(
        self, device: str, seq: int, blob: bytes, samples: int, version: int, pv: int, replay: bool
    ) -> list[tuple[str, list[int], bytes, int]]:
        """One unit as `count` part messages, each within max_message (docs/payload.md,
        "Continuation"); the samples count with the last part, which completes the unit."""
        room = self.max_message - wire.message_overhead(self.gateway, device, 1, part=True)
        if room < 1024:
            raise SyncError(f"{self._cap_source()} of {self.max_message} bytes leaves no room for a unit's bytes")
        room = piece_size(room)
        count = -(-len(blob) // room)
        out = []
        for i in range(count):
            piece = blob[i * room : (i + 1) * room]
            payload = wire.encode_message(
                self.gateway, device, [seq], [piece], version, prev=pv, replay=replay, part=(i, count)
            )
            out.append((device, [seq], payload, samples if i == count - 1 else 0))
        return out

    def _dictionary(self) -> list[tuple[int, str, str, str, str]]:
        return self.outbox.dictionary()

    def refresh_status(self, cursor: int | None = None) -> None:
        """Backlog and lag above `cursor` (captured on the event loop), for status and metrics:
        in the worker thread, on its own connection, reading only what changed since the last
        call. Lag is the age of the oldest sample of the first unit not yet acknowledged."""
        if cursor is None:
            cursor = self._cursor
        head, units, samples, oldest = self._backlog.refresh(cursor)
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

    def offline_seconds(self) -> float:
        """How long no session has been up (0 while one is), on the monotonic clock."""
        since = self._offline_since
        return 0.0 if since is None else time.monotonic() - since

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
                with contextlib.suppress(sqlite3.Error):
                    self.outbox.close()
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
        at_once = True  # the first try is made without a wait: the first of its round
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
                    self.status.server = str(getattr(self.transport, "where", ""))
                    self.status.state = "connected"
                    self._offline_since = None
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
            self.status.replay_listening = False
            if self._offline_since is None:
                self._offline_since = time.monotonic()
            lasted = 0.0 if connected_at is None else time.monotonic() - connected_at
            if self._cursor > start or lasted * 1e9 > hi:
                # The session moved the cursor (or stood) before it failed: a new outage, so
                # backoff starts over. One whose unit is refused again and again cannot move the
                # cursor past it, whatever else is acknowledged meanwhile: it keeps backing off.
                attempt, at_once = 0, False
            self.status.state = "backoff"
            servers = len(getattr(self.transport, "servers", ()))
            await asyncio.sleep(_next_try_delay(attempt, servers, lo, hi, at_once=at_once))
            attempt += 1

    def _cap_source(self) -> str:
        if self.max_message < self._max_message:
            return f"the broker's Maximum Packet Size ({self.status.broker_max_packet} bytes) leaves a message cap"
        return "upstream.max_message"

    def _session_cap(self, session: Session) -> None:
        """`max_message` for this session: the configured cap, lowered to what the broker said
        in its CONNACK it accepts (MQTT 5 Maximum Packet Size, less PUBLISH_ROOM for the
        PUBLISH packet's own header, topic and properties). Sending more gets the connection
        dropped, and the same message sent again after the reconnect: a loop, never delivered."""
        st = self.status
        st.broker_receive_maximum = getattr(session, "receive_maximum", None) or 0
        st.broker_max_packet = limit = getattr(session, "max_packet", None) or 0
        cap = self._max_message
        if limit and limit - PUBLISH_ROOM < cap:
            cap = max(limit - PUBLISH_ROOM, 1)
        if cap != self.max_message:
            log.info(
                "upstream: %s accepts packets of at most %s bytes: messages are capped at %d bytes "
                "(upstream.max_message %d)",
                getattr(self.transport, "where", "the broker"),
                limit or "any number of",
                cap,
                self._max_message,
            )
        self.max_message = st.max_message = cap

    async def _pump(self, session: Session) -> None:
        self._session_acked = asyncio.Event()
        self.status.replay_listening = False
        self._session_cap(session)
        await self._publish_dictionary(session)
        cursor = self._cursor
        head = self._head()
        window = self.options["max_inflight"]
        cap = self._cap
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
            tg.create_task(self._listen(session), name="sync:replay-requests")
            tg.create_task(self._replay(session), name="sync:replay")

    def _reader(self, name: str) -> tuple[concurrent.futures.ThreadPoolExecutor, Outbox]:
        """A lane's reader thread and its own outbox connection: the next run of units is read
        and framed there while the loop publishes the current one (sqlite3 releases the GIL
        while it reads pages)."""
        if name not in self._readers:
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"edgeos-sync-{name}")
            self._readers[name] = (pool, Outbox(self.path.parent))
        return self._readers[name]

    async def _lane(self, session: Session, lane: _Lane, tg: asyncio.TaskGroup) -> None:
        pool, outbox = self._reader(lane.name)
        reads = _ReadAhead(self, pool, outbox, lane)
        try:
            await self._lane_loop(session, lane, tg, reads)
        finally:
            reads.drop()

    async def _lane_loop(self, session: Session, lane: _Lane, tg: asyncio.TaskGroup, reads: _ReadAhead) -> None:
        reads.restart(lane.after)
        while not lane.done:
            last, messages, framed, version, tags = await reads.next()
            if not messages:
                if lane.end is not None:
                    lane.after = lane.end - 1  # the rest of the backlog is no longer stored
                    self._advance()
                    if lane.done:
                        break
                if reads.queue:
                    continue  # a read submitted later may see what this one did not
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
                # arrives as the wait ends, and the lane would outlive its stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await self.wakeup.wait()
                reads.restart(lane.after)
                continue
            if lane.end is None and self._dictionary_version < tags:
                # New tags (or a new store file) since the last dictionary: publish it before the
                # units that use it, then read and frame them again so their `td` names it.
                await self._publish_dictionary(session)
                reads.restart(lane.after)
                continue
            if version != self._dictionary_version:
                reads.restart(lane.after)  # framed before the dictionary changed
                continue
            lane.prev.update(framed)  # the next runs are being read while this one goes out
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

    async def _send(self, session: Session, lane: _Lane, key: int, device: str, payload: bytes, samples: int) -> None:
        try:
            await session.publish(self.topic(device), payload)
        finally:
            lane.window.release()
        del lane.inflight[key]
        self._advance()
        self._acked.set()
        self._session_acked.set()
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
        payload = wire.encode_dictionary(self.gateway, tags)
        limit = self.status.broker_max_packet
        if limit and len(payload) + PUBLISH_ROOM > limit:
            # It would get the connection dropped at every session start: nothing would flow.
            raise SyncError(
                f"the tag dictionary ({len(tags)} tags, {len(payload)} bytes) does not fit the broker's "
                f"Maximum Packet Size ({limit} bytes), and it is sent whole; raise the broker's limit "
                "(mosquitto: max_packet_size)"
            )
        if len(payload) > self.max_message:
            # One retained message, never split (consumers read it whole): the one exception.
            self.errors.log(
                logging.WARNING,
                "dictionary-size",
                "upstream: the tag dictionary (%d tags, %d bytes) exceeds max_message (%d); sent whole",
                len(tags),
                len(payload),
                self.max_message,
            )
        await session.publish(topic, payload, retain=True)
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

    # -- replay on request ----------------------------------------------------------------

    async def _listen(self, session: Session) -> None:
        """Requests on the replay topic: well-formed ones for this gateway are queued (bounded:
        beyond REPLAY_QUEUE waiting they are counted and ignored), anything else counted.

        Data first: the subscription goes after the session's first acknowledged unit (or
        REPLAY_SUBSCRIBE_AFTER s without one). A cluster node that has just taken over (NATS
        server, its JetStream electing a leader) held a SUBSCRIBE 4 s and every packet of the
        connection behind it, so units waited behind a request nobody had made yet: 4 s of the
        measured failover (issue 25, `sync.failover_s`)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REPLAY_SUBSCRIBE_AFTER):
                await self._session_acked.wait()
        await session.subscribe(self.replay_topic)
        st = self.status
        st.replay_listening = True
        async for topic, payload in session.messages():
            if not topic_matches(self.replay_topic, topic):
                # Not something this session subscribed to: a broker that sends a new session
                # retained messages of other clients' subscriptions (amqtt 0.12, an independent
                # tester's finding). Not a request, whatever it holds, and not counted as one.
                self.errors.log(
                    logging.WARNING,
                    "replay:topic",
                    "upstream: ignored a message on %s: the broker sent a topic this session did not subscribe to",
                    topic[:200],
                )
                continue
            try:
                req = wire.decode_replay_request(payload)
                if req.gateway != self.gateway:
                    raise ValueError(f"names gateway {req.gateway!r}")
            except ValueError as e:
                st.replay_malformed += 1
                self.errors.log(logging.WARNING, "replay:malformed", "upstream: replay request ignored: %s", e)
                continue
            try:
                self._replays.put_nowait(req)
            except asyncio.QueueFull:
                st.replay_dropped += 1
                continue
            st.replay_requests += 1

    async def _replay(self, session: Session) -> None:
        """Answer requests one at a time: what is gone first, then the units still held, under
        the backlog lane's rate cap, with a window of their own."""
        window = asyncio.Semaphore(max(2, self.options["max_inflight"] // 2))
        # The store is read in a thread of the replay's own: a request may span 10 M seqs, and a
        # unit's predecessor may take a pass over the ids (Outbox.device_before).
        pool, outbox = self._reader("replay")
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            while True:
                req = await self._replays.get()
                last, gone = await loop.run_in_executor(pool, self._replay_plan, outbox, req)
                if req.first > last:
                    continue  # nothing given there yet: nothing held, nothing gone
                for payload in self._gone_messages(req, last, gone):
                    await self._cap.take(len(payload))
                    await session.publish(self.gone_topic, payload)
                self.status.replay_gone += sum(b - a + 1 for a, b in gone)
                after, prev = req.first - 1, {}
                answered = wire._Runs()  # the runs the first answer named (the consumer's run set)
                for a, b in gone:
                    answered.add(a, b)
                while after < last:
                    run, messages, framed, late = await loop.run_in_executor(
                        pool, self._replay_read, outbox, after, last, req.device, dict(prev), answered
                    )
                    prev.update(framed)
                    # Units the budget or retention deleted since the first answer: gone too,
                    # said before the units above them.
                    for payload in self._gone_messages(req, last, late):
                        await self._cap.take(len(payload))
                        await session.publish(self.gone_topic, payload)
                    self.status.replay_gone += sum(b - a + 1 for a, b in late)
                    for device, _seqs, payload, _samples in messages:
                        await self._cap.take(len(payload))
                        await window.acquire()
                        tg.create_task(self._send_replay(session, window, device, payload), name="sync:replay-publish")
                    self.status.replay_units += len(run)
                    after = run.last

    def _gone_messages(self, req: wire.ReplayRequest, last: int, gone: list[tuple[int, int]]) -> list[bytes]:
        """The gone answer in messages of at most GONE_RANGES runs and `max_message` bytes, as
        every other message but the dictionary (a broker's Maximum Packet Size included: a
        larger one would cost the connection, and the answer with it)."""
        head = len(wire.encode_gone(self.gateway, req.first, last, req.device, []))
        # A run [a, b] packs in at most 19 bytes (an array header and two 9-byte integers), the
        # array of runs adds at most 5: so many runs always fit, whatever their values.
        per = max(1, min(GONE_RANGES, (self.max_message - head - 5) // 19))
        return [
            wire.encode_gone(self.gateway, req.first, last, req.device, gone[k : k + per])
            for k in range(0, len(gone), per)
        ]

    def _replay_plan(self, outbox: Outbox, req: wire.ReplayRequest) -> tuple[int, list[tuple[int, int]]]:
        """(the request's last seq capped at the highest given, the runs no longer held), in
        the replay's reader thread."""
        last = min(req.last, outbox.top())
        return last, outbox.gone(req.first, last) if req.first <= last else []

    def _replay_read(
        self,
        outbox: Outbox,
        after: int,
        last: int,
        device: str | None,
        prev: dict[str, int],
        answered: wire._Runs,
    ) -> tuple[UnitRun, list[tuple[str, list[int], bytes, int]], dict[str, int], list[tuple[int, int]]]:
        """The next run of a replayed range, framed as replays, and the runs of the ids it
        covers gone since the first answer (`answered`); in the replay's reader thread."""
        run, holes = outbox.held_range(after + 1, last, device, READ_BYTES)
        self._fresh_file(outbox)
        messages, framed = self._frame(run, prev, replay=True, outbox=outbox)
        return run, messages, framed, [r for a, b in holes for r in answered.missing(a, b)]

    async def _send_replay(self, session: Session, window: asyncio.Semaphore, device: str, payload: bytes) -> None:
        try:
            await session.publish(self.topic(device), payload)
        finally:
            window.release()

    def close(self) -> None:
        self._io.submit(self._status_outbox.close).result()
        self._io.shutdown(wait=True)
        for pool, outbox in self._readers.values():
            pool.submit(outbox.close).result()
            pool.shutdown(wait=True)
        self._readers = {}
        self.outbox.close()


def topic_matches(sub: str, topic: str) -> bool:
    """Whether `topic` matches the subscription filter `sub` (MQTT 3.1.1 4.7: `+` one level, `#`
    the rest, levels split on `/`; a `$` topic is matched by no wildcard in the first level)."""
    if topic.startswith("$") and sub[:1] in ("+", "#"):
        return False
    f, t = sub.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def piece_size(room: int) -> int:
    """The slice size of a unit sent as parts with `room` bytes for its slice: the largest
    power of two that fits. A unit sent again under another cap (a session with a broker of
    another Maximum Packet Size, or a changed `max_message`) is then split into another count
    of parts, or alike: sizes at least twice apart never give one unit the same count (for
    x > 1, ceil(x/2) < ceil(x)). A consumer that still holds parts of the first split tells
    the two apart by their count (docs/payload.md, "Continuation")."""
    return 1 << (room.bit_length() - 1)


def _pack(run: UnitRun, gateway: str, cap: int) -> list[tuple[str, np.ndarray]]:
    """Group a run of units into messages: per device, in id order, each within `cap` bytes
    (a unit alone larger than that is a message of its own, sent as parts). Each message is
    (device, the indexes of its units in the run), in the order of their first unit. Column
    work, not a step per unit: the cut points come from the running sum of the units' sizes."""
    n = len(run)
    if not n:
        return []
    devices = run.devices
    if devices.count(devices[0]) == n:  # a run of one device: the common case
        groups = [(devices[0], np.arange(n, dtype=np.int64))]
    else:
        rows: dict[str, list[int]] = {}
        for i, device in enumerate(devices):
            rows.setdefault(device, []).append(i)
        groups = [(device, np.array(ix, np.int64)) for device, ix in rows.items()]
    sizes = np.diff(run.offsets)
    out = []
    for device, idx in groups:
        base = wire.message_overhead(gateway, device, 0)
        per_unit = wire.message_overhead(gateway, device, 1) - base
        # Unit k joins the message begun at `start` while base + its running sum fits the cap.
        cum = np.cumsum(sizes[idx] + per_unit)
        start, m = 0, len(idx)
        while start < m:
            limit = (int(cum[start - 1]) if start else 0) + cap - base
            end = max(start + 1, int(np.searchsorted(cum, limit, side="right")))
            out.append((device, idx[start:end]))
            start = end
    # Publish in the order of each message's first unit, so per device order holds.
    out.sort(key=lambda m: int(m[1][0]))
    return out
