"""Plain-Python twins of the compiled kernels: the executable specification, and the fallback
where no compiler was available. Same signatures, state arrays and float operations (in the
same order) as ext/_kernels.pyx, so both give bit-identical output; docs/filters.md explains
the semantics in prose.

Conventions shared by every kernel:
- columns are tags int32, ts int64 (UTC ns), values float64, quality uint32 (OPC UA codes);
- per-tag parameters and state are arrays indexed by tag id (or by a slot for ring buffers),
  owned by the caller and updated in place, so a stream split into batches anywhere gives the
  same output;
- a tag id outside the state arrays raises IndexError (the compiled twin must not write there);
- columns of unequal length, a per-tag array shorter than the one that bounds the tag ids
  (`state`, `enabled` or `slot`), or ring buffers that do not fit their slots and counts raise
  ValueError, checked at entry (in the same order, with the same messages, in both twins);
- Bad samples (severity >= 2) pass through unchanged and never become a reference value.
Kernels that create samples return columns (tags, ts, values, quality, src); `src` is the input
row a sample was copied from, or -1 for a computed sample (which carries no text).
"""

from __future__ import annotations

import math

import numpy as np

GOOD_CLAMPED = 0x00300000
UNCERTAIN = 0x40000000
UNCERTAIN_SENSOR_NOT_ACCURATE = 0x40930000
UNCERTAIN_ENGINEERING_UNITS_EXCEEDED = 0x40940000
UNCERTAIN_SUB_NORMAL = 0x40A40000
BAD_OUT_OF_RANGE = 0x803C0000

AGG_MIN, AGG_MAX, AGG_MEAN, AGG_FIRST, AGG_LAST, AGG_COUNT, AGG_STDDEV = range(7)
RANGE_BAD, RANGE_UNCERTAIN, RANGE_CLAMP = range(3)
MAX_SPIKE_WINDOW = 255

_INF = math.inf


def _check(t: int, nt: int) -> None:
    if t < 0 or t >= nt:
        raise IndexError(f"tag id {t} outside the filter's state (0..{nt - 1})")


def _check_columns(kernel: str, tags, ts, values, quality) -> int:
    """The batch's length; ValueError when the four columns differ in length."""
    n, n_ts, n_v, n_q = len(tags), len(ts), len(values), len(quality)
    if n_ts != n or n_v != n or n_q != n:
        raise ValueError(f"{kernel}: columns of unequal length (tags {n}, ts {n_ts}, values {n_v}, quality {n_q})")
    return n


def _check_len(kernel: str, name: str, length: int, bound: str, nt: int) -> None:
    if length < nt:
        raise ValueError(f"{kernel}: {name} has {length} entries, fewer than {bound} ({nt})")


def _check_rings(kernel: str, buf_v, per_slot) -> tuple[int, int]:
    """(slots, width) of the ring buffers; ValueError when another per-slot array is smaller."""
    n_slots, width = np.shape(buf_v)
    for name, a in per_slot.items():
        if np.ndim(a) == 2:
            _check_len(kernel, name, np.shape(a)[0], "buf_v rows", n_slots)
            _check_len(kernel, f"{name} columns", np.shape(a)[1], "buf_v columns", width)
        else:
            _check_len(kernel, name, len(a), "buf_v rows", n_slots)
    return n_slots, width


def _bad_slot(kernel: str, t: int, k: int, cap: int, n_slots: int, width: int) -> None:
    raise ValueError(
        f"{kernel}: tag {t} has slot {k} and count {cap}, outside its ring buffers ({n_slots} slots, {width} wide)"
    )


def _check_slot(kernel: str, t: int, k: int, cap: int, n_slots: int, width: int) -> None:
    if k >= n_slots or cap < 1 or cap > width:
        _bad_slot(kernel, t, k, cap, n_slots, width)


def _worse(q: int, p: int) -> int:
    """The code of higher severity; the current one on a tie."""
    return p if (p >> 30) > (q >> 30) else q


class _Out:
    """Output columns of a sample-creating kernel, grown per sample (the reference may be slow)."""

    def __init__(self, want_src: bool) -> None:
        self.want_src = want_src
        self.tags: list[int] = []
        self.ts: list[int] = []
        self.values: list[float] = []
        self.quality: list[int] = []
        self.src: list[int] = []

    def emit(self, t: int, ts: int, v: float, q: int, src: int) -> None:
        self.tags.append(t)
        self.ts.append(ts)
        self.values.append(v)
        self.quality.append(q)
        self.src.append(src)

    def columns(self):
        return (
            np.array(self.tags, np.int32),
            np.array(self.ts, np.int64),
            np.array(self.values, np.float64),
            np.array(self.quality, np.uint32),
            np.array(self.src, np.int32) if self.want_src else None,
        )


# --------------------------------------------------------------------------------------------
# deadband


# Records per tag, laid out as the compiled kernel's structs (it checks the layout).
DEADBAND_PARAMS = np.dtype(
    [
        ("dead_abs", "f8"),
        ("dead_rel", "f8"),
        ("max_silence", "i8"),  # NO_SILENCE_LIMIT: no heartbeat; REPORT_ALL: tag not filtered here
    ],
    align=True,
)
DEADBAND_STATE = np.dtype(
    [
        ("ref_value", "f8"),
        ("band", "f8"),  # dead_abs + dead_rel * |ref_value|; NaN when ref_value is not finite
        ("deadline", "i8"),  # report anyway at or after this time: ref_ts + max_silence, saturated
        ("ref_quality", "u4"),  # NO_REF (with deadline REPORT_ALL) until a usable sample was reported
        ("pad", "u4"),
    ],
    align=True,
)
NO_REF = 0xFFFFFFFF  # a Bad code: no usable sample has it, so it never matches
NO_SILENCE_LIMIT = 2**63 - 1
REPORT_ALL = -(2**63)


def _deadline_after(now: int, max_silence: int) -> int:
    if max_silence == NO_SILENCE_LIMIT or (max_silence > 0 and now > NO_SILENCE_LIMIT - max_silence):
        return NO_SILENCE_LIMIT
    if max_silence == REPORT_ALL:
        return REPORT_ALL
    return now + max_silence


def deadband(tags, ts, values, quality, params, state, want_src):
    """Report-by-exception; returns the reported samples as columns (rows of the input).

    - A Bad sample is reported and clears the reference (ref_quality NO_REF, deadline
      REPORT_ALL), so the next usable one is reported.
    - A usable sample is reported when its quality differs from the reference's (or there is
      none), when max_silence ns passed since the reference (now >= deadline), or when it
      differs from the reference r: for a finite r, when not |value - r| <= band (band =
      dead_abs + dead_rel * |r|), which includes a NaN or infinite value; for a NaN or
      infinite r, when the value is not equal to r (NaN equals NaN here).
    - A reported usable sample becomes the reference.
    """
    n, nt = _check_columns("deadband", tags, ts, values, quality), len(state)
    _check_len("deadband", "params", len(params), "state", nt)
    ref_value, band, deadline, ref_quality = state["ref_value"], state["band"], state["deadline"], state["ref_quality"]
    dead_abs, dead_rel, max_silence = params["dead_abs"], params["dead_rel"], params["max_silence"]
    out = _Out(want_src)
    for i in range(n):
        t = int(tags[i])
        _check(t, nt)
        q = int(quality[i])
        if (q >> 30) >= 2:
            ref_quality[t] = NO_REF
            deadline[t] = REPORT_ALL
            out.emit(t, int(ts[i]), float(values[i]), q, i)
            continue
        v = float(values[i])
        now = int(ts[i])
        r = float(ref_value[t])
        b = float(band[t])
        if math.isnan(b):
            keep = not (v == r or (math.isnan(v) and math.isnan(r)))
        else:
            keep = not (abs(v - r) <= b)
        keep = keep or q != int(ref_quality[t]) or now >= int(deadline[t])
        if keep:
            ref_value[t] = v
            ref_quality[t] = q
            deadline[t] = _deadline_after(now, int(max_silence[t]))
            band[t] = float(dead_abs[t]) + float(dead_rel[t]) * abs(v) if math.isfinite(v) else math.nan
            out.emit(t, now, v, q, i)
    return out.columns()


# --------------------------------------------------------------------------------------------
# swinging door


SWINGING_DOOR_STATE = np.dtype(
    [
        ("deviation", "f8"),
        ("a_value", "f8"),
        ("h_value", "f8"),
        ("slope_lo", "f8"),
        ("slope_hi", "f8"),
        ("min_interval", "i8"),
        ("max_interval", "i8"),
        ("a_ts", "i8"),
        ("h_ts", "i8"),
        ("a_quality", "u4"),
        ("h_quality", "u4"),
        ("has_a", "u1"),
        ("has_h", "u1"),
        ("enabled", "u1"),
    ],
    align=True,
)


def swinging_door(tags, ts, values, quality, state, want_src):
    """Swinging-door compression; returns the archived points as columns.

    State per tag: A, the last archived point; H, the held point (the latest sample, not yet
    archived); [slope_lo, slope_hi], the slopes from A that keep every point after A up to H
    within `deviation`. A new point P is a valid end of the segment from A when its slope
    from A lies in that interval; then it becomes H. Otherwise H is archived (it was a valid
    end) and P is considered again from the new A. Hence every point lies within the deviation
    of the line between the archived points around it (unless min_interval holds points back).

    Breaks, which archive H and start afresh: a Bad or non-finite sample (passed through,
    clears A so the next usable sample is archived), a quality different from A's (archived),
    a value whose difference from A overflows (archived). A point at A's timestamp (or
    earlier) is archived when it is more than `deviation` from A, else dropped. max_interval
    (PI's CompMax): a point more than that after A first archives H, which is always closer
    than max_interval to A; a point exactly max_interval or more after A is archived. So no
    two archived points are further apart than max_interval unless no sample came between
    them. min_interval: H is not archived while it is closer than that to A; later points are
    then held instead.
    """
    n, nt = _check_columns("swinging_door", tags, ts, values, quality), len(state)
    enabled, deviation, min_interval, max_interval = (
        state["enabled"],
        state["deviation"],
        state["min_interval"],
        state["max_interval"],
    )
    has_a, a_value, a_ts, a_quality = state["has_a"], state["a_value"], state["a_ts"], state["a_quality"]
    has_h, h_value, h_ts, h_quality = state["has_h"], state["h_value"], state["h_ts"], state["h_quality"]
    slope_lo, slope_hi = state["slope_lo"], state["slope_hi"]
    out = _Out(want_src)

    def flush(t: int) -> None:  # archive H
        if has_h[t]:
            out.emit(t, int(h_ts[t]), float(h_value[t]), int(h_quality[t]), -1)
            a_value[t] = h_value[t]
            a_ts[t] = h_ts[t]
            a_quality[t] = h_quality[t]
            has_a[t] = 1
            has_h[t] = 0
            slope_lo[t] = -_INF
            slope_hi[t] = _INF

    def archive(t: int, i: int, v: float, q: int) -> None:
        out.emit(t, int(ts[i]), v, q, i)
        a_value[t] = v
        a_ts[t] = ts[i]
        a_quality[t] = q
        has_a[t] = 1
        has_h[t] = 0
        slope_lo[t] = -_INF
        slope_hi[t] = _INF

    def hold(t: int, i: int, v: float, q: int, d: float, dev: float, inv: float) -> None:
        h_value[t] = v
        h_ts[t] = ts[i]
        h_quality[t] = q
        has_h[t] = 1
        lo = (d - dev) * inv
        hi = (d + dev) * inv
        cur_lo, cur_hi = float(slope_lo[t]), float(slope_hi[t])
        slope_lo[t] = lo if lo > cur_lo else cur_lo
        slope_hi[t] = hi if hi < cur_hi else cur_hi

    for i in range(n):
        t = int(tags[i])
        _check(t, nt)
        q = int(quality[i])
        v = float(values[i])
        if not enabled[t]:
            out.emit(t, int(ts[i]), v, q, i)
            continue
        if (q >> 30) >= 2 or not math.isfinite(v):
            flush(t)
            out.emit(t, int(ts[i]), v, q, i)
            has_a[t] = 0
            continue
        if not has_a[t] or q != int(a_quality[t]):
            flush(t)
            archive(t, i, v, q)
            continue
        dev = float(deviation[t])
        dt = int(ts[i]) - int(a_ts[t])
        d = v - float(a_value[t])
        if has_h[t] and max_interval[t] > 0 and dt > int(max_interval[t]):
            flush(t)  # H is closer than max_interval to A: no archived gap is longer (CompMax)
            dt = int(ts[i]) - int(a_ts[t])
            d = v - float(a_value[t])
        if dt <= 0 or not math.isfinite(d):
            if not math.isfinite(d) or abs(d) > dev:
                flush(t)
                archive(t, i, v, q)
            continue
        force = max_interval[t] > 0 and dt >= int(max_interval[t])
        inv = 1.0 / float(dt)
        s = d * inv
        if float(slope_lo[t]) <= s <= float(slope_hi[t]):
            if force:
                archive(t, i, v, q)
            else:
                hold(t, i, v, q, d, dev, inv)
            continue
        if has_h[t] and (force or int(h_ts[t]) - int(a_ts[t]) >= int(min_interval[t])):
            flush(t)
            dt = int(ts[i]) - int(a_ts[t])
            d = v - float(a_value[t])
            if dt <= 0 or not math.isfinite(d):
                if not math.isfinite(d) or abs(d) > dev:
                    archive(t, i, v, q)
                continue
            if max_interval[t] > 0 and dt >= int(max_interval[t]):
                archive(t, i, v, q)
            else:
                hold(t, i, v, q, d, dev, 1.0 / float(dt))
        else:  # H younger than min_interval: hold P instead (the interval may become empty)
            hold(t, i, v, q, d, dev, inv)
    return out.columns()


# --------------------------------------------------------------------------------------------
# moving average, ewma


def _two_sum(tot: float, comp: float, x: float) -> tuple[float, float]:
    """tot + x, with the rounding error kept in comp (Neumaier): a huge value that enters and
    leaves the window takes none of the small ones with it."""
    s = tot + x
    if abs(tot) >= abs(x):
        comp += (tot - s) + x
    else:
        comp += (x - s) + tot
    return s, comp


def moving_average(tags, ts, values, quality, slot, count, window, base, buf_v, buf_t, head, size, total, comp, pushes):
    """Mean of the last `count[t]` usable samples, or (window[t] > 0) of the usable samples in
    (ts - window, ts], at most `count[t]` of them. Returns the output values (row-aligned).

    Usable: not Bad and finite; other samples pass through unchanged and leave the state as is.
    Slot k's ring is buf_v[base[k] : base[k] + count[t]], so each tag holds only its own count.
    The running total is a compensated sum, recomputed from the ring every `count` pushes, after
    an overflow, and when the compensation is no longer small beside the total (huge values
    have left), so rounding cannot drift and huge values leave no trace once out of the window.
    """
    n, nt = _check_columns("moving_average", tags, ts, values, quality), len(slot)
    _check_len("moving_average", "count", len(count), "slot", nt)
    _check_len("moving_average", "window", len(window), "slot", nt)
    n_slots, width = len(base), len(buf_v)
    _check_len("moving_average", "buf_t", len(buf_t), "buf_v", width)
    for name, a in {"head": head, "size": size, "total": total, "comp": comp, "pushes": pushes}.items():
        _check_len("moving_average", name, len(a), "base", n_slots)
    out = np.array(values, dtype=np.float64, copy=True)
    for i in range(n):
        t = int(tags[i])
        _check(t, nt)
        k = int(slot[t])
        v = float(values[i])
        if k < 0 or (int(quality[i]) >> 30) >= 2 or not math.isfinite(v):
            continue
        cap, w, now = int(count[t]), int(window[t]), int(ts[i])
        if k >= n_slots or cap < 1 or base[k] < 0 or int(base[k]) + cap > width:
            _bad_slot("moving_average", t, k, cap, n_slots, width)
        b = int(base[k])
        h, sz, tot, c = int(head[k]), int(size[k]), float(total[k]), float(comp[k])
        if w > 0:
            while sz > 0 and int(buf_t[b + h]) <= now - w:
                tot, c = _two_sum(tot, c, -float(buf_v[b + h]))
                h += 1
                if h == cap:
                    h = 0
                sz -= 1
        if sz == cap:
            tot, c = _two_sum(tot, c, -float(buf_v[b + h]))
            h += 1
            if h == cap:
                h = 0
            sz -= 1
        if sz == 0:
            tot, c = 0.0, 0.0
        p = h + sz
        if p >= cap:
            p -= cap
        buf_v[b + p] = v
        buf_t[b + p] = now
        sz += 1
        tot, c = _two_sum(tot, c, v)
        pushes[k] += 1
        if pushes[k] >= cap or not math.isfinite(tot) or abs(c) > abs(tot) * 2.0**-30:
            pushes[k] = 0
            tot, c = 0.0, 0.0
            p = h
            for _ in range(sz):
                tot, c = _two_sum(tot, c, float(buf_v[b + p]))
                p += 1
                if p == cap:
                    p = 0
            if not math.isfinite(tot):
                c = 0.0  # the mean is +-inf (or NaN from both), not inf - inf
        head[k], size[k], total[k], comp[k] = h, sz, tot, c
        out[i] = (tot + c) / sz
    return out


def ewma(tags, ts, values, quality, enabled, tau, has_y, y, y_ts):
    """Exponentially weighted moving average in continuous time: each usable sample moves the
    average by weight 1 - exp(-dt / tau), dt being the time since the previous usable sample,
    so irregular sampling is weighted correctly (a sample at the same instant has weight 0).
    Returns the output values (row-aligned); unusable samples pass through unchanged."""
    n, nt = _check_columns("ewma", tags, ts, values, quality), len(enabled)
    for name, a in (("tau", tau), ("has_y", has_y), ("y", y), ("y_ts", y_ts)):
        _check_len("ewma", name, len(a), "enabled", nt)
    out = np.array(values, dtype=np.float64, copy=True)
    for i in range(n):
        t = int(tags[i])
        _check(t, nt)
        v = float(values[i])
        if not enabled[t] or (int(quality[i]) >> 30) >= 2 or not math.isfinite(v):
            continue
        if not has_y[t]:
            y[t] = v
            y_ts[t] = ts[i]
            has_y[t] = 1
        else:
            dt = int(ts[i]) - int(y_ts[t])
            if dt > 0:
                w = math.exp(-float(dt) / float(tau[t]))
                y[t] = w * float(y[t]) + (1.0 - w) * v
                y_ts[t] = ts[i]
        out[i] = y[t]
    return out


# --------------------------------------------------------------------------------------------
# rate, counter_delta


def rate(tags, ts, values, quality, enabled, has_p, p_value, p_ts, p_quality, want_src):
    """Per-second derivative between consecutive usable samples of a tag, stamped at the later
    one, with the worse of the two qualities. The first usable sample only sets the reference;
    a sample at the reference's timestamp emits nothing and replaces it. Unusable samples
    (Bad, non-finite) pass through unchanged and are skipped as references, so the first
    usable sample after them reports the mean rate across the gap."""
    n, nt = _check_columns("rate", tags, ts, values, quality), len(enabled)
    for name, a in (("has_p", has_p), ("p_value", p_value), ("p_ts", p_ts), ("p_quality", p_quality)):
        _check_len("rate", name, len(a), "enabled", nt)
    out = _Out(want_src)
    for i in range(n):
        t = int(tags[i])
        _check(t, nt)
        q = int(quality[i])
        v = float(values[i])
        if not enabled[t] or (q >> 30) >= 2 or not math.isfinite(v):
            out.emit(t, int(ts[i]), v, q, i)
            continue
        if has_p[t]:
            dt = int(ts[i]) - int(p_ts[t])
            if dt > 0:
                out.emit(t, int(ts[i]), (v - float(p_value[t])) * 1e9 / float(dt), _worse(q, int(p_quality[t])), -1)
        p_value[t] = v
        p_ts[t] = ts[i]
        p_quality[t] = q
        has_p[t] = 1
    return out.columns()


def counter_delta(tags, ts, values, quality, enabled, modulus, max_increase, has_p, p_value, p_quality, want_src):
    """Increase of a counter since the previous usable sample, stamped at the current one.

    A decrease is a rollover when both values lie in [0, modulus) and the increase across the
    wrap, (modulus - previous) + current, is at most max_increase; the delta is that increase.
    Any other decrease is a reset (the counter restarted from 0): the delta is the current
    value. A value in [-modulus/2, 0) is a counter decoded as signed and counts as value +
    modulus. Quality is the worse of the two samples'. Unusable samples pass through unchanged
    and are skipped, so the first usable sample after an outage reports what was counted
    during it.
    """
    n, nt = _check_columns("counter_delta", tags, ts, values, quality), len(enabled)
    per_tag = (
        ("modulus", modulus),
        ("max_increase", max_increase),
        ("has_p", has_p),
        ("p_value", p_value),
        ("p_quality", p_quality),
    )
    for name, a in per_tag:
        _check_len("counter_delta", name, len(a), "enabled", nt)
    out = _Out(want_src)
    for i in range(n):
        t = int(tags[i])
        _check(t, nt)
        q = int(quality[i])
        v = float(values[i])
        if not enabled[t] or (q >> 30) >= 2 or not math.isfinite(v):
            out.emit(t, int(ts[i]), v, q, i)
            continue
        if v < 0 and v >= -0.5 * float(modulus[t]):
            v += float(modulus[t])  # a counter decoded as signed: its unsigned value counts on
        if has_p[t]:
            p = float(p_value[t])
            d = v - p
            if d < 0:
                m = float(modulus[t])
                wrapped = (m - p) + v
                if v >= 0 and p < m and wrapped <= float(max_increase[t]):
                    d = wrapped
                else:
                    d = v
            out.emit(t, int(ts[i]), d, _worse(q, int(p_quality[t])), -1)
        p_value[t] = v
        p_quality[t] = q
        has_p[t] = 1
    return out.columns()


# --------------------------------------------------------------------------------------------
# window


def _window_emit(out, t, start, agg, n, nbad, last_bad, not_good, first, last, mn, mx, k, s1, s2):
    if n > 0:
        if agg == AGG_MIN:
            r = mn
        elif agg == AGG_MAX:
            r = mx
        elif agg == AGG_MEAN:
            r = k + s1 / n
        elif agg == AGG_FIRST:
            r = first
        elif agg == AGG_LAST:
            r = last
        elif agg == AGG_COUNT:
            r = float(n)
        else:
            var = (s2 - s1 * s1 / n) / n
            r = 0.0 if var < 0.0 else math.sqrt(var)  # NaN (from infinities) stays NaN
        out.emit(t, start, r, UNCERTAIN_SUB_NORMAL if not_good & 2 else (UNCERTAIN if not_good else 0), -1)
    elif nbad > 0:
        out.emit(t, start, math.nan, last_bad, -1)


def window(
    tags,
    ts,
    values,
    quality,
    enabled,
    width,
    offset,
    agg,
    has_w,
    w_start,
    n_used,
    n_bad,
    last_bad,
    not_good,
    first,
    last,
    vmin,
    vmax,
    shift,
    s1,
    s2,
    want_src,
):
    """Tumbling windows [offset + j*width, offset + (j+1)*width) on the UTC clock. A window is
    closed by the tag's first sample at or past its end (or before its start) and emitted as
    one sample stamped at the window's start, carrying `agg` over its usable samples (not Bad,
    not NaN; infinities count). Quality: Good when every sample of the window was Good, else
    Uncertain (an Uncertain or Bad sample was in it, whatever its value, NaN included);
    UNCERTAIN_SUB_NORMAL for a window seen only in part: the first one after the filter was
    created (or flushed) when its first sample came after the window's start. A window
    with only Bad samples emits NaN with the last Bad code; one with no usable and no Bad sample
    emits nothing. Mean and stddev (population) use sums shifted by the window's first value
    for accuracy. Tags without a window here pass through. A width <= 0 raises ValueError.
    """
    n, nt = _check_columns("window", tags, ts, values, quality), len(enabled)
    per_tag = {
        "width": width,
        "offset": offset,
        "agg": agg,
        "has_w": has_w,
        "w_start": w_start,
        "n_used": n_used,
        "n_bad": n_bad,
        "last_bad": last_bad,
        "not_good": not_good,
        "first": first,
        "last": last,
        "vmin": vmin,
        "vmax": vmax,
        "shift": shift,
        "s1": s1,
        "s2": s2,
    }
    for name, a in per_tag.items():
        _check_len("window", name, len(a), "enabled", nt)
    out = _Out(want_src)
    for i in range(n):
        t = int(tags[i])
        _check(t, nt)
        q = int(quality[i])
        v = float(values[i])
        now = int(ts[i])
        if not enabled[t]:
            out.emit(t, now, v, q, i)
            continue
        if not has_w[t] or now >= int(w_start[t]) + int(width[t]) or now < int(w_start[t]):
            if width[t] <= 0:
                raise ValueError(f"window: tag {t} has width {int(width[t])}, expected > 0")
            if has_w[t]:
                _window_emit(
                    out,
                    t,
                    int(w_start[t]),
                    int(agg[t]),
                    int(n_used[t]),
                    int(n_bad[t]),
                    int(last_bad[t]),
                    int(not_good[t]),
                    float(first[t]),
                    float(last[t]),
                    float(vmin[t]),
                    float(vmax[t]),
                    float(shift[t]),
                    float(s1[t]),
                    float(s2[t]),
                )
            wd, off = int(width[t]), int(offset[t])
            start = ((now - off) // wd) * wd + off
            w_start[t] = start
            not_good[t] = 2 if not has_w[t] and now > start else 0  # the first window seen only in part
            has_w[t] = 1
            n_used[t] = 0
            n_bad[t] = 0
        if (q >> 30) != 0:  # Uncertain or Bad, whatever the value (NaN included)
            not_good[t] |= 1
        if (q >> 30) >= 2:
            n_bad[t] += 1
            last_bad[t] = q
        elif not math.isnan(v):
            if n_used[t] == 0:
                first[t] = v
                vmin[t] = v
                vmax[t] = v
                shift[t] = v
                s1[t] = 0.0
                s2[t] = 0.0
            else:
                if v < vmin[t]:
                    vmin[t] = v
                if v > vmax[t]:
                    vmax[t] = v
            last[t] = v
            d = v - float(shift[t])
            s1[t] = float(s1[t]) + d
            s2[t] = float(s2[t]) + d * d
            n_used[t] += 1
    return out.columns()


# --------------------------------------------------------------------------------------------
# spike


def _median_sorted(xs: list[float]) -> float:
    m = len(xs)
    return xs[m // 2] if m % 2 else (xs[m // 2 - 1] + xs[m // 2]) * 0.5


def _sorted_insert(a, m: int, x: float) -> None:
    j = m
    while j > 0 and a[j - 1] > x:
        a[j] = a[j - 1]
        j -= 1
    a[j] = x


def _sorted_remove(a, m: int, x: float) -> None:
    j = 0
    while j < m - 1 and a[j] != x:
        j += 1
    while j < m - 1:
        a[j] = a[j + 1]
        j += 1


def spike(tags, ts, values, quality, slot, count, k_mad, floor, buf_v, buf_sorted, head, size):
    """Outlier rejection against the median of the tag's previous `count[t]` usable samples:
    a sample is marked UNCERTAIN_SENSOR_NOT_ACCURATE (value kept) when |value - median| >
    max(k_mad * MAD, floor), MAD being the median absolute deviation of those samples (Hampel:
    k_mad = threshold * 1.4826; median method: k_mad = 0, floor = deviation). Nothing is
    judged until the history is full. Every usable sample (not Bad, finite) enters the history,
    outliers included, so a real step is accepted after count/2 samples. State per slot: the
    history in arrival order (a ring) and the same values kept sorted. Returns the output
    quality (row-aligned)."""
    n, nt = _check_columns("spike", tags, ts, values, quality), len(slot)
    for name, a in (("count", count), ("k_mad", k_mad), ("floor", floor)):
        _check_len("spike", name, len(a), "slot", nt)
    n_slots, width = _check_rings("spike", buf_v, {"buf_sorted": buf_sorted, "head": head, "size": size})
    out = np.array(quality, dtype=np.uint32, copy=True)
    for i in range(n):
        t = int(tags[i])
        _check(t, nt)
        k = int(slot[t])
        v = float(values[i])
        q = int(quality[i])
        if k < 0 or (q >> 30) >= 2 or not math.isfinite(v):
            continue
        cap = int(count[t])
        _check_slot("spike", t, k, cap, n_slots, width)
        h, sz = int(head[k]), int(size[k])
        ring, srt = buf_v[k], buf_sorted[k]
        if sz == cap:
            hist = [float(x) for x in srt[:cap]]
            med = _median_sorted(hist)
            lim = float(floor[t])
            km = float(k_mad[t])
            if km > 0.0:
                mad = _median_sorted(sorted(abs(x - med) for x in hist))
                if km * mad > lim:
                    lim = km * mad
            if abs(v - med) > lim:
                out[i] = UNCERTAIN_SENSOR_NOT_ACCURATE
            old = float(ring[h])
            ring[h] = v
            h += 1
            if h == cap:
                h = 0
            _sorted_remove(srt, cap, old)
            _sorted_insert(srt, cap - 1, v)
        else:
            ring[sz] = v
            _sorted_insert(srt, sz, v)
            sz += 1
        head[k], size[k] = h, sz
    return out


# --------------------------------------------------------------------------------------------
# range


def range_check(tags, ts, values, quality, enabled, low, high, mode):
    """Limits check; returns (values or None when no tag clamps, quality), row-aligned.

    A Good or Uncertain sample with value < low or > high, or NaN, gets, by mode:
    BAD_OUT_OF_RANGE; UNCERTAIN_ENGINEERING_UNITS_EXCEEDED; or the value set to the limit with
    GOOD_CLAMPED (an Uncertain sample keeps its code; NaN, which no limit replaces, becomes
    BAD_OUT_OF_RANGE). Bad samples pass unchanged.
    """
    n, nt = _check_columns("range_check", tags, ts, values, quality), len(enabled)
    for name, a in (("low", low), ("high", high), ("mode", mode)):
        _check_len("range_check", name, len(a), "enabled", nt)
    any_clamp = any(enabled[t] and mode[t] == RANGE_CLAMP for t in range(nt))
    out_q = np.array(quality, dtype=np.uint32, copy=True)
    out_v = np.array(values, dtype=np.float64, copy=True) if any_clamp else None
    for i in range(n):
        t = int(tags[i])
        _check(t, nt)
        q = int(quality[i])
        if not enabled[t] or (q >> 30) >= 2:
            continue
        v = float(values[i])
        lo, hi = float(low[t]), float(high[t])
        if not (lo <= v <= hi):  # NaN too: it lies within no limits
            m = int(mode[t])
            if m == RANGE_BAD or (m == RANGE_CLAMP and math.isnan(v)):  # NaN cannot be clamped
                out_q[i] = BAD_OUT_OF_RANGE
            elif m == RANGE_UNCERTAIN:
                out_q[i] = UNCERTAIN_ENGINEERING_UNITS_EXCEEDED
            else:
                out_v[i] = lo if v < lo else hi
                if (q >> 30) == 0:
                    out_q[i] = GOOD_CLAMPED
    return out_v, out_q
