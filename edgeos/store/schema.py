"""Tables, versions and migrations of the store database (docs/store.md, "Layout")."""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 4
APPLICATION_ID = 0x45444745  # "EDGE": tells our database from any other SQLite file
HEADER = b"SQLite format 3\x00"

DDL = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- A tag whose kind or unit changes gets a new id; the old row stays (retired=1), so samples
-- stored under it keep their kind and unit. One active row per device/name.
CREATE TABLE IF NOT EXISTS tags(
    id INTEGER PRIMARY KEY, device TEXT NOT NULL, name TEXT NOT NULL,
    kind TEXT NOT NULL, unit TEXT NOT NULL DEFAULT '', retired INTEGER NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX IF NOT EXISTS tags_active ON tags(device, name) WHERE retired=0;
-- Hot units: one device's samples from one commit, as committed (and as forwarded upstream).
-- The writer gives the ids (never reused: meta.top_id and edgeos.seq, docs/store.md I14), so
-- a commit writes no sqlite_sequence page. No index is touched by a commit: hot units are
-- found by id from meta.hot_from (I19); the partial indexes hold only compacted raw copies,
-- and are written by the compaction that marks them.
CREATE TABLE IF NOT EXISTS units(
    id INTEGER PRIMARY KEY, device TEXT NOT NULL,
    t_min INTEGER NOT NULL, t_max INTEGER NOT NULL, n INTEGER NOT NULL,
    compacted INTEGER NOT NULL DEFAULT 0, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS units_copies ON units(id) WHERE compacted=1;
CREATE INDEX IF NOT EXISTS units_copies_time ON units(t_max) WHERE compacted=1;
-- Compacted history: one tag's samples over a span, compressed (edgeos/store/chunk.py).
CREATE TABLE IF NOT EXISTS chunks(
    id INTEGER PRIMARY KEY, tag INTEGER NOT NULL,
    t_min INTEGER NOT NULL, t_max INTEGER NOT NULL, n INTEGER NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_tag_time ON chunks(tag, t_max);
CREATE INDEX IF NOT EXISTS chunks_time ON chunks(t_max);
-- Units that did not decode at compaction: kept aside with the reason, never deleted.
CREATE TABLE IF NOT EXISTS bad_units(
    id INTEGER PRIMARY KEY, device TEXT NOT NULL, reason TEXT NOT NULL, data BLOB NOT NULL);
"""

# Version 2's tags table: UNIQUE(device, name) over every row, which a retired row would break.
_TAGS_V3 = """
CREATE TABLE tags_v3(
    id INTEGER PRIMARY KEY, device TEXT NOT NULL, name TEXT NOT NULL,
    kind TEXT NOT NULL, unit TEXT NOT NULL DEFAULT '', retired INTEGER NOT NULL DEFAULT 0);
INSERT INTO tags_v3(id, device, name, kind, unit) SELECT id, device, name, kind, unit FROM tags;
DROP TABLE tags;
ALTER TABLE tags_v3 RENAME TO tags;
"""


def version(db: sqlite3.Connection) -> int | None:
    """The schema version recorded in the file; None for an empty database."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables:
        return None
    if "meta" not in tables:
        return -1
    row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return int(row[0]) if row else -1


def create(db: sqlite3.Connection) -> None:
    db.execute(f"PRAGMA application_id={APPLICATION_ID}")
    db.executescript(DDL)
    db.execute("INSERT OR REPLACE INTO meta VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))


def migrate(db: sqlite3.Connection, found: int) -> None:
    """Bring an older schema up to date in one transaction. Units keep their bytes: the unit
    decoder reads every version, so nothing is re-encoded."""
    steps = []
    if found == 1:
        # 0.1.0 development store: units without the compaction flag (and without AUTOINCREMENT,
        # which cannot be added in place), no chunks, no application id.
        steps.append(
            """
            CREATE TABLE units_v2(
                id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL,
                t_min INTEGER NOT NULL, t_max INTEGER NOT NULL, n INTEGER NOT NULL,
                compacted INTEGER NOT NULL DEFAULT 0, data BLOB NOT NULL);
            INSERT INTO units_v2(id, device, t_min, t_max, n, compacted, data)
                SELECT id, device, t_min, t_max, n, 0, data FROM units;
            DROP TABLE units;
            ALTER TABLE units_v2 RENAME TO units;
            """
        )
    if found < 3:
        # 2 -> 3: retired tags (a kind or unit change gets a new id), bad_units, units(t_max).
        steps.append(_TAGS_V3)
    if found < 4:
        # 3 -> 4: no index on hot units (each cost a page written per commit); partial ones
        # for raw copies. The table keeps AUTOINCREMENT (rebuilding it would copy every unit):
        # its sqlite_sequence page is still written per commit, in migrated stores only.
        steps.append(
            "DROP INDEX IF EXISTS units_device_time; DROP INDEX IF EXISTS units_pending; "
            "DROP INDEX IF EXISTS units_time;"
        )
    try:
        db.executescript(
            "BEGIN;"
            + "".join(steps)
            + DDL
            + f"PRAGMA application_id={APPLICATION_ID};"
            + f"INSERT OR REPLACE INTO meta VALUES('schema_version', '{SCHEMA_VERSION}');"
            + "COMMIT;"
        )
    except BaseException:
        if db.in_transaction:  # a failed step leaves the file as it was
            db.execute("ROLLBACK")
        raise
