"""The collector's PostgreSQL side (asyncpg): one transaction per batch of units, exactly once.

Each batch: COPY the units' keys into a temporary table, insert them into the `units` ledger
with ON CONFLICT DO NOTHING, and COPY the samples of only the units that were new, then commit.
A duplicate from the broker, a second collector on the same topics, or a replay after a crash
finds its key already in the ledger and writes nothing; a collector killed mid-batch commits
nothing, so the broker (which was not acknowledged) delivers the batch again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import logging
import time
from dataclasses import dataclass

import asyncpg
import numpy as np

from edgeos import wire
from edgeos.collector import copy, schema

log = logging.getLogger("edgeos.collector")

_DEADLOCK_RETRIES = 5
# What a lost or broken connection raises: the batch was not committed; reconnect and retry.
# (asyncpg's InternalClientError: a protocol left mid-operation by a dropped server.)
_LOST = (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError)


class DatabaseError(Exception):
    """PostgreSQL is unreachable or refused a statement; the batch was not committed."""


class BadData(DatabaseError):
    """PostgreSQL refused the batch's data itself (SQLSTATE class 22, e.g. a NUL in a text
    value): retrying the same batch would fail forever, so its messages are tried alone."""


@dataclass
class Pending:
    """One decoded unit waiting for its batch's commit."""

    gateway: str
    seq: int
    unit: wire.Unit
    gtags: np.ndarray  # global tag ids (tags.id), one per sample
    prev: int = 0  # the device's previous unit (the gateway's `pv` chain), for gap detection


@dataclass
class Written:
    units: int = 0
    duplicates: int = 0
    samples: int = 0


class Database:
    """One asyncpg connection for writes (a batch at a time) and tag lookups."""

    def __init__(
        self,
        dsn: str,
        *,
        password: str | None = None,
        connect_timeout: float = 10.0,
        tag_maps: dict[str, np.ndarray] | None = None,
        pack_min: int = 16,
    ) -> None:
        self.dsn = dsn
        self.password = password
        self.connect_timeout = connect_timeout
        self.conn: asyncpg.Connection | None = None
        self._hours: set[dt.datetime] = set()
        self._days: set[dt.datetime] = set()
        self.pack_min = pack_min
        # gateway -> local tag id -> global id (-1: unknown); shared by a collector's connections
        self.tag_maps: dict[str, np.ndarray] = {} if tag_maps is None else tag_maps
        self.latency_s = 0.0

    async def connect(self) -> None:
        try:
            self.conn = await asyncpg.connect(self.dsn, password=self.password, timeout=self.connect_timeout)
            await schema.migrate(self.conn)
            await self.conn.execute(
                "CREATE TEMP TABLE incoming (gateway text, seq bigint, device text, samples integer, prev bigint) "
                "ON COMMIT DELETE ROWS"
            )
        except _LOST as e:
            self.drop()
            raise DatabaseError(f"PostgreSQL: {type(e).__name__}: {e}") from e
        self._hours.clear()
        self._days.clear()

    def drop(self) -> None:
        """Forget a connection that failed, without talking to it (it may be mid-operation)."""
        if self.conn is not None:
            conn, self.conn = self.conn, None
            conn.terminate()

    async def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            try:
                await asyncio.wait_for(conn.close(), 2)
            except Exception:  # noqa: BLE001 - a dead connection closes badly; it is gone either way
                conn.terminate()

    # -- tags ----------------------------------------------------------------------------------

    async def save_dictionary(self, gateway: str, entries: dict[int, wire.TagEntry]) -> None:
        """Insert new dictionary entries (ids are never reused, so existing ones are kept)."""
        assert self.conn is not None
        rows = [(gateway, e.id, e.device, e.name, e.unit or "", e.kind or "number") for e in entries.values()]
        async with self.conn.transaction():
            await self.conn.executemany(
                "INSERT INTO tags (gateway, tag_id, device, name, unit, kind) VALUES ($1, $2, $3, $4, $5, $6) "
                "ON CONFLICT (gateway, tag_id) DO NOTHING",
                sorted(rows, key=lambda r: r[1]),
            )
        await self.load_tags(gateway)

    async def load_tags(self, gateway: str) -> np.ndarray:
        assert self.conn is not None
        rows = await self.conn.fetch("SELECT tag_id, id FROM tags WHERE gateway = $1", gateway)
        size = max((r["tag_id"] for r in rows), default=-1) + 1
        m = np.full(size, -1, np.int32)
        for r in rows:
            m[r["tag_id"]] = r["id"]
        self.tag_maps[gateway] = m
        return m

    def tag_map(self, gateway: str) -> np.ndarray | None:
        return self.tag_maps.get(gateway)

    # -- samples -------------------------------------------------------------------------------

    async def _ensure_days(self, ts_us: np.ndarray) -> None:
        if not len(ts_us):
            return
        days = {dt.datetime.fromtimestamp(int(d) * 86400, dt.UTC) for d in np.unique(ts_us // 86_400_000_000)}
        assert self.conn is not None
        for d in sorted(days - self._days):
            for _ in range(3):
                try:
                    await schema.ensure_packed(self.conn, d)
                    break
                except (asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
                    continue
            self._days.add(d)

    async def _ensure_hours(self, ts_us: np.ndarray) -> None:
        if not len(ts_us):
            return
        hours_us = np.unique(ts_us // 3_600_000_000)
        need = {dt.datetime.fromtimestamp(int(h) * 3600, dt.UTC) for h in hours_us} - self._hours
        if need:
            assert self.conn is not None
            for h in sorted(need):
                # Outside the batch's transaction: several collectors may race to create it.
                for _ in range(3):
                    try:
                        await schema.ensure_recent(self.conn, {h})
                        break
                    except (asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
                        continue
            self._hours |= need

    async def write(self, batch: list[Pending]) -> Written:
        """Commit a batch exactly once; raises DatabaseError (nothing committed) on failure."""
        if self.conn is None:
            await self.connect()
        assert self.conn is not None
        start = time.monotonic()
        try:
            for attempt in range(_DEADLOCK_RETRIES):
                try:
                    result = await self._write(batch)
                    break
                except asyncpg.DeadlockDetectedError:
                    if attempt == _DEADLOCK_RETRIES - 1:
                        raise
                    await asyncio.sleep(0.05 * (attempt + 1))
                except asyncpg.exceptions.CheckViolationError:
                    # A partition was dropped by a rollup after we cached it: forget and retry.
                    self._hours.clear()
                    self._days.clear()
            else:  # pragma: no cover - the loop always breaks or raises
                raise DatabaseError("batch not written")
        except asyncpg.DataError as e:
            raise BadData(f"PostgreSQL refused the data: {type(e).__name__}: {e}") from e
        except _LOST as e:
            self.drop()
            raise DatabaseError(f"PostgreSQL: {type(e).__name__}: {e}") from e
        self.latency_s = time.monotonic() - start
        return result

    async def _write(self, batch: list[Pending]) -> Written:
        conn = self.conn
        assert conn is not None
        batch = sorted(batch, key=lambda p: (p.gateway, p.seq))  # one lock order for every collector
        ts_all = np.concatenate([p.unit.ts for p in batch]) // 1000 if batch else np.zeros(0, np.int64)
        await self._ensure_hours(ts_all)
        if self.pack_min:
            await self._ensure_days(ts_all)
        keys = copy.key_rows(
            [p.gateway for p in batch],
            [p.seq for p in batch],
            [p.unit.device for p in batch],
            [len(p.unit) for p in batch],
            [p.prev for p in batch],
        )
        async with conn.transaction():
            await conn.copy_to_table(
                "incoming",
                source=io.BytesIO(copy.HEADER + keys + copy.TRAILER),
                format="binary",
                columns=["gateway", "seq", "device", "samples", "prev"],
            )
            new = await conn.fetch(
                "INSERT INTO units (gateway, seq, device, samples, prev) SELECT gateway, seq, device, samples, prev "
                "FROM incoming ORDER BY gateway, seq ON CONFLICT DO NOTHING RETURNING gateway, seq"
            )
            fresh = {(r["gateway"], r["seq"]) for r in new}
            keep = [p for p in batch if (p.gateway, p.seq) in fresh]
            parts = []
            plain = [p for p in keep if p.unit.text is None]
            if plain and self.pack_min:
                # A tag with many samples in one hour of this batch (a backlog being caught up)
                # goes straight into its packed row: no row per sample, no index entry each.
                tags = np.concatenate([p.gtags for p in plain])
                ts = np.concatenate([p.unit.ts for p in plain])
                vals = np.concatenate([p.unit.values for p in plain])
                q = np.concatenate([p.unit.quality for p in plain])
                body, rest, _days = copy.split_packed(tags, ts, vals, q, self.pack_min)
                if body:
                    await conn.copy_to_table(
                        "samples_packed",
                        source=io.BytesIO(copy.HEADER + body + copy.TRAILER),
                        format="binary",
                        columns=list(copy.PACKED_COLUMNS),
                    )
                if rest.any():
                    # Live traffic (a few samples a tag): a row of arrays per device, not per sample.
                    live = _live_rows(plain, tags, ts, vals, q, rest)
                    await conn.copy_to_table(
                        "samples_live",
                        source=io.BytesIO(copy.HEADER + live + copy.TRAILER),
                        format="binary",
                        columns=list(copy.LIVE_COLUMNS),
                    )
            else:
                plain = []
            for p in keep:
                if p.unit.text is not None or not plain:
                    u = p.unit
                    parts.append(copy.sample_rows(p.gtags, u.ts, u.values, u.quality, u.text))
            if parts:
                await conn.copy_to_table(
                    "samples_recent",
                    source=io.BytesIO(copy.HEADER + b"".join(parts) + copy.TRAILER),
                    format="binary",
                    columns=list(copy.COLUMNS),
                )
        return Written(units=len(keep), duplicates=len(batch) - len(keep), samples=sum(len(p.unit) for p in keep))

    async def pack_live(self, rows_per_txn: int = 500, rounds: int = 10_000) -> int:
        """Move live rows into `samples_pieces`, a gateway at a time (so each tag's samples of the
        rows moved make one piece per hour; the rollup merges the hour's pieces into its row).
        Each slice is deleted and its pieces written in one transaction, so a sample is always in
        one place; a concurrent deleter gets other rows. Returns the samples moved."""
        conn = self.conn
        assert conn is not None
        moved = 0
        made: set[dt.datetime] = set()  # the pieces' hourly partitions made by this pass
        gateways = [r[0] for r in await conn.fetch("SELECT DISTINCT gateway FROM samples_live")]
        for gateway in gateways:
            for _ in range(rounds):
                n = await self._pack_live_slice(gateway, rows_per_txn, made)
                moved += n
                if not n:
                    break
        return moved

    async def _pack_live_slice(self, gateway: str, rows_per_txn: int, made: set[dt.datetime]) -> int:
        conn = self.conn
        assert conn is not None
        async with conn.transaction():
            rows = await conn.fetch(
                "DELETE FROM samples_live WHERE ctid = ANY(ARRAY(SELECT ctid FROM samples_live WHERE gateway = $1 "
                "ORDER BY t_min LIMIT $2)) RETURNING cardinality(tag) AS n, array_send(tag) AS tag, "
                "array_send(ts) AS ts, array_send(val) AS val, array_send(q) AS q",
                gateway,
                rows_per_txn,
            )
            if not rows:
                return 0
            tags = np.concatenate([copy.array_values(r["tag"], ">i4", r["n"]) for r in rows])
            us = np.concatenate([copy.array_values(r["ts"], ">i8", r["n"]) for r in rows]) + copy.PG_EPOCH_US
            vals = np.concatenate([copy.array_values(r["val"], ">f8", r["n"]) for r in rows])
            q = np.concatenate([copy.array_values(r["q"], ">i4", r["n"]) for r in rows]).view(np.uint32)
            for h in np.unique(us // 3_600_000_000).tolist():
                hour = dt.datetime.fromtimestamp(h * 3600, dt.UTC)
                if hour not in made:
                    try:
                        async with conn.transaction():  # a savepoint: another may create it first
                            await schema.ensure_recent(conn, {hour}, "samples_pieces")
                    except (asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
                        pass
                    made.add(hour)
            body, rest, _ = copy.split_packed(tags, us * 1000, vals, q, 1)
            if rest.any():  # min_run 1 packs every sample; anything else would be deleted unwritten
                raise RuntimeError(f"live rows of {gateway}: {int(rest.sum())} samples not packed; nothing moved")
            await conn.copy_to_table(
                "samples_pieces",
                source=io.BytesIO(copy.HEADER + body + copy.TRAILER),
                format="binary",
                columns=list(copy.PACKED_COLUMNS),
            )
        return len(tags)

    # -- parked input, gaps, maintenance -------------------------------------------------------

    async def park(self, topic: str, reason: str, gateway: str | None, payload: bytes) -> None:
        assert self.conn is not None
        await self.conn.execute(
            "INSERT INTO parked (topic, reason, gateway, payload) VALUES ($1, $2, $3, $4)",
            topic,
            reason,
            gateway,
            payload,
        )

    async def take_parked(self, gateway: str, reason: str) -> list[tuple[int, str, bytes]]:
        assert self.conn is not None
        rows = await self.conn.fetch(
            "SELECT id, topic, payload FROM parked WHERE gateway = $1 AND reason = $2 ORDER BY id", gateway, reason
        )
        return [(r["id"], r["topic"], bytes(r["payload"])) for r in rows]

    async def unpark(self, ids: list[int]) -> None:
        assert self.conn is not None
        await self.conn.execute("DELETE FROM parked WHERE id = ANY($1::bigint[])", ids)

    async def find_gaps(self, since_s: float) -> int:
        """Record as open gaps the units whose stated predecessor (`prev`) is not in the ledger,
        among units received in the last `since_s` seconds: units the broker lost, whichever
        collector was running then. The ledger is shared, so several collectors agree."""
        assert self.conn is not None
        status = await self.conn.execute(
            """
            INSERT INTO gaps (gateway, device, first_seq, last_seq, state)
            SELECT DISTINCT u.gateway, u.device,
                   coalesce((SELECT max(p.seq) FROM units p
                             WHERE p.gateway = u.gateway AND p.seq < u.prev AND p.device = u.device), 0) + 1,
                   u.prev, 'open'
            FROM units u
            WHERE u.received > now() - make_interval(secs => $1) AND u.prev > 0
              AND NOT EXISTS (SELECT 1 FROM units p WHERE p.gateway = u.gateway AND p.seq = u.prev)
              AND NOT EXISTS (SELECT 1 FROM gaps g WHERE g.gateway = u.gateway
                              AND u.prev BETWEEN g.first_seq AND g.last_seq)
            ON CONFLICT DO NOTHING
            """,
            since_s,
        )
        return int(status.split()[-1])

    async def mark_filled(self) -> int:
        """Open gaps whose last unit arrived are marked filled; how many this call marked (each
        collector counts its own: the ledger is shared)."""
        assert self.conn is not None
        status = await self.conn.execute(
            "UPDATE gaps g SET state = 'filled', updated = now() WHERE state = 'open' "
            "AND EXISTS (SELECT 1 FROM units u WHERE u.gateway = g.gateway AND u.seq = g.last_seq)"
        )
        return int(status.split()[-1])

    async def due_gaps(self, reorder_wait: float, retry: float) -> list[tuple[str, str | None, int, int]]:
        """Open gaps to ask for now (`mark_filled` first)."""
        assert self.conn is not None
        rows = await self.conn.fetch(
            "UPDATE gaps SET requests = requests + 1, updated = now() "
            "WHERE state = 'open' AND opened < now() - make_interval(secs => $1) "
            "AND (requests = 0 OR updated < now() - make_interval(secs => $2)) "
            "RETURNING gateway, device, first_seq, last_seq",
            reorder_wait,
            retry,
        )
        return [(r["gateway"], r["device"], r["first_seq"], r["last_seq"]) for r in rows]

    async def record_gone(self, gateway: str, device: str | None, ranges: list[tuple[int, int]]) -> None:
        """The gateway no longer holds these seqs: the gaps they cover are closed as gone (never
        asked for again), and each range is kept as a gone row."""
        assert self.conn is not None
        async with self.conn.transaction():
            for first, last in ranges:
                await self.conn.execute(
                    "UPDATE gaps SET state = 'gone', updated = now() WHERE gateway = $1 AND state = 'open' "
                    "AND last_seq BETWEEN $2 AND $3",
                    gateway,
                    first,
                    last,
                )
                await self.conn.execute(
                    "INSERT INTO gaps (gateway, device, first_seq, last_seq, state) VALUES ($1, $2, $3, $4, 'gone') "
                    "ON CONFLICT (gateway, first_seq, last_seq) DO UPDATE SET state = 'gone', updated = now()",
                    gateway,
                    device,
                    first,
                    last,
                )

    async def gap_counts(self) -> dict[str, int]:
        assert self.conn is not None
        rows = await self.conn.fetch("SELECT state, count(*) FROM gaps GROUP BY state")
        return {r[0]: r[1] for r in rows}

    async def maintain(self, *, rollup_after: float, retention: float) -> tuple[int, int]:
        """Rollup and retention, by one collector at a time (advisory lock); partitions ahead."""
        assert self.conn is not None
        now = dt.datetime.now(dt.UTC)
        if not await self.conn.fetchval("SELECT pg_try_advisory_lock(7302520)"):
            return 0, 0
        try:
            ahead = {schema.hour_floor(now) + schema.HOUR * k for k in range(3)}
            await schema.ensure_recent(self.conn, ahead)
            await schema.ensure_packed(self.conn, now)
            await schema.ensure_packed(self.conn, now + schema.DAY)
            await self.pack_live()
            packed = await schema.rollup(self.conn, now - dt.timedelta(seconds=rollup_after))
            await schema.rewrite_closed_days(self.conn, now - dt.timedelta(seconds=rollup_after))
            dropped = await schema.drop_older(self.conn, now - dt.timedelta(seconds=retention)) if retention else 0
            self._hours.clear()
            self._days.clear()
        finally:
            await self.conn.execute("SELECT pg_advisory_unlock(7302520)")
        return packed, dropped


def _live_rows(
    plain: list[Pending], tags: np.ndarray, ts: np.ndarray, vals: np.ndarray, q: np.ndarray, rest: np.ndarray
) -> bytes:
    """COPY rows of `samples_live` for the samples of `plain` (concatenated in `tags` ...) left
    by `rest`: one per gateway and device."""
    lens = np.fromiter((len(p.unit) for p in plain), np.int64, len(plain))
    starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
    groups: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(plain):
        groups.setdefault((p.gateway, p.unit.device), []).append(i)
    out = []
    for (gateway, device), idx in groups.items():
        sel = np.concatenate([np.arange(starts[i], starts[i] + lens[i]) for i in idx])
        sel = sel[rest[sel]]
        if len(sel):
            out.append(copy.live_row(gateway, device, tags[sel], ts[sel], vals[sel], q[sel]))
    return b"".join(out)
