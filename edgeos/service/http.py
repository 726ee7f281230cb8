"""The daemon's one local HTTP server: /metrics, /healthz and the web console share it.

HTTP/1.1 parsed by h11 (a small sans-IO parser, about 0.3 MB in the daemon) over asyncio
streams, so it runs in the daemon's own loop and TaskGroup, with no second framework. Why h11
and not aiohttp or uvicorn: README.md, "Dependencies".

API, for the handlers built on it (metrics, health, the console)::

    server = HttpServer(HttpSettings(address="127.0.0.1", port=9180))
    server.route("/metrics", handler)                 # exact path; GET and HEAD
    server.route("/api/", handler, prefix=True)       # every path under /api/
    server.static("/static/", files("edgeos.console") / "static")   # no listing, no escape
    server.auth = my_check                            # default hook for every route
    server.route("/healthz", health, auth=None)       # a route that is always public
    async with asyncio.TaskGroup() as tg:
        tg.create_task(server.serve())                # until cancelled; `await server.started.wait()`

A handler takes a `Request` and returns a `Response` (plain or awaitable). A `Response` with
`stream=` (an async iterator of bytes) is sent chunked as it is produced, for server-sent
events: it ends when the iterator ends, when the client goes away, or when the server stops
(the iterator is then closed, so its `finally` runs).

An auth hook takes the `Request` and returns None to let it through, or the `Response` to
send instead (e.g. 401 with `WWW-Authenticate`). Every response carries `SECURITY_HEADERS`
unless the handler sets the same header itself.

Bounds: connections (`max_connections`; one more is answered 503 and closed), request line
plus headers (`max_header_bytes`, else 431), body (`max_body_bytes`, else 413), time to read a
request (`request_timeout`), and an idle keep-alive connection (`keepalive_timeout`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import mimetypes
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11

log = logging.getLogger("edgeos.http")

SECURITY_HEADERS: dict[str, str] = {
    # No inline script or style anywhere: every script is a file of the package.
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
    ".woff2": "font/woff2",
    ".map": "application/json",
}
_REASONS = {
    200: "OK",
    204: "No Content",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class HttpSettings:
    """Where and how the server listens; every bound is per connection unless it says otherwise."""

    address: str = "127.0.0.1"
    port: int = 9180  # 0: any free port (tests), read it back from HttpServer.port
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_connections: int = 32  # open at once, across all clients
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 64 * 1024
    request_timeout: float = 10.0  # to receive a whole request (slow clients)
    keepalive_timeout: float = 15.0  # idle between requests
    write_timeout: float = 30.0  # a client that stops reading is dropped

    @classmethod
    def from_config(cls, c: Any) -> HttpSettings:
        """From the config's [http] table (edgeos.config.model.HttpConfig)."""
        return cls(
            address=c.address, port=c.port, tls_cert=c.tls_cert, tls_key=c.tls_key, max_connections=c.max_connections
        )


@dataclass
class Request:
    method: str  # upper case
    path: str  # decoded, without the query string
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes = b""
    peer: str = ""
    tls: bool = False
    route: str = ""  # the route's path (its prefix, for a prefix route)

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The first value of a query parameter."""
        values = self.query.get(name)
        return values[0] if values else default

    @property
    def subpath(self) -> str:
        """For a prefix route: the path after its prefix."""
        return self.path[len(self.route) :] if self.path.startswith(self.route) else ""


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    stream: AsyncIterator[bytes] | None = None  # sent chunked instead of `body`

    @classmethod
    def text(cls, text: str, status: int = 200, **headers: str) -> Response:
        return cls(status, text.encode(), headers=_hdrs(headers))

    @classmethod
    def json(cls, doc: Any, status: int = 200, **headers: str) -> Response:
        body = json.dumps(doc, separators=(",", ":"), default=str).encode()
        return cls(status, body, "application/json", headers=_hdrs(headers))

    @classmethod
    def sse(cls, events: AsyncIterator[bytes]) -> Response:
        """Server-sent events: `events` yields already formatted `data: ...\\n\\n` blocks."""
        return cls(200, content_type="text/event-stream", headers={"cache-control": "no-store"}, stream=events)


def _hdrs(kw: Mapping[str, str]) -> dict[str, str]:
    return {k.replace("_", "-").lower(): v for k, v in kw.items()}


Handler = Callable[[Request], "Response | Awaitable[Response]"]
AuthHook = Callable[[Request], "Response | None | Awaitable[Response | None]"]
INHERIT: Any = object()  # a route's auth: the server's default hook


@dataclass
class _Route:
    path: str
    handler: Handler
    prefix: bool
    methods: frozenset[str]
    auth: Any


def ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 or later) from a PEM certificate chain and key."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


class HttpServer:
    """Routes and the listening socket; `serve()` runs it until cancelled."""

    def __init__(self, settings: HttpSettings | None = None, *, auth: AuthHook | None = None) -> None:
        self.settings = settings or HttpSettings()
        self.auth = auth
        self._exact: dict[str, _Route] = {}
        self._prefixes: list[_Route] = []  # longest first
        self._open = 0
        self.port: int | None = None
        self.started = asyncio.Event()  # set once listening; `port` then holds the bound port

    # -- routes ----------------------------------------------------------------------------

    def route(
        self,
        path: str,
        handler: Handler,
        *,
        prefix: bool = False,
        methods: Iterable[str] = ("GET", "HEAD"),
        auth: AuthHook | None = INHERIT,
    ) -> None:
        """Register `handler` for `path` (or every path under it with prefix=True; the longest
        prefix wins, an exact route wins over any prefix). auth=None makes the route public."""
        if not path.startswith("/"):
            raise ValueError(f"route {path!r}: a path starts with '/'")
        r = _Route(path, handler, prefix, frozenset(m.upper() for m in methods), auth)
        if prefix:
            self._prefixes = sorted([*(p for p in self._prefixes if p.path != path), r], key=lambda p: -len(p.path))
        else:
            self._exact[path] = r

    def static(self, prefix: str, root: Path | Any, *, index: str | None = "index.html", auth: Any = INHERIT) -> None:
        """Serve the files under `root` (a directory, e.g. `importlib.resources.files(pkg) / "static"`)
        at `prefix`. A directory is never listed (its `index` file is served if there is one);
        a path with '..', a hidden segment, a backslash or a NUL, or a symlink leading out of
        `root`, is 404."""
        base = Path(str(root)).resolve()
        if not prefix.endswith("/"):
            prefix += "/"

        def serve_file(req: Request) -> Response:
            target = _safe_join(base, req.subpath)
            if target is not None and target.is_dir() and index:
                target = _safe_join(base, f"{req.subpath.rstrip('/')}/{index}".lstrip("/"))
            if target is None or not target.is_file():
                return Response.text("not found\n", 404)
            st = target.stat()
            etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
            headers = {"etag": etag, "cache-control": "no-cache"}
            if req.headers.get("if-none-match") == etag:
                return Response(304, headers=headers)
            ctype = _TYPES.get(target.suffix.lower()) or mimetypes.guess_type(target.name)[0]
            return Response(200, target.read_bytes(), ctype or "application/octet-stream", headers)

        self.route(prefix, serve_file, prefix=True, auth=auth)

    def _match(self, path: str) -> _Route | None:
        r = self._exact.get(path)
        if r is not None:
            return r
        for p in self._prefixes:
            if path.startswith(p.path):
                return p
        return None

    # -- serving ---------------------------------------------------------------------------

    async def serve(self) -> None:
        """Listen and serve until cancelled; open connections (streams included) are closed then.
        A failure to listen (a busy port, a bad certificate) raises OSError/SSLError as it is."""
        s = self.settings
        tls = ssl_context(s.tls_cert, s.tls_key) if s.tls_cert and s.tls_key else None
        tg: asyncio.TaskGroup | None = None

        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # The handler task belongs to the TaskGroup below, so a stop cancels every connection.
            try:
                assert tg is not None
                tg.create_task(self._connection(reader, writer, tls is not None), name="http-conn")
            except RuntimeError:  # accepted in the instant the server stops: the group takes no more
                writer.close()

        # Bound before the TaskGroup, so a busy port raises OSError itself, not inside a group.
        server = await asyncio.start_server(
            accept,
            s.address,
            s.port,
            ssl=tls,
            ssl_handshake_timeout=10.0 if tls else None,
            reuse_address=True,
            start_serving=False,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                await server.start_serving()
                self.port = server.sockets[0].getsockname()[1]
                self.started.set()
                log.info("http: listening on %s://%s:%d", "https" if tls else "http", s.address, self.port)
                if self.auth is None and not _loopback(s.address):
                    log.warning("http: %s is not a loopback address and no authentication is set", s.address)
                try:
                    await asyncio.Future()  # until cancelled
                finally:
                    server.close()  # no new connections; the TaskGroup then cancels the open ones
        finally:
            self.started.clear()
            server.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: bool) -> None:
        s = self.settings
        peer = writer.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=s.max_header_bytes)
        self._open += 1
        try:
            if self._open > s.max_connections:
                await self._send(conn, writer, None, Response.text("too many connections\n", 503), close=True)
                await _linger(reader, writer)
                return
            while True:
                try:
                    req = await self._read_request(conn, reader, peer_text, tls)
                except _Reject as r:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await self._send(conn, writer, None, r.response, close=True)
                        await _linger(reader, writer)
                    return
                if req is None:
                    return
                resp = await self._dispatch(req)
                keep = await self._send(conn, writer, req, resp, reader=reader)
                if not keep or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, TimeoutError, h11.LocalProtocolError, ssl.SSLError, OSError):
            pass
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, peer: str, tls: bool
    ) -> Request | None:
        """The next request, whole; None when the client closed (or idled out) between requests."""
        s = self.settings
        head: h11.Request | None = None
        body = bytearray()
        first = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.keepalive_timeout
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint  # 431 for a head over max_incomplete_event_size
                raise _Reject(Response.text(f"{_REASONS.get(status, 'bad request').lower()}\n", status)) from None
            if event is h11.NEED_DATA:
                timeout = max(0.0, deadline - loop.time())
                try:
                    async with asyncio.timeout(timeout):
                        data = await reader.read(65536)
                except TimeoutError:
                    if first:
                        return None  # an idle keep-alive connection
                    raise _Reject(Response.text("request timeout\n", 408)) from None
                if first:
                    first = False
                    if data:  # the request has begun: the rest must come within request_timeout
                        deadline = loop.time() + s.request_timeout
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, h11.Request):
                head = event
                # h11 bounds a head that arrives in pieces; one that arrives whole is measured here.
                size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if size > s.max_header_bytes:
                    raise _Reject(Response.text("request header fields too large\n", 431))
                length = _header(event.headers, b"content-length")
                if length is not None and (not length.isdigit() or int(length) > s.max_body_bytes):
                    raise _Reject(Response.text("request body too large\n", 413))
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > s.max_body_bytes:
                    raise _Reject(Response.text("request body too large\n", 413))
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                target = head.target.decode("ascii", "replace")
                raw_path, _, raw_query = target.partition("?")
                headers: dict[str, str] = {}
                for k, v in head.headers:
                    name, value = k.decode("latin-1"), v.decode("latin-1")
                    headers[name] = f"{headers[name]}, {value}" if name in headers else value
                return Request(
                    method=head.method.decode("ascii", "replace").upper(),
                    path=urllib.parse.unquote(raw_path) or "/",
                    query=urllib.parse.parse_qs(raw_query, keep_blank_values=True),
                    headers=headers,
                    body=bytes(body),
                    peer=peer,
                    tls=tls,
                )

    async def _dispatch(self, req: Request) -> Response:
        route = self._match(req.path)
        if route is None:
            return Response.text("not found\n", 404)
        req.route = route.path
        if req.method not in route.methods:
            return Response.text("method not allowed\n", 405, allow=", ".join(sorted(route.methods)))
        try:
            hook = self.auth if route.auth is INHERIT else route.auth
            if hook is not None:
                denied = hook(req)
                if inspect.isawaitable(denied):
                    denied = await denied
                if denied is not None:
                    return denied
            resp = route.handler(req)
            if inspect.isawaitable(resp):
                resp = await resp
            return resp
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # The detail goes to the log, never to the client (it could name a path or a secret).
            log.error("http: %s %s failed: %s: %s", req.method, req.path, type(e).__name__, e)
            return Response.text("internal error\n", 500)

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        req: Request | None,
        resp: Response,
        *,
        close: bool = False,
        reader: asyncio.StreamReader | None = None,
    ) -> bool:
        """Send `resp`; False when the connection must close afterwards."""
        s = self.settings
        headers = {**SECURITY_HEADERS, **{k.lower(): v for k, v in resp.headers.items()}}
        if resp.status != 304 and resp.status != 204:
            headers.setdefault("content-type", resp.content_type)
        head_only = req is not None and req.method == "HEAD"
        if resp.stream is None and resp.status not in (204, 304):
            headers["content-length"] = str(len(resp.body))
        if close:
            headers["connection"] = "close"
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

        async def write(event: h11.Event) -> None:
            data = conn.send(event)
            if data:
                writer.write(data)
                async with asyncio.timeout(s.write_timeout):
                    await writer.drain()

        await write(h11.Response(status_code=resp.status, headers=out, reason=_REASONS.get(resp.status, "")))
        if resp.stream is not None:
            if head_only or reader is None:
                await _aclose(resp.stream)
            else:
                await self._stream(resp.stream, write, reader)
                # The stream ran to its end: terminate the body (the last chunk), so the client
                # knows it is whole. A stream ends the connection either way.
                if conn.our_state is h11.SEND_BODY:
                    await write(h11.EndOfMessage())
                return False
        elif resp.body and not head_only:
            await write(h11.Data(data=resp.body))
        if conn.our_state is h11.SEND_BODY:
            await write(h11.EndOfMessage())
        return not close and conn.our_state is h11.DONE

    async def _stream(
        self, chunks: AsyncIterator[bytes], write: Callable[[h11.Event], Awaitable[None]], reader: asyncio.StreamReader
    ) -> None:
        """Send chunks until the iterator ends or the client closes (a read returns EOF)."""

        async def pump() -> None:
            async for chunk in chunks:
                if chunk:
                    await write(h11.Data(data=chunk))

        async def watch() -> None:
            while await reader.read(4096):
                pass  # a client sends nothing more while it reads a stream; EOF means it left

        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (pumping, watching):
                t.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)
            await _aclose(chunks)
        if pumping.done() and not pumping.cancelled() and pumping.exception() is None:
            return
        raise ConnectionResetError("stream ended early")


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After an early error answer: stop sending and read what the client still sends, briefly,
    so that closing with unread data does not reset the connection before it reads the answer."""
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(1.0):
            for _ in range(64):
                if not await reader.read(65536):
                    break


class _Reject(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


async def _aclose(it: AsyncIterator[bytes]) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for k, v in headers:
        if k == name:
            return v.decode("latin-1").strip()
    return None


def _loopback(address: str) -> bool:
    import ipaddress

    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _safe_join(base: Path, sub: str) -> Path | None:
    """`base/sub` when it stays inside `base` (symlinks resolved), else None."""
    parts = [p for p in sub.split("/") if p]
    if any(p in (".", "..") or p.startswith(".") or "\\" in p or "\0" in p for p in parts):
        return None
    target = base.joinpath(*parts).resolve() if parts else base
    return target if target == base or target.is_relative_to(base) else None
