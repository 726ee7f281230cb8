"""Trend buckets from the store (edgeos/store/reader.py): sized to a chart, Bad periods apart."""

from __future__ import annotations

import numpy as np

from edgeos.model import Quality
from edgeos.store.reader import History, TagInfo, bad_periods, trend

S = 1_000_000_000
TAG = TagInfo(0, "press", "temperature", "number", "degC")


def _history(ts, values, quality=None) -> History:
    ts = np.asarray(ts, np.int64)
    q = np.zeros(len(ts), np.uint32) if quality is None else np.asarray(quality, np.uint32)
    return History(TAG, ts, np.asarray(values, np.float64), q)


def test_a_week_at_1hz_becomes_1000_buckets_with_min_max_mean():
    n = 7 * 86400
    ts = np.arange(n, dtype=np.int64) * S
    values = np.arange(n, dtype=np.float64)
    t = trend(_history(ts, values), 0, ts[-1], 1000)
    assert len(t.t) == len(t.mean) == 1000 and t.samples == n
    assert 604 * S < t.step_ns <= 605 * S  # a week over 1,000 pixels
    per = -(-t.step_ns // S)  # samples in a bucket
    assert t.lo[0] == 0 and t.hi[0] == per - 1 and t.mean[0] == (per - 1) / 2
    assert t.count.sum() == n and t.bad == [] and t.interval_ns == S
    assert not np.isnan(t.mean).any()


def test_bad_samples_are_left_out_and_reported_as_periods():
    ts = np.arange(100, dtype=np.int64) * S
    values = np.full(100, 5.0)
    quality = np.zeros(100, np.uint32)
    values[40:60] = np.nan
    quality[40:60] = Quality.BAD_COMM_FAILURE
    quality[70] = Quality.UNCERTAIN  # usable: drawn
    values[90] = 1e9
    quality[90] = Quality.BAD  # a Bad sample with a value: still left out
    t = trend(_history(ts, values, quality), 0, 99 * S, 10)
    assert t.bad == [(40 * S, 60 * S), (90 * S, 91 * S)]  # each ends at the next usable sample
    assert np.isnan(t.mean[4]) and np.isnan(t.mean[5])  # buckets 40..59 hold only Bad samples
    assert np.nanmax(t.hi) == 5.0 and t.count[7] == 10


def test_bad_at_the_end_and_empty_ranges():
    ts = np.arange(5, dtype=np.int64) * S
    assert bad_periods(ts, np.array([True, True, False, False, False])) == [(2 * S, 4 * S)]
    assert bad_periods(ts, np.ones(5, bool)) == []
    t = trend(_history([], []), 0, 10 * S, 50)
    assert len(t.mean) == 50 and np.isnan(t.mean).all() and t.bad == [] and t.samples == 0


def test_samples_outside_the_range_are_ignored():
    ts = np.array([-5, 0, 5, 10, 15], np.int64) * S
    t = trend(_history(ts, [100, 1, 2, 3, 100]), 0, 10 * S, 2)
    assert np.nanmax(t.hi) == 3 and np.nanmin(t.lo) == 1
