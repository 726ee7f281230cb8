# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, nonecheck=False
"""Compiled filter kernels over interleaved columnar batches.

Each kernel walks the batch once without the GIL; per-tag state lives in arrays indexed by tag
id and owned by the caller, so a stream split into any number of batches gives the same output.
The plain-Python twins in edgeos/filters/_reference.py are the specification: same signatures,
same float operations in the same order (the build disables FMA contraction), bit-identical
output. Read a kernel's docstring there.
"""

import numpy as np
cimport numpy as cnp
from libc.math cimport isnan, isinf, isfinite, fabs, exp, sqrt, INFINITY, NAN

cnp.import_array()

ctypedef cnp.int32_t tag_t
ctypedef cnp.int64_t ts_t
ctypedef cnp.float64_t val_t
ctypedef cnp.uint32_t q_t
ctypedef cnp.uint8_t u8

# Compile-time constants (macros, not module variables): the C compiler folds them into the
# loops instead of reloading them, which frees registers in the hottest kernels.
cdef extern from *:
    """
    #define EDGEOS_GOOD_CLAMPED ((npy_uint32)0x00300000u)
    #define EDGEOS_UNCERTAIN ((npy_uint32)0x40000000u)
    #define EDGEOS_UNCERTAIN_SENSOR_NOT_ACCURATE ((npy_uint32)0x40930000u)
    #define EDGEOS_UNCERTAIN_ENGINEERING_UNITS_EXCEEDED ((npy_uint32)0x40940000u)
    #define EDGEOS_UNCERTAIN_SUB_NORMAL ((npy_uint32)0x40A40000u)
    #define EDGEOS_BAD_OUT_OF_RANGE ((npy_uint32)0x803C0000u)
    #define EDGEOS_NO_REF ((npy_uint32)0xFFFFFFFFu)
    #define EDGEOS_TS_MAX NPY_MAX_INT64
    #define EDGEOS_TS_MIN NPY_MIN_INT64
    """
    const q_t GOOD_CLAMPED "EDGEOS_GOOD_CLAMPED"
    const q_t UNCERTAIN "EDGEOS_UNCERTAIN"
    const q_t UNCERTAIN_SENSOR_NOT_ACCURATE "EDGEOS_UNCERTAIN_SENSOR_NOT_ACCURATE"
    const q_t UNCERTAIN_ENGINEERING_UNITS_EXCEEDED "EDGEOS_UNCERTAIN_ENGINEERING_UNITS_EXCEEDED"
    const q_t UNCERTAIN_SUB_NORMAL "EDGEOS_UNCERTAIN_SUB_NORMAL"
    const q_t BAD_OUT_OF_RANGE "EDGEOS_BAD_OUT_OF_RANGE"
    const q_t NO_REF "EDGEOS_NO_REF"  # a Bad code: no usable sample has it, so it never matches
    const ts_t TS_MAX "EDGEOS_TS_MAX"
    const ts_t TS_MIN "EDGEOS_TS_MIN"

cdef inline bint is_bad(q_t q) noexcept nogil:
    return (q >> 30) >= 2


cdef inline q_t worse(q_t q, q_t p) noexcept nogil:
    return p if (p >> 30) > (q >> 30) else q


cdef inline ts_t floordiv(ts_t a, ts_t b) noexcept nogil:
    cdef ts_t d = a / b
    if (a % b != 0) and ((a < 0) != (b < 0)):
        d -= 1
    return d


cdef struct Out:
    tag_t* tags
    ts_t* ts
    val_t* values
    q_t* quality
    cnp.int32_t* src  # NULL when the batch has no text column to follow


cdef inline Py_ssize_t emit(Out o, Py_ssize_t m, tag_t t, ts_t ts, val_t v, q_t q, Py_ssize_t src) noexcept nogil:
    """Write one output row at m; returns m + 1. `o` is passed by value so its pointers stay in
    registers (a uint8 store may alias anything the compiler cannot prove is a local)."""
    o.tags[m] = t
    o.ts[m] = ts
    o.values[m] = v
    o.quality[m] = q
    if o.src != NULL:
        o.src[m] = <cnp.int32_t>src
    return m + 1


cdef class _OutCols:
    """Owns the output arrays of a sample-creating kernel (capacity known up front)."""
    cdef object tags, ts, values, quality, src
    cdef Out o

    def __cinit__(self, Py_ssize_t cap, bint want_src):
        cap = max(cap, 1)
        self.tags = np.empty(cap, np.int32)
        self.ts = np.empty(cap, np.int64)
        self.values = np.empty(cap, np.float64)
        self.quality = np.empty(cap, np.uint32)
        cdef tag_t[::1] a = self.tags
        cdef ts_t[::1] b = self.ts
        cdef val_t[::1] c = self.values
        cdef q_t[::1] d = self.quality
        cdef cnp.int32_t[::1] e
        self.o.tags = &a[0]
        self.o.ts = &b[0]
        self.o.values = &c[0]
        self.o.quality = &d[0]
        self.o.src = NULL
        self.src = None
        if want_src:
            self.src = np.empty(cap, np.int32)
            e = self.src
            self.o.src = &e[0]

    cdef columns(self, Py_ssize_t m):
        """The first m rows; these columns become the spare again (see _out_cols)."""
        _spare[self.src is not None] = self
        src = None if self.src is None else self.src[:m]
        return self.tags[:m], self.ts[:m], self.values[:m], self.quality[:m], src


cdef list _spare = [None, None]  # per want_src: the last output columns handed out, if not in use


cdef inline bint _sole(cnp.PyObject* a) noexcept:
    """Only the spare slot holds `a` (a borrowed pointer, so the check itself adds no reference)."""
    return a.ob_refcnt == 1


cdef _OutCols _out_cols(Py_ssize_t cap, bint want_src):
    """Output columns for `cap` rows: the last ones handed out when no caller holds a view of
    them any more (the usual streaming case), else fresh ones. Fresh memory costs a page fault
    per 4 KiB written; reuse keeps a filter over big batches from paying that on every call.
    Checked under the GIL; views of an array hold a reference to it, so a held result is
    never overwritten. The spare is taken out of its slot while a kernel fills it (with the GIL
    released), so a call from another thread gets fresh columns instead of the same ones."""
    cdef _OutCols c = _spare[want_src]
    _spare[want_src] = None
    if (
        c is not None
        and c.tags.shape[0] >= cap
        and _sole(<cnp.PyObject*>c.tags)
        and _sole(<cnp.PyObject*>c.ts)
        and _sole(<cnp.PyObject*>c.values)
        and _sole(<cnp.PyObject*>c.quality)
        and (c.src is None or _sole(<cnp.PyObject*>c.src))
    ):
        return c
    return _OutCols(cap, want_src)


cdef inline _bad_tag(const tag_t[::1] tags, Py_ssize_t i, Py_ssize_t nt):
    raise IndexError(f"tag id {tags[i]} outside the filter's state (0..{nt - 1})")


# Shape checks, O(1) at each kernel's entry (the loops index without bounds checks); the same
# checks, in the same order and with the same messages, as _reference.py.


cdef int _check_columns(str kernel, Py_ssize_t n, Py_ssize_t n_ts, Py_ssize_t n_v, Py_ssize_t n_q) except -1:
    if n_ts != n or n_v != n or n_q != n:
        raise ValueError(
            f"{kernel}: columns of unequal length (tags {n}, ts {n_ts}, values {n_v}, quality {n_q})"
        )
    return 0


cdef int _check_len(str kernel, str name, Py_ssize_t length, str bound, Py_ssize_t nt) except -1:
    if length < nt:
        raise ValueError(f"{kernel}: {name} has {length} entries, fewer than {bound} ({nt})")
    return 0


cdef _bad_slot(str kernel, tag_t t, Py_ssize_t k, Py_ssize_t cap, Py_ssize_t n_slots, Py_ssize_t width):
    raise ValueError(
        f"{kernel}: tag {t} has slot {k} and count {cap}, outside its ring buffers ({n_slots} slots, {width} wide)"
    )


# --------------------------------------------------------------------------------------------
# deadband


ctypedef struct DeadbandParams:  # read only when a sample is reported
    val_t dead_abs
    val_t dead_rel
    ts_t max_silence  # NO_SILENCE_LIMIT: no heartbeat; REPORT_ALL: tag not filtered here


ctypedef struct DeadbandState:  # read for every sample: 32 bytes, 1,000 tags fit in L1
    val_t ref_value
    val_t band  # dead_abs + dead_rel * |ref_value|; NaN when ref_value is not finite
    ts_t deadline  # report anyway at or after this time (ref_ts + max_silence, saturated; TS_MIN with NO_REF)
    q_t ref_quality  # NO_REF (a Bad code) until a usable sample was reported
    q_t pad



cdef inline ts_t deadline_after(ts_t now, ts_t max_silence) noexcept nogil:
    if max_silence == TS_MAX or (max_silence > 0 and now > TS_MAX - max_silence):
        return TS_MAX
    if max_silence == TS_MIN:
        return TS_MIN
    return now + max_silence


cdef inline int db_differs(const DeadbandState* s, val_t v, q_t q, ts_t now) noexcept nogil:
    """The first pass's test: 1 for a row to report, or to decide in the second pass (a NaN
    band keeps every row). A Bad row differs from every reference quality but NO_REF, and
    NO_REF always comes with a deadline of REPORT_ALL (TS_MIN)."""
    return (not (fabs(v - s.ref_value) <= s.band)) | (q != s.ref_quality) | (now >= s.deadline)


cdef enum:
    BLOCK = 512  # most rows classified before their kept rows are applied
    SLOTS = 1024  # tag -> its last row in the block, by the tag's low bits (tags may share a slot)


def deadband(
    const tag_t[::1] tags,
    const ts_t[::1] ts,
    const val_t[::1] values,
    const q_t[::1] quality,
    const DeadbandParams[::1] params,
    DeadbandState[::1] state,
    bint want_src,
):
    """Report-by-exception; returns the reported samples as (tags, ts, values, quality, src).

    Two passes per block of rows. The first classifies every row against the state as it was
    at the block's start and stores nothing into the state, so the common row (not reported)
    costs no new reference and no branch on its outcome, which is as random as the signal (the
    compiler turned the earlier per-row "update the reference or a scratch copy" select into
    such a branch). It notes each tag's last row in the block. The second walks the kept rows,
    applies them to the state and writes them out; the block ends before the first row whose
    tag was kept earlier in the block, since that row was judged on a stale reference, and the
    next block classifies it again. After a cut, blocks are as long as the shortest distance at
    which a kept tag came again (the tags' period in a poll-ordered batch), then grow back.

    Precondition (kept by DeadbandFilter and by both twins): a state with ref_quality NO_REF
    has deadline REPORT_ALL, which is what reports a Bad sample without a test of its own.
    """
    cdef Py_ssize_t i, j, k, x, b0 = 0, b1, e, gap, m = 0, m0, bs = BLOCK, n = tags.shape[0], nt = state.shape[0], err = -1
    _check_columns("deadband", n, ts.shape[0], values.shape[0], quality.shape[0])
    _check_len("deadband", "params", params.shape[0], "state", nt)
    cdef _OutCols cols = _out_cols(n, want_src)
    if n == 0 or nt == 0:
        if n:
            _bad_tag(tags, 0, nt)
        return cols.columns(0)
    cdef tag_t* otg = cols.o.tags
    cdef ts_t* ots = cols.o.ts
    cdef val_t* ov = cols.o.values
    cdef q_t* oq = cols.o.quality
    cdef cnp.int32_t* osrc = cols.o.src
    cdef cnp.int32_t idx[BLOCK]
    cdef cnp.int32_t last[SLOTS]
    cdef const tag_t* tg = &tags[0]
    cdef const ts_t* tsp = &ts[0]
    cdef const val_t* vp = &values[0]
    cdef const q_t* qp = &quality[0]
    cdef const DeadbandParams* pp = &params[0]
    cdef DeadbandState* st = &state[0]
    cdef const DeadbandState* s
    cdef const DeadbandState* s2
    cdef DeadbandState* w
    cdef const DeadbandParams* p
    cdef tag_t t, t2
    cdef ts_t now
    cdef val_t v, r
    cdef q_t q
    with nogil:
        for j in range(SLOTS):
            last[j] = -1
        while b0 < n:
            b1 = b0 + bs if b0 + bs < n else n
            m0 = 0
            i = b0
            while i + 1 < b1:  # two rows per turn
                t = tg[i]
                t2 = tg[i + 1]
                if (<size_t>t >= <size_t>nt) | (<size_t>t2 >= <size_t>nt):
                    break  # the loop below finds which
                last[t & (SLOTS - 1)] = <cnp.int32_t>i
                last[t2 & (SLOTS - 1)] = <cnp.int32_t>(i + 1)
                s = st + t
                s2 = st + t2
                idx[m0] = <cnp.int32_t>i
                m0 += db_differs(s, vp[i], qp[i], tsp[i])
                idx[m0] = <cnp.int32_t>(i + 1)
                i += 1
                m0 += db_differs(s2, vp[i], qp[i], tsp[i])
                i += 1
            while i < b1:
                t = tg[i]
                if <size_t>t >= <size_t>nt:
                    err = i
                    break
                last[t & (SLOTS - 1)] = <cnp.int32_t>i
                s = st + t
                idx[m0] = <cnp.int32_t>i
                m0 += db_differs(s, vp[i], qp[i], tsp[i])
                i += 1
            e = i  # rows before e are final
            gap = BLOCK  # the shortest distance at which a kept tag came again
            for j in range(m0):
                k = idx[j]
                if k >= e:
                    break
                t = tg[k]
                w = st + t
                q = qp[k]
                v = vp[k]
                now = tsp[k]
                r = w.ref_value
                if w.band != w.band and q == w.ref_quality and now < w.deadline and (
                    v == r or (isnan(v) and isnan(r))
                ):
                    continue  # reference not finite and the value equal to it: not reported
                if last[t & (SLOTS - 1)] > k:  # a later row of this slot: if it is this tag's, end there
                    for x in range(k + 1, min(e, <Py_ssize_t>last[t & (SLOTS - 1)] + 1)):
                        if tg[x] == t:
                            e = x
                            gap = min(gap, x - k)
                            break
                if q >= 0x80000000u:  # Bad: the next usable sample is reported too
                    w.ref_quality = NO_REF
                    w.deadline = TS_MIN  # REPORT_ALL: the reference is gone
                else:
                    p = pp + t
                    w.ref_value = v
                    w.ref_quality = q
                    w.deadline = deadline_after(now, p.max_silence)
                    w.band = p.dead_abs + p.dead_rel * fabs(v) if v - v == 0.0 else NAN
                otg[m] = t
                ots[m] = now
                ov[m] = v
                oq[m] = q
                if osrc != NULL:
                    osrc[m] = <cnp.int32_t>k
                m += 1
            if e < i:  # cut short: classify the rest again; a bad tag beyond e is met again
                err = -1
                bs = max(16, gap)  # blocks no longer than the tags' period rarely need a cut
            elif bs < BLOCK:
                bs = min(<Py_ssize_t>BLOCK, bs + bs // 8 + 1)
            if err >= 0:
                break
            b0 = e
    if err >= 0:
        _bad_tag(tags, err, nt)
    return cols.columns(m)


# --------------------------------------------------------------------------------------------
# swinging door


ctypedef struct DoorTag:  # one record per tag: params, the archived point A, the held point H
    val_t deviation
    val_t a_value
    val_t h_value
    val_t slope_lo
    val_t slope_hi
    ts_t min_interval
    ts_t max_interval
    ts_t a_ts
    ts_t h_ts
    q_t a_quality
    q_t h_quality
    u8 has_a
    u8 has_h
    u8 enabled


cdef inline Py_ssize_t sd_flush(DoorTag* s, Out o, Py_ssize_t m, tag_t t) noexcept nogil:
    if s.has_h:
        m = emit(o, m, t, s.h_ts, s.h_value, s.h_quality, -1)
        s.a_value = s.h_value
        s.a_ts = s.h_ts
        s.a_quality = s.h_quality
        s.has_a = 1
        s.has_h = 0
        s.slope_lo = -INFINITY
        s.slope_hi = INFINITY
    return m


cdef inline Py_ssize_t sd_archive(
    DoorTag* s, Out o, Py_ssize_t m, tag_t t, ts_t now, val_t v, q_t q, Py_ssize_t i
) noexcept nogil:
    m = emit(o, m, t, now, v, q, i)
    s.a_value = v
    s.a_ts = now
    s.a_quality = q
    s.has_a = 1
    s.has_h = 0
    s.slope_lo = -INFINITY
    s.slope_hi = INFINITY
    return m


cdef inline void sd_hold(DoorTag* s, ts_t now, val_t v, q_t q, val_t d, val_t inv) noexcept nogil:
    cdef val_t lo = (d - s.deviation) * inv
    cdef val_t hi = (d + s.deviation) * inv
    cdef val_t cur_lo = s.slope_lo
    cdef val_t cur_hi = s.slope_hi
    s.h_value = v
    s.h_ts = now
    s.h_quality = q
    s.has_h = 1
    s.slope_lo = lo if lo > cur_lo else cur_lo  # selects (maxsd/minsd), not branches: these
    s.slope_hi = hi if hi < cur_hi else cur_hi  # outcomes are as random as the signal


def swinging_door(
    const tag_t[::1] tags,
    const ts_t[::1] ts,
    const val_t[::1] values,
    const q_t[::1] quality,
    DoorTag[::1] state,
    bint want_src,
):
    """Swinging-door compression; returns the archived points as (tags, ts, values, quality, src)."""
    cdef Py_ssize_t i, m = 0, n = tags.shape[0], nt = state.shape[0], err = -1
    _check_columns("swinging_door", n, ts.shape[0], values.shape[0], quality.shape[0])
    cdef _OutCols cols = _out_cols(2 * n, want_src)
    if n == 0 or nt == 0:
        if n:
            _bad_tag(tags, 0, nt)
        return cols.columns(0)
    cdef Out o = cols.o
    cdef const tag_t* tg = &tags[0]
    cdef const ts_t* tsp = &ts[0]
    cdef const val_t* vp = &values[0]
    cdef const q_t* qp = &quality[0]
    cdef DoorTag* st = &state[0]
    cdef DoorTag* s
    cdef tag_t t
    cdef ts_t now, dt
    cdef val_t v, d, inv, sl
    cdef q_t q
    cdef bint force
    with nogil:
        for i in range(n):
            t = tg[i]
            if <size_t>t >= <size_t>nt:
                err = i
                break
            s = st + t
            q = qp[i]
            v = vp[i]
            now = tsp[i]
            if not s.enabled:
                m = emit(o, m, t, now, v, q, i)
                continue
            if is_bad(q) or not isfinite(v):
                m = sd_flush(s, o, m, t)
                m = emit(o, m, t, now, v, q, i)
                s.has_a = 0
                continue
            if not s.has_a or q != s.a_quality:
                m = sd_flush(s, o, m, t)
                m = sd_archive(s, o, m, t, now, v, q, i)
                continue
            dt = now - s.a_ts
            d = v - s.a_value
            force = False
            if s.max_interval > 0 and dt >= s.max_interval:  # rare: one test on the common path
                if s.has_h and dt > s.max_interval:
                    m = sd_flush(s, o, m, t)  # H is closer than max_interval to A (CompMax)
                    dt = now - s.a_ts
                    d = v - s.a_value
                force = dt >= s.max_interval
            if dt <= 0 or not isfinite(d):
                if not isfinite(d) or fabs(d) > s.deviation:
                    m = sd_flush(s, o, m, t)
                    m = sd_archive(s, o, m, t, now, v, q, i)
                continue
            inv = 1.0 / <val_t>dt
            sl = d * inv
            if s.slope_lo <= sl and sl <= s.slope_hi:
                if force:
                    m = sd_archive(s, o, m, t, now, v, q, i)
                else:
                    sd_hold(s, now, v, q, d, inv)
                continue
            if s.has_h and (force or s.h_ts - s.a_ts >= s.min_interval):
                m = sd_flush(s, o, m, t)
                dt = now - s.a_ts
                d = v - s.a_value
                if dt <= 0 or not isfinite(d):
                    if not isfinite(d) or fabs(d) > s.deviation:
                        m = sd_archive(s, o, m, t, now, v, q, i)
                    continue
                if s.max_interval > 0 and dt >= s.max_interval:
                    m = sd_archive(s, o, m, t, now, v, q, i)
                else:
                    sd_hold(s, now, v, q, d, 1.0 / <val_t>dt)
            else:
                sd_hold(s, now, v, q, d, inv)
    if err >= 0:
        _bad_tag(tags, err, nt)
    return cols.columns(m)


# --------------------------------------------------------------------------------------------
# moving average, ewma


cdef inline void two_sum(val_t* tot, val_t* comp, val_t x) noexcept nogil:
    """tot += x, with the rounding error kept in comp (Neumaier): a huge value that enters and
    leaves the window takes none of the small ones with it."""
    cdef val_t s = tot[0] + x
    if fabs(tot[0]) >= fabs(x):
        comp[0] += (tot[0] - s) + x
    else:
        comp[0] += (x - s) + tot[0]
    tot[0] = s


def moving_average(
    const tag_t[::1] tags,
    const ts_t[::1] ts,
    const val_t[::1] values,
    const q_t[::1] quality,
    const cnp.int32_t[::1] slot,
    const ts_t[::1] count,
    const ts_t[::1] window,
    const ts_t[::1] base,
    val_t[::1] buf_v,
    ts_t[::1] buf_t,
    ts_t[::1] head,
    ts_t[::1] size,
    val_t[::1] total,
    val_t[::1] comp,
    ts_t[::1] pushes,
):
    """Moving average by count or time; returns the output values (row-aligned)."""
    cdef Py_ssize_t i, j, n = tags.shape[0], nt = slot.shape[0], err = -1
    cdef Py_ssize_t n_slots = base.shape[0], width = buf_v.shape[0]
    _check_columns("moving_average", n, ts.shape[0], values.shape[0], quality.shape[0])
    _check_len("moving_average", "count", count.shape[0], "slot", nt)
    _check_len("moving_average", "window", window.shape[0], "slot", nt)
    _check_len("moving_average", "buf_t", buf_t.shape[0], "buf_v", width)
    _check_len("moving_average", "head", head.shape[0], "base", n_slots)
    _check_len("moving_average", "size", size.shape[0], "base", n_slots)
    _check_len("moving_average", "total", total.shape[0], "base", n_slots)
    _check_len("moving_average", "comp", comp.shape[0], "base", n_slots)
    _check_len("moving_average", "pushes", pushes.shape[0], "base", n_slots)
    cdef tag_t t
    cdef Py_ssize_t k, cap, h, sz, p, b, bad = -1
    cdef ts_t w, now
    cdef val_t v, tot, c
    out = np.array(values, dtype=np.float64, copy=True)
    cdef val_t[::1] o = out
    with nogil:
        for i in range(n):
            t = tags[i]
            if <size_t>t >= <size_t>nt:
                err = i
                break
            k = slot[t]
            v = values[i]
            if k < 0 or is_bad(quality[i]) or not isfinite(v):
                continue
            cap = count[t]
            if k >= n_slots or cap < 1 or base[k] < 0 or base[k] + cap > width:
                bad = i
                break
            b = base[k]
            w = window[t]
            now = ts[i]
            h = head[k]
            sz = size[k]
            tot = total[k]
            c = comp[k]
            if w > 0:
                while sz > 0 and buf_t[b + h] <= now - w:
                    two_sum(&tot, &c, -buf_v[b + h])
                    h += 1
                    if h == cap:
                        h = 0
                    sz -= 1
            if sz == cap:
                two_sum(&tot, &c, -buf_v[b + h])
                h += 1
                if h == cap:
                    h = 0
                sz -= 1
            if sz == 0:
                tot = 0.0
                c = 0.0
            p = h + sz
            if p >= cap:
                p -= cap
            buf_v[b + p] = v
            buf_t[b + p] = now
            sz += 1
            two_sum(&tot, &c, v)
            pushes[k] += 1
            # Recompute: every cap pushes (bounds the drift), after an overflow, and when the
            # compensation is no longer small beside the total (huge values left the window).
            if pushes[k] >= cap or not isfinite(tot) or fabs(c) > fabs(tot) * 9.313225746154785e-10:  # 2**-30
                pushes[k] = 0
                tot = 0.0
                c = 0.0
                p = h
                for j in range(sz):
                    two_sum(&tot, &c, buf_v[b + p])
                    p += 1
                    if p == cap:
                        p = 0
                if not isfinite(tot):
                    c = 0.0  # the mean is +-inf (or NaN from both), not inf - inf
            head[k] = h
            size[k] = sz
            total[k] = tot
            comp[k] = c
            o[i] = (tot + c) / sz
    if err >= 0:
        _bad_tag(tags, err, nt)
    if bad >= 0:
        _bad_slot("moving_average", tags[bad], slot[tags[bad]], count[tags[bad]], n_slots, width)
    return out


def ewma(
    const tag_t[::1] tags,
    const ts_t[::1] ts,
    const val_t[::1] values,
    const q_t[::1] quality,
    const u8[::1] enabled,
    const ts_t[::1] tau,
    u8[::1] has_y,
    val_t[::1] y,
    ts_t[::1] y_ts,
):
    """Continuous-time EWMA; returns the output values (row-aligned)."""
    cdef Py_ssize_t i, n = tags.shape[0], nt = enabled.shape[0], err = -1
    _check_columns("ewma", n, ts.shape[0], values.shape[0], quality.shape[0])
    _check_len("ewma", "tau", tau.shape[0], "enabled", nt)
    _check_len("ewma", "has_y", has_y.shape[0], "enabled", nt)
    _check_len("ewma", "y", y.shape[0], "enabled", nt)
    _check_len("ewma", "y_ts", y_ts.shape[0], "enabled", nt)
    cdef tag_t t
    cdef ts_t dt
    cdef val_t v, w
    out = np.array(values, dtype=np.float64, copy=True)
    cdef val_t[::1] o = out
    with nogil:
        for i in range(n):
            t = tags[i]
            if <size_t>t >= <size_t>nt:
                err = i
                break
            v = values[i]
            if not enabled[t] or is_bad(quality[i]) or not isfinite(v):
                continue
            if not has_y[t]:
                y[t] = v
                y_ts[t] = ts[i]
                has_y[t] = 1
            else:
                dt = ts[i] - y_ts[t]
                if dt > 0:
                    w = exp(-(<val_t>dt) / <val_t>tau[t])
                    y[t] = w * y[t] + (1.0 - w) * v
                    y_ts[t] = ts[i]
            o[i] = y[t]
    if err >= 0:
        _bad_tag(tags, err, nt)
    return out


# --------------------------------------------------------------------------------------------
# rate, counter_delta


def rate(
    const tag_t[::1] tags,
    const ts_t[::1] ts,
    const val_t[::1] values,
    const q_t[::1] quality,
    const u8[::1] enabled,
    u8[::1] has_p,
    val_t[::1] p_value,
    ts_t[::1] p_ts,
    q_t[::1] p_quality,
    bint want_src,
):
    """Per-second derivative; returns (tags, ts, values, quality, src)."""
    cdef Py_ssize_t i, m = 0, n = tags.shape[0], nt = enabled.shape[0], err = -1
    _check_columns("rate", n, ts.shape[0], values.shape[0], quality.shape[0])
    _check_len("rate", "has_p", has_p.shape[0], "enabled", nt)
    _check_len("rate", "p_value", p_value.shape[0], "enabled", nt)
    _check_len("rate", "p_ts", p_ts.shape[0], "enabled", nt)
    _check_len("rate", "p_quality", p_quality.shape[0], "enabled", nt)
    cdef _OutCols cols = _out_cols(n, want_src)
    if n == 0 or nt == 0:
        if n:
            _bad_tag(tags, 0, nt)
        return cols.columns(0)
    cdef Out o = cols.o
    cdef const tag_t* tg = &tags[0]
    cdef const ts_t* tsp = &ts[0]
    cdef const val_t* vp = &values[0]
    cdef const q_t* qp = &quality[0]
    cdef const u8* en = &enabled[0]
    cdef u8* hp = &has_p[0]
    cdef val_t* pv = &p_value[0]
    cdef ts_t* pt = &p_ts[0]
    cdef q_t* pq = &p_quality[0]
    cdef tag_t t
    cdef ts_t dt, now
    cdef val_t v
    cdef q_t q
    with nogil:
        for i in range(n):
            t = tg[i]
            if <size_t>t >= <size_t>nt:
                err = i
                break
            q = qp[i]
            v = vp[i]
            now = tsp[i]
            if not en[t] or is_bad(q) or not isfinite(v):
                m = emit(o, m, t, now, v, q, i)
                continue
            if hp[t]:
                dt = now - pt[t]
                if dt > 0:
                    m = emit(o, m, t, now, (v - pv[t]) * 1e9 / <val_t>dt, worse(q, pq[t]), -1)
            pv[t] = v
            pt[t] = now
            pq[t] = q
            hp[t] = 1
    if err >= 0:
        _bad_tag(tags, err, nt)
    return cols.columns(m)


def counter_delta(
    const tag_t[::1] tags,
    const ts_t[::1] ts,
    const val_t[::1] values,
    const q_t[::1] quality,
    const u8[::1] enabled,
    const val_t[::1] modulus,
    const val_t[::1] max_increase,
    u8[::1] has_p,
    val_t[::1] p_value,
    q_t[::1] p_quality,
    bint want_src,
):
    """Counter increase with rollover and reset; returns (tags, ts, values, quality, src)."""
    cdef Py_ssize_t i, m = 0, n = tags.shape[0], nt = enabled.shape[0], err = -1
    _check_columns("counter_delta", n, ts.shape[0], values.shape[0], quality.shape[0])
    _check_len("counter_delta", "modulus", modulus.shape[0], "enabled", nt)
    _check_len("counter_delta", "max_increase", max_increase.shape[0], "enabled", nt)
    _check_len("counter_delta", "has_p", has_p.shape[0], "enabled", nt)
    _check_len("counter_delta", "p_value", p_value.shape[0], "enabled", nt)
    _check_len("counter_delta", "p_quality", p_quality.shape[0], "enabled", nt)
    cdef _OutCols cols = _out_cols(n, want_src)
    if n == 0 or nt == 0:
        if n:
            _bad_tag(tags, 0, nt)
        return cols.columns(0)
    cdef Out o = cols.o
    cdef const tag_t* tg = &tags[0]
    cdef const ts_t* tsp = &ts[0]
    cdef const val_t* vp = &values[0]
    cdef const q_t* qp = &quality[0]
    cdef const u8* en = &enabled[0]
    cdef const val_t* mod = &modulus[0]
    cdef const val_t* mxi = &max_increase[0]
    cdef u8* hp = &has_p[0]
    cdef val_t* pv = &p_value[0]
    cdef q_t* pq = &p_quality[0]
    cdef tag_t t
    cdef val_t v, p, d, md, wrapped
    cdef q_t q
    with nogil:
        for i in range(n):
            t = tg[i]
            if <size_t>t >= <size_t>nt:
                err = i
                break
            q = qp[i]
            v = vp[i]
            if not en[t] or is_bad(q) or not isfinite(v):
                m = emit(o, m, t, tsp[i], v, q, i)
                continue
            if v < 0 and v >= -0.5 * mod[t]:
                v += mod[t]  # a counter decoded as signed: its unsigned value counts on
            if hp[t]:
                p = pv[t]
                d = v - p
                if d < 0:
                    md = mod[t]
                    wrapped = (md - p) + v
                    if v >= 0 and p < md and wrapped <= mxi[t]:
                        d = wrapped
                    else:
                        d = v
                m = emit(o, m, t, tsp[i], d, worse(q, pq[t]), -1)
            pv[t] = v
            pq[t] = q
            hp[t] = 1
    if err >= 0:
        _bad_tag(tags, err, nt)
    return cols.columns(m)


# --------------------------------------------------------------------------------------------
# window


cdef enum:
    AGG_MIN, AGG_MAX, AGG_MEAN, AGG_FIRST, AGG_LAST, AGG_COUNT, AGG_STDDEV


def window(
    const tag_t[::1] tags,
    const ts_t[::1] ts,
    const val_t[::1] values,
    const q_t[::1] quality,
    const u8[::1] enabled,
    const ts_t[::1] width,
    const ts_t[::1] offset,
    const u8[::1] agg,
    u8[::1] has_w,
    ts_t[::1] w_start,
    ts_t[::1] n_used,
    ts_t[::1] n_bad,
    q_t[::1] last_bad,
    u8[::1] not_good,
    val_t[::1] first,
    val_t[::1] last,
    val_t[::1] vmin,
    val_t[::1] vmax,
    val_t[::1] shift,
    val_t[::1] s1,
    val_t[::1] s2,
    bint want_src,
):
    """Tumbling wall-clock windows; returns the closed windows' aggregates as columns."""
    cdef Py_ssize_t i, m = 0, n = tags.shape[0], nt = enabled.shape[0], err = -1, bad = -1
    _check_columns("window", n, ts.shape[0], values.shape[0], quality.shape[0])
    _check_len("window", "width", width.shape[0], "enabled", nt)
    _check_len("window", "offset", offset.shape[0], "enabled", nt)
    _check_len("window", "agg", agg.shape[0], "enabled", nt)
    _check_len("window", "has_w", has_w.shape[0], "enabled", nt)
    _check_len("window", "w_start", w_start.shape[0], "enabled", nt)
    _check_len("window", "n_used", n_used.shape[0], "enabled", nt)
    _check_len("window", "n_bad", n_bad.shape[0], "enabled", nt)
    _check_len("window", "last_bad", last_bad.shape[0], "enabled", nt)
    _check_len("window", "not_good", not_good.shape[0], "enabled", nt)
    _check_len("window", "first", first.shape[0], "enabled", nt)
    _check_len("window", "last", last.shape[0], "enabled", nt)
    _check_len("window", "vmin", vmin.shape[0], "enabled", nt)
    _check_len("window", "vmax", vmax.shape[0], "enabled", nt)
    _check_len("window", "shift", shift.shape[0], "enabled", nt)
    _check_len("window", "s1", s1.shape[0], "enabled", nt)
    _check_len("window", "s2", s2.shape[0], "enabled", nt)
    cdef _OutCols cols = _out_cols(n, want_src)
    if n == 0 or nt == 0:
        if n:
            _bad_tag(tags, 0, nt)
        return cols.columns(0)
    cdef Out o = cols.o
    cdef const tag_t* tg = &tags[0]
    cdef const ts_t* tsp = &ts[0]
    cdef const val_t* vp = &values[0]
    cdef const q_t* qp = &quality[0]
    cdef const u8* en = &enabled[0]
    cdef const ts_t* wdp = &width[0]
    cdef const ts_t* offp = &offset[0]
    cdef const u8* aggp = &agg[0]
    cdef u8* hw = &has_w[0]
    cdef ts_t* ws = &w_start[0]
    cdef ts_t* nu = &n_used[0]
    cdef ts_t* nb = &n_bad[0]
    cdef q_t* lb = &last_bad[0]
    cdef u8* ng = &not_good[0]
    cdef val_t* fst = &first[0]
    cdef val_t* lst = &last[0]
    cdef val_t* mn = &vmin[0]
    cdef val_t* mxp = &vmax[0]
    cdef val_t* sh = &shift[0]
    cdef val_t* a1 = &s1[0]
    cdef val_t* a2 = &s2[0]
    cdef tag_t t
    cdef ts_t now, wd, start, cnt
    cdef val_t v, d, r, var, lo, hi
    cdef q_t q
    cdef u8 a
    with nogil:
        for i in range(n):
            t = tg[i]
            if <size_t>t >= <size_t>nt:
                err = i
                break
            q = qp[i]
            v = vp[i]
            now = tsp[i]
            if not en[t]:
                m = emit(o, m, t, now, v, q, i)
                continue
            start = ws[t]
            if not hw[t] or now >= start + wdp[t] or now < start:
                if wdp[t] <= 0:  # checked where a window opens: not on the per-sample path
                    bad = i
                    break
                if hw[t]:
                    cnt = nu[t]
                    if cnt > 0:
                        a = aggp[t]
                        if a == AGG_MIN:
                            r = mn[t]
                        elif a == AGG_MAX:
                            r = mxp[t]
                        elif a == AGG_MEAN:
                            r = sh[t] + a1[t] / <val_t>cnt
                        elif a == AGG_FIRST:
                            r = fst[t]
                        elif a == AGG_LAST:
                            r = lst[t]
                        elif a == AGG_COUNT:
                            r = <val_t>cnt
                        else:
                            var = (a2[t] - a1[t] * a1[t] / <val_t>cnt) / <val_t>cnt
                            r = 0.0 if var < 0.0 else sqrt(var)
                        m = emit(o, m, t, start, r, UNCERTAIN_SUB_NORMAL if ng[t] & 2 else (UNCERTAIN if ng[t] else 0), -1)
                    elif nb[t] > 0:
                        m = emit(o, m, t, start, NAN, lb[t], -1)
                wd = wdp[t]
                start = floordiv(now - offp[t], wd) * wd + offp[t]
                ws[t] = start
                ng[t] = 2 if not hw[t] and now > start else 0  # the first window seen only in part
                hw[t] = 1
                nu[t] = 0
                nb[t] = 0
            if (q >> 30) != 0:  # Uncertain or Bad, whatever the value (NaN included)
                ng[t] |= 1
            if is_bad(q):
                nb[t] += 1
                lb[t] = q
            elif not isnan(v):
                if nu[t] == 0:
                    fst[t] = v
                    mn[t] = v
                    mxp[t] = v
                    sh[t] = v
                    a1[t] = 0.0
                    a2[t] = 0.0
                else:
                    lo = mn[t]
                    hi = mxp[t]
                    mn[t] = v if v < lo else lo
                    mxp[t] = v if v > hi else hi
                lst[t] = v
                d = v - sh[t]
                a1[t] = a1[t] + d
                a2[t] = a2[t] + d * d
                nu[t] += 1
    if err >= 0:
        _bad_tag(tags, err, nt)
    if bad >= 0:
        raise ValueError(f"window: tag {tags[bad]} has width {width[tags[bad]]}, expected > 0")
    return cols.columns(m)


# --------------------------------------------------------------------------------------------
# spike


cdef inline void sorted_insert(val_t* a, Py_ssize_t m, val_t x) noexcept nogil:
    """Insert x into the sorted a[0..m-1] after any equal values (a has room for m + 1)."""
    cdef Py_ssize_t j = m
    while j > 0 and a[j - 1] > x:
        a[j] = a[j - 1]
        j -= 1
    a[j] = x


cdef inline void sorted_remove(val_t* a, Py_ssize_t m, val_t x) noexcept nogil:
    """Remove the first value equal to x from the sorted a[0..m-1]."""
    cdef Py_ssize_t j = 0
    while j < m - 1 and a[j] != x:
        j += 1
    while j < m - 1:
        a[j] = a[j + 1]
        j += 1


cdef inline val_t median_sorted(const val_t* a, Py_ssize_t m) noexcept nogil:
    if m % 2:
        return a[m // 2]
    return (a[m // 2 - 1] + a[m // 2]) * 0.5


cdef inline val_t mad_sorted(const val_t* a, Py_ssize_t m, val_t med) noexcept nogil:
    """Median of |a - med| by merging the two sorted runs of deviations either side of med."""
    cdef Py_ssize_t lo = 0, hi, c
    cdef val_t x = 0.0, prev = 0.0, dl, dr
    while lo < m and a[lo] < med:
        lo += 1
    hi = lo
    lo -= 1
    for c in range(m // 2 + 1):
        prev = x
        if lo >= 0 and (hi >= m or med - a[lo] <= a[hi] - med):
            x = med - a[lo]
            lo -= 1
        else:
            x = a[hi] - med
            hi += 1
    if m % 2:
        return x
    return (prev + x) * 0.5


def spike(
    const tag_t[::1] tags,
    const ts_t[::1] ts,
    const val_t[::1] values,
    const q_t[::1] quality,
    const cnp.int32_t[::1] slot,
    const ts_t[::1] count,
    const val_t[::1] k_mad,
    const val_t[::1] floor,
    val_t[:, ::1] buf_v,
    val_t[:, ::1] buf_sorted,
    ts_t[::1] head,
    ts_t[::1] size,
):
    """Hampel / median outlier marking; returns the output quality (row-aligned)."""
    cdef Py_ssize_t i, n = tags.shape[0], nt = slot.shape[0], err = -1, bad = -1
    cdef Py_ssize_t n_slots = buf_v.shape[0], width = buf_v.shape[1]
    _check_columns("spike", n, ts.shape[0], values.shape[0], quality.shape[0])
    _check_len("spike", "count", count.shape[0], "slot", nt)
    _check_len("spike", "k_mad", k_mad.shape[0], "slot", nt)
    _check_len("spike", "floor", floor.shape[0], "slot", nt)
    _check_len("spike", "buf_sorted", buf_sorted.shape[0], "buf_v rows", n_slots)
    _check_len("spike", "buf_sorted columns", buf_sorted.shape[1], "buf_v columns", width)
    _check_len("spike", "head", head.shape[0], "buf_v rows", n_slots)
    _check_len("spike", "size", size.shape[0], "buf_v rows", n_slots)
    out = np.array(quality, dtype=np.uint32, copy=True)
    if n == 0 or nt == 0:
        if n:
            _bad_tag(tags, 0, nt)
        return out
    cdef q_t[::1] o = out
    cdef q_t* op = &o[0]
    cdef const tag_t* tg = &tags[0]
    cdef const val_t* vp = &values[0]
    cdef const q_t* qp = &quality[0]
    cdef const cnp.int32_t* sl = &slot[0]
    cdef const ts_t* cp = &count[0]
    cdef const val_t* kp = &k_mad[0]
    cdef const val_t* fp = &floor[0]
    cdef val_t* ring = &buf_v[0, 0] if buf_v.shape[0] else NULL
    cdef val_t* srt0 = &buf_sorted[0, 0] if buf_sorted.shape[0] else NULL
    cdef ts_t* hp = &head[0] if head.shape[0] else NULL
    cdef ts_t* sp = &size[0] if size.shape[0] else NULL
    cdef tag_t t
    cdef Py_ssize_t k, cap, h, sz
    cdef val_t v, med, mad, lim, km, old
    cdef val_t* rb
    cdef val_t* srt
    with nogil:
        for i in range(n):
            t = tg[i]
            if <size_t>t >= <size_t>nt:
                err = i
                break
            k = sl[t]
            v = vp[i]
            if k < 0 or is_bad(qp[i]) or not isfinite(v):
                continue
            cap = cp[t]
            if k >= n_slots or cap < 1 or cap > width:
                bad = i
                break
            h = hp[k]
            sz = sp[k]
            rb = ring + k * width
            srt = srt0 + k * width
            if sz == cap:
                med = median_sorted(srt, cap)
                lim = fp[t]
                km = kp[t]
                if km > 0.0:
                    mad = mad_sorted(srt, cap, med)
                    if km * mad > lim:
                        lim = km * mad
                if fabs(v - med) > lim:
                    op[i] = UNCERTAIN_SENSOR_NOT_ACCURATE
                old = rb[h]
                rb[h] = v
                h += 1
                if h == cap:
                    h = 0
                sorted_remove(srt, cap, old)
                sorted_insert(srt, cap - 1, v)
            else:
                rb[sz] = v
                sorted_insert(srt, sz, v)
                sz += 1
            hp[k] = h
            sp[k] = sz
    if err >= 0:
        _bad_tag(tags, err, nt)
    if bad >= 0:
        _bad_slot("spike", tags[bad], slot[tags[bad]], count[tags[bad]], n_slots, width)
    return out


# --------------------------------------------------------------------------------------------
# range


def range_check(
    const tag_t[::1] tags,
    const ts_t[::1] ts,
    const val_t[::1] values,
    const q_t[::1] quality,
    const u8[::1] enabled,
    const val_t[::1] low,
    const val_t[::1] high,
    const u8[::1] mode,
):
    """Limits check; returns (values or None when no tag clamps, quality), row-aligned."""
    cdef Py_ssize_t i, n = tags.shape[0], nt = enabled.shape[0], err = -1
    _check_columns("range_check", n, ts.shape[0], values.shape[0], quality.shape[0])
    _check_len("range_check", "low", low.shape[0], "enabled", nt)
    _check_len("range_check", "high", high.shape[0], "enabled", nt)
    _check_len("range_check", "mode", mode.shape[0], "enabled", nt)
    cdef tag_t t
    cdef val_t v, lo, hi
    cdef q_t q
    cdef u8 m
    cdef bint any_clamp = False
    for i in range(nt):
        if enabled[i] and mode[i] == 2:
            any_clamp = True
    out_q = np.empty(n, dtype=np.uint32)
    cdef q_t[::1] oq = out_q
    out_v = np.array(values, dtype=np.float64, copy=True) if any_clamp else np.empty(1, np.float64)
    cdef val_t[::1] ov = out_v
    with nogil:
        for i in range(n):
            t = tags[i]
            if <size_t>t >= <size_t>nt:
                err = i
                break
            q = quality[i]
            oq[i] = q
            if not enabled[t] or is_bad(q):
                continue
            v = values[i]
            lo = low[t]
            hi = high[t]
            if not (lo <= v and v <= hi):  # NaN too: it lies within no limits
                m = mode[t]
                if m == 0 or (m == 2 and v != v):  # NaN cannot be clamped
                    oq[i] = BAD_OUT_OF_RANGE
                elif m == 1:
                    oq[i] = UNCERTAIN_ENGINEERING_UNITS_EXCEEDED
                else:
                    ov[i] = lo if v < lo else hi
                    if (q >> 30) == 0:
                        oq[i] = GOOD_CLAMPED
    if err >= 0:
        _bad_tag(tags, err, nt)
    return (out_v if any_clamp else None), out_q
