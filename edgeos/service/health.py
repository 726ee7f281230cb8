"""/healthz: 200 when the daemon does its job, 503 with what is wrong when it does not.

Unhealthy means one of: an enabled device down (not connected, or connected and not answering:
docs/adapters.md, Answers) for longer than its bound (`[health] device_down`, or
`[health.devices]`), a store that refuses writes, an upstream lag over `[health] sync_lag`.
The body names each problem with a low-cardinality code and never an error message, which
could carry a secret.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from edgeos.service.http import HttpServer, Request, Response

if TYPE_CHECKING:
    from edgeos.runtime import Runtime


def evaluate(rt: Runtime, now_ns: int | None = None) -> dict[str, Any]:
    """{"status": "ok"|"unhealthy", "problems": [...], "checked": {...}} of the runtime now."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    bounds = rt.config.health
    problems: list[dict[str, Any]] = []
    devices_up = devices_down = 0
    for dev in rt.config.devices:
        if not dev.enabled:
            continue
        st = rt.devices[dev.name]
        if st.up:
            devices_up += 1
            continue
        devices_down += 1
        down_s = (now_ns - st.down_since_ns) / 1e9 if st.down_since_ns else 0.0
        bound_s = bounds.device_bound_ns(dev.name) / 1e9
        if down_s > bound_s:
            problems.append(
                {
                    "check": "device_down",
                    "device": dev.name,
                    "state": st.state,
                    "down_seconds": round(down_s, 3),
                    "bound_seconds": bound_s,
                    "last_error_code": st.last_error_code,
                }
            )
    if rt.use_store and rt.store_failing:
        problems.append({"check": "store_refuses_writes", "errors": rt.counters.store_errors})
    lag = None
    if rt.sync is not None:
        lag = rt.sync.status.lag_seconds
        if lag > bounds.sync_lag_ns / 1e9:
            problems.append(
                {
                    "check": "sync_lag",
                    "lag_seconds": round(lag, 3),
                    "bound_seconds": bounds.sync_lag_ns / 1e9,
                    "state": rt.sync.status.state,
                }
            )
    return {
        "status": "unhealthy" if problems else "ok",
        "problems": problems,
        "checked": {"devices_up": devices_up, "devices_down": devices_down, "sync_lag_seconds": lag},
    }


def register(server: HttpServer, rt: Runtime) -> None:
    """Serve /healthz from `rt` on `server`."""

    def healthz(req: Request) -> Response:
        doc = evaluate(rt)
        return Response.json(doc, 200 if doc["status"] == "ok" else 503, cache_control="no-store")

    server.route("/healthz", healthz)
