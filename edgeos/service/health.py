"""/healthz: 200 when the daemon does its job, 503 with what is wrong when it does not.

Unhealthy means one of: an enabled device down (not connected, or connected and not answering:
docs/adapters.md, Answers) for longer than its bound (`[health] device_down`, or
`[health.devices]`), a store that refuses writes, an upstream lag over `[health] sync_lag`.
The body names each problem with a low-cardinality code and never an error message, which
could carry a secret.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeos.service.http import HttpServer, Request, Response

if TYPE_CHECKING:
    from edgeos.runtime import Runtime


def evaluate(rt: Runtime) -> dict[str, Any]:
    """{"status": "ok"|"unhealthy", "problems": [...], "checked": {...}} of the runtime now.
    Durations are measured on the monotonic clock: a wall-clock step changes none of them."""
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
        down_s = st.down_seconds()
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
        # The lag is the oldest unsent sample's age by its timestamp, which a wall-clock step
        # shifts; no session for longer than the bound while units wait is a lag over it too,
        # measured on the monotonic clock (an independent tester's finding: a step back hid
        # a broker outage).
        offline = rt.sync.offline_seconds() if rt.sync.status.backlog_units else 0.0
        if max(lag, offline) > bounds.sync_lag_ns / 1e9:
            lag = max(lag, offline)
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
