"""A realistic plant signal set, generated: the same input for every benchmark that needs one.

1,000 tags polled together at 1 Hz with a few ms of timestamp jitter, as a Modbus poll gives:
slow random walks and noisy sines quantised to 0.01 (register values scaled by 100), boolean
and step states, production counters, and setpoints that change now and then (0.1).
"""

from __future__ import annotations

import numpy as np

DAY_START_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z


def plant_day(n_tags: int = 1000, seconds: int = 86_400, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """(poll timestamps [seconds], values [n_tags, seconds])."""
    rng = np.random.default_rng(seed)
    t = np.arange(seconds, dtype=np.float64)
    jitter = np.round(rng.normal(0, 3e6, seconds)).astype(np.int64)  # ~3 ms
    ts = DAY_START_NS + np.arange(seconds, dtype=np.int64) * 10**9 + jitter
    values = np.empty((n_tags, seconds))
    for i in range(n_tags):
        kind = i % 5
        if kind == 0:  # slow random walk, 0.01 resolution
            v = np.round(50 + np.cumsum(rng.normal(0, 0.02, seconds)), 2)
        elif kind == 1:  # noisy sine, 0.01 resolution
            period = rng.uniform(300, 3600)
            v = np.round(60 + 20 * np.sin(2 * np.pi * t / period + rng.uniform(0, 6)) + rng.normal(0, 0.05, seconds), 2)
        elif kind == 2:  # boolean state, changes every few minutes
            v = (np.cumsum(rng.random(seconds) < 1 / 300) % 2).astype(float)
        elif kind == 3:  # production counter
            v = (np.cumsum(rng.random(seconds) < 0.3) + rng.integers(0, 100_000)).astype(float)
        else:  # setpoint, 0.1 resolution, changes every ~10 minutes
            v = np.round(100 + np.cumsum((rng.random(seconds) < 1 / 600) * rng.normal(0, 5, seconds)), 1)
        values[i] = v
    return ts, values
