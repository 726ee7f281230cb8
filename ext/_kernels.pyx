# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled filter kernels over interleaved columnar batches.

Each kernel walks the batch once; per-tag state lives in arrays indexed by tag id and owned by
the caller, so a stream split into any number of batches gives the same output. Plain-Python
twins with the same signatures live in edgeos/filters/_reference.py.
"""

import numpy as np
cimport numpy as cnp
from libc.math cimport isnan, fabs

cnp.import_array()

ctypedef cnp.int32_t tag_t
ctypedef cnp.int64_t ts_t
ctypedef cnp.float64_t val_t
ctypedef cnp.uint32_t q_t


def deadband(
    const tag_t[::1] tags,
    const ts_t[::1] ts,
    const val_t[::1] values,
    const q_t[::1] quality,
    const cnp.uint8_t[::1] enabled,
    const val_t[::1] dead,
    const ts_t[::1] max_silence,
    val_t[::1] ref_value,
    ts_t[::1] ref_ts,
    q_t[::1] ref_quality,
    cnp.uint8_t[::1] has_ref,
):
    """Report-by-exception; returns a uint8 keep mask. See _reference.deadband for the rules."""
    cdef Py_ssize_t i, n = tags.shape[0]
    cdef tag_t t
    cdef val_t v, r
    cdef q_t q
    cdef bint keep
    out = np.empty(n, dtype=np.uint8)
    cdef cnp.uint8_t[::1] keep_mv = out
    with nogil:
        for i in range(n):
            t = tags[i]
            q = quality[i]
            if not enabled[t]:
                keep_mv[i] = 1
                continue
            if (q >> 30) >= 2:
                # Bad: always passed, never a reference; the next Good is reported.
                keep_mv[i] = 1
                has_ref[t] = 0
                continue
            v = values[i]
            keep = not has_ref[t] or q != ref_quality[t]
            if not keep:
                r = ref_value[t]
                if isnan(v) or isnan(r):
                    keep = isnan(v) != isnan(r)
                elif v != r:
                    keep = fabs(v - r) > dead[t]
            if not keep and max_silence[t] > 0 and ts[i] - ref_ts[t] >= max_silence[t]:
                keep = True
            if keep:
                ref_value[t] = v
                ref_ts[t] = ts[i]
                ref_quality[t] = q
                has_ref[t] = 1
            keep_mv[i] = keep
    return out
