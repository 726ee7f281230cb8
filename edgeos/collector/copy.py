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
