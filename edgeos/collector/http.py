"""/metrics and /healthz for the collector: a minimal asyncio HTTP/1.0 server.

Interim: edgeos/service/http.py (branch wip-ops-http) is to be the one local HTTP server; until it
lands on main the collector serves its two endpoints itself, read-only, on loopback by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeos.collector.service import Collector


def _reply(status: str, body: bytes, ctype: str) -> bytes:
    head = f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


async def serve(collector: Collector, listen: str, stop: asyncio.Event) -> None:
    host, _, port = listen.rpartition(":")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            m = collector.metrics
            if path == "/metrics":
                out = _reply("200 OK", m.prometheus().encode(), "text/plain; version=0.0.4")
            elif path == "/healthz":
                ok = m.db_connected and m.broker_connected
                body = json.dumps({"ok": ok, "postgresql": m.db_connected, "broker": m.broker_connected}).encode()
                out = _reply("200 OK" if ok else "503 Service Unavailable", body, "application/json")
            else:
                out = _reply("404 Not Found", b"not found\n", "text/plain")
            writer.write(out)
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host or "127.0.0.1", int(port))
    async with server:
        await stop.wait()
