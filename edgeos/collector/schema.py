"""The collector's PostgreSQL schema: versioned migrations, time partitions, rollup and retention.

Layout (docs/collector.md draws it):
- `samples_recent`: one row per sample, partitioned by hour of `ts`, for fresh data;
- `samples_packed`: one row per tag and hour, arrays of time offsets and values (lz4 TOAST),
  partitioned by day of the window start; the rollup moves closed hours from the first to the
  second and drops the hour's partition in one transaction, so a sample is in exactly one;
- `samples_live`: live samples (a few per tag in a batch) as one row of arrays per gateway, device
  and batch, moved by maintenance (`Database.pack_live`) into `samples_pieces` (as packed rows, in
  hourly partitions), which the rollup merges into `samples_packed` and drops;
- `samples`: a view over the four with the tag key joined;
- `tags` (from the dictionaries), `units` (the exactly-once ledger), `gaps`, `parked`.

Plain PostgreSQL only (no extension), so a TimescaleDB install keeps working unchanged.
"""

from __future__ import annotations

import datetime as dt

SCHEMA_VERSION = 2

HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)

_MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE tags (
    id serial PRIMARY KEY,
    gateway text NOT NULL,
    tag_id integer NOT NULL,
    device text NOT NULL,
    name text NOT NULL,
    unit text NOT NULL DEFAULT '',
    kind text NOT NULL DEFAULT 'number',
    key text GENERATED ALWAYS AS (gateway || '/' || device || '/' || name) STORED,
    first_seen timestamptz NOT NULL DEFAULT now(),
    UNIQUE (gateway, tag_id)
);
CREATE INDEX tags_key ON tags (key);

-- The exactly-once ledger: a unit's samples are written in the transaction that inserts its
-- (gateway, seq); a second delivery finds the key and writes nothing.
CREATE TABLE units (
    gateway text NOT NULL,
    seq bigint NOT NULL,
    device text NOT NULL,
    samples integer NOT NULL,
    prev bigint NOT NULL DEFAULT 0,  -- the device's previous unit, as the gateway stated it (0: none)
    received timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway, seq)
);
CREATE INDEX units_received ON units (received);

CREATE TABLE gaps (
    gateway text NOT NULL,
    first_seq bigint NOT NULL,
    last_seq bigint NOT NULL,
    device text,
    state text NOT NULL CHECK (state IN ('open', 'gone', 'filled')),
    requests integer NOT NULL DEFAULT 0,
    opened timestamptz NOT NULL DEFAULT now(),
    updated timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway, first_seq, last_seq)
);

-- Input that could not be stored (undecodable, unknown version, tag ids missing from the
-- dictionary), kept whole for a later retry or report.
CREATE TABLE parked (
    id bigserial PRIMARY KEY,
    received timestamptz NOT NULL DEFAULT now(),
    topic text NOT NULL,
    reason text NOT NULL,
    gateway text,
    payload bytea NOT NULL
);

CREATE TABLE samples_recent (
    tag integer NOT NULL,
    ts timestamptz NOT NULL,
    value double precision,
    quality integer NOT NULL DEFAULT 0,
    text text
) PARTITION BY RANGE (ts);
CREATE INDEX samples_recent_tag_ts ON samples_recent (tag, ts);

CREATE TABLE samples_packed (
    tag integer NOT NULL,
    t0 timestamptz NOT NULL,
    t1 timestamptz NOT NULL,
    n integer NOT NULL,
    off integer[] NOT NULL,
    off_us smallint[],
    val double precision[] NOT NULL,
    q integer[],
    txt text[]
) PARTITION BY RANGE (t0);
ALTER TABLE samples_packed ALTER COLUMN off SET COMPRESSION lz4;
ALTER TABLE samples_packed ALTER COLUMN off_us SET COMPRESSION lz4;
ALTER TABLE samples_packed ALTER COLUMN val SET COMPRESSION lz4;
ALTER TABLE samples_packed ALTER COLUMN q SET COMPRESSION lz4;
ALTER TABLE samples_packed ALTER COLUMN txt SET COMPRESSION lz4;
CREATE INDEX samples_packed_tag_t0 ON samples_packed (tag, t0);

-- `off` counts milliseconds from t0 (a window is one hour, so it fits an integer); `off_us` holds
-- the microseconds within the millisecond, and is NULL when every timestamp is a whole millisecond.
CREATE VIEW samples AS
    SELECT t.key AS tag, r.ts, r.value, r.quality::bigint & 4294967295 AS quality, r.text,
           t.gateway, t.device, t.name, t.unit
    FROM samples_recent r JOIN tags t ON t.id = r.tag
    UNION ALL
    SELECT t.key, p.t0 + u.off * interval '1 millisecond' + coalesce(u.us, 0) * interval '1 microsecond',
           u.val, coalesce(u.q, 0)::bigint & 4294967295, u.txt,
           t.gateway, t.device, t.name, t.unit
    FROM samples_packed p JOIN tags t ON t.id = p.tag
    CROSS JOIN LATERAL unnest(p.off, p.off_us, p.val, p.q, p.txt) AS u(off, us, val, q, txt);

-- The view cannot let a time condition skip packed windows (their ts is computed): this
-- function takes the range as arguments and reads only the windows that overlap it.
CREATE FUNCTION samples_between(p_tag text, p_from timestamptz, p_to timestamptz)
RETURNS TABLE (ts timestamptz, value double precision, quality bigint, text text)
LANGUAGE sql STABLE AS $fn$
    SELECT r.ts, r.value, r.quality::bigint & 4294967295, r.text
    FROM samples_recent r JOIN tags t ON t.id = r.tag
    WHERE t.key = p_tag AND r.ts >= p_from AND r.ts < p_to
    UNION ALL
    SELECT x.ts, x.val, x.q, x.txt FROM (
        SELECT p.t0 + u.off * interval '1 millisecond' + coalesce(u.us, 0) * interval '1 microsecond' AS ts,
               u.val, coalesce(u.q, 0)::bigint & 4294967295 AS q, u.txt
        FROM samples_packed p JOIN tags t ON t.id = p.tag
        CROSS JOIN LATERAL unnest(p.off, p.off_us, p.val, p.q, p.txt) AS u(off, us, val, q, txt)
        WHERE t.key = p_tag AND p.t0 > p_from - interval '1 hour' AND p.t0 < p_to AND p.t1 > p_from
    ) x
    WHERE x.ts >= p_from AND x.ts < p_to
$fn$;

-- Days whose packed partition holds the dead space of merged pieces: rewritten once closed.
CREATE TABLE packed_dirty (day timestamptz PRIMARY KEY);

CREATE TABLE edgeos_collector (version integer NOT NULL);
INSERT INTO edgeos_collector VALUES (0);
""",
    2: """
-- Live samples (a few per tag in a batch): one row per gateway, device and batch, holding arrays,
-- so a sample costs no row and no index entry of its own; maintenance moves them into packed
-- pieces (which the rollup merges per tag and hour), deleting them in the same transaction.
CREATE TABLE samples_live (
    gateway text NOT NULL,
    device text NOT NULL,
    t_min timestamptz NOT NULL,
    t_max timestamptz NOT NULL,
    tag integer[] NOT NULL,
    ts timestamptz[] NOT NULL,
    val double precision[] NOT NULL,
    q integer[]
);
ALTER TABLE samples_live ALTER COLUMN tag SET COMPRESSION lz4;
ALTER TABLE samples_live ALTER COLUMN ts SET COMPRESSION lz4;
ALTER TABLE samples_live ALTER COLUMN val SET COMPRESSION lz4;
ALTER TABLE samples_live ALTER COLUMN q SET COMPRESSION lz4;
CREATE INDEX samples_live_gateway ON samples_live (gateway, t_min);

-- What maintenance moves out of samples_live: pieces per tag and hour as in samples_packed, in
-- hourly partitions which the rollup merges into samples_packed and then drops, so live traffic
-- leaves no dead space in a day's packed partition (and no day to rewrite).
CREATE TABLE samples_pieces (
    tag integer NOT NULL,
    t0 timestamptz NOT NULL,
    t1 timestamptz NOT NULL,
    n integer NOT NULL,
    off integer[] NOT NULL,
    off_us smallint[],
    val double precision[] NOT NULL,
    q integer[],
    txt text[]
) PARTITION BY RANGE (t0);
CREATE INDEX samples_pieces_tag_t0 ON samples_pieces (tag, t0);

-- One tag's live samples are found through its gateway's rows (the join on the gateway lets the
-- planner go from tags_key to samples_live_gateway), then unnested. Not by device: a unit's tags
-- are its device's in a gateway's store, but the gateway is the one thing the ids are sure of.
CREATE OR REPLACE VIEW samples AS
    SELECT t.key AS tag, r.ts, r.value, r.quality::bigint & 4294967295 AS quality, r.text,
           t.gateway, t.device, t.name, t.unit
    FROM samples_recent r JOIN tags t ON t.id = r.tag
    UNION ALL
    SELECT t.key, p.t0 + u.off * interval '1 millisecond' + coalesce(u.us, 0) * interval '1 microsecond',
           u.val, coalesce(u.q, 0)::bigint & 4294967295, u.txt,
           t.gateway, t.device, t.name, t.unit
    FROM samples_packed p JOIN tags t ON t.id = p.tag
    CROSS JOIN LATERAL unnest(p.off, p.off_us, p.val, p.q, p.txt) AS u(off, us, val, q, txt)
    UNION ALL
    SELECT t.key, p.t0 + u.off * interval '1 millisecond' + coalesce(u.us, 0) * interval '1 microsecond',
           u.val, coalesce(u.q, 0)::bigint & 4294967295, u.txt,
           t.gateway, t.device, t.name, t.unit
    FROM samples_pieces p JOIN tags t ON t.id = p.tag
    CROSS JOIN LATERAL unnest(p.off, p.off_us, p.val, p.q, p.txt) AS u(off, us, val, q, txt)
    UNION ALL
    SELECT t.key, u.ts, u.val, coalesce(u.q, 0)::bigint & 4294967295, NULL::text,
           t.gateway, t.device, t.name, t.unit
    FROM tags t JOIN samples_live l ON l.gateway = t.gateway
    CROSS JOIN LATERAL unnest(l.tag, l.ts, l.val, l.q) AS u(tag, ts, val, q)
    WHERE u.tag = t.id;

CREATE OR REPLACE FUNCTION samples_between(p_tag text, p_from timestamptz, p_to timestamptz)
RETURNS TABLE (ts timestamptz, value double precision, quality bigint, text text)
LANGUAGE sql STABLE AS $fn$
    SELECT r.ts, r.value, r.quality::bigint & 4294967295, r.text
    FROM samples_recent r JOIN tags t ON t.id = r.tag
    WHERE t.key = p_tag AND r.ts >= p_from AND r.ts < p_to
    UNION ALL
    SELECT x.ts, x.val, x.q, x.txt FROM (
        SELECT p.t0 + u.off * interval '1 millisecond' + coalesce(u.us, 0) * interval '1 microsecond' AS ts,
               u.val, coalesce(u.q, 0)::bigint & 4294967295 AS q, u.txt
        FROM samples_packed p JOIN tags t ON t.id = p.tag
        CROSS JOIN LATERAL unnest(p.off, p.off_us, p.val, p.q, p.txt) AS u(off, us, val, q, txt)
        WHERE t.key = p_tag AND p.t0 > p_from - interval '1 hour' AND p.t0 < p_to AND p.t1 > p_from
    ) x
    WHERE x.ts >= p_from AND x.ts < p_to
    UNION ALL
    SELECT x.ts, x.val, x.q, x.txt FROM (
        SELECT p.t0 + u.off * interval '1 millisecond' + coalesce(u.us, 0) * interval '1 microsecond' AS ts,
               u.val, coalesce(u.q, 0)::bigint & 4294967295 AS q, u.txt
        FROM samples_pieces p JOIN tags t ON t.id = p.tag
        CROSS JOIN LATERAL unnest(p.off, p.off_us, p.val, p.q, p.txt) AS u(off, us, val, q, txt)
        WHERE t.key = p_tag AND p.t0 > p_from - interval '1 hour' AND p.t0 < p_to AND p.t1 > p_from
    ) x
    WHERE x.ts >= p_from AND x.ts < p_to
    UNION ALL
    SELECT u.ts, u.val, coalesce(u.q, 0)::bigint & 4294967295, NULL::text
    FROM tags t JOIN samples_live l ON l.gateway = t.gateway
    CROSS JOIN LATERAL unnest(l.tag, l.ts, l.val, l.q) AS u(tag, ts, val, q)
    WHERE t.key = p_tag AND l.t_max >= p_from AND l.t_min < p_to
      AND u.tag = t.id AND u.ts >= p_from AND u.ts < p_to
$fn$;
""",
}


class SchemaError(Exception):
    """The database holds a schema this collector does not know (a newer one)."""


async def migrate(conn) -> int:
    """Bring the schema to SCHEMA_VERSION; refuse a newer one. Safe with several collectors
    starting at once (an advisory lock serialises them)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(7302519)")
        have = await conn.fetchval("SELECT to_regclass('edgeos_collector') IS NOT NULL")
        version = await conn.fetchval("SELECT version FROM edgeos_collector") if have else 0
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"the database schema is version {version}, newer than this collector's {SCHEMA_VERSION}: "
                "upgrade edgeos on this host"
            )
        for v in range(version + 1, SCHEMA_VERSION + 1):
            await conn.execute(_MIGRATIONS[v])
            await conn.execute("UPDATE edgeos_collector SET version = $1", v)
    return SCHEMA_VERSION


def hour_floor(t: dt.datetime) -> dt.datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def _hour_name(parent: str, start: dt.datetime) -> str:
    return f"{parent}_{start:%Y%m%d%H}"


def _packed_name(start: dt.datetime) -> str:
    return f"samples_packed_{start:%Y%m%d}"


async def ensure_recent(conn, hours: set[dt.datetime], parent: str = "samples_recent") -> None:
    """Create the hourly partitions of `samples_recent` (or of `samples_pieces`) for these hours
    (idempotent)."""
    for h in sorted(hour_floor(h) for h in hours):
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {_hour_name(parent, h)} PARTITION OF {parent} "
            f"FOR VALUES FROM ('{h.isoformat()}') TO ('{(h + HOUR).isoformat()}')"
        )


async def ensure_packed(conn, day: dt.datetime) -> None:
    d = day.replace(hour=0, minute=0, second=0, microsecond=0)
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {_packed_name(d)} PARTITION OF samples_packed "
        f"FOR VALUES FROM ('{d.isoformat()}') TO ('{(d + DAY).isoformat()}')"
    )


async def recent_partitions(conn, parent: str = "samples_recent") -> list[tuple[str, dt.datetime]]:
    """The hourly partitions of `samples_recent` (or of `samples_pieces`) and their hours."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = $1::regclass ORDER BY 1",
        parent,
    )
    out = []
    for r in rows:
        stamp = r["relname"].rsplit("_", 1)[1]
        out.append((r["relname"], dt.datetime.strptime(stamp, "%Y%m%d%H").replace(tzinfo=dt.UTC)))
    return out


async def rollup(conn, older_than: dt.datetime, lookback: dt.timedelta = dt.timedelta(days=7)) -> int:
    """Make each closed hour ending at or before `older_than` one packed row per tag: the hour's
    rows in `samples_recent` and its packed rows (written directly for backlogs, or by an
    earlier rollup of a late hour) are merged, and the hour's partition dropped, in one
    transaction, so a sample is never in both, nor in neither. Hours with several packed rows
    for a tag are looked for `lookback` back. Returns the hours rolled up."""
    recent = {start: name for name, start in await recent_partitions(conn) if start + HOUR <= older_than}
    pieces = {
        start: name for name, start in await recent_partitions(conn, "samples_pieces") if start + HOUR <= older_than
    }
    rows = await conn.fetch(
        "SELECT DISTINCT t0 FROM (SELECT t0 FROM samples_packed WHERE t0 >= $1 AND t0 <= $2 "
        "GROUP BY tag, t0 HAVING count(*) > 1) x",
        older_than - lookback,
        older_than - HOUR,
    )
    done = 0
    for start in sorted(set(recent) | set(pieces) | {r["t0"] for r in rows}):
        name, pname = recent.get(start), pieces.get(start)
        from_rows = (
            f"UNION ALL SELECT tag, (extract(epoch FROM ts - $1) * 1000000)::bigint, value, quality, text FROM {name}"
            if name
            else ""
        )
        if pname:
            from_rows += (
                f" UNION ALL SELECT pc.tag, u.off::bigint * 1000 + coalesce(u.us, 0), u.val, coalesce(u.q, 0), u.txt "
                f"FROM {pname} pc CROSS JOIN LATERAL unnest(pc.off, pc.off_us, pc.val, pc.q, pc.txt) "
                "AS u(off, us, val, q, txt)"
            )
        async with conn.transaction():
            for part in (name, pname):
                if part:
                    # The lock waits for writers still copying into the hour, and keeps new ones out.
                    await conn.execute(f"LOCK TABLE {part} IN ACCESS EXCLUSIVE MODE")
            await ensure_packed(conn, start)
            merged = await conn.fetchval("SELECT count(*) FROM samples_packed WHERE t0 = $1", start)
            if merged:
                await conn.execute("INSERT INTO packed_dirty VALUES ($1) ON CONFLICT DO NOTHING", start.replace(hour=0))
            await conn.execute(
                f"""
                WITH moved AS (
                    DELETE FROM samples_packed WHERE t0 = $1 RETURNING tag, off, off_us, val, q, txt
                ), s (tag, us, value, quality, text) AS (
                    SELECT m.tag, u.off::bigint * 1000 + coalesce(u.us, 0), u.val, coalesce(u.q, 0), u.txt
                    FROM moved m
                    CROSS JOIN LATERAL unnest(m.off, m.off_us, m.val, m.q, m.txt) AS u(off, us, val, q, txt)
                    {from_rows}
                )
                INSERT INTO samples_packed (tag, t0, t1, n, off, off_us, val, q, txt)
                SELECT tag, $1, $2, count(*), array_agg((us / 1000)::integer ORDER BY us),
                       CASE WHEN bool_or(us % 1000 <> 0) THEN array_agg((us % 1000)::smallint ORDER BY us) END,
                       array_agg(value ORDER BY us),
                       CASE WHEN bool_or(quality <> 0) THEN array_agg(quality ORDER BY us) END,
                       CASE WHEN bool_or(text IS NOT NULL) THEN array_agg(text ORDER BY us) END
                FROM s GROUP BY tag
                """,
                start,
                start + HOUR,
            )
            for part in (name, pname):
                if part:
                    await conn.execute(f"DROP TABLE {part}")
        done += 1
    return done


async def rewrite_closed_days(conn, older_than: dt.datetime) -> int:
    """VACUUM FULL each day partition of `samples_packed` that merged pieces left dead space in,
    once the day is over (its hours are rolled up): the space goes back to the filesystem. It
    locks only that closed day, for as long as rewriting it takes."""
    rows = await conn.fetch("SELECT day FROM packed_dirty WHERE day + interval '1 day' <= $1", older_than)
    for r in rows:
        await conn.execute(f"VACUUM (FULL, ANALYZE) {_packed_name(r['day'])}")
        await conn.execute("DELETE FROM packed_dirty WHERE day = $1", r["day"])
    return len(rows)


async def drop_older(conn, before: dt.datetime) -> int:
    """Retention: drop whole partitions (packed days, recent hours) that end at or before `before`."""
    dropped = 0
    for name, start in await recent_partitions(conn) + await recent_partitions(conn, "samples_pieces"):
        if start + HOUR <= before:
            await conn.execute(f"DROP TABLE IF EXISTS {name}")
            dropped += 1
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'samples_packed'::regclass"
    )
    for r in rows:
        day = dt.datetime.strptime(r["relname"].rsplit("_", 1)[1], "%Y%m%d").replace(tzinfo=dt.UTC)
        if day + DAY <= before:
            await conn.execute(f"DROP TABLE IF EXISTS {r['relname']}")
            dropped += 1
    await conn.execute("DELETE FROM samples_live WHERE t_max < $1", before)
    await conn.execute("DELETE FROM units WHERE received < $1", before)
    return dropped
