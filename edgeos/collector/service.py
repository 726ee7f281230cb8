"""`edgeos collect`: broker -> PostgreSQL, exactly once, with backpressure and gap filling.

One reader (the MQTT session) feeds a bounded queue; one writer takes up to `batch_units` units
or `batch_wait` of them, commits them in one transaction (db.py) and only then acknowledges their
messages. While PostgreSQL is down the writer retries with capped, jittered backoff and
acknowledges nothing: the queue fills, the reader stops, the broker's in-flight window for this
client fills, and the broker keeps the rest. Nothing is buffered without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from edgeos import wire
from edgeos.aio import within
from edgeos.collector import db as dbm
from edgeos.collector.config import CollectorConfig
from edgeos.collector.schema import SchemaError
from edgeos.errors import SyncError
from edgeos.logs import RateLimited
from edgeos.retry import backoff_delay
from edgeos.sync.mqtt import Incoming, MqttSession, MqttTransport

log = logging.getLogger("edgeos.collector")

UNKNOWN_TAGS = "unknown tags"
# Retries of the database and the broker: the plant's own servers, a short way off, so soon and
# never more than 2 s apart.
_RETRY_MIN_NS, _RETRY_MAX_NS = 200_000_000, 2_000_000_000
FIRST_MAINTENANCE_S = 30.0  # the first maintenance pass after start (then every maintain_every)


@dataclass
class Metrics:
    units_written: int = 0
    samples_written: int = 0
    duplicates_skipped: int = 0
    messages: int = 0
    parked: int = 0
    parked_retried: int = 0
    replay_requests: int = 0
    gaps_open: int = 0
    gaps_filled: int = 0
    gaps_gone: int = 0
    db_errors: int = 0
    broker_errors: int = 0
    db_latency_s: float = 0.0
    db_connected: bool = False
    broker_connected: bool = False
    newest_s: dict[str, float] = field(default_factory=dict)  # per gateway: the newest sample committed
    gateway_status: dict[str, str] = field(default_factory=dict)

    def prometheus(self) -> str:
        lines = []
        for name, help_ in [
            ("units_written", "units committed to PostgreSQL"),
            ("samples_written", "samples committed to PostgreSQL"),
            ("duplicates_skipped", "units already in the ledger (broker redelivery, another collector)"),
            ("messages", "data messages received"),
            ("parked", "messages parked (undecodable, unknown version, unknown tags)"),
            ("replay_requests", "replay requests published"),
            ("gaps_filled", "gaps closed by late or replayed units"),
            ("gaps_gone", "ranges the gateways reported gone"),
            ("db_errors", "failed batch commits (retried)"),
            ("broker_errors", "lost or refused broker sessions (retried)"),
        ]:
            lines += [f"# HELP edgeos_collector_{name}_total {help_}", f"# TYPE edgeos_collector_{name}_total counter"]
            lines.append(f"edgeos_collector_{name}_total {getattr(self, name)}")
        lines += ["# TYPE edgeos_collector_gaps_open gauge", f"edgeos_collector_gaps_open {self.gaps_open}"]
        lines += [
            "# TYPE edgeos_collector_db_latency_seconds gauge",
            f"edgeos_collector_db_latency_seconds {self.db_latency_s:.6f}",
        ]
        lines += [
            "# TYPE edgeos_collector_up gauge",
            f'edgeos_collector_up{{peer="postgresql"}} {int(self.db_connected)}',
            f'edgeos_collector_up{{peer="broker"}} {int(self.broker_connected)}',
        ]
        # Now minus the newest sample committed, at the scrape: it grows while nothing is
        # committed (the database, the broker or the gateway down), so it can be alerted on.
        lines.append("# TYPE edgeos_collector_lag_seconds gauge")
        now = time.time()
        for gw, newest in sorted(self.newest_s.items()):
            lines.append(f'edgeos_collector_lag_seconds{{gateway="{gw}"}} {max(0.0, now - newest):.3f}')
        return "\n".join(lines) + "\n"


def transport_options(broker: dict) -> dict:
    """The [broker] section as edgeos.sync.mqtt takes it: a plain subscriber (no status, no
    will) on a persistent session that never expires, acknowledging a message only once its
    units are committed (`MqttSession.ack`), with `receive_maximum` unacknowledged at most."""
    return {
        **broker,
        "keepalive": int(broker["keepalive"] * 1_000_000_000),
        "status_topic": None,
        "manual_ack": True,
        "clean_start": False,
        "session_expiry": 0xFFFFFFFF,
        "connect_timeout": 10.0,
    }


class Collector:
    def __init__(self, cfg: CollectorConfig) -> None:
        self.cfg = cfg
        password = cfg.password()
        # One connection for dictionaries, parking and gaps (under a lock), and `writers` more
        # for data batches in parallel (PostgreSQL uses a core per connection).
        self.db = dbm.Database(cfg.dsn, password=password)
        self.writers = [
            dbm.Database(cfg.dsn, password=password, tag_maps=self.db.tag_maps, pack_min=cfg.pack_min)
            for _ in range(cfg.writers)
        ]
        self._control_lock = asyncio.Lock()
        self.transport = MqttTransport("collector", transport_options(cfg.broker), cfg.base)
        self.metrics = Metrics()
        # Joins the parts of units split for the size cap (one per session: what a lost session
        # held half-joined is delivered again, whole, by the broker).
        self._joiner = self._new_joiner()
        self._refused: list[tuple[str, str, int, bytes, str]] = []  # units the joiner would not deliver
        self._queue: asyncio.Queue[Incoming] = asyncio.Queue(maxsize=max(16, cfg.broker["receive_maximum"]))
        self._stop = asyncio.Event()
        self._errors = RateLimited(log)  # a retry every 0.2-2 s: one line a minute says it
        self._db_failing: set[int] = set()  # id() of the connections whose last statement failed

    def stop(self) -> None:
        self._stop.set()

    def _new_joiner(self) -> wire.Consumer:
        return wire.Consumer(on_refused=lambda *unit: self._refused.append(unit))

    # -- the main loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Until `stop()`. /healthz answers from the start (503 while PostgreSQL is not reached),
        and a stop ends the wait for the database too. A schema newer than this collector's
        stops it at the first connection, plainly (SchemaError)."""
        try:
            async with asyncio.TaskGroup() as tg:
                if self.cfg.http_listen:
                    from edgeos.collector.http import serve

                    tg.create_task(serve(self, self.cfg.http_listen, self._stop), name="collector-http")
                tg.create_task(self._start(tg), name="collector-start")
                await self._stop.wait()
                raise asyncio.CancelledError  # leave the group: every task is cancelled
        except* SchemaError as eg:
            raise eg.exceptions[0] from None

    async def _start(self, tg: asyncio.TaskGroup) -> None:
        await self._connect_db()  # first the database
        tg.create_task(self._sessions(), name="collector-sessions")
        tg.create_task(self._maintenance(), name="collector-maintenance")

    async def _connect_db(self) -> None:
        await self._retrying(None)

    async def _sessions(self) -> None:
        attempt = 0
        while True:
            await self._connect_db()
            try:
                async with self.transport.session() as session:
                    attempt = 0
                    self._joiner = self._new_joiner()
                    for topic in self.cfg.topics():
                        await session.subscribe(topic)
                    self.metrics.broker_connected = True
                    self._errors.clear("broker")
                    log.info("collector: subscribed on %s", session.where)
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._read(session), name="collector-read")
                        for i, w in enumerate(self.writers):
                            tg.create_task(self._write(session, w), name=f"collector-write-{i}")
                        tg.create_task(self._replays(session), name="collector-replays")
            except* SyncError as eg:
                self.metrics.broker_connected = False
                self.metrics.broker_errors += 1
                self._errors.log(
                    logging.WARNING, "broker", "collector: %s; trying again", eg.exceptions[0], code="collector_broker"
                )
            self._drain_queue()
            for d in [self.db, *self.writers]:
                d.drop()  # a batch cancelled mid-transaction leaves nothing behind (rolled back)
            await asyncio.sleep(backoff_delay(attempt, _RETRY_MIN_NS, _RETRY_MAX_NS))
            attempt += 1

    def _drain_queue(self) -> None:
        """Messages of a lost session are never acknowledged: the broker sends them again."""
        while not self._queue.empty():
            self._queue.get_nowait()

    async def _read(self, session: MqttSession) -> None:
        async for msg in session.incoming():
            await self._queue.put(msg)  # blocks while the writer is behind: backpressure
        raise SyncError(f"{session.where} closed the session")

    async def _write(self, session: MqttSession, db: dbm.Database) -> None:
        while True:
            first = await self._queue.get()
            msgs = [first]
            deadline = time.monotonic() + self.cfg.batch_wait
            units = 0
            while units < self.cfg.batch_units:
                try:
                    msgs.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        msgs.append(await within(self._queue.get(), left))
                    except TimeoutError:
                        break
                units += 1
            await self._handle(session, msgs, db)

    async def _handle(self, session: MqttSession, msgs: list[Incoming], db: dbm.Database | None = None) -> None:
        db = db or self.db
        pending: list[dbm.Pending] = []
        data: list[tuple[Incoming, wire.Message]] = []
        others: list[Incoming] = []
        async with self._control_lock:
            for m in msgs:
                if m.topic.endswith("/data"):
                    decoded = await self._decode(m)
                    if decoded is not None:
                        data.append(decoded)
                else:
                    others.append(m)
            # Dictionaries first: units of this batch may use tags they add.
            for m in others:
                await self._retrying(lambda m=m: self._control(session, m))
            groups: list[tuple[Incoming, list[dbm.Pending]]] = []
            for m, message in data:
                units = await self._resolve(m, message)
                if units is not None:
                    pending += units
                    groups.append((m, units))
        if pending:
            try:
                written = await self._retrying(lambda: db.write(pending), db)
            except dbm.BadData:
                written = await self._write_alone(groups, db)
            self.metrics.units_written += written.units
            self.metrics.samples_written += written.samples
            self.metrics.duplicates_skipped += written.duplicates
            self.metrics.db_latency_s = db.latency_s
            newest = self.metrics.newest_s
            for p in pending:
                if len(p.unit):
                    t = int(p.unit.ts.max()) / 1e9
                    if t > newest.get(p.gateway, -math.inf):
                        newest[p.gateway] = t
        for m in msgs:
            session.ack(m)

    async def _write_alone(self, groups: list[tuple[Incoming, list[dbm.Pending]]], db: dbm.Database) -> dbm.Written:
        """A batch PostgreSQL refused as data: each message alone, the refused ones parked."""
        total = dbm.Written()
        for m, units in groups:
            try:
                w = await self._retrying(lambda units=units: db.write(units), db)
            except dbm.BadData as e:
                async with self._control_lock:
                    await self._park(m, str(e)[:500], units[0].gateway if units else None)
                continue
            total.units += w.units
            total.duplicates += w.duplicates
            total.samples += w.samples
        return total

    async def _retrying(self, op, db: dbm.Database | None = None):
        """Connect if need be and run a database operation (None: only connect) until it
        succeeds: backpressure, never loss."""
        db = db or self.db
        try:
            return await self._retry_loop(op, db)
        finally:  # returned, or cancelled while failing: this connection no longer says
            self._db_failing.discard(id(db))
            self.metrics.db_connected = not self._db_failing and self.metrics.db_connected

    async def _retry_loop(self, op, db: dbm.Database):
        attempt = 0
        while True:
            try:
                if db.conn is None:
                    await db.connect()
                result = None if op is None else await op()
                # Up only while no connection is failing: the gap loop's statements succeeding on
                # one connection hid the writers' refused INSERTs on theirs (/healthz said ok while
                # nothing was committed: an independent tester's finding).
                self._db_failing.discard(id(db))
                if not self._db_failing and not self.metrics.db_connected:
                    self._errors.clear("database")  # the next outage is logged at once
                self.metrics.db_connected = not self._db_failing
                return result
            except dbm.BadData:
                raise
            except dbm.DatabaseError as e:
                self._db_failing.add(id(db))
                self.metrics.db_connected = False
                self.metrics.db_errors += 1
                delay = backoff_delay(attempt, _RETRY_MIN_NS, _RETRY_MAX_NS)
                self._errors.log(
                    logging.WARNING,
                    "database",
                    "collector: %s; %s, retrying (every 2 s at most)",
                    e,
                    "batch kept" if op else "waiting",
                    code="collector_database",
                )
                await asyncio.sleep(delay)
                attempt += 1

    async def _park(self, m: Incoming, reason: str, gateway: str | None) -> None:
        self.metrics.parked += 1
        log.warning("collector: parked a message on %s: %s", m.topic, reason)
        await self._retrying(lambda: self._guard(self.db.park(m.topic, reason, gateway, m.payload)))

    async def _guard(self, coro):
        """Wrap a plain statement's failures as DatabaseError (so it is retried)."""
        import asyncpg

        try:
            return await coro
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError) as e:
            self.db.drop()
            raise dbm.DatabaseError(f"PostgreSQL: {type(e).__name__}: {e}") from e

    def _topic_gateway(self, topic: str) -> str | None:
        parts = topic.split("/")
        return parts[1] if len(parts) > 2 else None

    async def _decode(self, m: Incoming) -> tuple[Incoming, wire.Message] | None:
        """The message decoded, with what to park if it must be: the message itself, or for a
        unit that came in parts the whole unit as one message (a part alone cannot be retried)."""
        self.metrics.messages += 1
        try:
            env = wire.decode_envelope(m.payload)
            if env.part is None:
                units = [wire.decode_unit(u) for u in env.units]
                if (other := next((u.device for u in units if u.device != env.device), None)) is not None:
                    # Its samples would be written as the message's device's: parked instead.
                    raise ValueError(f"a unit of device {other!r} in a message of {env.device!r}")
                return m, wire.Message(env.gateway, env.device, env.seqs, env.dictionary, units, env.prev, env.replay)
            self._refused.clear()
            whole = self._joiner.feed(m.payload)
            if self._refused:
                # Joined, but not a unit of this message's device (or not a unit): parked whole,
                # as an unsplit message, not acknowledged away with its last part.
                gw, dev, seq, blob, why = self._refused[0]
                payload = wire.encode_message(gw, dev, [seq], [blob], env.dictionary, prev=env.prev, replay=env.replay)
                await self._park(dataclasses.replace(m, payload=payload), f"undecodable: {why}", gw)
                return None
            if not whole:
                return None  # more parts to come (acknowledged: a part lost in a crash is replayed)
            d = whole[0]
            u = d.unit
            blob = wire.encode_unit(u.device, u.tags, u.ts, u.values, u.quality, u.text)
            payload = wire.encode_message(
                d.gateway, d.device, [d.seq], [blob], env.dictionary, prev=env.prev, replay=env.replay
            )
            message = wire.Message(d.gateway, d.device, [d.seq], env.dictionary, [u], env.prev, env.replay)
            return dataclasses.replace(m, payload=payload), message
        except Exception as e:  # noqa: BLE001 - anything a broker client could publish
            await self._park(m, f"undecodable: {type(e).__name__}: {e}"[:500], self._topic_gateway(m.topic))
            return None

    async def _resolve(self, m: Incoming, message: wire.Message) -> list[dbm.Pending] | None:
        """Store tag ids -> global ids; a unit with ids the dictionary lacks parks the message."""
        gw = message.gateway
        tag_map = self.db.tag_map(gw)
        if tag_map is None:
            tag_map = await self._retrying(lambda: self._guard(self.db.load_tags(gw)))
        out = []
        prev = message.prev
        for seq, unit in zip(message.seqs, message.units, strict=True):
            local = unit.tags
            if len(local) and _unknown(local, tag_map):
                # Another collector (or writer) may have saved the dictionary meanwhile.
                tag_map = await self._retrying(lambda: self._guard(self.db.load_tags(gw)))
                if _unknown(local, tag_map):
                    await self._park(m, UNKNOWN_TAGS, gw)
                    return None
            gtags = tag_map[local] if len(local) else np.zeros(0, np.int32)
            out.append(dbm.Pending(gw, int(seq), unit, gtags, prev))
            prev = int(seq)  # within a message, each unit follows the one before
        return out

    async def _control(self, session: MqttSession, m: Incoming) -> None:
        gw = self._topic_gateway(m.topic)
        if m.topic.endswith("/tags"):
            try:
                entries = wire.decode_dictionary(m.payload)
            except Exception as e:  # noqa: BLE001
                await self._park(m, f"undecodable dictionary: {e}"[:500], gw)
                return
            if gw is None:
                return
            await self._guard(self.db.save_dictionary(gw, entries))
            await self._retry_parked(gw)
        elif m.topic.endswith("/status"):
            with contextlib.suppress(ValueError, AttributeError):
                self.metrics.gateway_status[gw or "?"] = str(json.loads(m.payload).get("state"))
        elif m.topic.endswith("/replay/gone"):
            await self._gone(gw, m)

    async def _retry_parked(self, gateway: str) -> None:
        """Messages parked for tags the dictionary lacked are written once the dictionary has them."""
        parked = await self._guard(self.db.take_parked(gateway, UNKNOWN_TAGS))
        if not parked:
            return
        tag_map = self.db.tag_map(gateway)
        done = []
        for pid, _topic, payload in parked:
            try:
                message = wire.decode(payload)
            except ValueError as e:  # e.g. a part parked alone by an older collector: stays parked
                log.warning("collector: parked message %d cannot be retried: %s", pid, e)
                continue
            pending = []
            for seq, unit in zip(message.seqs, message.units, strict=True):
                if len(unit.tags) and (int(unit.tags.max()) >= len(tag_map) or (tag_map[unit.tags] < 0).any()):
                    pending = None
                    break
                prev = message.prev if not pending else pending[-1].seq
                pending.append(dbm.Pending(gateway, int(seq), unit, tag_map[unit.tags], prev))
            if pending is None:
                continue
            written = await self.db.write(pending)
            self.metrics.units_written += written.units
            self.metrics.samples_written += written.samples
            self.metrics.duplicates_skipped += written.duplicates
            self.metrics.parked_retried += 1
            done.append(pid)
        if done:
            await self._guard(self.db.unpark(done))

    async def _gone(self, gw: str | None, m: Incoming) -> None:
        try:
            g = wire.decode_gone(m.payload)
        except Exception as e:  # noqa: BLE001
            await self._park(m, f"undecodable gone report: {e}"[:500], gw)
            return
        if gw is None or g.gateway != gw:
            await self._park(m, "gone report for another gateway than its topic's", gw)
            return
        self.metrics.gaps_gone += len(g.ranges)
        log.warning("collector: %s no longer holds seqs %s: recorded as gone", gw, g.ranges)
        await self._guard(self.db.record_gone(gw, g.device, g.ranges))

    async def _replays(self, session: MqttSession) -> None:
        """Gaps from the shared ledger (a unit's stated predecessor missing), asked for again
        after the reorder wait and every `replay_retry` until filled or reported gone."""
        while True:
            await asyncio.sleep(min(1.0, self.cfg.reorder_wait))
            async with self._control_lock:
                due = await self._retrying(lambda: self._guard(self._gaps_due()))
            for gw, device, first, last in due:
                topic = self.cfg.replay_topic.format(prefix=self.cfg.topic_prefix, gateway=gw)
                await session.publish(topic, wire.encode_replay_request(gw, first, last, device), ack_within=10)
                self.metrics.replay_requests += 1
                log.info("collector: asked %s to replay seqs %d..%d of %s", gw, first, last, device)

    async def _gaps_due(self) -> list[tuple[str, str | None, int, int]]:
        await self.db.find_gaps(max(600.0, 3 * self.cfg.replay_retry))
        # This collector's own fills (docs/collector.md, Guarantees 5): the count of filled rows
        # in the shared table made a collector started later report gaps it never handled (an
        # independent tester's finding).
        self.metrics.gaps_filled += await self.db.mark_filled()
        due = await self.db.due_gaps(self.cfg.reorder_wait, self.cfg.replay_retry)
        counts = await self.db.gap_counts()
        self.metrics.gaps_open = counts.get("open", 0)
        return due

    async def _maintenance(self) -> None:
        # The first pass soon after start, not a whole `maintain_every` later: a collector
        # restarted more often than that would otherwise never pack, roll up or create
        # partitions ahead.
        wait = min(self.cfg.maintain_every, FIRST_MAINTENANCE_S)
        while True:
            await asyncio.sleep(wait)
            wait = self.cfg.maintain_every
            maint = dbm.Database(self.cfg.dsn, password=self.db.password)
            try:
                await maint.connect()
                await maint.maintain(rollup_after=self.cfg.rollup_after, retention=self.cfg.retention)
            except Exception as e:  # noqa: BLE001 - maintenance retries at its next turn
                log.warning("collector: maintenance failed: %s", e)
            finally:
                await maint.close()


def _unknown(local: np.ndarray, tag_map: np.ndarray) -> bool:
    return int(local.max()) >= len(tag_map) or int(local.min()) < 0 or bool((tag_map[local] < 0).any())
