"""Kernels: compiled equals reference, batch-split invariance, quality rules; the pipeline."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeos import Batch, Quality
from edgeos.adapter import FilterSpec, TagConfig
from edgeos.filters import kernels
from edgeos.filters.builtin import DeadbandFilter
from edgeos.model import TagMeta
from edgeos.pipeline import Pipeline

N_TAGS = 4
values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, 0.5, 1.0, 1.0000001, -1e300, 1e300]),
)
qualities = st.sampled_from([Quality.GOOD, Quality.GOOD, Quality.GOOD, Quality.UNCERTAIN, Quality.BAD_COMM_FAILURE])


@st.composite
def streams(draw):
    n = draw(st.integers(0, 120))
    tags = draw(st.lists(st.integers(0, N_TAGS - 1), min_size=n, max_size=n))
    steps = draw(st.lists(st.sampled_from([0, 0, 1, 7, 10**9, 10**12]), min_size=n, max_size=n))
    ts = np.cumsum(np.array(steps, np.int64)) + 1_700_000_000 * 10**9
    vals = draw(st.lists(values, min_size=n, max_size=n))
    qs = draw(st.lists(qualities, min_size=n, max_size=n))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    return Batch("d", np.array(tags, np.int32), ts, np.array(vals, np.float64), np.array(qs, np.uint32)), cuts


PARAMS = {
    0: {"abs": 0.5, "max_silence": None},
    1: {"abs": 0.0, "max_silence": 10**9},
    2: {"abs": 1e299, "max_silence": 5},
}


def _run(batch: Batch, cuts: list[int], impl: str) -> Batch:
    f = DeadbandFilter(N_TAGS, PARAMS, impl=impl)
    bounds = [0, *cuts, len(batch)]
    parts = [f.apply(batch.take(slice(a, b))) for a, b in zip(bounds, bounds[1:], strict=False) if b >= a]
    return Batch.concat("d", parts)


def _same(a: Batch, b: Batch) -> None:
    np.testing.assert_array_equal(a.tags, b.tags)
    np.testing.assert_array_equal(a.ts, b.ts)
    np.testing.assert_array_equal(a.values, b.values)  # NaN == NaN here
    np.testing.assert_array_equal(a.quality, b.quality)


@settings(max_examples=300, deadline=None)
@given(streams())
def test_deadband_compiled_equals_reference(case):
    batch, cuts = case
    _same(_run(batch, [], "compiled"), _run(batch, [], "reference"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(streams())
def test_deadband_split_invariance(kernel_impl, case):  # kernel_impl is a constant string
    batch, cuts = case
    _same(_run(batch, [], kernel_impl), _run(batch, cuts, kernel_impl))


def test_deadband_rules_by_hand(kernel_impl):
    G, B = Quality.GOOD, Quality.BAD_COMM_FAILURE
    t = np.arange(8, dtype=np.int64) * 10**9
    b = Batch(
        "d",
        np.zeros(8, np.int32),
        t,
        np.array([10.0, 10.2, 10.6, 10.6, np.nan, 10.7, 10.7, np.nan]),
        np.array([G, G, G, B, G, G, G, G], np.uint32),
    )
    f = DeadbandFilter(1, {0: {"abs": 0.5, "max_silence": None}}, impl=kernel_impl)
    out = f.apply(b)
    # 10.0 first; 10.2 inside the band; 10.6 exceeds it; Bad passes; NaN after Bad is reported;
    # 10.7 is a change from NaN; the repeat is suppressed; NaN again is a change.
    assert (out.ts // 10**9).tolist() == [0, 2, 3, 4, 5, 7]


def test_deadband_heartbeat(kernel_impl):
    n = 10
    b = Batch("d", np.zeros(n, np.int32), np.arange(n, dtype=np.int64) * 10**9, np.ones(n), np.zeros(n, np.uint32))
    f = DeadbandFilter(1, {0: {"abs": 1.0, "max_silence": 3 * 10**9}}, impl=kernel_impl)
    assert (f.apply(b).ts // 10**9).tolist() == [0, 3, 6, 9]


def test_deadband_built_in_code_rejects_a_negative_max_silence(kernel_impl):
    """The config checks max_silence >= 1 ms; code that builds the filter directly gets a clear
    error instead of a deadline that overflows int64 near its low end."""
    with pytest.raises(ValueError, match=r"tag 0: max_silence must not be negative \(found -5 ns\)"):
        DeadbandFilter(1, {0: {"abs": 1.0, "max_silence": -5}}, impl=kernel_impl)


KERNEL_NAMES = ("deadband", "swinging_door", "moving_average", "ewma", "rate", "counter_delta", "window", "spike")


def test_reference_module_is_the_fallback_with_identical_signatures():
    ref, comp = kernels("reference"), kernels("compiled")
    assert ref is not comp
    for name in (*KERNEL_NAMES, "range_check"):
        params = list(inspect.signature(getattr(comp, name)).parameters)
        assert params == list(inspect.signature(getattr(ref, name)).parameters), name
        assert params[:4] == ["tags", "ts", "values", "quality"]


def test_record_dtypes_match_the_compiled_structs():
    from edgeos.filters import _reference

    batch = Batch("d", np.zeros(1, np.int32), np.zeros(1, np.int64), np.zeros(1), np.zeros(1, np.uint32))
    comp = kernels("compiled")
    params, state = np.zeros(1, _reference.DEADBAND_PARAMS), np.zeros(1, _reference.DEADBAND_STATE)
    comp.deadband(*_cols(batch), params, state, False)  # the buffer check accepts them
    comp.swinging_door(*_cols(batch), np.zeros(1, _reference.SWINGING_DOOR_STATE), False)
    wrong = np.zeros(1, [("x", "f8")])
    with pytest.raises(ValueError, match="dtype"):
        comp.deadband(*_cols(batch), params, wrong, False)


def _cols(b: Batch):
    return b.tags, b.ts, b.values, b.quality


def _tag(i, filters=()):
    return TagConfig(TagMeta(i, "d", f"t{i}"), 10**9, tuple(filters))


def test_pipeline_applies_each_tags_chain_and_passes_the_rest(kernel_impl):
    tags = [
        _tag(0),
        _tag(1, [FilterSpec("deadband", {"abs": 5.0, "max_silence": None})]),
        _tag(2, [FilterSpec("scale", {"factor": 10.0}), FilterSpec("deadband", {"abs": 5.0, "max_silence": None})]),
    ]
    p = Pipeline(tags, impl=kernel_impl)
    n = 30
    b = Batch(
        "d",
        np.tile(np.arange(3, dtype=np.int32), 10),
        np.arange(n, dtype=np.int64),
        np.repeat(np.arange(10.0), 3),
        np.zeros(n, np.uint32),
    )
    out = p.apply(b)
    per = {t: out.values[out.tags == t].tolist() for t in range(3)}
    assert per[0] == list(np.arange(10.0))  # no filter
    assert per[1] == [0.0, 6.0]  # |Δ| > 5
    assert per[2] == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]  # scaled first (third-party filter)


def test_pipeline_flush_sends_held_points_through_the_later_steps_per_device(kernel_impl):
    S = 10**9
    door = FilterSpec("swinging_door", {"deviation": 100.0})
    count = FilterSpec("window", {"width": 3600 * S, "agg": "count"})
    tags = [
        TagConfig(TagMeta(0, "a", "x"), S, (door, count)),
        TagConfig(TagMeta(1, "b", "y"), S, (door, count)),
        TagConfig(TagMeta(2, "b", "z"), S, (door,)),
        TagConfig(TagMeta(3, "b", "plain"), S),
    ]
    p = Pipeline(tags, impl=kernel_impl)
    for dev, ids, kept in (("a", [0], []), ("b", [1, 2, 3], [2, 3] + [3] * 9)):
        n = 10 * len(ids)
        ts = np.repeat(np.arange(10) * S, len(ids))
        out = p.apply(Batch(dev, np.tile(np.array(ids, np.int32), 10), ts, np.ones(n), np.zeros(n, np.uint32)))
        assert sorted(out.tags.tolist()) == kept  # x, y: the first point sits in an open window
    held = {b.device: b for b in p.flush()}
    assert sorted(held) == ["a", "b"]
    # x and y: the first point and the held last one reach the window, which the flush closes
    assert held["a"].tags.tolist() == [0] and held["a"].values.tolist() == [2.0]
    assert held["a"].quality.tolist() == [Quality.UNCERTAIN_SUB_NORMAL]
    b = held["b"]
    assert sorted(zip(b.tags.tolist(), b.ts.tolist(), b.values.tolist(), strict=True)) == [(1, 0, 2.0), (2, 9 * S, 1.0)]
    assert p.flush() == []  # nothing is held twice


def test_pipeline_flush_failing_in_one_chain_keeps_the_others(kernel_impl):
    S = 10**9
    tags = [
        TagConfig(TagMeta(0, "a", "x"), S, (FilterSpec("swinging_door", {"deviation": 100.0}),)),
        TagConfig(
            TagMeta(1, "a", "y"),
            S,
            (FilterSpec("swinging_door", {"deviation": 100.0}), FilterSpec("range", {"low": 0.0})),
        ),
    ]
    p = Pipeline(tags, impl=kernel_impl)
    p.apply(Batch("a", np.array([0, 1, 0, 1], np.int32), np.array([0, 0, S, S]), np.ones(4), np.zeros(4, np.uint32)))

    def broken():
        raise RuntimeError("plugin bug")

    p.chains[1][0].flush = broken  # x's chain
    errors: list[tuple[str, Exception]] = []
    (held,) = p.flush(on_error=lambda name, e: errors.append((name, e)))
    assert [(name, str(e)) for name, e in errors] == [("swinging_door", "plugin bug")]
    assert (held.device, held.tags.tolist(), held.ts.tolist()) == ("a", [1], [S])  # y's held point
