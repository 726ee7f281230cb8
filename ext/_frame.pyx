# cython: boundscheck=False, wraparound=False, initializedcheck=False, nonecheck=False
"""Compiled assembly of upstream messages from a run of stored units.

The sync's reader thread frames about 10,000 units a second per MB/s of backlog; done in Python
(a bin header object and a list entry per unit) it cost the drain's reader thread a sixth of
its CPU, holding the GIL the event loop publishes with (docs/benchmarks.md, sixteenth
session). The plain-Python twin in edgeos/sync/_reference.py is the specification: same
arguments, same refusals, byte-identical output.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t
from libc.string cimport memcpy


def assemble(
    bytes head not None,
    const unsigned char[::1] blob not None,
    const int64_t[::1] offsets not None,
    const int64_t[::1] idx not None,
):
    """head, then for each i of idx the unit blob[offsets[i]:offsets[i + 1]] as msgpack bin 32."""
    cdef int64_t units = offsets.shape[0] - 1
    cdef Py_ssize_t n = idx.shape[0]
    cdef Py_ssize_t k, hlen = len(head)
    cdef int64_t i, a, b, size, total = hlen, at = hlen
    for k in range(n):
        i = idx[k]
        if i < 0 or i >= units:
            raise IndexError(f"unit {i} is not in a run of {units}")
        a = offsets[i]
        b = offsets[i + 1]
        if a < 0 or b < a or b > blob.shape[0] or b - a > 0xFFFFFFFF:
            raise ValueError(f"unit {i} spans [{a}, {b}) of a run of {blob.shape[0]} bytes")
        total += 5 + b - a
        if total > <int64_t> 0x7FFFFFFF * 64:  # far past any cap; keeps the sum from wrapping
            raise ValueError(f"a message of {total} bytes or more")
    out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t> total)
    cdef unsigned char *p = <unsigned char *> PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(head), hlen)
    # With the GIL held throughout: the arrays cannot change between the check above and the
    # copy, and the sizes are checked against the allocation again all the same.
    for k in range(n):
        i = idx[k]
        a = offsets[i]
        size = offsets[i + 1] - a
        if size < 0 or at + 5 + size > total:
            raise ValueError("the run changed while its message was assembled")
        p[at] = 0xC6
        p[at + 1] = (size >> 24) & 0xFF
        p[at + 2] = (size >> 16) & 0xFF
        p[at + 3] = (size >> 8) & 0xFF
        p[at + 4] = size & 0xFF
        if size:
            memcpy(p + at + 5, &blob[a], size)
        at += 5 + size
    return out
