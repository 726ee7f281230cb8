"""Plain-Python twins of the compiled kernels: the executable specification, and the fallback
where no compiler was available. Same signatures and state arrays as ext/_kernels.pyx."""

from __future__ import annotations

import math

import numpy as np


def deadband(tags, ts, values, quality, enabled, dead, max_silence, ref_value, ref_ts, ref_quality, has_ref):
    """Keep a sample when (in order):
    - the tag has no deadband here (pass-through);
    - it is Bad (kept, and it clears the reference so the next Good sample is reported);
    - there is no reference yet, or its quality differs from the last reported one;
    - NaN-ness changed, or |value - reference| > deadband (inf vs finite is a change);
    - max_silence > 0 and at least max_silence ns passed since the last reported sample.
    """
    n = len(tags)
    out = np.empty(n, dtype=np.uint8)
    for i in range(n):
        t = int(tags[i])
        q = int(quality[i])
        if not enabled[t]:
            out[i] = 1
            continue
        if (q >> 30) >= 2:
            out[i] = 1
            has_ref[t] = 0
            continue
        v = float(values[i])
        keep = (not has_ref[t]) or q != int(ref_quality[t])
        if not keep:
            r = float(ref_value[t])
            if math.isnan(v) or math.isnan(r):
                keep = math.isnan(v) != math.isnan(r)
            elif v != r:
                keep = abs(v - r) > dead[t]
        if not keep and max_silence[t] > 0 and int(ts[i]) - int(ref_ts[t]) >= max_silence[t]:
            keep = True
        if keep:
            ref_value[t] = v
            ref_ts[t] = ts[i]
            ref_quality[t] = q
            has_ref[t] = 1
        out[i] = keep
    return out
