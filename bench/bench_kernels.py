"""Filter kernels: 10 million samples across 1,000 interleaved tags, in samples/s.

Each kernel runs through its Filter (what the pipeline calls) in batches of 1 million samples,
so per-tag state carries across calls as in operation; best of a few runs. Beside it, in the
same run: the plain-Python reference (on the first samples only, it is slow), the best numpy
formulation where one exists (deadband, swinging door and ewma depend on the previous output,
which numpy cannot express without a Python loop), and the memory-bandwidth bound: a numpy
copy of the four input columns into arrays allocated beforehand (no page faults).
`min_speedup_vs_python` is the smallest compiled/reference ratio over all kernels.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np

from edgeos.filters import builtin
from edgeos.model import Batch

TAGS = 1000
N = 10_000_000
CHUNK = 1_000_000
BAD = 0x80050000

PARAMS: dict[str, dict] = {
    "deadband": {"abs": 0.5, "max_silence": 60 * 10**9},
    "swinging_door": {"deviation": 0.5, "max_interval": 600 * 10**9},
    "moving_average": {"count": 10},
    "ewma": {"time_constant": 5 * 10**9},
    "rate": {},
    "counter_delta": {"bits": 16},
    "window": {"width": 10**9, "agg": "mean"},
    "spike": {"window": 7},
    "range": {"low": -20.0, "high": 20.0, "mode": "bad"},
}


def _data(n: int) -> dict[str, Batch]:
    rng = np.random.default_rng(7)
    rows = n // TAGS
    tags = np.tile(np.arange(TAGS, dtype=np.int32), rows)
    ts = np.repeat(1_700_000_000 * 10**9 + np.arange(rows, dtype=np.int64) * 100_000_000, TAGS)  # 10 Hz
    quality = np.where(rng.random(n) < 0.001, BAD, 0).astype(np.uint32)
    walk = np.cumsum(rng.normal(0, 0.2, (rows, TAGS)), axis=0).ravel()
    spiky = walk + np.where(rng.random(n) < 0.01, 50.0, 0.0)
    counts = np.cumsum(rng.poisson(3, (rows, TAGS)), axis=0).ravel() % 65536
    plain = Batch("b", tags, ts, walk, quality)
    return {
        **{k: plain for k in PARAMS},
        "spike": Batch("b", tags, ts, spiky, quality),
        "counter_delta": Batch("b", tags, ts, counts.astype(np.float64), quality),
    }


def _best(fn: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None) -> float:
    """Best wall time of `fn(setup())` (or `fn()`); setup is not timed."""
    best = float("inf")
    for _ in range(repeat):
        arg = setup() if setup is not None else None
        t0 = time.perf_counter()
        fn(arg) if setup is not None else fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _filter_run(kind: str, batch: Batch, impl: str, repeat: int) -> float:
    """Best time to push `batch` through a fresh filter (created untimed) in CHUNK-sized batches."""
    plugin = getattr(builtin, "range_" if kind == "range" else kind)
    params = dict.fromkeys(range(TAGS), PARAMS[kind])
    parts = [batch.take(slice(a, a + CHUNK)) for a in range(0, len(batch), CHUNK)]

    def go(f) -> None:
        for part in parts:
            f.apply(part)

    return _best(go, repeat, lambda: plugin.create(TAGS, params, impl=impl))


# ---- numpy formulations: sort once by tag (stable), then whole-array operations per group ----


def _by_tag(b: Batch):
    order = np.argsort(b.tags, kind="stable")
    tags = b.tags[order]
    first = np.empty(len(tags), bool)
    first[0] = True
    first[1:] = tags[1:] != tags[:-1]
    return order, tags, b.ts[order], b.values[order], b.quality[order], first


def _np_range(b: Batch) -> None:
    low, high = np.full(TAGS, -20.0), np.full(TAGS, 20.0)
    lo, hi = low[b.tags], high[b.tags]
    out = ~((b.values >= lo) & (b.values <= hi)) & ((b.quality >> 30) < 2)  # NaN is out of range
    np.where(out, np.uint32(0x803C0000), b.quality)


def _np_rate(b: Batch) -> None:
    _, _, ts, v, _, first = _by_tag(b)
    r = np.diff(v) * 1e9 / np.diff(ts)
    r[first[1:]] = np.nan


def _np_counter(b: Batch) -> None:
    _, _, _, v, _, first = _by_tag(b)
    v = np.where((v < 0) & (v >= -32768), v + 65536, v)  # a counter decoded as signed
    d = np.diff(v)
    d = np.where(d < 0, np.where(65536 - v[:-1] + v[1:] <= 32768, 65536 - v[:-1] + v[1:], v[1:]), d)
    d[first[1:]] = np.nan


def _np_moving_average(b: Batch, k: int = 10) -> None:
    _, _, _, v, _, first = _by_tag(b)
    group = np.cumsum(first) - 1
    start = np.flatnonzero(first)
    pos = np.arange(len(v)) - start[group]
    c = np.cumsum(v)
    lag = np.concatenate([np.zeros(k), c[:-k]])
    base = c[start[group]] - v[start[group]]
    s = np.where(pos >= k, c - lag, c - base)
    s / np.minimum(pos + 1, k)


def _np_window(b: Batch, width: int = 10**9) -> None:
    _, tags, ts, v, _, _ = _by_tag(b)
    wid = ts // width
    brk = np.empty(len(v), bool)
    brk[0] = True
    brk[1:] = (tags[1:] != tags[:-1]) | (wid[1:] != wid[:-1])
    idx = np.flatnonzero(brk)
    sums = np.add.reduceat(v, idx)
    counts = np.diff(np.append(idx, len(v)))
    sums / counts


def _np_spike(b: Batch, k: int = 7) -> None:
    from numpy.lib.stride_tricks import sliding_window_view

    _, _, _, v, _, first = _by_tag(b)
    start = np.append(np.flatnonzero(first), len(v))
    for a, z in zip(start[:-1], start[1:], strict=True):
        w = sliding_window_view(v[a : z - 1], k)
        med = np.median(w, axis=1)
        mad = np.median(np.abs(w - med[:, None]), axis=1)
        _ = np.abs(v[a + k : z] - med) > 3 * 1.4826 * mad


NUMPY: dict[str, Callable[[Batch], None]] = {
    "moving_average": _np_moving_average,
    "rate": _np_rate,
    "counter_delta": _np_counter,
    "window": _np_window,
    "spike": _np_spike,
    "range": _np_range,
}


def run(quick: bool) -> Iterator[tuple[str, float, str]]:
    repeat = 5 if quick else 9  # best of: shared VMs stall for whole runs now and then
    n_ref = 20_000 if quick else 200_000
    data = _data(N)
    cols = next(iter(data.values()))
    src = (cols.tags, cols.ts, cols.values, cols.quality)
    dst = [np.empty_like(c) for c in src]
    copy = _best(lambda: [np.copyto(d, c) for d, c in zip(dst, src, strict=True)], repeat)
    yield "memory_bound", N / copy, "samples/s"
    speedups = []
    for kind in PARAMS:
        batch = data[kind]
        compiled = N / _filter_run(kind, batch, "compiled", repeat)
        reference = n_ref / _filter_run(kind, batch.take(slice(0, n_ref)), "reference", 1)
        yield kind, compiled, "samples/s"
        yield f"{kind}_reference", reference, "samples/s"
        if kind in NUMPY:
            nb = batch if kind != "spike" else batch.take(slice(0, 1_000_000))
            yield f"{kind}_numpy", len(nb) / _best(lambda nb=nb, kind=kind: NUMPY[kind](nb), 1), "samples/s"
        yield f"{kind}_vs_reference", compiled / reference, "x"
        speedups.append(compiled / reference)
    yield "min_speedup_vs_python", min(speedups), "x"
