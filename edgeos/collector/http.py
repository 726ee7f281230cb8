"""/metrics and /healthz for the collector, on the project's one local HTTP server
(edgeos/service/http.py: h11 over asyncio streams, bounded), with the collector's own routes."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from edgeos.collector.config import parse_listen
from edgeos.service.http import HttpServer, HttpSettings, Request, Response

if TYPE_CHECKING:
    from edgeos.collector.service import Collector

log = logging.getLogger("edgeos.collector")


async def serve(collector: Collector, listen: str, stop: asyncio.Event) -> None:
    """Serve until `stop`. A port that cannot be bound is logged and the collector runs on
    without these routes, as the gateway's daemon does: its data matters more."""
    host, port = parse_listen(listen)
    server = HttpServer(HttpSettings(address=host, port=port))

    def metrics(_: Request) -> Response:
        return Response(body=collector.metrics.prometheus().encode(), content_type="text/plain; version=0.0.4")

    def healthz(_: Request) -> Response:
        m = collector.metrics
        ok = m.db_connected and m.broker_connected
        return Response.json({"ok": ok, "postgresql": m.db_connected, "broker": m.broker_connected}, 200 if ok else 503)

    server.route("/metrics", metrics, auth=None)
    server.route("/healthz", healthz, auth=None)
    task = asyncio.create_task(server.serve(), name="collector-http-server")
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if task.done() and not task.cancelled():
            if not isinstance(task.exception(), OSError):
                task.result()  # anything else is a defect: raised
            log.error(
                "collector: http: cannot listen on %s (%s); /metrics and /healthz are unavailable",
                listen,
                task.exception(),
            )
            await stopping
    finally:
        for t in (task, stopping):
            t.cancel()
        await asyncio.gather(task, stopping, return_exceptions=True)
