"""Kernels by hand: counter rollover and resets, rates, windows, smoothing, spikes, limits, config."""

from __future__ import annotations

import math
import textwrap
import threading

import numpy as np
import pytest

from edgeos import Batch, Quality
from edgeos.config import load_config
from edgeos.errors import ConfigError
from edgeos.filters import builtin
from edgeos.plugins import FILTERS, names

S = 10**9
G, U, B = int(Quality.GOOD), int(Quality.UNCERTAIN), int(Quality.BAD_COMM_FAILURE)


def series(values, ts=None, quality=None, tag=0) -> Batch:
    n = len(values)
    ts = np.arange(n, dtype=np.int64) * S if ts is None else np.asarray(ts, np.int64)
    q = np.zeros(n, np.uint32) if quality is None else np.asarray(quality, np.uint32)
    return Batch("d", np.full(n, tag, np.int32), ts, np.asarray(values, np.float64), q)


def test_all_builtins_are_registered_entry_points():
    expected = {"deadband", "swinging_door", "moving_average", "ewma", "rate", "counter_delta", "window", "spike"}
    assert expected | {"range"} <= set(names(FILTERS))


# --------------------------------------------------------------------------------------------
# counter_delta


@pytest.mark.parametrize(
    ("bits", "values", "deltas"),
    [
        (16, [65530, 65535, 3, 10], [5, 4, 7]),  # rollover across 2**16
        (16, [1000, 1010, 5, 6], [10, 5, 1]),  # reset: the wrap would imply 64531 counts
        (32, [2**32 - 6, 10], [16]),
        (64, [2.0**64 - 4096, 5], [4101]),
        (16, [7, 7, 7], [0, 0]),
        (16, [32766, 32767, -32768, -32767], [1, 1, 1]),  # an INT16 register counts on past 32767
        (16, [-2, -1, 0, 1], [1, 1, 1]),  # -1 is 65535 read as signed
        (32, [2**31 - 1, -(2**31)], [1]),
    ],
)
def test_counter_rollover_and_reset(kernel_impl, bits, values, deltas):
    f = builtin.counter_delta.create(1, {0: {"bits": bits}}, kernel_impl)
    out = f.apply(series(values))
    assert out.values.tolist() == deltas
    assert (out.ts // S).tolist() == list(range(1, len(values)))  # stamped at the later sample


def test_counter_max_increase_tells_rollover_from_reset(kernel_impl):
    f = builtin.counter_delta.create(2, {0: {"bits": 16, "max_increase": 10.0}, 1: {"bits": 16}}, kernel_impl)
    out = f.apply(series([65530, 3, 65520, 3]))
    assert out.values.tolist() == [9, 65520 - 3, 3]  # 65520 is an increase; 65520 -> 3 wraps 19 > 10: reset


def test_counter_keeps_counting_across_an_outage(kernel_impl):
    f = builtin.counter_delta.create(1, {0: {"bits": 32}}, kernel_impl)
    out = f.apply(series([100, np.nan, 130, 131], quality=[G, B, G, U]))
    assert out.quality.tolist() == [B, G, U]
    assert out.values[1:].tolist() == [30, 1]  # what was counted during the outage is not lost


def test_counter_values_outside_the_width_are_resets(kernel_impl):
    f = builtin.counter_delta.create(1, {0: {"bits": 16}}, kernel_impl)
    assert f.apply(series([70000, 5, -40000])).values.tolist() == [5, -40000]  # -40000: not an INT16


def test_counter_max_increase_must_fit_the_width():
    assert "more than a 16-bit counter" in builtin.counter_delta.validate({"bits": 16, "max_increase": 1e6})
    assert builtin.counter_delta.validate({"bits": 16, "max_increase": 65536.0}) is None


# --------------------------------------------------------------------------------------------
# rate


def test_rate_per_second_with_irregular_and_equal_timestamps(kernel_impl):
    f = builtin.rate.create(1, {0: {}}, kernel_impl)
    out = f.apply(
        series([0.0, 10.0, 11.0, 20.0, 26.0], ts=[0, 2 * S, 2 * S, 3 * S, S * 7 // 2], quality=[G, G, G, U, G])
    )
    # 0 -> 10 over 2 s; same instant: nothing, 11 replaces 10; 11 -> 20 in 1 s (Uncertain); 20 -> 26 in 0.5 s
    assert out.values.tolist() == [5.0, 9.0, 12.0]
    assert out.quality.tolist() == [G, U, U]  # the worse of the two samples


def test_rate_drops_text_of_computed_samples_and_keeps_passthrough_text(kernel_impl):
    b = Batch(
        "d",
        np.array([0, 1, 0, 1], np.int32),
        np.array([0, 0, S, S]),
        np.array([1.0, np.nan, 2.0, np.nan]),
        np.zeros(4, np.uint32),
        np.array([None, "on", None, "off"], dtype=object),
    )
    out = builtin.rate.create(2, {0: {}, 1: {}}, kernel_impl).apply(b)
    assert out.tags.tolist() == [1, 0, 1] and out.text.tolist() == ["on", None, "off"]


# --------------------------------------------------------------------------------------------
# window


def test_window_aggregates_at_window_start_when_the_next_window_begins(kernel_impl):
    ts = np.array([0.1, 0.5, 0.9, 1.2, 1.3, 2.5]) * S
    vals = [1.0, 4.0, 2.0, 5.0, 7.0, 9.0]
    expect = {
        "min": [1.0, 5.0],
        "max": [4.0, 7.0],
        "mean": [7 / 3, 6.0],
        "first": [1.0, 5.0],
        "last": [2.0, 7.0],
        "count": [3.0, 2.0],
        "stddev": [float(np.std([1.0, 4.0, 2.0])), 1.0],
    }
    for agg, want in expect.items():
        f = builtin.window.create(1, {0: {"width": S, "agg": agg}}, kernel_impl)
        out = f.apply(series(vals, ts=ts.astype(np.int64)))
        assert out.ts.tolist() == [0, S]
        np.testing.assert_allclose(out.values, want, rtol=1e-12)
        # the first window began before the first sample: it was seen only in part
        assert out.quality.tolist() == [Quality.UNCERTAIN_SUB_NORMAL, G]


def test_window_is_aligned_to_the_clock_and_offset(kernel_impl):
    f = builtin.window.create(1, {0: {"width": 60 * S, "offset": 30 * S, "agg": "count"}}, kernel_impl)
    out = f.apply(series([1, 2, 3, 4, 5], ts=np.array([100, 140, 150, 200, 215]) * S))
    assert (out.ts // S).tolist() == [90, 150]  # windows [90, 150), [150, 210); [210, 270) is still open
    assert out.values.tolist() == [2.0, 2.0]


def test_window_quality_and_all_bad_windows(kernel_impl):
    f = builtin.window.create(1, {0: {"width": S, "agg": "mean"}}, kernel_impl)
    q = [G, U, B, B, G, G, G]
    ts = np.array([0, 0.5, 1.1, 1.5, 2.1, 2.2, 3.0]) * S
    out = f.apply(series([1.0, 3.0, 0.0, 0.0, 4.0, np.nan, 0.0], ts=ts.astype(np.int64), quality=q))
    assert out.ts.tolist() == [0, S, 2 * S]
    assert out.values[0] == 2.0 and out.quality[0] == U  # an Uncertain sample makes the window Uncertain
    assert math.isnan(out.values[1]) and out.quality[1] == B  # only Bad: NaN with the Bad code
    assert out.values[2] == 4.0 and out.quality[2] == G  # NaN values are not aggregated


def test_window_is_uncertain_when_any_sample_was_not_good_even_a_nan_one(kernel_impl):
    f = builtin.window.create(1, {0: {"width": S, "agg": "mean"}}, kernel_impl)
    vals = [1.0, np.nan, 3.0, 2.0, np.nan, 6.0, 4.0, np.nan, 5.0]
    q = [G, U, G, G, G, G, B, U, G]
    ts = np.array([0.0, 0.5, 0.9, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]) * S
    out = f.apply(series(vals, ts=ts.astype(np.int64), quality=q))
    # [0, 1): an Uncertain NaN makes it Uncertain and stays out of the mean; [1, 2): a Good NaN
    # does not; [2, 3): a Bad sample does (its value is not aggregated); [3, 4): only an
    # Uncertain NaN, no usable and no Bad sample: nothing is emitted
    assert out.ts.tolist() == [0, S, 2 * S]
    assert out.values.tolist() == [2.0, 2.0, 6.0]
    assert out.quality.tolist() == [U, G, U]


def test_window_negative_timestamps_floor_to_the_window_start(kernel_impl):
    f = builtin.window.create(1, {0: {"width": 10, "agg": "first"}}, kernel_impl)
    out = f.apply(series([1.0, 2.0, 3.0], ts=[-15, -5, 5]))
    assert out.ts.tolist() == [-20, -10]


# --------------------------------------------------------------------------------------------
# moving average, ewma


def test_moving_average_by_count_and_by_time(kernel_impl):
    f = builtin.moving_average.create(2, {0: {"count": 3}, 1: {"window": 2 * S}}, kernel_impl)
    assert f.apply(series([1, 2, 3, 4, 5])).values.tolist() == [1.0, 1.5, 2.0, 3.0, 4.0]
    # window (t - 2 s, t]: at 3 s it holds the samples at 2 s and 3 s
    out = f.apply(series([1, 2, 3, 4, 10], ts=np.array([0, 1, 2, 3, 10]) * S, tag=1))
    assert out.values.tolist() == [1.0, 1.5, 2.5, 3.5, 10.0]


def test_moving_average_forgets_a_huge_value_exactly(kernel_impl):
    f = builtin.moving_average.create(1, {0: {"count": 2}}, kernel_impl)
    out = f.apply(series([1.0, 1e300, -1e300, 1.0, 2.0, 3.0, 4.0]))
    assert out.values[-1] == 3.5  # the running total was recomputed, no residue of the huge values
    # the review's cases: right after the huge value leaves, not only at the next recompute
    f = builtin.moving_average.create(1, {0: {"count": 3}}, kernel_impl)
    assert f.apply(series([1e300, 1, 2, 3, 4, 5])).values[3:].tolist() == [2.0, 3.0, 4.0]
    f = builtin.moving_average.create(1, {0: {"count": 2}}, kernel_impl)
    assert f.apply(series([1e16, 1, 1, 1])).values[2:].tolist() == [1.0, 1.0]


def test_moving_average_one_glitch_leaves_no_trace_in_a_time_window(kernel_impl):
    """One Good 1e20 in a 50-ish signal, 10 s window at 1 Hz, 1,000 samples between recomputes."""
    n = 300
    vals = 50.0 + np.sin(np.arange(n) / 10.0)
    vals[5] = 1e20
    f = builtin.moving_average.create(1, {0: {"window": 10 * S}}, kernel_impl)
    out = f.apply(series(vals, ts=np.arange(n) * S)).values
    exact = np.array([vals[max(0, i - 9) : i + 1].mean() for i in range(n)])
    np.testing.assert_allclose(out[15:], exact[15:], rtol=1e-13)


def test_moving_average_rings_are_as_long_as_each_tags_count(kernel_impl):
    """2,000 five-sample averages beside one 100,000-sample window: buffers for ~110,000 values."""
    params = {t: {"count": 5} for t in range(2000)} | {2000: {"window": S, "max_samples": 100_000}}
    f = builtin.moving_average.create(2001, params, kernel_impl)
    assert len(f.buf_v) == 2000 * 5 + 100_000
    out = f.apply(series([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], tag=1999))
    assert out.values.tolist() == [1.0, 1.5, 2.0, 2.5, 3.0, 4.0]
    out = f.apply(series([7.0, 8.0], ts=np.array([0, S // 2]), tag=2000))
    assert out.values.tolist() == [7.0, 7.5]


def test_ewma_is_exact_for_irregular_sampling(kernel_impl):
    tau = 10 * S
    fine = builtin.ewma.create(1, {0: {"time_constant": tau}}, kernel_impl)
    coarse = builtin.ewma.create(1, {0: {"time_constant": tau}}, kernel_impl)
    # a step from 0 to 1 at t=0 sampled every 1 s and, irregularly, at 0, 3, 4, 10 s
    a = fine.apply(series([0.0] + [1.0] * 10, ts=np.arange(-1, 10) * S))
    b = coarse.apply(series([0.0, 1.0, 1.0, 1.0, 1.0], ts=np.array([-1, 0, 3, 4, 9]) * S))
    assert a.values[0] == 0.0 and a.values[1] == pytest.approx(1 - math.exp(-0.1))
    assert b.values[-1] == pytest.approx(a.values[-1], rel=1e-12)  # same time, same average
    assert a.values[-1] == pytest.approx(1 - math.exp(-1.0), rel=1e-12)  # 63 % after one time constant


def test_ewma_sample_at_the_same_instant_has_no_weight(kernel_impl):
    f = builtin.ewma.create(1, {0: {"time_constant": S}}, kernel_impl)
    assert f.apply(series([1.0, 5.0], ts=[0, 0])).values.tolist() == [1.0, 1.0]


# --------------------------------------------------------------------------------------------
# spike


def test_spike_hampel_marks_the_outlier_not_the_trend(kernel_impl):
    f = builtin.spike.create(1, {0: {"window": 5}}, kernel_impl)
    vals = [10.0, 10.2, 9.9, 10.1, 10.0, 10.1, 55.0, 10.0, 9.8]
    out = f.apply(series(vals))
    flagged = out.quality == Quality.UNCERTAIN_SENSOR_NOT_ACCURATE
    assert flagged.tolist() == [False] * 6 + [True, False, False]
    assert out.values.tolist() == vals  # the value is kept, only marked


def test_spike_median_method_and_real_steps_are_accepted(kernel_impl):
    f = builtin.spike.create(1, {0: {"method": "median", "window": 3, "deviation": 1.0}}, kernel_impl)
    out = f.apply(series([0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0]))
    # the step is suspicious until most of the window has moved with it
    flagged = (out.quality == Quality.UNCERTAIN_SENSOR_NOT_ACCURATE).tolist()
    assert flagged == [False, False, False, True, True, False, False]


# --------------------------------------------------------------------------------------------
# range


def test_range_modes(kernel_impl):
    vals = [-1.0, 0.0, 0.5, 1.0, 2.0, np.nan, np.inf, 5.0, -5.0]
    q = [G, G, G, G, G, G, G, B, U]
    params = {0: {"low": 0.0, "high": 1.0, "mode": "bad"}}
    out = builtin.range_.create(1, params, kernel_impl).apply(series(vals, quality=q))
    OUT = int(Quality.BAD_OUT_OF_RANGE)
    assert out.quality.tolist() == [OUT, G, G, G, OUT, OUT, OUT, B, OUT]  # NaN lies within no limits
    params = {0: {"low": 0.0, "high": 1.0, "mode": "uncertain"}}
    out = builtin.range_.create(1, params, kernel_impl).apply(series(vals, quality=q))
    E = int(Quality.UNCERTAIN_ENGINEERING_UNITS_EXCEEDED)
    assert out.quality.tolist() == [E, G, G, G, E, E, E, B, E]
    params = {0: {"low": 0.0, "high": 1.0, "mode": "clamp"}}
    out = builtin.range_.create(1, params, kernel_impl).apply(series(vals, quality=q))
    C = int(Quality.GOOD_CLAMPED)
    assert out.quality.tolist() == [C, G, G, G, C, OUT, C, B, U]  # no limit replaces a NaN
    np.testing.assert_array_equal(out.values, [0.0, 0.0, 0.5, 1.0, 1.0, np.nan, 1.0, 5.0, 0.0])


# --------------------------------------------------------------------------------------------
# deadband modes


def test_deadband_percent_of_span_and_of_value(kernel_impl):
    span = builtin.deadband.create(1, {0: {"percent": 1.0, "span": 200.0}}, kernel_impl)  # band 2.0
    assert span.apply(series([100.0, 101.5, 102.5, 104.0])).values.tolist() == [100.0, 102.5]
    rel = builtin.deadband.create(1, {0: {"percent": 10.0, "percent_of": "value"}}, kernel_impl)
    assert rel.apply(series([100.0, 109.0, 111.0, 120.0, 123.0])).values.tolist() == [100.0, 111.0, 123.0]


# --------------------------------------------------------------------------------------------
# swinging door: max_interval as PI's CompMax, the stop's flush


def test_swinging_door_keeps_every_archived_gap_within_max_interval(kernel_impl):
    """Sampled every 7 s with max_interval 10 s: the held point is archived when the next
    sample would make the gap too long (gaps were 14 s when only new samples were archived)."""
    f = builtin.swinging_door.create(1, {0: {"deviation": 1.0, "max_interval": 10 * S}}, kernel_impl)
    out = f.apply(series(np.zeros(8), ts=np.arange(0, 50, 7) * S))
    assert (out.ts // S).tolist() == [0, 7, 14, 21, 28, 35, 42]
    # a sample exactly max_interval after A is archived itself
    f = builtin.swinging_door.create(1, {0: {"deviation": 1.0, "max_interval": 10 * S}}, kernel_impl)
    out = f.apply(series(np.zeros(5), ts=np.array([0, 5, 10, 15, 20]) * S))
    assert (out.ts // S).tolist() == [0, 10, 20]
    # samples further apart than max_interval: each is archived, nothing can be closer
    f = builtin.swinging_door.create(1, {0: {"deviation": 1.0, "max_interval": 10 * S}}, kernel_impl)
    assert (f.apply(series(np.zeros(3), ts=np.array([0, 30, 60]) * S)).ts // S).tolist() == [0, 30, 60]


def test_swinging_door_flush_archives_the_held_points_once(kernel_impl):
    f = builtin.swinging_door.create(3, {0: {"deviation": 0.5}, 1: {"deviation": 0.5}}, kernel_impl)
    b = Batch(
        "d", np.array([0, 1, 0, 0, 2], np.int32), np.arange(5) * S, np.array([1.0, 2, 1, 1, 3]), np.zeros(5, np.uint32)
    )
    assert f.apply(b).tags.tolist() == [0, 1, 2]  # first points, and tag 2 (not filtered) passes
    held = f.flush()
    assert (held.tags.tolist(), (held.ts // S).tolist(), held.values.tolist()) == ([0], [3], [1.0])
    assert len(f.flush()) == 0
    # the trend goes on from the flushed point: a later step is judged from it
    out = f.apply(series([1.0, 5.0], ts=np.array([4, 5]) * S))
    assert (out.ts // S).tolist() == [4]  # 5 s is held; from A = (3 s, 1.0) the step ends at 4 s


# --------------------------------------------------------------------------------------------
# configuration


def test_filter_params_are_checked_at_load_all_in_one_pass(tmp_path):
    cfg = tmp_path / "edgeos.toml"
    cfg.write_text(
        textwrap.dedent(
            """
            [gateway]
            id = "g"
            data_dir = "data"
            [[devices]]
            name = "d"
            protocol = "simulated"
            tags = [
              { name = "a", filters = [{ type = "deadband", abs = 1.0, percent = 2.0 }] },
              { name = "b", filters = [{ type = "moving_average" }] },
              { name = "c", filters = [{ type = "window", width = "1m", agg = "median" }] },
              { name = "d", filters = [{ type = "range", low = 5.0, high = 1.0 }] },
              { name = "e", filters = [{ type = "spike", method = "median" }] },
              { name = "f", filters = [{ type = "counter_delta", bits = 24 }] },
              { name = "g", filters = [{ type = "swinging_door" }] },
              { name = "h", filters = [{ type = "ewma", time_constant = "5s" }, { type = "rate" }] },
            ]
            """
        )
    )
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    text = str(e.value)
    for fragment in (
        "abs and percent are alternatives",
        "set exactly one of count (samples) or window (time)",
        'found "median", expected one of min, max, mean, first, last, count, stddev',
        "low must not be greater than high",
        'method = "median" needs deviation',
        "expected one of 16, 32, 64",
        "deviation: missing required key",
    ):
        assert fragment in text, (fragment, text)
    assert "tags[7]" not in text  # the valid chain is accepted


def test_filters_in_two_threads_get_their_own_output(kernel_impl):
    """The compiled kernels fill their output with the GIL released: two threads, each with its
    own filter, never see each other's rows (they shared the reusable output columns once)."""
    n = 400_000 if kernel_impl == "compiled" else 5_000  # the reference holds the GIL throughout
    ts = np.arange(n, dtype=np.int64) * S
    results: dict[float, list[tuple[float, float]]] = {}

    def work(slope: float) -> None:
        f = builtin.rate.create(1, {0: {}}, kernel_impl)
        batch = series(np.arange(n) * slope, ts=ts)
        results[slope] = [(float(o.values.min()), float(o.values.max())) for o in map(f.apply, [batch] * 8)]

    threads = [threading.Thread(target=work, args=(slope,)) for slope in (1.0, 3.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {1.0: [(1.0, 1.0)] * 8, 3.0: [(3.0, 3.0)] * 8}


def test_window_seen_only_in_part_is_marked_at_a_start_and_at_a_stop(kernel_impl):
    SUB = int(Quality.UNCERTAIN_SUB_NORMAL)
    f = builtin.window.create(2, {0: {"width": 10 * S, "agg": "count"}, 1: {"width": 10 * S}}, kernel_impl)
    # tag 0 starts on a window's start: whole; tag 1 starts mid-window: partial
    b = Batch(
        "d",
        np.array([0, 1, 0, 1, 0, 1], np.int32),
        np.array([0, 3, 5, 6, 12, 13]) * S,
        np.ones(6),
        np.zeros(6, np.uint32),
    )
    out = f.apply(b)
    assert sorted(zip(out.tags.tolist(), out.quality.tolist(), strict=True)) == [(0, G), (1, SUB)]
    held = f.flush()  # the stop: both open windows [10 s, 20 s) are partial
    assert (held.tags.tolist(), (held.ts // S).tolist(), held.quality.tolist()) == ([0, 1], [10, 10], [SUB, SUB])
    # after the stop the rest of that window is the first window seen again: partial too
    out = f.apply(series([1.0, 1.0], ts=np.array([15, 21]) * S))
    assert (out.ts // S).tolist() == [10] and out.quality.tolist() == [SUB]
    out = f.apply(series([1.0], ts=np.array([31]) * S))
    assert out.quality.tolist() == [G]  # [20 s, 30 s) followed a window the filter saw: whole
