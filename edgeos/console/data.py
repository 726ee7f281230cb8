"""What the console shows, as JSON-ready dicts, read from a running Runtime without changing it.

Live values come from `Runtime.latest` (columns indexed by tag id, updated by the pipeline);
history and trends from the store through a read-only StoreReader of the console's own, used
in one worker thread so a slow query never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import math
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

import edgeos
from edgeos import filters
from edgeos.config.units import parse_time_ns
from edgeos.errors import StoreError
from edgeos.logs import redact
from edgeos.model import Quality, ValueKind
from edgeos.store.reader import CSV_HEADER, StoreReader, TagInfo, UnknownTag, csv_rows, trend

if TYPE_CHECKING:
    from edgeos.runtime import Runtime

MAX_PAGE = 500
MAX_STREAM_IDS = 1000
MAX_TREND_TAGS = 8
TRIM_AFTER = 2.0  # s without a trend or download before freed memory goes back to the system
MASK = "********"
_SECRET_WORDS = ("password", "passwd", "secret", "token", "credential", "api_key", "apikey", "private")


def is_secret(key: str) -> bool:
    k = key.lower()
    return any(w in k for w in _SECRET_WORDS)


def masked(value: Any, key: str = "") -> Any:
    """The config with every secret-looking key's value replaced (recursively), and in every
    other text what the logs mask too (a URL's password, a secret read from a file)."""
    if key and is_secret(key):
        return MASK
    if isinstance(value, dict):
        return {k: masked(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v, key) for v in value]
    if isinstance(value, str):
        return redact(value)
    return value


def _num(v: float) -> float | None:
    return None if math.isnan(v) or math.isinf(v) else v


def _col(a: np.ndarray) -> list[float | None]:
    """A float column as JSON: NaN becomes null (a break in the chart's line)."""
    out: list[float | None] = np.round(a, 9).tolist()
    if np.isnan(a).any():
        out = [None if x != x else x for x in out]
    return out


class ConsoleData:
    """Read-only views of one Runtime: overview, tags, live changes, trends, CSV, config."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.meta = rt.latest.meta
        self.keys = [m.key.lower() for m in self.meta]
        self.devices = [d.name for d in rt.config.devices]
        self._by_key = {m.key: m for m in self.meta}
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgeos-console")
        self._reader: StoreReader | None = None
        self._generation = -1
        self._store_info: tuple[float, dict[str, Any]] = (0.0, {})
        self._trim: asyncio.TimerHandle | None = None
        self._open = True

    def close(self) -> None:
        """Queued reads are dropped; the reader is closed in its thread after the one running."""
        self._open = False
        if self._trim is not None:
            self._trim.cancel()
        if self._reader is not None:
            self._pool.submit(self._reader.close)
        self._pool.shutdown(wait=False, cancel_futures=False)

    async def _in_pool(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _store(self) -> StoreReader:
        """The console's reader (in the pool thread); reopened after the daemon replaced a damaged file."""
        gen = self.rt.store.generation if self.rt.store is not None else 0
        if self._reader is None or gen != self._generation:
            if self._reader is not None:
                self._reader.close()
            self._reader = None
            self._reader = StoreReader(self.rt.config.gateway.data_dir)
            self._generation = gen
        return self._reader

    # -- overview -------------------------------------------------------------------------

    async def overview(self) -> dict[str, Any]:
        rt, now = self.rt, time.time_ns()
        store = await self._store_summary(now)
        devices = []
        for d in rt.config.devices:
            st = rt.devices[d.name]
            devices.append(
                {
                    "name": d.name,
                    "protocol": d.protocol,
                    "enabled": d.enabled,
                    "tags": len(d.tags),
                    "state": st.state if d.enabled else "disabled",
                    "up": st.up,
                    "last_ok_ns": st.last_ok_ns,
                    "errors": st.failures,
                    "last_error": st.last_error,
                    "last_error_code": st.last_error_code,
                    "lateness_ms": _lateness(st.adapter, st),
                }
            )
        sync = rt.sync.status if rt.sync is not None else None
        return {
            "now_ns": now,
            "gateway": {
                "id": rt.config.gateway.id,
                "version": edgeos.__version__,
                "started_ns": rt.counters.started_ns,
                "uptime_s": (now - rt.counters.started_ns) / 1e9,
                "kernels": filters.implementation(),
                "tags": len(self.meta),
                "read": rt.counters.read,
                "stored": rt.counters.stored,
                "filtered_out": rt.counters.filtered_out,
            },
            "devices": devices,
            "store": store,
            "upstream": {
                "enabled": rt.config.upstream.enabled,
                "state": sync.state if sync else "off",
                "connected": bool(sync and sync.state == "connected"),
                "lag_s": sync.lag_seconds if sync else None,
                "backlog_samples": sync.backlog_samples if sync else 0,
                "backlog_units": sync.backlog_units if sync else 0,
                "last_error": sync.last_error if sync else "",
            },
        }

    async def _store_summary(self, now: int) -> dict[str, Any]:
        rt = self.rt
        c = rt.store.counters if rt.store is not None else None
        out: dict[str, Any] = {
            "enabled": rt.use_store,
            "max_size": rt.store.settings.max_size if rt.store is not None else None,
            "retention_s": rt.config.store.retention_ns / 1e9 if rt.config.store.retention_ns else None,
            "committed_samples": c.committed_samples if c else 0,
            "dropped_retention": c.dropped_retention if c else 0,
            "dropped_budget": c.dropped_budget if c else 0,
            "dropped_unsent": c.dropped_unsent if c else 0,
            "dropped_store_unavailable": rt.counters.dropped_store_unavailable,
            "store_errors": rt.counters.store_errors,
        }
        stamp, cached = self._store_info
        if rt.store is not None and time.monotonic() - stamp > 5.0:
            try:
                cached = await self._in_pool(self._store_disk)
            except (StoreError, OSError) as e:
                cached = {"error": str(e)}
            self._store_info = (time.monotonic(), cached)
        return {**out, **cached}

    def _store_disk(self) -> dict[str, Any]:
        """Bytes in use (pages in use plus the WAL, as the budget counts them) and the oldest sample."""
        r = self._store()
        db = r.db
        pages, free, size = (
            db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count", "page_size")
        )
        try:
            wal = (r.path.parent / (r.path.name + "-wal")).stat().st_size
        except OSError:
            wal = 0
        span = r.time_range()
        return {"used_bytes": (pages - free) * size + wal, "horizon_ns": span[0] if span else None}

    # -- tags -----------------------------------------------------------------------------

    def tags(self, q: str = "", device: str = "", offset: int = 0, limit: int = 100) -> dict[str, Any]:
        """One page of tags matching a text (any part of device/tag) and a device."""
        limit = max(1, min(int(limit), MAX_PAGE))
        q = q.strip().lower()
        if device:
            prefix = device.lower() + "/"
            ids = [i for i, k in enumerate(self.keys) if k.startswith(prefix) and (not q or q in k)]
        elif q:
            ids = [i for i, k in enumerate(self.keys) if q in k]
        else:
            ids = range(len(self.keys))
        total = len(ids)
        offset = max(0, min(int(offset), max(0, total - 1)))
        page = list(ids[offset : offset + limit])
        return {
            "now_ns": time.time_ns(),
            "total": len(self.meta),
            "matched": total,
            "offset": offset,
            "limit": limit,
            "devices": self.devices,
            "rows": [self._row(i) for i in page],
        }

    def _row(self, i: int) -> dict[str, Any]:
        m = self.meta[i]
        return {
            "id": i,
            "device": m.device,
            "name": m.name,
            "kind": m.kind.value if isinstance(m.kind, ValueKind) else str(m.kind),
            "unit": m.unit,
            **self._live(i),
        }

    def _live(self, i: int) -> dict[str, Any]:
        lv = self.rt.latest
        q = int(lv.quality[i])
        text = lv.text.get(i)
        return {
            "value": text if text is not None else _num(float(lv.values[i])),
            "quality": Quality.describe(q),
            "severity": Quality.severity(q),
            "ts": int(lv.ts[i]),
        }

    def changes(self, ids: list[int], seen: np.ndarray) -> list[dict[str, Any]]:
        """Rows of `ids` whose timestamp moved since `seen` (updated in place): what SSE sends."""
        ts = self.rt.latest.ts[ids] if ids else np.empty(0, np.int64)
        moved = np.flatnonzero(ts != seen)
        seen[moved] = ts[moved]
        return [{"id": ids[j], **self._live(ids[j])} for j in moved.tolist()]

    def parse_ids(self, text: str) -> list[int]:
        n = len(self.meta)
        out = []
        for part in text.split(",")[:MAX_STREAM_IDS]:
            if part.strip().isdigit() and int(part) < n:
                out.append(int(part))
        return out

    # -- history --------------------------------------------------------------------------

    def _resolve(self, names: list[str], limit: int | None = None) -> list[TagInfo]:
        """The named tags, each once, in the order given. More than `limit` is an error (a
        silently shorter chart would look like data that is not there)."""
        names = list(dict.fromkeys(names))
        if limit is not None and len(names) > limit:
            raise ValueError(f"{len(names)} tags named: at most {limit} at once")
        out = []
        r = self._store()
        for name in names:
            try:
                out.append(r.resolve(name))
            except KeyError:
                # The reader knows the tags of when it opened: a tag added since needs a new one.
                self._generation = -1
                try:
                    out.append(self._store().resolve(name))
                except UnknownTag as e:
                    raise LookupError(f"no tag {e.name!r} is stored on this gateway") from None
                except KeyError as e:  # ambiguous: the message lists the candidates
                    raise LookupError(e.args[0]) from None
        return out

    @staticmethod
    def range_ns(since: str, until: str) -> tuple[int, int]:
        now = time.time_ns()
        lo, hi = parse_time_ns(since or "1h", now), parse_time_ns(until or "now", now)
        if hi <= lo:
            raise ValueError(f"the range ends ({until}) before it starts ({since})")
        return lo, hi

    async def trend(self, names: list[str], since: str, until: str, width: int) -> dict[str, Any]:
        lo, hi = self.range_ns(since, until)
        try:
            return await self._in_pool(self._trend, names, lo, hi, max(10, min(int(width), 4000)))
        finally:
            self._trim_later()

    def _trim_later(self) -> None:
        """release_memory() once queries pause for TRIM_AFTER s (not after each: the next query
        would fault the same pages back in)."""
        if self._trim is not None:
            self._trim.cancel()
        loop = asyncio.get_running_loop()
        self._trim = loop.call_later(TRIM_AFTER, lambda: self._pool.submit(release_memory) if self._open else None)

    def _trend(self, names: list[str], lo: int, hi: int, width: int) -> dict[str, Any]:
        infos = self._resolve(names, MAX_TREND_TAGS)
        r = self._store()  # reopened if a name was new
        series = []
        for info in infos:
            t = trend(r.history(info, lo, hi), lo, hi, width)
            series.append(
                {
                    "tag": info.key,
                    "unit": info.unit,
                    "kind": info.kind,
                    "samples": t.samples,
                    "interval_ns": t.interval_ns,
                    "mean": _col(t.mean),
                    "min": _col(t.lo),
                    "max": _col(t.hi),
                    "bad": [[a, b] for a, b in t.bad],
                }
            )
        step = max(1, -(-(hi - lo + 1) // width))
        return {"since_ns": lo, "until_ns": hi, "step_ns": step, "buckets": width, "series": series}

    def csv(self, names: list[str], lo: int, hi: int) -> Iterator[str]:
        """The raw samples as `edgeos export` writes them, in pieces (runs in the pool thread)."""
        import csv
        import io

        r = self._store()
        infos = self._resolve(names) if names else r.tags()
        r = self._store()  # reopened if a name was new
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_HEADER)
        for rows in csv_rows(r, infos, lo, hi):
            w.writerows(rows)
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
        if buf.tell():  # no samples in the range: the header alone, as `edgeos export` writes it
            yield buf.getvalue()

    async def csv_stream(self, names: list[str], lo: int, hi: int) -> AsyncIterator[bytes]:
        """The CSV sent as the store reads it, one window at a time (in the pool thread), so
        memory stays at one window whatever the range. Unknown names raise before the first
        byte (LookupError: a 404, not a cut download)."""
        if names:
            await self._in_pool(self._resolve, names)
        pieces = self.csv(names, lo, hi)
        try:
            while (piece := await self._in_pool(next, pieces, None)) is not None:
                yield piece.encode()
        finally:
            await self._in_pool(pieces.close)
            self._trim_later()

    # -- config ---------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        src = self.rt.config.source
        try:
            raw = tomllib.loads(src.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raw = {"error": f"cannot read {src.name}: {type(e).__name__}"}
        return {"file": str(src), "config": masked(raw)}


def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def release_memory() -> None:
    """Give a big query's freed memory back to the system. A week of one tag is tens of MB of
    numpy temporaries; glibc keeps freed blocks in the console thread's arena (its mmap
    threshold grows with each large free), so without this the daemon would stay that much
    bigger after the first long trend or download."""
    if _TRIM is not None:
        _TRIM(0)


def _lateness(adapter: Any, state: Any = None) -> dict[str, float] | None:
    """Poll lateness in ms: median, p99 and max of the adapter's recent cycles where it keeps
    them (PollStats.lateness_ns), else the mean since start (DeviceState.poll_stats())."""
    stats = getattr(adapter, "stats", None)
    samples = [x for s in stats.values() for x in getattr(s, "lateness_ns", ())] if isinstance(stats, dict) else []
    if samples:
        a = np.asarray(samples, np.float64) / 1e6
        return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max())}
    totals = getattr(state, "poll_stats", None)
    if callable(totals):
        ps = totals()
        if getattr(ps, "cycles", 0):
            return {"mean": ps.late_sum_ns / ps.cycles / 1e6}
    return None
