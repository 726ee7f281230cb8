"""Thundering herd: 200 clients with edgeos's reconnect policy (edgeos.retry.backoff_delay, the
upstream defaults reconnect_min 1 s, reconnect_max 60 s) and 200 with the same backoff without
jitter, against one mosquitto restarted quickly (down 0.3 s: `systemctl restart`). The peak
connection rate after the restart must be at least 5 times lower with edgeos's policy.

Negative control, in the same run: a third group that uses the no-jitter policy under the
edgeos name must fail the same check."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from herd import edgeos_policy, no_jitter_policy, restart_herd  # noqa: E402

LO, HI = 1_000_000_000, 60_000_000_000
N = 200


def at_least_5x_lower(result: dict, group: str) -> bool:
    return result["nojitter"]["peak_per_100ms"] >= 5 * result[group]["peak_per_100ms"]


async def test_reconnects_after_a_broker_restart_are_spread(tmp_path):
    groups = {
        "edgeos": edgeos_policy(LO, HI),
        "nojitter": no_jitter_policy(LO, HI),
        "control": no_jitter_policy(LO, HI),
    }
    res = await restart_herd(tmp_path / "broker", groups, N, down_s=0.3)
    for g, r in res.items():
        print(
            f"faults.herd.{g}.peak_per_100ms: {r['peak_per_100ms']} connections "
            f"({r['reconnected']}/{N} back, last after {r['last_s']:.2f} s)"
        )
    ratio = res["nojitter"]["peak_per_100ms"] / max(1, res["edgeos"]["peak_per_100ms"])
    print(f"faults.herd.peak_ratio: {ratio:.1f} x lower with edgeos's policy (target >= 5)")
    assert all(r["reconnected"] == N for r in res.values()), res
    assert at_least_5x_lower(res, "edgeos"), res
    assert not at_least_5x_lower(res, "control"), "the check passed a policy without jitter"
