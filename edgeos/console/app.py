"""The console's routes: pages and assets from the package, JSON and SSE from ConsoleData.

Mounted on the daemon's local HTTP server (edgeos/service/http.py) with its own auth hook, so
/metrics keeps its own. Read-only by construction: the routes take GET and HEAD only, and
nothing here holds a device or a config writer. Assets are a fixed table read from the
package at start: a path not in it is a 404, so there is no listing and no way outside them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeos.console.auth import Authenticator
from edgeos.console.data import ConsoleData
from edgeos.service.http import HttpServer, Request, Response

if TYPE_CHECKING:
    from edgeos.runtime import Runtime

log = logging.getLogger("edgeos.console")

PAGES = {"/": "overview.html", "/tags": "tags.html", "/trend": "trend.html", "/config": "config.html"}
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
STREAM_INTERVAL = 0.25  # s between checks for changed values on the SSE stream
HEARTBEAT = 15.0  # s: a comment line keeps proxies and the browser from timing the stream out


def _json(obj: Any, status: int = 200) -> Response:
    body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    return Response(status, body, "application/json", {"cache-control": "no-store"})


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def load_assets() -> dict[str, tuple[bytes, str]]:
    """Every file in the package's static/ folder, read once: (bytes, content type) by name."""
    out = {}
    # The package's own folder (installed as files), not importlib.resources: 0.9 MB less RSS.
    for f in (Path(__file__).parent / "static").iterdir():
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

    def mount(self, server: HttpServer) -> None:
        """Register the console's routes (GET and HEAD only), each behind the console's auth."""
        for path, name in PAGES.items():
            server.route(path, self._page(name), auth=self.check)
        server.route("/static/", self.static, prefix=True, auth=self.check)
        server.route("/api/", self.api, prefix=True, auth=self.check)

    async def check(self, req: Request) -> Response | None:
        """The auth hook: None lets the request through. A first verification of a header
        (scrypt, tens of ms) runs off the event loop."""
        if self.auth is None:
            return None
        if await asyncio.to_thread(self.auth.check, req.headers.get("authorization")):
            return None
        r = _error(401, "authentication required")
        r.headers["www-authenticate"] = f'Basic realm="{Authenticator.realm}", charset="UTF-8"'
        return r

    def _page(self, name: str):
        def page(req: Request) -> Response:
            return self._asset(name)

        return page

    def static(self, req: Request) -> Response:
        return self._asset(req.subpath, cache=True)

    def _asset(self, name: str, cache: bool = False) -> Response:
        found = self.assets.get(name)
        if found is None:
            return _error(404, "not found")
        body, ctype = found
        return Response(200, body, ctype, {"cache-control": "max-age=300" if cache else "no-cache"})

    async def api(self, req: Request) -> Response:
        try:
            return await self._api(req.subpath, req)
        except (ValueError, LookupError) as e:
            return _error(400, str(e))

    async def _api(self, path: str, req: Request) -> Response:
        d = self.data

        def arg(name: str, default: str = "") -> str:
            return req.arg(name, default) or default

        if path == "overview":
            return _json(await d.overview())
        if path == "tags":
            return _json(d.tags(arg("q"), arg("device"), _int(arg("offset", "0")), _int(arg("limit", "100"))))
        if path == "stream":
            return Response.sse(self._stream(d.parse_ids(arg("ids"))))
        if path == "trend":
            names = [t for t in req.query.get("tag", []) if t]
            if not names:
                raise ValueError("give at least one tag=device/name")
            width = _int(arg("width", "1000"))
            return _json(await d.trend(names, arg("since", "24h"), arg("until", "now"), width))
        if path == "export.csv":
            lo, hi = d.range_ns(arg("since", "1h"), arg("until", "now"))
            names = [t for t in req.query.get("tag", []) if t]
            body = d.csv_stream(names, lo, hi)
            first = await anext(body, b"")  # unknown tags raise here, before the answer starts

            async def rest() -> AsyncIterator[bytes]:
                yield first
                async for piece in body:
                    yield piece

            headers = {"content-disposition": 'attachment; filename="edgeos-export.csv"', "cache-control": "no-store"}
            return Response(200, b"", "text/csv; charset=utf-8", headers, stream=rest())
        if path == "config":
            return _json(d.config())
        return _error(404, "not found")

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


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"found {text!r}, expected a whole number") from None
