"""Frames to a columnar Batch: checksum (all frames at once), decode, regex, conversion by column.

One call per read: every frame that arrived together becomes one batch. Per frame there is one
decode and one regex search (Python's `re`, in C); the captured texts are gathered per tag and
converted a column at a time (numpy parses a column of decimal text in one call). A frame that
fails (checksum, decoding, no match, a value or timestamp that does not convert) is never
dropped: it becomes Bad samples (`BAD_DECODING_ERROR`) for the tags it should have carried, and
its reason is counted and returned for the adapter to log.
"""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from edgeos.protocols.serial.checksum import WIDTH, compute_many
from edgeos.protocols.serial.config import Pattern, Spec
from edgeos.protocols.serial.framing import Frames

from edgeos.model import QUALITY_DTYPE, Batch, Quality

BAD = int(Quality.BAD_DECODING_ERROR)
REASONS = ("checksum", "decode", "no_match", "value", "timestamp", "overlong", "incomplete")

_HEX = np.full(256, -1, np.int64)
for _c in b"0123456789":
    _HEX[_c] = _c - 48
for _c in b"abcdef":
    _HEX[_c] = _HEX[_c - 32] = _c - 87
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_US = dt.timedelta(microseconds=1)


@dataclass
class Failure:
    """One rejected frame: why, a short excerpt for the log."""

    reason: str
    detail: str = ""


@dataclass
class Result:
    batch: Batch
    frames: int = 0  # complete frames seen (good and bad)
    failures: list[Failure] = field(default_factory=list)


def excerpt(b: bytes, n: int = 60) -> str:
    return repr(b[:n]) + ("..." if len(b) > n else "")


class Parser:
    """Checks and parses the frames of one device; holds nothing between calls."""

    def __init__(self, device: str, spec: Spec) -> None:
        self.device = device
        self.spec = spec
        self.tz = zoneinfo.ZoneInfo(spec.timezone)
        self.any_text = any(s.type == "string" for p in spec.patterns for s in p.slots)
        # Listen mode with several patterns: a frame no pattern matches should have carried
        # any of their tags; all of them get the Bad sample.
        ids: dict[int, None] = {}
        for p in spec.patterns:
            ids.update(dict.fromkeys(p.tag_ids))
        self.all_ids = np.array(list(ids), np.int32)

    # -- checksum ----------------------------------------------------------------------------

    def check(self, frames: Frames) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(text ends, checksum ok, computed, found) per frame; without a checksum the text is
        the whole frame and every frame passes."""
        ends = np.array(frames.ends, np.int64)
        cs = self.spec.checksum
        # With a trailer the frame holds its end bytes and trailer: the text stops before them.
        cut = len(self.spec.end) + self.spec.trailer if self.spec.framing == "start_end" and self.spec.trailer else 0
        if cs is None:
            return ends - cut, np.ones(len(ends), bool), None, None
        starts = np.array(frames.starts, np.int64)
        arr = np.frombuffer(frames.data, np.uint8)
        at = ends - cs.size  # where the checksum field begins
        text_end = at - cs.gap
        cov = starts + cs.start
        fits = text_end >= cov
        computed = compute_many(cs.kind, arr, cov, np.maximum(text_end, cov))
        last = max(len(arr) - 1, 0)
        found = np.zeros(len(ends), np.int64)
        valid = fits.copy()
        width = WIDTH[cs.kind]
        if len(arr):
            if cs.binary:
                for k in range(width):
                    byte = arr[np.clip(at + k, 0, last)].astype(np.int64)
                    shift = 8 * (width - 1 - k) if cs.order == "big" else 8 * k
                    found |= byte << shift
            else:
                for k in range(cs.size):
                    digit = _HEX[arr[np.clip(at + k, 0, last)]]
                    valid &= digit >= 0
                    found |= np.maximum(digit, 0) << (4 * (cs.size - 1 - k))
                if width == 2 and cs.order == "little":
                    found = ((found & 0xFF) << 8) | (found >> 8)
        ok = valid & (computed == found)
        text_end = np.minimum(text_end, ends - cut)
        return np.where(fits, np.maximum(text_end, starts), ends), ok, computed, found

    # -- parse -------------------------------------------------------------------------------

    def parse(self, frames: Frames, now_ns: int, patterns: Sequence[Pattern] | None = None) -> Result:
        """The batch for these frames, read with `patterns` (default: the device's)."""
        patterns = self.spec.patterns if patterns is None else patterns
        n = len(frames)
        res = Result(Batch.empty(self.device), n + len(frames.bad))
        bad_ids = self.all_ids if len(patterns) > 1 or patterns is self.spec.patterns else None
        if bad_ids is None:
            bad_ids = np.array(patterns[0].tag_ids, np.int32)
        # Rows are ordered by frame: good frame i has key 2i+1, a frame the framer rejected
        # before good frame k has key 2k.
        bad_rows: list[int] = []
        for reason, k in zip(frames.bad, frames.bad_at, strict=True):
            bad_rows.append(2 * k)
            res.failures.append(
                Failure(reason, f"longer than {self.spec.max_frame} bytes" if reason == "overlong" else "")
            )
        matched: list[list[tuple[int, tuple]]] = [[] for _ in patterns]
        if n:
            text_end, ok, _, _ = self.check(frames)
            data, starts, enc = frames.data, frames.starts, self.spec.encoding
            searches = [p.regex.search for p in patterns]
            single = searches[0] if len(searches) == 1 else None
            te = text_end.tolist()
            okl = ok.tolist()
            for i in range(n):
                raw = data[starts[i] : te[i]]
                if not okl[i]:
                    bad_rows.append(2 * i + 1)
                    res.failures.append(Failure("checksum", excerpt(frames.frame(i))))
                    continue
                try:
                    text = raw.decode(enc)
                except UnicodeDecodeError:
                    bad_rows.append(2 * i + 1)
                    res.failures.append(Failure("decode", excerpt(raw)))
                    continue
                if single is not None:
                    m = single(text)
                    if m is not None:
                        matched[0].append((i, m.groups()))
                        continue
                else:
                    for k, search in enumerate(searches):
                        m = search(text)
                        if m is not None:
                            matched[k].append((i, m.groups()))
                            break
                    else:
                        m = None
                    if m is not None:
                        continue
                bad_rows.append(2 * i + 1)
                res.failures.append(Failure("no_match", excerpt(raw)))
        parts: list[tuple[np.ndarray, Batch]] = []
        for pat, rows in zip(patterns, matched, strict=True):
            if rows:
                parts.append(self._columns(pat, rows, now_ns, bad_rows, res.failures))
        if bad_rows:
            k = len(bad_ids)
            order = np.repeat(np.array(bad_rows, np.int64), k)
            b = Batch.filled(self.device, np.tile(bad_ids, len(bad_rows)), now_ns, math.nan, BAD)
            if self.any_text:
                b = Batch(self.device, b.tags, b.ts, b.values, b.quality, np.full(len(b), None, object))
            parts.append((order, b))
        if not parts:
            return res
        if len(parts) == 1:
            res.batch = parts[0][1]
            return res
        order = np.concatenate([o for o, _ in parts])
        batch = Batch.concat(self.device, [b for _, b in parts])
        if self.any_text and batch.text is None:
            batch = Batch(
                self.device, batch.tags, batch.ts, batch.values, batch.quality, np.full(len(batch), None, object)
            )
        res.batch = batch.take(np.argsort(order, kind="stable"))
        return res

    def _columns(
        self, pat: Pattern, rows: list[tuple[int, tuple]], now_ns: int, bad_rows: list[int], failures: list[Failure]
    ) -> tuple[np.ndarray, Batch]:
        """Matched frames of one pattern: (frame index per row, batch), frame-major."""
        m, slots = len(rows), pat.slots
        k = len(slots)
        idx = np.array([2 * i + 1 for i, _ in rows], np.int64)
        groups = [g for _, g in rows]
        values = np.empty((m, k), np.float64)
        quality = np.zeros((m, k), QUALITY_DTYPE)
        bad: dict[int, tuple[str, int]] = {}  # row -> its first failure (reason, column; -1: the time)
        present = np.ones((m, k), bool)
        text = np.full((m, k), None, object) if self.any_text else None  # None: not a string sample
        for c, s in enumerate(slots):
            col = [g[s.group - 1] for g in groups]
            if None in col:  # an optional group that did not take part: no sample for the tag
                miss = np.array([x is None for x in col])
                present[:, c] = ~miss
                col = ["" if x is None else x for x in col]
            if s.type == "string":
                values[:, c] = math.nan
                text[:, c] = col
                continue
            if s.type == "bool":
                tv = s.true_values
                values[:, c] = [1.0 if x.strip().lower() in tv else 0.0 for x in col]
                continue
            v, good = _numbers(col, s.type == "integer")
            if s.scale != 1.0 or s.offset != 0.0:
                v = v * s.scale + s.offset
            values[:, c] = v
            if good is not None:
                badc = ~good & present[:, c]
                if badc.any():
                    quality[badc, c] = BAD
                    values[badc, c] = math.nan
                    for r in np.flatnonzero(badc).tolist():
                        bad.setdefault(r, ("value", c))
        ts = np.full(m, now_ns, np.int64)
        if pat.ts_group is not None:
            for r, g in enumerate(groups):
                t = self._timestamp(g[pat.ts_group - 1])
                if t is None:
                    quality[r, :] = BAD
                    values[r, :] = math.nan
                    bad.setdefault(r, ("timestamp", -1))
                else:
                    ts[r] = t
        # One failure per bad frame, named by its first (README, Bad input), however many of its
        # values failed: `bad_frames` counts frames (an independent tester's finding: a frame of
        # four unconvertible fields counted four). The first few carry their detail.
        for n, r in enumerate(sorted(bad)):
            reason, c = bad[r]
            if n >= 3:  # a read of garbage may hold thousands: their text is not built
                failures.append(Failure(reason))
            elif c < 0:
                failures.append(Failure(reason, repr(groups[r][pat.ts_group - 1])))
            else:
                failures.append(Failure(reason, f"{slots[c].name}: {groups[r][slots[c].group - 1]!r}"))
        ids = np.array([s.id for s in slots], np.int32)
        tags = np.tile(ids, m)
        b = Batch(
            self.device,
            tags,
            np.repeat(ts, k),
            values.ravel(),
            quality.ravel(),
            None if text is None else text.ravel(),
        )
        order = np.repeat(idx, k)
        keep = present.ravel()
        if not keep.all():
            b, order = b.take(keep), order[keep]
        return order, b

    def _timestamp(self, s: str | None) -> int | None:
        t = self._timestamp_ns(s)
        # int64 nanoseconds hold 1677..2262: a time beyond is a bad timestamp, not a crash (fuzzed)
        return t if t is not None and -(2**63) <= t < 2**63 else None

    def _timestamp_ns(self, s: str | None) -> int | None:
        if s is None:
            return None
        fmt = self.spec.ts_format
        try:
            if fmt.startswith("unix"):
                mult = {"unix": 10**9, "unix_ms": 10**6, "unix_us": 10**3, "unix_ns": 1}[fmt]
                s = s.strip()
                if fmt == "unix_ns" or s.lstrip("-").isdigit():
                    return int(s) * mult
                v = float(s)
                return int(round(v * mult)) if math.isfinite(v) else None
            d = dt.datetime.fromisoformat(s.strip()) if fmt == "iso8601" else dt.datetime.strptime(s, fmt)
            if d.tzinfo is None:
                d = d.replace(tzinfo=self.tz)
            if self.spec.ts_fill:
                d = _nearest(d, self.spec.ts_fill, dt.datetime.now(d.tzinfo))
        except (ValueError, OverflowError):
            return None
        return ((d - _EPOCH) // _US) * 1000


def _nearest(d: dt.datetime, fill: str, now: dt.datetime) -> dt.datetime:
    """A time of day (fill "date") or a day of the year ("year") on the date nearest `now`:
    a frame stamped 23:59:59 that arrives after midnight is from yesterday."""
    if fill == "date":
        d = dt.datetime.combine(now.date(), d.timetz())
        step, half = dt.timedelta(days=1), dt.timedelta(hours=12)
        if d - now > half:
            return d - step
        return d + step if now - d > half else d
    best = None
    for year in (now.year - 1, now.year, now.year + 1):
        try:
            c = d.replace(year=year)
        except ValueError:  # 29 February of a year without one
            continue
        if best is None or abs(c - now) < abs(best - now):
            best = c
    if best is None:
        raise ValueError(f"no year near {now.year} has {d:%d %B}")
    return best


def _numbers(col: list[str], integer: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """A column of text as float64, and where it is valid (None: all of it)."""
    if not integer:
        try:
            v = np.array(col, np.float64)
        except ValueError:
            v = np.array([_float(x) for x in col], np.float64)
        fin = np.isfinite(v)
        return v, None if fin.all() else fin
    out = np.empty(len(col), np.float64)
    good = np.ones(len(col), bool)
    for i, x in enumerate(col):
        try:
            out[i] = int(x)
        except ValueError:
            out[i] = math.nan
            good[i] = False
    return out, None if good.all() else good


def _float(x: str) -> float:
    try:
        return float(x)
    except ValueError:
        return math.nan
