"""PostgreSQL binary COPY buffers built from numpy columns: no Python object per sample.

A binary COPY row of `samples_recent` is (tag int4, ts timestamptz, value float8, quality int4,
text text): a fixed-size record in network byte order, so a whole batch is one structured numpy
array written with `tobytes()`. Rows with a text value (rare: string tags) are appended one by one.
"""

from __future__ import annotations

import struct

import numpy as np

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
TRAILER = struct.pack("!h", -1)
PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in Unix microseconds

_ROW = np.dtype(
    [
        ("nf", ">i2"),
        ("l_tag", ">i4"),
        ("tag", ">i4"),
        ("l_ts", ">i4"),
        ("ts", ">i8"),
        ("l_val", ">i4"),
        ("val", ">f8"),
        ("l_q", ">i4"),
        ("q", ">i4"),
        ("l_txt", ">i4"),
    ]
)
COLUMNS = ("tag", "ts", "value", "quality", "text")


def sample_rows(
    tags: np.ndarray,
    ts_ns: np.ndarray,
    values: np.ndarray,
    quality: np.ndarray,
    text: list[str | None] | None = None,
) -> bytes:
    """The binary COPY body (no header/trailer) of these samples; `tags` are global tag ids.
    Timestamps are kept to the microsecond (PostgreSQL's resolution), truncated toward -inf."""
    n = len(tags)
    rows = np.empty(n, _ROW)
    rows["nf"] = 5
    rows["l_tag"] = 4
    rows["tag"] = tags
    rows["l_ts"] = 8
    rows["ts"] = np.floor_divide(ts_ns, 1000) - PG_EPOCH_US
    rows["l_val"] = 8
    rows["val"] = values
    rows["l_q"] = 4
    rows["q"] = np.asarray(quality, np.uint32).view(np.int32)  # StatusCode bits, kept as int4
    rows["l_txt"] = -1
    if text is None or all(t is None for t in text):
        return rows.tobytes()
    parts = []
    for i, t in enumerate(text):
        if t is None:
            parts.append(rows[i : i + 1].tobytes())
        else:
            raw = t.encode()
            parts.append(rows[i : i + 1].tobytes()[:-4] + struct.pack("!i", len(raw)) + raw)
    return b"".join(parts)


def key_rows(gateways: list[str], seqs: list[int], devices: list[str], counts: list[int], prevs: list[int]) -> bytes:
    """Binary COPY body of (gateway text, seq int8, device text, samples int4, prev int8): one per unit."""
    out = []
    for g, s, d, c, p in zip(gateways, seqs, devices, counts, prevs, strict=True):
        gb, db = g.encode(), d.encode()
        out.append(struct.pack(f"!hi{len(gb)}sIqi{len(db)}siiIq", 5, len(gb), gb, 8, s, len(db), db, 4, c, 8, p))
    return b"".join(out)


# -- packed rows (one per tag and hour) written directly ------------------------------------

_HOUR_US = 3_600_000_000
_OFF = np.dtype([("l", ">i4"), ("v", ">i4")])
_OFF_US = np.dtype([("l", ">i4"), ("v", ">i2")])
_VAL = np.dtype([("l", ">i4"), ("v", ">f8")])
_INT4, _INT2, _FLOAT8 = 23, 21, 701
PACKED_COLUMNS = ("tag", "t0", "t1", "n", "off", "off_us", "val", "q")


def _array_head(oid: int, n: int, elem_bytes: int) -> bytes:
    """Field length, then a 1-dimensional array's header (no NULLs, lower bound 1)."""
    return struct.pack("!iiiiii", 20 + n * elem_bytes, 1, 0, oid, n, 1)


def split_packed(
    tags: np.ndarray, ts_ns: np.ndarray, values: np.ndarray, quality: np.ndarray, min_run: int
) -> tuple[bytes, np.ndarray, set[int]]:
    """Samples whose tag has at least `min_run` samples in one hour of this batch (a backlog, a
    catch-up) become packed rows, as the rollup would write them, with no row per sample; the
    rest stay rows. Returns (binary COPY body of packed rows, mask of the samples left as rows,
    the packed rows' days as Unix day numbers)."""
    n = len(tags)
    rest = np.ones(n, bool)
    if n < min_run or np.bincount(tags - tags.min()).max() < min_run:
        return b"", rest, set()  # live traffic: no tag has that many samples in the batch at all
    ts_us = np.floor_divide(ts_ns, 1000)
    hour = np.floor_divide(ts_us, _HOUR_US)
    order = np.lexsort((ts_us, hour, tags))
    t_s, h_s = tags[order], hour[order]
    brk = np.flatnonzero((np.diff(t_s) != 0) | (np.diff(h_s) != 0)) + 1
    starts = np.concatenate(([0], brk))
    ends = np.concatenate((brk, [n]))
    big = (ends - starts) >= min_run
    if not big.any():
        return b"", rest, set()
    us_s = ts_us[order]
    rel = us_s - h_s * _HOUR_US
    off = np.empty(n, _OFF)
    off["l"], off["v"] = 4, rel // 1000
    sub = (rel % 1000).astype(np.int16)
    off_us = np.empty(n, _OFF_US)
    off_us["l"], off_us["v"] = 2, sub
    val = np.empty(n, _VAL)
    val["l"], val["v"] = 8, values[order]
    q_s = np.asarray(quality, np.uint32)[order].view(np.int32)
    qa = np.empty(n, _OFF)
    qa["l"], qa["v"] = 4, q_s
    parts: list[bytes] = []
    days: set[int] = set()
    # Per run: any sub-millisecond part, any quality bit (one numpy call each, not one a run).
    has_us = np.logical_or.reduceat(sub != 0, starts)[big].tolist()
    has_q = np.logical_or.reduceat(q_s != 0, starts)[big].tolist()
    for s, e, with_us, with_q in zip(starts[big].tolist(), ends[big].tolist(), has_us, has_q, strict=True):
        k = e - s
        t0_us = int(h_s[s]) * _HOUR_US
        days.add(t0_us // (24 * _HOUR_US))
        parts.append(
            struct.pack(
                "!hiiiqiqii",
                8,
                4,
                int(t_s[s]),
                8,
                t0_us - PG_EPOCH_US,
                8,
                t0_us + _HOUR_US - PG_EPOCH_US,
                4,
                k,
            )
        )
        parts.append(_array_head(_INT4, k, 8))
        parts.append(off[s:e].tobytes())
        if with_us:
            parts.append(_array_head(_INT2, k, 6))
            parts.append(off_us[s:e].tobytes())
        else:
            parts.append(b"\xff\xff\xff\xff")
        parts.append(_array_head(_FLOAT8, k, 12))
        parts.append(val[s:e].tobytes())
        if with_q:
            parts.append(_array_head(_INT4, k, 8))
            parts.append(qa[s:e].tobytes())
        else:
            parts.append(b"\xff\xff\xff\xff")
        rest[order[s:e]] = False
    return b"".join(parts), rest, days


# -- live rows (one per gateway, device and batch) -----------------------------------------

_TS = np.dtype([("l", ">i4"), ("v", ">i8")])
_TIMESTAMPTZ = 1184
LIVE_COLUMNS = ("gateway", "device", "t_min", "t_max", "tag", "ts", "val", "q")


def live_row(gateway: str, device: str, tags: np.ndarray, ts_ns: np.ndarray, values: np.ndarray, quality) -> bytes:
    """Binary COPY row of `samples_live`: a device's samples of one batch as arrays (one row and
    a few TOAST chunks for them all, instead of a row and an index entry each)."""
    us = np.floor_divide(ts_ns, 1000) - PG_EPOCH_US
    g, d = gateway.encode(), device.encode()
    parts = [
        struct.pack(f"!hi{len(g)}si{len(d)}siqiq", 8, len(g), g, len(d), d, 8, int(us.min()), 8, int(us.max())),
        _array(_INT4, _OFF, tags),
        _array(_TIMESTAMPTZ, _TS, us),
        _array(_FLOAT8, _VAL, values),
    ]
    q = np.asarray(quality, np.uint32).view(np.int32)
    parts.append(_array(_INT4, _OFF, q) if q.any() else b"\xff\xff\xff\xff")  # NULL: all Good
    return b"".join(parts)


def _array(oid: int, rec: np.dtype, values: np.ndarray) -> bytes:
    """A binary COPY field holding `values` as a 1-dimensional array of `oid` without NULLs:
    each element's length (from `rec`, a ("l", "v") record) and bytes."""
    a = np.empty(len(values), rec)
    a["l"], a["v"] = rec["v"].itemsize, values
    return _array_head(oid, len(values), rec.itemsize) + a.tobytes()


def array_values(raw: bytes | None, dtype: str, n: int) -> np.ndarray:
    """The elements of a 1-dimensional array without NULLs from `array_send()` (its binary
    form: a 20-byte header, then each element's length and bytes); zeros when `raw` is NULL."""
    if raw is None or n == 0:
        return np.zeros(n, dtype.replace(">", "<"))
    size = np.dtype(dtype).itemsize
    got = np.frombuffer(raw, np.dtype([("l", ">i4"), ("v", dtype)]), offset=20) if len(raw) > 12 else None
    if got is None or len(got) != n or (got["l"] != size).any():
        raise ValueError("not a 1-dimensional array without NULLs of the expected length")
    return got["v"].astype(dtype.replace(">", "<"))
