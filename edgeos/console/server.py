"""A small HTTP/1.1 server on asyncio streams for the console (GET/HEAD, keep-alive, SSE, TLS).

Requests are bounded (line and header sizes, header count, an idle timeout); bodies are
refused (the console is read-only). Streaming responses end the connection when done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from edgeos.console.app import Request, Response

log = logging.getLogger("edgeos.console")

Handler = Callable[[Request], Awaitable[Response]]
MAX_LINE = 8192
MAX_HEADERS = 64
IDLE_TIMEOUT = 30.0


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


async def start(handler: Handler, host: str, port: int, tls: ssl.SSLContext | None = None) -> asyncio.Server:
    """Listen; the caller owns the returned server (close() and wait_closed() to stop)."""
    tasks: set[asyncio.Task] = set()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            tasks.add(task)
        try:
            await _serve_connection(handler, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError):
            pass
        finally:
            if task is not None:
                tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    server = await asyncio.start_server(on_client, host, port, ssl=tls, limit=MAX_LINE * 2)
    server._edgeos_tasks = tasks  # type: ignore[attr-defined]  # stop() cancels open streams
    return server


async def stop(server: asyncio.Server) -> None:
    server.close()
    for t in list(getattr(server, "_edgeos_tasks", ())):
        t.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.wait_closed(), 2.0)


async def _serve_connection(handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
        except ValueError:  # line over the limit
            await _send(writer, Response(414, b"request line too long"), head=False, keep=False)
            return
        if not line:
            return
        parts = line.decode("latin-1").strip().split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await _send(writer, Response(400, b"bad request"), head=False, keep=False)
            return
        method, target, version = parts
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            h = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        else:
            await _send(writer, Response(431, b"too many headers"), head=False, keep=False)
            return
        if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
            await _send(writer, Response(413, b"request bodies are not accepted"), head=False, keep=False)
            return
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if not target.startswith("/"):
            await _send(writer, Response(400, b"bad request target"), head=False, keep=False)
            return
        resp = await handler(Request.from_target(method, target, headers))
        keep = keep and not resp.streaming
        await _send(writer, resp, head=method.upper() == "HEAD", keep=keep)
        if not keep:
            return


async def _send(writer: asyncio.StreamWriter, resp: Response, *, head: bool, keep: bool) -> None:
    reason = HTTPStatus(resp.status).phrase
    hdrs = resp.all_headers()
    if not resp.streaming:
        hdrs["Content-Length"] = str(len(resp.body))  # type: ignore[arg-type]
    hdrs["Connection"] = "keep-alive" if keep else "close"
    out = [f"HTTP/1.1 {resp.status} {reason}\r\n"] + [f"{k}: {v}\r\n" for k, v in hdrs.items()] + ["\r\n"]
    writer.write("".join(out).encode("latin-1"))
    if head:
        if resp.streaming:
            await resp.body.aclose()  # type: ignore[union-attr]
        await writer.drain()
        return
    if not resp.streaming:
        writer.write(resp.body)  # type: ignore[arg-type]
        await writer.drain()
        return
    body = resp.body
    try:
        async for piece in body:  # type: ignore[union-attr]
            writer.write(piece)
            await writer.drain()
    finally:
        await body.aclose()  # type: ignore[union-attr]
