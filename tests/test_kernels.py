"""Every kernel: compiled equals reference, batch-split invariance, the swinging-door guarantee."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeos import Batch, Quality
from edgeos.filters import builtin

N_TAGS = 5  # tag 4 is never configured: it must pass through every filter unchanged
S = 10**9

KERNELS = {
    "deadband": {
        0: {"abs": 0.5},
        1: {"max_silence": S},
        2: {"percent": 10.0, "percent_of": "value", "max_silence": 5},
        3: {"percent": 1.0, "span": 100.0},
    },
    "swinging_door": {
        0: {"deviation": 0.5},
        1: {"deviation": 0.0, "max_interval": S},
        2: {"deviation": 1e299},
        3: {"deviation": 1.0, "min_interval": 7, "max_interval": 10**12},
    },
    "moving_average": {
        0: {"count": 3},
        1: {"window": S, "max_samples": 4},
        2: {"count": 1},
        3: {"window": 10, "max_samples": 50},
    },
    "ewma": {0: {"time_constant": S}, 1: {"time_constant": 1}, 2: {"time_constant": 10**12}, 3: {"time_constant": 7}},
    "rate": {0: {}, 1: {}, 2: {}, 3: {}},
    "counter_delta": {0: {"bits": 16}, 1: {"bits": 32, "max_increase": 10.0}, 2: {"bits": 64}, 3: {"bits": 16}},
    "window": {
        0: {"width": 10, "agg": "mean"},
        1: {"width": S, "agg": "stddev"},
        2: {"width": 7, "offset": 3, "agg": "min"},
        3: {"width": 2 * S, "agg": "count"},
    },
    "window_other_aggs": {
        0: {"width": 10, "agg": "max"},
        1: {"width": S, "agg": "first"},
        2: {"width": 7, "offset": 3, "agg": "last"},
        3: {"width": 10**12, "agg": "mean"},
    },
    "spike": {
        0: {"window": 3},
        1: {"method": "median", "window": 4, "deviation": 0.5},
        2: {"window": 5, "threshold": 2.0, "deviation": 0.1},
        3: {"window": 8},
    },
    "range": {
        0: {"low": 0.0, "high": 1.0},
        1: {"low": -1e300, "mode": "uncertain"},
        2: {"high": 0.5, "mode": "clamp"},
        3: {"low": 0.0, "high": 1.0, "mode": "clamp"},
    },
}


def make(kind: str, impl: str):
    plugin = getattr(builtin, kind.removesuffix("_other_aggs").replace("range", "range_"))
    return plugin.create(N_TAGS, KERNELS[kind], impl=impl)


values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.0000001, -1e300, 1e300, 65535.0, 65536.0, 2.0**32 - 1, 2.0**64]),
    st.integers(0, 20).map(float),
)
qualities = st.sampled_from(
    [Quality.GOOD, Quality.GOOD, Quality.GOOD, Quality.GOOD, Quality.UNCERTAIN, Quality.BAD_COMM_FAILURE]
)


@st.composite
def streams(draw):
    n = draw(st.integers(0, 120))
    tags = draw(st.lists(st.integers(0, N_TAGS - 1), min_size=n, max_size=n))
    steps = draw(st.lists(st.sampled_from([0, 0, 1, 3, 7, 10**9, 10**12]), min_size=n, max_size=n))
    ts = np.cumsum(np.array(steps, np.int64)) + 1_700_000_000 * S - draw(st.sampled_from([0, 10**18]))
    vals = draw(st.lists(values, min_size=n, max_size=n))
    qs = draw(st.lists(qualities, min_size=n, max_size=n))
    text = None
    if draw(st.booleans()):
        text = np.array([f"s{i}" if t == 4 else None for i, t in enumerate(tags)], dtype=object)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    batch = Batch("d", np.array(tags, np.int32), ts, np.array(vals, np.float64), np.array(qs, np.uint32), text)
    return batch, cuts


def run(kind: str, impl: str, batch: Batch, cuts: list[int]):
    f = make(kind, impl)
    bounds = [0, *cuts, len(batch)]
    parts = [f.apply(batch.take(slice(a, b))) for a, b in zip(bounds, bounds[1:], strict=False)]
    return Batch.concat("d", parts), f


def same(a: Batch, b: Batch) -> None:
    np.testing.assert_array_equal(a.tags, b.tags)
    np.testing.assert_array_equal(a.ts, b.ts)
    np.testing.assert_array_equal(a.values, b.values)  # NaN == NaN here
    np.testing.assert_array_equal(a.quality, b.quality)
    if a.text is None or b.text is None:
        assert all(x is None for x in (a.text if a.text is not None else b.text if b.text is not None else []))
    else:
        assert a.text.tolist() == b.text.tolist()


def same_state(f, g) -> None:
    for name, value in vars(f).items():
        if not isinstance(value, np.ndarray):
            continue
        for field in value.dtype.names or [None]:  # per field, so NaN equals NaN
            a, b = (value, getattr(g, name)) if field is None else (value[field], getattr(g, name)[field])
            np.testing.assert_array_equal(a, b, err_msg=f"{name}.{field}")


PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("kind", list(KERNELS))
@PROPS
@given(case=streams())
def test_compiled_equals_reference(kind, case):
    batch, cuts = case
    out_c, f_c = run(kind, "compiled", batch, cuts)
    out_r, f_r = run(kind, "reference", batch, cuts)
    same(out_c, out_r)
    same_state(f_c, f_r)


@pytest.mark.parametrize("kind", list(KERNELS))
@PROPS
@given(case=streams())
def test_batch_split_invariance(kernel_impl, kind, case):
    batch, cuts = case
    whole, f_whole = run(kind, kernel_impl, batch, [])
    split, f_split = run(kind, kernel_impl, batch, cuts)
    same(whole, split)
    same_state(f_whole, f_split)
    # the unconfigured tag passes through untouched, in order
    np.testing.assert_array_equal(whole.values[whole.tags == 4], batch.values[batch.tags == 4])
    np.testing.assert_array_equal(whole.ts[whole.tags == 4], batch.ts[batch.tags == 4])


@pytest.mark.parametrize("kind", list(KERNELS))
def test_out_of_range_tag_id_raises_in_both(kernel_impl, kind):
    b = Batch("d", np.array([0, N_TAGS], np.int32), np.array([1, 2]), np.ones(2), np.zeros(2, np.uint32))
    with pytest.raises(IndexError):
        make(kind, kernel_impl).apply(b)


# --------------------------------------------------------------------------------------------
# shapes: checked at every kernel's entry, ValueError in both implementations


KERNEL_OF = {"range": "range_check", "window_other_aggs": "window"}
BOUNDS = {"state", "enabled", "slot"}  # the array that bounds tag ids: shorter is not a mismatch


def kernel_args(kind: str, impl: str):
    """(kernel function, [(name, value)]) for a direct call with a fresh filter's own arrays."""
    f = make(kind, impl)
    fn = getattr(f._k, KERNEL_OF.get(kind, kind))
    names = list(inspect.signature(fn).parameters)
    n = 2 * N_TAGS
    cols = {
        "tags": np.tile(np.arange(N_TAGS, dtype=np.int32), 2),
        "ts": np.repeat(np.array([0, 3 * S], np.int64), N_TAGS),
        "values": np.ones(n),
        "quality": np.zeros(n, np.uint32),
    }
    attrs = {"params": "params_rec"}
    args = [(a, cols[a] if a in cols else False if a == "want_src" else getattr(f, attrs.get(a, a))) for a in names]
    return fn, args


def shortened(kind: str):
    """Every argument that, one entry too short (or a column one entry too long), is a mismatch."""
    _, args = kernel_args(kind, "reference")
    for name, a in args:
        if not isinstance(a, np.ndarray) or name in BOUNDS or name == "tags":
            continue
        yield name, lambda a: a[:-1]
        if a.ndim == 2:
            yield f"{name} columns", lambda a: np.ascontiguousarray(a[:, :-1])
        if name in ("ts", "values", "quality"):
            yield f"{name} (longer)", lambda a: np.concatenate([a, a[:1]])


@pytest.mark.parametrize("kind", [k for k in KERNELS if k != "window_other_aggs"])
def test_mismatched_lengths_raise_value_error_in_both(kernel_impl, kind):
    cases = list(shortened(kind))
    assert len(cases) >= 3
    for label, cut in cases:
        fn, args = kernel_args(kind, kernel_impl)
        name = label.split()[0]
        args = [(a, cut(v) if a == name else v) for a, v in args]
        with pytest.raises(ValueError, match=rf"^{KERNEL_OF.get(kind, kind)}: ") as e:
            fn(*[v for _, v in args])
        assert name in str(e.value) or "buf_v" in str(e.value) or "ring buffers" in str(e.value), (label, e.value)
    # the untouched arguments are accepted, so every failure above is the one mismatch
    fn, args = kernel_args(kind, kernel_impl)
    fn(*[v for _, v in args])


@pytest.mark.parametrize("kind", [k for k in KERNELS if k != "window_other_aggs"])
def test_shape_errors_are_identical_in_both(kind):
    for label, cut in shortened(kind):
        name = label.split()[0]
        messages = []
        for impl in ("compiled", "reference"):
            fn, args = kernel_args(kind, impl)
            with pytest.raises(ValueError) as e:
                fn(*[cut(v) if a == name else v for a, v in args])
            messages.append(str(e.value))
        assert messages[0] == messages[1], label


def test_rate_with_short_columns_raises_instead_of_reading_past_them(kernel_impl):
    """The reviewer's repro: 100,000 tag ids against one-row ts, values and quality columns."""
    fn, args = kernel_args("rate", kernel_impl)
    args = dict(args)
    args.update(tags=np.zeros(100_000, np.int32), ts=np.zeros(1, np.int64), values=np.zeros(1))
    args.update(quality=np.zeros(1, np.uint32))
    with pytest.raises(ValueError, match=r"rate: columns of unequal length \(tags 100000, ts 1, values 1, quality 1\)"):
        fn(*args.values())


@pytest.mark.parametrize(
    ("kind", "array", "value", "message"),
    [
        ("moving_average", "count", 0, "outside its ring buffers"),
        ("moving_average", "count", 51, "outside its ring buffers"),  # the buffers are 50 wide
        ("moving_average", "slot", 4, "outside its ring buffers"),  # 4 slots: 0..3
        ("spike", "count", 0, "outside its ring buffers"),
        ("spike", "count", 9, "outside its ring buffers"),  # 8 wide
        ("spike", "slot", 4, "outside its ring buffers"),
        ("window", "width", 0, "has width 0, expected > 0"),  # the compiled floor division would trap
    ],
)
def test_parameters_pointing_outside_the_buffers_raise_value_error(kernel_impl, kind, array, value, message):
    fn, args = kernel_args(kind, kernel_impl)
    args = dict(args)
    args[array][3] = value
    with pytest.raises(ValueError, match=message):
        fn(*args.values())


# --------------------------------------------------------------------------------------------
# swinging door: every original point lies within the deviation of the archived trend


@st.composite
def smooth_streams(draw):
    n_tags = draw(st.integers(1, 3))
    n = draw(st.integers(1, 200))
    tags = draw(st.lists(st.integers(0, n_tags - 1), min_size=n, max_size=n))
    steps = draw(st.lists(st.sampled_from([0, 1, 5, 1000, S]), min_size=n, max_size=n))
    ts = np.cumsum(np.array(steps, np.int64)) + 1_700_000_000 * S
    kind = draw(st.sampled_from(["walk", "wild"]))
    if kind == "walk":
        vals = np.cumsum(draw(st.lists(st.floats(-3, 3), min_size=n, max_size=n)))
    else:
        vals = np.array(draw(st.lists(st.floats(-1e9, 1e9), min_size=n, max_size=n)))
    dev = draw(st.sampled_from([0.0, 0.01, 0.5, 2.0, 1e6]))
    max_interval = draw(st.sampled_from([None, 3, 10 * S]))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    batch = Batch("d", np.array(tags, np.int32), ts, vals, np.zeros(n, np.uint32))
    return batch, cuts, dev, max_interval


def within_trend(t: int, v: float, arch_t: np.ndarray, arch_v: np.ndarray, dev: float) -> bool:
    tol = dev + 1e-9 * max(1.0, abs(v), *np.abs(arch_v).tolist())
    for j in range(len(arch_t) - 1):
        ta, tb, va, vb = int(arch_t[j]), int(arch_t[j + 1]), float(arch_v[j]), float(arch_v[j + 1])
        if not ta <= t <= tb:
            continue
        if t == ta and abs(v - va) <= tol or t == tb and abs(v - vb) <= tol:
            return True
        if ta == tb:
            if min(va, vb) - tol <= v <= max(va, vb) + tol:
                return True
        elif abs(v - (va + (vb - va) * ((t - ta) / (tb - ta)))) <= tol:
            return True
    return len(arch_t) == 1 and t == arch_t[0] and abs(v - arch_v[0]) <= tol


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=smooth_streams())
def test_swinging_door_trend_within_deviation(kernel_impl, case):
    batch, cuts, dev, max_interval = case
    f = builtin.swinging_door.create(
        3, {t: {"deviation": dev, "max_interval": max_interval} for t in range(3)}, kernel_impl
    )
    bounds = [0, *cuts, len(batch)]
    out = Batch.concat("d", [f.apply(batch.take(slice(a, b))) for a, b in zip(bounds, bounds[1:], strict=False)])
    for tag in np.unique(batch.tags):
        arch_t, arch_v = out.ts[out.tags == tag], out.values[out.tags == tag]
        orig_t, orig_v = batch.ts[batch.tags == tag], batch.values[batch.tags == tag]
        assert arch_t[0] == orig_t[0] and arch_v[0] == orig_v[0]  # the first point is archived
        assert np.all(np.diff(arch_t) >= 0)
        if max_interval:  # no gap longer than max_interval plus one sampling step
            steps = np.diff(orig_t)
            assert np.all(np.diff(arch_t) <= max_interval + (steps.max() if len(steps) else 0))
        for t, v in zip(orig_t.tolist(), orig_v.tolist(), strict=True):
            if t > arch_t[-1]:
                break  # held, not yet archived
            assert within_trend(t, v, arch_t, arch_v, dev), (t, v)
    if dev == 1e6 and len(batch) > 50 and np.ptp(batch.values) < 1e5:
        assert len(out) < len(batch)  # and it does compress


def test_swinging_door_compresses_a_line_to_its_ends_and_corners(kernel_impl):
    t = np.arange(21, dtype=np.int64) * S
    v = np.concatenate([np.arange(11.0), 10 - np.arange(1.0, 11.0)])  # up to 10, back down to 0
    f = builtin.swinging_door.create(1, {0: {"deviation": 0.1}}, kernel_impl)
    out = f.apply(Batch("d", np.zeros(21, np.int32), t, v, np.zeros(21, np.uint32)))
    assert (out.ts // S).tolist() == [0, 10]  # 20 is held until the next sample decides
    out2 = f.apply(Batch("d", np.zeros(1, np.int32), np.array([21 * S]), np.array([5.0]), np.zeros(1, np.uint32)))
    assert (out2.ts // S).tolist() == [20]
    assert out2.values.tolist() == [0.0]


def test_swinging_door_bad_flushes_the_held_point_and_the_next_good_is_archived(kernel_impl):
    G, B = Quality.GOOD, Quality.BAD_COMM_FAILURE
    t = np.arange(6, dtype=np.int64) * S
    b = Batch(
        "d", np.zeros(6, np.int32), t, np.array([0.0, 1, 2, np.nan, 2, 2]), np.array([G, G, G, B, G, G], np.uint32)
    )
    out = builtin.swinging_door.create(1, {0: {"deviation": 0.5}}, kernel_impl).apply(b)
    assert (out.ts // S).tolist() == [0, 2, 3, 4]
    assert out.quality.tolist() == [G, G, B, G]


# --------------------------------------------------------------------------------------------
# the same rules for every kernel: Bad passes through untouched


@pytest.mark.parametrize("kind", [k for k in KERNELS if not k.startswith("window")])  # windows: see test_kernels_cases
def test_bad_samples_pass_through_unchanged(kernel_impl, kind):
    n = 12
    q = np.zeros(n, np.uint32)
    q[5] = Quality.BAD_TIMEOUT
    vals = np.arange(n, dtype=np.float64) * 3.0
    vals[5] = 123.0
    b = Batch("d", np.zeros(n, np.int32), np.arange(n, dtype=np.int64) * S, vals, q)
    out = make(kind, kernel_impl).apply(b)
    bad = out.quality == Quality.BAD_TIMEOUT
    assert bad.sum() == 1 and out.values[bad][0] == 123.0 and out.ts[bad][0] == 5 * S
    if kind in ("deadband", "swinging_door", "rate", "counter_delta"):  # a Good sample after Bad is reported
        assert 6 * S in out.ts.tolist()


@pytest.mark.parametrize(
    "pattern",
    ["interleaved", "period_250", "runs", "one_tag", "shared_low_bits"],
)
def test_deadband_blocks_equal_reference_on_long_streams(pattern):
    """The compiled deadband classifies blocks of rows against the state at the block's start
    and cuts a block short where a tag kept in it comes again. Long streams exercise that:
    many tags (no cuts), fewer tags than a block holds (cuts at the tags' period), runs of one
    tag (a cut at every kept row), and tag ids 1024 apart (they share a slot of the block's
    table), with a bad tag id at the end."""
    rng = np.random.default_rng(11)
    n, n_tags = 6000, 3000
    ids = {
        "interleaved": np.tile(np.arange(700, dtype=np.int32), n // 700 + 1)[:n],
        "period_250": np.tile(np.arange(250, dtype=np.int32), n // 250),  # blocks cut to the period
        "runs": np.repeat(rng.integers(0, 50, n // 37 + 1).astype(np.int32), 37)[:n],
        "one_tag": np.full(n, 7, np.int32),
        "shared_low_bits": rng.choice(np.array([5, 1029, 2053, 6], np.int32), n),
    }[pattern]
    ts = 1_700_000_000 * S + np.arange(n, dtype=np.int64) * (S // 1000)
    steps, vals = rng.normal(0, 0.3, n), np.empty(n)
    for t in np.unique(ids):  # a random walk per tag
        vals[ids == t] = np.cumsum(steps[ids == t])
    vals[rng.random(n) < 0.01] = np.nan
    qs = np.where(rng.random(n) < 0.01, Quality.BAD_COMM_FAILURE, Quality.GOOD).astype(np.uint32)
    params = {int(t): {"abs": 0.5, "max_silence": 2 * S} for t in np.unique(ids)}
    batch = Batch("d", ids, ts, vals, qs)
    out = {}
    for impl in ("compiled", "reference"):
        f = builtin.deadband.create(n_tags, params, impl=impl)
        out[impl] = (Batch.concat("d", [f.apply(batch.take(slice(a, a + 2500))) for a in range(0, n, 2500)]), f)
    same(out["compiled"][0], out["reference"][0])
    same_state(out["compiled"][1], out["reference"][1])
    assert 0.02 < len(out["compiled"][0]) / n < 0.9  # the filter did filter: a meaningful comparison
    bad = Batch("d", np.append(ids[:900], n_tags).astype(np.int32), ts[:901], vals[:901], qs[:901])
    for impl in ("compiled", "reference"):
        f = builtin.deadband.create(n_tags, params, impl=impl)
        with pytest.raises(IndexError, match=f"tag id {n_tags} outside"):
            f.apply(bad)
        out[impl] = f
    same_state(out["compiled"], out["reference"])  # both applied the rows before the bad one


@pytest.mark.parametrize("kind", list(KERNELS))
def test_held_results_survive_later_calls(kind):
    """Compiled kernels reuse their last output columns once nobody holds them: a result still
    held must never be overwritten, one dropped may be reused, and both must stay correct."""
    rng = np.random.default_rng(3)
    n = 3000
    tags = np.tile(np.arange(N_TAGS, dtype=np.int32), n // N_TAGS)
    ts = np.repeat(np.arange(n // N_TAGS, dtype=np.int64) * 3 * S // 10, N_TAGS)
    batches = [
        Batch("d", tags, ts + k * 10**12, np.cumsum(rng.normal(0, 1, n)), np.zeros(n, np.uint32)) for k in range(3)
    ]
    compiled, reference = make(kind, "compiled"), make(kind, "reference")
    held = compiled.apply(batches[0])
    snapshot = Batch("d", held.tags.copy(), held.ts.copy(), held.values.copy(), held.quality.copy())
    same(held, reference.apply(batches[0]))
    for b in batches[1:]:
        same(compiled.apply(b), reference.apply(b))  # each dropped at once: free for reuse
    same(held, snapshot)
