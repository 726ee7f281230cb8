import numpy as np
import numpy.typing as npt

# The compiled kernels (ext/_kernels.pyx). Their plain-Python twins in _reference.py have the same
# signatures and are the specification. Per-tag arrays are updated in place. Both raise IndexError
# for a tag id beyond the per-tag arrays and ValueError when the arguments' shapes do not fit
# together (columns of unequal length, a per-tag array shorter than state/enabled/slot).

I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
U32 = npt.NDArray[np.uint32]
U8 = npt.NDArray[np.uint8]
Record = npt.NDArray[np.void]
Columns = tuple[I32, I64, F64, U32, I32 | None]  # tags, ts, values, quality, src row (-1: computed)

def deadband(
    tags: I32, ts: I64, values: F64, quality: U32, params: Record, state: Record, want_src: bool
) -> Columns: ...
def swinging_door(tags: I32, ts: I64, values: F64, quality: U32, state: Record, want_src: bool) -> Columns: ...
def moving_average(
    tags: I32,
    ts: I64,
    values: F64,
    quality: U32,
    slot: I32,
    count: I64,
    window: I64,
    base: I64,
    buf_v: F64,
    buf_t: I64,
    head: I64,
    size: I64,
    total: F64,
    comp: F64,
    pushes: I64,
) -> F64: ...
def ewma(tags: I32, ts: I64, values: F64, quality: U32, enabled: U8, tau: I64, has_y: U8, y: F64, y_ts: I64) -> F64: ...
def rate(
    tags: I32,
    ts: I64,
    values: F64,
    quality: U32,
    enabled: U8,
    has_p: U8,
    p_value: F64,
    p_ts: I64,
    p_quality: U32,
    want_src: bool,
) -> Columns: ...
def counter_delta(
    tags: I32,
    ts: I64,
    values: F64,
    quality: U32,
    enabled: U8,
    modulus: F64,
    max_increase: F64,
    has_p: U8,
    p_value: F64,
    p_quality: U32,
    want_src: bool,
) -> Columns: ...
def window(
    tags: I32,
    ts: I64,
    values: F64,
    quality: U32,
    enabled: U8,
    width: I64,
    offset: I64,
    agg: U8,
    has_w: U8,
    w_start: I64,
    n_used: I64,
    n_bad: I64,
    last_bad: U32,
    not_good: U8,
    first: F64,
    last: F64,
    vmin: F64,
    vmax: F64,
    shift: F64,
    s1: F64,
    s2: F64,
    want_src: bool,
) -> Columns: ...
def spike(
    tags: I32,
    ts: I64,
    values: F64,
    quality: U32,
    slot: I32,
    count: I64,
    k_mad: F64,
    floor: F64,
    buf_v: F64,
    buf_sorted: F64,
    head: I64,
    size: I64,
) -> U32: ...
def range_check(
    tags: I32, ts: I64, values: F64, quality: U32, enabled: U8, low: F64, high: F64, mode: U8
) -> tuple[F64 | None, U32]: ...
