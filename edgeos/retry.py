"""Reconnect pacing shared by devices and the upstream sync."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, base_ns: int, cap_ns: int) -> float:
    """Capped full jitter, in seconds: uniform over [base/2, min(cap, base * 2**(attempt+1))].

    Full jitter spreads a fleet's reconnects after a broker or network restart, so a thousand
    gateways do not come back in lockstep. The first retry (attempt 0) is jittered too: a
    broker restarted in less than `base` drops every session at once, and a fixed first delay
    brought them all back in the same instant (issue 28: tests/faults/test_herd.py).
    """
    ceiling = min(cap_ns, base_ns * (2 ** min(attempt + 1, 30)))
    return random.uniform(base_ns / 2, ceiling) / 1e9 if ceiling > base_ns else base_ns / 1e9
