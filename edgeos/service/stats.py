"""Small figures the runtime keeps for /metrics without importing any metrics library."""

from __future__ import annotations

import bisect

COMMIT_BOUNDS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Cumulative histogram with fixed bounds (the last bucket is +Inf): one bisect and two
    additions per observation, read by the collector at scrape time."""

    def __init__(self, bounds_s: tuple[float, ...] = COMMIT_BOUNDS_S) -> None:
        self.bounds = bounds_s
        self.counts = [0] * (len(bounds_s) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
