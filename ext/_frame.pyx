# cython: boundscheck=False, wraparound=False, initializedcheck=False, nonecheck=False
"""Compiled assembly of upstream messages from a run of stored units.

The sync's reader thread frames about 10,000 units a second per MB/s of backlog; done in Python
(a bin header object and a list entry per unit) it held the GIL the event loop publishes with
for a third of a drain (docs/benchmarks.md, sixteenth session). The plain-Python twin in
edgeos/sync/_reference.py is the specification: same arguments, byte-identical output.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t
from libc.string cimport memcpy


def assemble(bytes head, const unsigned char[::1] blob, const int64_t[::1] offsets, const int64_t[::1] idx):
    """head, then for each i of idx the unit blob[offsets[i]:offsets[i + 1]] as msgpack bin 32."""
    cdef Py_ssize_t units = offsets.shape[0] - 1
    cdef Py_ssize_t n = idx.shape[0]
    cdef Py_ssize_t k, i, hlen = len(head)
    cdef int64_t a, b, size, total = hlen
    for k in range(n):
        i = idx[k]
        if i < 0 or i >= units:
            raise IndexError(f"unit {i} is not in a run of {units}")
        a = offsets[i]
        b = offsets[i + 1]
        if a < 0 or b < a or b > blob.shape[0] or b - a > 0xFFFFFFFF:
            raise ValueError(f"unit {i} spans [{a}, {b}) of a run of {blob.shape[0]} bytes")
        total += 5 + b - a
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef unsigned char *p = <unsigned char *> PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(head), hlen)
    p += hlen
    with nogil:
        for k in range(n):
            i = idx[k]
            a = offsets[i]
            size = offsets[i + 1] - a
            p[0] = 0xC6
            p[1] = (size >> 24) & 0xFF
            p[2] = (size >> 16) & 0xFF
            p[3] = (size >> 8) & 0xFF
            p[4] = size & 0xFF
            if size:
                memcpy(p + 5, &blob[a], size)
            p += 5 + size
    return out
