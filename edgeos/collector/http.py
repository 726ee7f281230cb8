"""/metrics and /healthz for the collector, on the project's one local HTTP server
(edgeos/service/http.py: h11 over asyncio streams, bounded), with the collector's own routes."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from edgeos.service.http import HttpServer, HttpSettings, Request, Response

if TYPE_CHECKING:
    from edgeos.collector.service import Collector


async def serve(collector: Collector, listen: str, stop: asyncio.Event) -> None:
    host, _, port = listen.rpartition(":")
    server = HttpServer(HttpSettings(address=host or "127.0.0.1", port=int(port)))

    def metrics(_: Request) -> Response:
        return Response(body=collector.metrics.prometheus().encode(), content_type="text/plain; version=0.0.4")

    def healthz(_: Request) -> Response:
        m = collector.metrics
        ok = m.db_connected and m.broker_connected
        return Response.json({"ok": ok, "postgresql": m.db_connected, "broker": m.broker_connected}, 200 if ok else 503)

    server.route("/metrics", metrics, auth=None)
    server.route("/healthz", healthz, auth=None)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(server.serve(), name="collector-http-server")
        await stop.wait()
        task.cancel()
