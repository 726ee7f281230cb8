"""The console's routes: pages and assets from the package, JSON and SSE from ConsoleData.

Transport-agnostic: `Console.handle(Request) -> Response`, served by the local HTTP server.
Read-only by construction: only GET and HEAD exist, and nothing here holds a device or a
config writer. Assets are a fixed table read from the package at start: a path that is not
in it is a 404, so there is no directory listing and no way outside the assets.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import numpy as np

from edgeos.console.auth import Authenticator
from edgeos.console.data import ConsoleData

if TYPE_CHECKING:
    from edgeos.runtime import Runtime

log = logging.getLogger("edgeos.console")

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
PAGES = {"/": "overview.html", "/tags": "tags.html", "/trend": "trend.html", "/config": "config.html"}
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
STREAM_INTERVAL = 0.25  # s between checks for changed values on the SSE stream
HEARTBEAT = 15.0  # s: a comment line keeps proxies and the browser from timing the stream out


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case

    @classmethod
    def from_target(cls, method: str, target: str, headers: dict[str, str] | None = None) -> Request:
        path, _, qs = target.partition("?")
        return cls(method.upper(), path, parse_qs(qs, keep_blank_values=True), headers or {})

    def arg(self, name: str, default: str = "") -> str:
        return self.query.get(name, [default])[0]


@dataclass
class Response:
    status: int
    body: bytes | AsyncIterator[bytes] = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def streaming(self) -> bool:
        return not isinstance(self.body, bytes)

    def all_headers(self) -> dict[str, str]:
        return {"Content-Type": self.content_type, **SECURITY_HEADERS, **self.headers}


def _json(obj: Any, status: int = 200) -> Response:
    body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    return Response(status, body, "application/json", {"Cache-Control": "no-store"})


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def load_assets() -> dict[str, tuple[bytes, str]]:
    """Every file in the package's static/ folder, read once: (bytes, content type) by name."""
    out = {}
    for f in resources.files("edgeos.console").joinpath("static").iterdir():
        suffix = "." + f.name.rsplit(".", 1)[-1]
        if f.is_file() and suffix in _TYPES:
            out[f.name] = (f.read_bytes(), _TYPES[suffix])
    return out


class Console:
    """Routes of the read-only console over one Runtime."""

    def __init__(self, rt: Runtime, auth: Authenticator | None = None) -> None:
        self.data = ConsoleData(rt)
        self.auth = auth
        self.assets = load_assets()

    def close(self) -> None:
        self.data.close()

    async def authorized(self, req: Request) -> bool:
        """Per-request check; a first verification (scrypt, tens of ms) runs off the event loop."""
        if self.auth is None:
            return True
        return await asyncio.to_thread(self.auth.check, req.headers.get("authorization"))

    async def handle(self, req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            r = _error(405, "the console is read-only: GET and HEAD only")
            r.headers["Allow"] = "GET, HEAD"
            return r
        if not await self.authorized(req):
            r = _error(401, "authentication required")
            r.headers["WWW-Authenticate"] = f'Basic realm="{Authenticator.realm}", charset="UTF-8"'
            return r
        try:
            return await self._route(req)
        except (ValueError, LookupError) as e:
            return _error(400, str(e))
        except Exception as e:  # a view that fails must not take the daemon with it
            log.warning("console: %s %s failed: %s: %s", req.method, req.path, type(e).__name__, e)
            return _error(500, f"{type(e).__name__}")

    async def _route(self, req: Request) -> Response:
        path = req.path
        if path in PAGES:
            return self._asset(PAGES[path])
        if path.startswith("/static/"):
            return self._asset(path[len("/static/") :], cache=True)
        d = self.data
        if path == "/api/overview":
            return _json(await d.overview())
        if path == "/api/tags":
            return _json(
                d.tags(req.arg("q"), req.arg("device"), _int(req.arg("offset", "0")), _int(req.arg("limit", "100")))
            )
        if path == "/api/stream":
            return Response(
                200, self._stream(d.parse_ids(req.arg("ids"))), "text/event-stream", {"Cache-Control": "no-store"}
            )
        if path == "/api/trend":
            names = [t for t in req.query.get("tag", []) if t]
            if not names:
                raise ValueError("give at least one tag=device/name")
            return _json(
                await d.trend(names, req.arg("since", "24h"), req.arg("until", "now"), _int(req.arg("width", "1000")))
            )
        if path == "/api/export.csv":
            lo, hi = d.range_ns(req.arg("since", "1h"), req.arg("until", "now"))
            names = [t for t in req.query.get("tag", []) if t]
            first = d.csv_chunks(names, lo, hi)
            head = await anext(first)  # the header, or a LookupError for an unknown tag: before the 200
            return Response(
                200,
                _prepend(head, first),
                "text/csv; charset=utf-8",
                {"Content-Disposition": 'attachment; filename="edgeos-export.csv"', "Cache-Control": "no-store"},
            )
        if path == "/api/config":
            return _json(d.config())
        return _error(404, "not found")

    def _asset(self, name: str, cache: bool = False) -> Response:
        found = self.assets.get(name)
        if found is None:
            return _error(404, "not found")
        body, ctype = found
        return Response(200, body, ctype, {"Cache-Control": "max-age=300" if cache else "no-cache"})

    async def _stream(self, ids: list[int]) -> AsyncIterator[bytes]:
        """Server-sent events: the shown tags' values whenever they change (first: all of them)."""
        seen = np.full(len(ids), -1, np.int64)
        yield b"retry: 2000\n\n"
        quiet = 0.0
        while True:
            rows = self.data.changes(ids, seen)
            if rows:
                yield b"data: " + json.dumps({"rows": rows}, separators=(",", ":")).encode() + b"\n\n"
                quiet = 0.0
            elif quiet >= HEARTBEAT:
                yield b": keep-alive\n\n"
                quiet = 0.0
            await asyncio.sleep(STREAM_INTERVAL)
            quiet += STREAM_INTERVAL


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for piece in rest:
        yield piece


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"found {text!r}, expected a whole number") from None
