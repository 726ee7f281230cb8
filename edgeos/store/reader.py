"""Reading the store while the daemon writes: read-only connections, WAL snapshots, no lock.

The history of a tag is its chunks (compacted) followed by its hot units not yet compacted;
compaction swaps one for the other in a single transaction, so a snapshot sees each sample once.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeos import wire
from edgeos.errors import StoreError
from edgeos.model import Quality
from edgeos.store.chunk import decode_chunk
from edgeos.store.writer import DB_NAME, _connect

log = logging.getLogger("edgeos.store")

TagInfo = wire.TagEntry
"""A stored tag: the store's id, device, name, kind, unit (the same record consumers receive)."""


@dataclass(frozen=True)
class History:
    """One tag's samples in time order, as columns (what OEM code gets)."""

    tag: TagInfo
    ts: np.ndarray
    values: np.ndarray
    quality: np.ndarray
    text: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.ts)


class UnknownTag(KeyError):
    """No stored tag has this name. `name` for callers that word it themselves (the console
    shows a browser no path of the gateway's)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class StoreReader:
    """Read-only access to a data directory's store; safe beside a running daemon."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.path = Path(data_dir).absolute() / DB_NAME  # a relative path has no file URI
        if not self.path.exists():
            raise StoreError(f"no edgeos store at {self.path} (has the daemon run with this data_dir?)")
        try:
            self.db = _connect(self.path, readonly=True)
            rows = self.db.execute("SELECT id, device, name, kind, unit FROM tags ORDER BY id").fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot read store: {e}") from e
        # A tag whose kind or unit changed has several ids over time (docs/store.md, I16): its
        # newest id names it, and queries by name read them all.
        self._all = {r[0]: TagInfo(*r) for r in rows}
        self._ids: dict[tuple[str, str], list[int]] = {}
        for t in self._all.values():
            self._ids.setdefault((t.device, t.name), []).append(t.id)
        self._tags = {ids[-1]: self._all[ids[-1]] for ids in self._ids.values()}

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tags -----------------------------------------------------------------------------

    def tags(self) -> list[TagInfo]:
        """One entry per device/name: its current id, kind and unit."""
        return sorted(self._tags.values(), key=lambda t: t.id)

    def ids(self, tag: TagInfo) -> list[int]:
        """Every store id the tag's name had (older ones kept their kind and unit)."""
        return self._ids.get((tag.device, tag.name), [tag.id])

    def resolve(self, name: str) -> TagInfo:
        """`device/tag`, or a bare tag name when only one device has it."""
        if "/" in name:
            device, tag = name.split("/", 1)
            found = [t for t in self._tags.values() if t.device == device and t.name == tag]
        else:
            found = [t for t in self._tags.values() if t.name == name]
        if len(found) == 1:
            return found[0]
        if not found:
            raise UnknownTag(name, f"no tag {name!r} in {self.path}")
        raise KeyError(f"tag name {name!r} is ambiguous: {', '.join(t.key for t in found)}; write device/tag")

    # -- history --------------------------------------------------------------------------

    def history(self, tag: str | TagInfo, since_ns: int | None = None, until_ns: int | None = None) -> History:
        """Samples of one tag with since <= ts <= until, as numpy columns in time order."""
        info = tag if isinstance(tag, TagInfo) else self.resolve(tag)
        # int(): numpy scalars would bind as BLOBs (buffer protocol) and match nothing.
        lo = -(2**63) if since_ns is None else int(since_ns)
        hi = 2**63 - 1 if until_ns is None else int(until_ns)
        ids = self.ids(info)
        with self._snapshot():
            parts = [p for tag in ids for p in self._chunk_parts(tag, lo, hi)] + self._unit_parts(info, ids, lo, hi)
        return _merge(info, parts)

    def _chunk_parts(self, tag: int, lo: int, hi: int) -> list:
        out = []
        rows = self.db.execute(
            "SELECT data FROM chunks WHERE tag=? AND t_max>=? AND t_min<=? ORDER BY t_min, id", (tag, lo, hi)
        )
        for (data,) in rows:
            c = decode_chunk(data)
            m = (c.ts >= lo) & (c.ts <= hi)
            out.append((c.ts[m], c.values[m], c.quality[m], None if c.text is None else np.array(c.text, object)[m]))
        return out

    def _unit_parts(self, info: TagInfo, ids: list[int], lo: int, hi: int) -> list:
        out = []
        rows = self.db.execute(
            "SELECT id, data FROM units WHERE id>=? AND device=? AND compacted=0 AND t_max>=? AND t_min<=? ORDER BY id",
            (self._hot_from(), info.device, lo, hi),
        )
        for uid, data in rows:
            u = _decode(uid, data)
            if u is None:
                continue
            m = (np.isin(u.tags, ids) if len(ids) > 1 else u.tags == info.id) & (u.ts >= lo) & (u.ts <= hi)
            if m.any():
                text = None if u.text is None else np.array(u.text, object)[m]
                out.append((u.ts[m], u.values[m], u.quality[m], text))
        return out

    def _hot_from(self) -> int:
        """(I19) Every hot unit's id is at or above meta.hot_from: hot units are read by id
        range, without an index (0 in a store the writer has not opened since schema 4)."""
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key='hot_from'").fetchone()
        except sqlite3.Error:
            return 0
        return int(row[0]) if row else 0

    def _snapshot(self):
        """One read transaction: chunk and unit reads see the same committed state."""
        return _ReadTxn(self.db)

    def latest(self, tags: Sequence[TagInfo] | None = None) -> list[tuple[TagInfo, int, float | str, int]]:
        """The last sample of each tag: newest hot units first, then each tag's newest chunk."""
        wanted = {t.id: t for t in (tags if tags is not None else self._tags.values())}
        # Any id a tag's name had counts as that tag (I16): map them all to the wanted entry.
        alias = {i: tid for tid, t in wanted.items() for i in self.ids(t)}
        found: dict[int, tuple[int, float | str, int]] = {}
        with self._snapshot():
            for device in sorted({t.device for t in wanted.values()}):
                need = {i for i, t in wanted.items() if t.device == device}
                for uid, data in self.db.execute(
                    "SELECT id, data FROM units WHERE id>=? AND device=? AND compacted=0 ORDER BY id DESC",
                    (self._hot_from(), device),
                ):
                    u = _decode(uid, data)
                    if u is None:
                        continue
                    for i in range(len(u) - 1, -1, -1):
                        tid = alias.get(int(u.tags[i]), -1)
                        if tid in need and tid not in found:
                            v = u.text[i] if u.text is not None and u.text[i] is not None else float(u.values[i])
                            found[tid] = (int(u.ts[i]), v, int(u.quality[i]))
                    if need <= found.keys():
                        break
            for tid in wanted.keys() - found.keys():
                marks = ",".join("?" * len(self.ids(wanted[tid])))
                sql = f"SELECT data FROM chunks WHERE tag IN ({marks}) ORDER BY t_max DESC LIMIT 1"
                row = self.db.execute(sql, self.ids(wanted[tid])).fetchone()
                if row:
                    c = decode_chunk(row[0])
                    j = int(np.argmax(c.ts))
                    v = c.text[j] if c.text is not None and c.text[j] is not None else float(c.values[j])
                    found[tid] = (int(c.ts[j]), v, int(c.quality[j]))
        out = []
        for tid, t in sorted(wanted.items()):
            ts, v, q = found.get(tid, (0, float("nan"), int(Quality.BAD_WAITING_FOR_INITIAL_DATA)))
            out.append((t, ts, v, q))
        return out

    def count(self) -> int:
        """Samples stored (hot units not yet compacted plus chunks)."""
        with self._snapshot():
            sql = "SELECT COALESCE(SUM(n), 0) FROM units WHERE id>=? AND compacted=0"
            a = self.db.execute(sql, (self._hot_from(),)).fetchone()[0]
            b = self.db.execute("SELECT COALESCE(SUM(n), 0) FROM chunks").fetchone()[0]
        return int(a + b)

    def time_range(self) -> tuple[int, int] | None:
        # Raw copies' samples are in the chunks too: chunks and hot units cover every sample.
        both = (
            "SELECT {f}(t) FROM (SELECT {f}({c}) t FROM chunks "
            "UNION ALL SELECT {f}({c}) FROM units WHERE id>=? AND compacted=0)"
        )
        with self._snapshot():
            hf = self._hot_from()
            lo = self.db.execute(both.format(f="MIN", c="t_min"), (hf,)).fetchone()[0]
            hi = self.db.execute(both.format(f="MAX", c="t_max"), (hf,)).fetchone()[0]
        return None if lo is None else (int(lo), int(hi))

    def windows(
        self, tags: Sequence[TagInfo], since_ns: int, until_ns: int, step_ns: int = 3_600_000_000_000
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
        """(tag ids, ts, values, quality, text) per time window, sorted by time: for streaming
        exports that never hold more than one window of history in memory. The windows cover
        only the stored time span within the range, and after an empty window the next starts
        where these tags have data again: a range from 1970 would otherwise read half a million
        empty hours, and so would one old sample (an OPC UA value with a years-old source time)."""
        span = self.time_range()
        if span is None:
            return
        t = max(since_ns, span[0])
        until_ns = min(until_ns, span[1])
        while t <= until_ns:
            end = min(until_ns, t + step_ns - 1)
            cols: list[tuple] = []
            for info in tags:
                h = self.history(info, t, end)
                if len(h):
                    text = None if h.text is None else np.asarray(h.text, object)
                    cols.append((np.full(len(h), info.id, np.int32), h.ts, h.values, h.quality, text))
            if cols:
                ids = np.concatenate([c[0] for c in cols])
                ts = np.concatenate([c[1] for c in cols])
                order = np.argsort(ts, kind="stable")
                text = None
                if any(c[4] is not None for c in cols):
                    filled = [c[4] if c[4] is not None else np.full(len(c[0]), None, object) for c in cols]
                    text = np.concatenate(filled)[order]
                yield (
                    ids[order],
                    ts[order],
                    np.concatenate([c[2] for c in cols])[order],
                    np.concatenate([c[3] for c in cols])[order],
                    text,
                )
                t = end + 1
            else:
                nxt = self._next_data(tags, end + 1)
                if nxt is None:
                    return
                t = max(end + 1, nxt)

    def _next_data(self, tags: Sequence[TagInfo], t: int) -> int | None:
        """The time of these tags' first sample at or after `t`: a stored piece that starts
        there gives its first time; one that reaches across `t` (a unit holding a sample years
        old beside today's) is decoded to find it."""
        ids = sorted({i for info in tags for i in self.ids(info)})
        devices = sorted({info.device for info in tags})
        found: list[int] = []

        def first(ts: np.ndarray, keep: np.ndarray | None = None) -> None:
            ts = ts[(ts >= t) if keep is None else keep & (ts >= t)]
            if len(ts):
                found.append(int(ts.min()))

        with self._snapshot():
            for tag in ids:
                q = "SELECT MIN(t_min) FROM chunks WHERE tag=? AND t_max>=? AND t_min>=?"
                row = self.db.execute(q, (tag, t, t)).fetchone()
                if row[0] is not None:
                    found.append(int(row[0]))
                q = "SELECT data FROM chunks WHERE tag=? AND t_max>=? AND t_min<?"
                for (data,) in self.db.execute(q, (tag, t, t)):
                    c = decode_chunk(data)
                    first(c.ts)
            hf = self._hot_from()
            for device in devices:
                q = "SELECT MIN(t_min) FROM units WHERE id>=? AND device=? AND compacted=0 AND t_max>=? AND t_min>=?"
                row = self.db.execute(q, (hf, device, t, t)).fetchone()
                if row[0] is not None:
                    found.append(int(row[0]))
                q = "SELECT id, data FROM units WHERE id>=? AND device=? AND compacted=0 AND t_max>=? AND t_min<?"
                for uid, data in self.db.execute(q, (hf, device, t, t)):
                    u = _decode(uid, data)
                    if u is not None:
                        first(u.ts, np.isin(u.tags, ids))
        return min(found) if found else None


def _decode(uid: int, data: bytes) -> wire.Unit | None:
    """A unit that does not decode is skipped (compaction moves it to bad_units, I13)."""
    try:
        return wire.decode_unit(data)
    except Exception as e:  # noqa: BLE001 - one bad unit must not fail every query
        log.warning("store: unit %d does not decode (%s: %s); skipped", uid, type(e).__name__, e)
        return None


class _ReadTxn:
    """Nestable: only the outermost level begins and ends the read transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.owner = False

    def __enter__(self) -> None:
        self.owner = not self.db.in_transaction
        if self.owner:
            self.db.execute("BEGIN")

    def __exit__(self, *exc: object) -> None:
        if self.owner:
            self.db.execute("COMMIT")


def _merge(info: TagInfo, parts: list) -> History:
    if not parts:
        return History(info, np.empty(0, np.int64), np.empty(0), np.empty(0, np.uint32), None)
    ts = np.concatenate([p[0] for p in parts])
    values = np.concatenate([p[1] for p in parts])
    quality = np.concatenate([p[2] for p in parts])
    text = None
    if any(p[3] is not None for p in parts):
        text = np.concatenate([p[3] if p[3] is not None else np.full(len(p[0]), None, object) for p in parts])
    if len(ts) > 1 and (np.diff(ts) < 0).any():
        order = np.argsort(ts, kind="stable")
        ts, values, quality = ts[order], values[order], quality[order]
        text = None if text is None else text[order]
    text_list = None if text is None else text.tolist()
    if text_list is not None and all(t is None for t in text_list):
        text_list = None  # a numeric tag stored beside string tags in the same unit
    return History(info, ts, values, quality, text_list)


def aggregate(h: History, every_ns: int, agg: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Buckets aligned to multiples of `every` since the epoch: (bucket start, value, samples).
    Bad samples are left out of every aggregate; a bucket with none is omitted."""
    ok = (h.quality >> np.uint32(30)) < 2
    ok &= np.isfinite(h.values) | (agg == "count")
    ts, v = h.ts[ok], h.values[ok]
    if not len(ts):
        return np.empty(0, np.int64), np.empty(0), np.empty(0, np.int64)
    bucket = (ts // every_ns) * every_ns
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    counts = np.diff(np.r_[starts, len(ts)])
    if agg == "mean":
        out = np.add.reduceat(v, starts) / counts
    elif agg == "min":
        out = np.minimum.reduceat(v, starts)
    elif agg == "max":
        out = np.maximum.reduceat(v, starts)
    elif agg == "last":
        out = v[np.r_[starts[1:], len(v)] - 1]
    elif agg == "first":
        out = v[starts]
    elif agg == "count":
        out = counts.astype(np.float64)
    else:
        raise ValueError(f"unknown aggregate {agg!r}; expected mean, min, max, first, last, count")
    return bucket[starts], out, counts


# -- trends and CSV for the web console (edgeos/console) -------------------------------------


@dataclass(frozen=True)
class Trend:
    """One tag over a range, cut into `len(t)` equal buckets for a chart of that many pixels.

    `mean`, `lo` and `hi` are NaN where a bucket holds no Good (or Uncertain) sample: the chart
    breaks its line there. `bad` lists (start, end) ns of each Bad-quality period: from its first
    Bad sample to the next usable one (or its last Bad sample), so a chart shades it and never
    draws a line through it."""

    tag: TagInfo
    t: np.ndarray  # bucket starts, ns
    step_ns: int
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    count: np.ndarray
    bad: list[tuple[int, int]]
    samples: int
    interval_ns: int  # median spacing of the samples: a chart bridges empty buckets up to a few of these


def trend(h: History, since_ns: int, until_ns: int, buckets: int) -> Trend:
    """Min/max/mean buckets over [since, until] (aggregate() aligns to the epoch; a chart needs
    its own grid). Vectorised: a week at 1 Hz is 605k samples, a few ms here."""
    buckets = max(1, min(int(buckets), 10_000))
    span = max(1, int(until_ns) - int(since_ns) + 1)
    step = max(1, -(-span // buckets))
    t = int(since_ns) + step * np.arange(buckets, dtype=np.int64)
    usable = ((h.quality >> np.uint32(30)) < 2) & np.isfinite(h.values)
    idx = (h.ts - since_ns) // step
    ok = usable & (idx >= 0) & (idx < buckets)
    b, v = idx[ok], h.values[ok]
    count = np.bincount(b, minlength=buckets)[:buckets]
    sums = np.bincount(b, weights=v, minlength=buckets)[:buckets]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, sums / np.maximum(count, 1), np.nan)
    lo = np.full(buckets, np.inf)
    hi = np.full(buckets, -np.inf)
    if len(b):
        _reduce_sorted(lo, b, v, np.minimum)
        _reduce_sorted(hi, b, v, np.maximum)
    lo[count == 0] = np.nan
    hi[count == 0] = np.nan
    interval = int(np.median(np.diff(h.ts))) if len(h) > 1 else 0
    return Trend(h.tag, t, step, mean, lo, hi, count, bad_periods(h.ts, usable), len(h), interval)


def _reduce_sorted(out: np.ndarray, b: np.ndarray, v: np.ndarray, ufunc: np.ufunc) -> None:
    """ufunc.at is slow; history is time-ordered, so each bucket's samples are contiguous."""
    starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    out[b[starts]] = ufunc.reduceat(v, starts)


def bad_periods(ts: np.ndarray, usable: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of unusable samples; it ends at the next usable sample."""
    if not len(ts) or usable.all():
        return []
    bad = (~usable).astype(np.int8)
    edges = np.diff(np.r_[0, bad, 0])
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)  # ends: first usable after
    return [(int(ts[s]), int(ts[e] if e < len(ts) else ts[e - 1])) for s, e in zip(starts, ends, strict=True)]


CSV_HEADER = ("time", "tag", "value", "quality")


def csv_rows(
    store: StoreReader, infos: Sequence[TagInfo], since_ns: int, until_ns: int
) -> Iterator[list[tuple[str, str, str, str]]]:
    """Raw history as CSV rows (time, tag, value, quality), one window at a time, in time order:
    what `edgeos export` writes and the console downloads (one function, so they agree)."""
    names = {t.id: t.key for t in infos}
    for ids, ts, values, quality, text in store.windows(infos, since_ns, until_ns):
        times = np.datetime_as_string(ts.astype("datetime64[ns]"), unit="ms")
        vals = (
            values.astype(str)
            if text is None
            else [s if s is not None else repr(float(v)) for s, v in zip(text, values, strict=True)]
        )
        quals = [Quality.describe(int(q)) for q in quality]
        yield [
            (f"{t}Z", names[i], "" if v == "nan" else v, q)
            for t, i, v, q in zip(times, ids.tolist(), vals, quals, strict=True)
        ]
