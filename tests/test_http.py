"""The local HTTP server over real sockets: routes, static files without escape or listing,
security headers, bounds, keep-alive, streams, TLS, auth hook, clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgeos.service.http import HttpServer, HttpSettings, Request, Response


@contextlib.asynccontextmanager
async def serving(server: HttpServer) -> AsyncIterator[int]:
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        waiter = asyncio.ensure_future(server.started.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            waiter.cancel()
            task.result()
    try:
        assert server.port
        yield server.port
    finally:
        task.cancel()
        async with asyncio.timeout(5):
            await asyncio.gather(task, return_exceptions=True)


async def raw(port: int, data: bytes, *, read_all: bool = True) -> bytes:
    """Send raw bytes and read the answer until the server closes (or 2 s pass)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                while chunk := await reader.read(65536):
                    out += chunk
                    if not read_all and b"\r\n\r\n" in out:
                        break
        return out
    finally:
        writer.close()


def get(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None, tls: bool = False):
    cls = http.client.HTTPSConnection if tls else http.client.HTTPConnection
    kw = {"context": ssl._create_unverified_context()} if tls else {}
    c = cls("127.0.0.1", port, timeout=5, **kw)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def static_dir(tmp_path: Path) -> Path:
    root = tmp_path / "static"
    (root / "sub").mkdir(parents=True)
    (root / "app.js").write_text("console.log(1);\n")
    (root / "index.html").write_text("<!doctype html><p>hi</p>\n")
    (root / "sub" / "x.css").write_text("p{}\n")
    (root / ".hidden").write_text("no")
    (tmp_path / "secret.txt").write_text("SECRET")
    (root / "link").symlink_to(tmp_path / "secret.txt")
    return root


def make_server(**kw) -> HttpServer:
    server = HttpServer(HttpSettings(port=0, **kw))
    server.route("/hello", lambda r: Response.text(f"hello {r.arg('name', '?')}\n"))

    async def echo(r: Request) -> Response:
        return Response.json({"path": r.path, "sub": r.subpath, "query": r.query, "body": r.body.decode()})

    server.route("/api/", echo, prefix=True, methods=("GET", "HEAD", "POST"))
    server.route("/api/exact", lambda r: Response.text("exact\n"))

    def boom(r: Request) -> Response:
        raise RuntimeError("password=hunter2")

    server.route("/boom", boom)
    return server


async def test_routes_query_head_and_headers() -> None:
    async with serving(make_server()) as port:
        status, headers, body = await asyncio.to_thread(get, port, "/hello?name=ana&x=1")
        assert (status, body) == (200, b"hello ana\n")
        assert headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "unsafe-inline" not in headers["content-security-policy"]
        assert "script-src 'self'" in headers["content-security-policy"]
        status, headers, body = await asyncio.to_thread(get, port, "/hello", "HEAD")
        assert (status, body, headers["content-length"]) == (200, b"", "8")
        status, _, body = await asyncio.to_thread(get, port, "/api/a/b%20c?k=1&k=2&e=")
        doc = json.loads(body)
        assert doc == {"path": "/api/a/b c", "sub": "a/b c", "query": {"k": ["1", "2"], "e": [""]}, "body": ""}
        assert (await asyncio.to_thread(get, port, "/api/exact"))[2] == b"exact\n"  # exact beats prefix
        assert (await asyncio.to_thread(get, port, "/nope"))[0] == 404
        status, headers, _ = await asyncio.to_thread(get, port, "/hello", "DELETE")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        status, _, body = await asyncio.to_thread(get, port, "/boom")
        assert status == 500 and b"hunter2" not in body


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async with serving(make_server()) as port:
        reqs = b"".join(b"GET /hello?name=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(3))
        out = await raw(port, reqs + b"GET /hello?name=last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert out.count(b"HTTP/1.1 200") == 4
        assert out.endswith(b"hello last\n")


async def test_static_files_no_escape_no_listing(static_dir: Path) -> None:
    server = HttpServer(HttpSettings(port=0))
    server.static("/static/", static_dir)
    async with serving(server) as port:
        status, headers, body = await asyncio.to_thread(get, port, "/static/app.js")
        assert (status, body) == (200, b"console.log(1);\n")
        assert headers["content-type"].startswith("text/javascript")
        assert headers["x-content-type-options"] == "nosniff"
        status, _, _ = await asyncio.to_thread(get, port, "/static/app.js", headers={"If-None-Match": headers["etag"]})
        assert status == 304
        assert (await asyncio.to_thread(get, port, "/static/sub/x.css"))[1]["content-type"].startswith("text/css")
        # A directory is never listed; the root serves its index file only.
        assert (await asyncio.to_thread(get, port, "/static/sub/"))[0] == 404
        assert (await asyncio.to_thread(get, port, "/static/"))[2].startswith(b"<!doctype html>")
        # Raw targets, as an attacker sends them (http.client would not normalise, but be explicit).
        for target in (
            b"/static/../secret.txt",
            b"/static/%2e%2e/secret.txt",
            b"/static/sub/../../secret.txt",
            b"/static/..%2fsecret.txt",
            b"/static/link",
            b"/static/.hidden",
            b"/static/sub%5c..%5c..%5csecret.txt",
            b"/static/app.js%00.png",
        ):
            out = await raw(port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 404"), (target, out[:60])
            assert b"SECRET" not in out


async def test_bounds_headers_body_and_connections() -> None:
    server = make_server(max_header_bytes=2048, max_body_bytes=100, max_connections=2)
    async with serving(server) as port:
        out = await raw(port, b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 431")
        out = await raw(port, b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n" + b"a" * 101)
        assert out.startswith(b"HTTP/1.1 413")
        chunked = b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"64\r\n" + b"a" * 100
        out = await raw(port, chunked + b"\r\n64\r\n" + b"a" * 100 + b"\r\n0\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 413")
        out = await raw(port, b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc")
        assert out.startswith(b"HTTP/1.1 200") and b'"body":"abc"' in out
        assert (await raw(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        # Two idle connections hold both slots: a third is answered 503 and closed.
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        try:
            await asyncio.sleep(0.2)
            out = await raw(port, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 503")
        finally:
            for _, w in held:
                w.close()
        for _ in range(50):  # the slots free up once the server sees them close
            await asyncio.sleep(0.05)
            if server._open == 0:
                break
        assert (await asyncio.to_thread(get, port, "/hello"))[0] == 200


async def test_slow_client_times_out() -> None:
    async with serving(make_server(request_timeout=0.3)) as port:
        out = await raw(port, b"GET /hello HTTP/1.1\r\nHo")  # never finishes its head
        assert out.startswith(b"HTTP/1.1 408")


async def test_auth_hook_default_and_per_route() -> None:
    def only_token(r: Request) -> Response | None:
        if r.headers.get("authorization") == "Bearer ok":
            return None
        return Response.text("no\n", 401, www_authenticate='Basic realm="edgeos"')

    server = make_server()
    server.auth = only_token
    server.route("/public", lambda r: Response.text("pub\n"), auth=None)
    async with serving(server) as port:
        status, headers, _ = await asyncio.to_thread(get, port, "/hello")
        assert status == 401 and headers["www-authenticate"] == 'Basic realm="edgeos"'
        assert headers["x-content-type-options"] == "nosniff"
        assert (await asyncio.to_thread(get, port, "/hello", headers={"Authorization": "Bearer ok"}))[0] == 200
        assert (await asyncio.to_thread(get, port, "/public"))[0] == 200


async def test_stream_is_chunked_ends_when_client_leaves_and_at_stop() -> None:
    closed: list[str] = []
    tick = asyncio.Event()

    async def events(name: str) -> AsyncIterator[bytes]:
        try:
            for i in range(1000):
                yield b"data: %d\n\n" % i
                tick.set()
                await asyncio.sleep(0.02)
        finally:
            closed.append(name)

    server = HttpServer(HttpSettings(port=0))
    server.route("/events", lambda r: Response.sse(events(r.arg("n") or "?")))
    async with serving(server) as port:
        # A client that leaves: the generator is closed soon after.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /events?n=left HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"data: 1\n\n"), 5)
        assert b"text/event-stream" in head and b"transfer-encoding: chunked" in head.lower()
        writer.close()
        for _ in range(100):
            if "left" in closed:
                break
            await asyncio.sleep(0.05)
        assert "left" in closed
        # A client still reading when the server stops: closed too.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /events?n=stop HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"data: 1\n\n"), 5)
    assert "stop" in closed  # serving() cancelled the server and waited for it
    async with asyncio.timeout(5):
        while await reader.read(65536):
            pass  # the connection is closed, not left hanging
    writer.close()


async def test_a_stream_that_ends_is_a_whole_body() -> None:
    # A finite stream (a CSV download) ends with the chunked terminator: a client that checks
    # for it (http.client, a browser's download) gets the whole body, not a truncated one.
    async def rows() -> AsyncIterator[bytes]:
        for i in range(3):
            yield b"row %d\n" % i

    server = HttpServer(HttpSettings(port=0))
    server.route("/rows", lambda r: Response(200, b"", content_type="text/csv", stream=rows()))
    async with serving(server) as port:
        status, headers, body = await asyncio.to_thread(get, port, "/rows")
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert body == b"row 0\nrow 1\nrow 2\n"


async def test_stop_is_clean_and_port_is_free_again() -> None:
    server = make_server()
    async with serving(server) as port:
        held = await asyncio.open_connection("127.0.0.1", port)  # an idle keep-alive client
        assert (await asyncio.to_thread(get, port, "/hello"))[0] == 200
    assert server._open == 0 and not server.started.is_set()
    held[1].close()
    again = HttpServer(HttpSettings(port=port))
    again.route("/hello", lambda r: Response.text("again\n"))
    async with serving(again):
        assert (await asyncio.to_thread(get, port, "/hello"))[2] == b"again\n"


async def test_tls(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server = make_server(tls_cert=cert, tls_key=key)
    async with serving(server) as port:
        status, _, body = await asyncio.to_thread(get, port, "/hello?name=tls", tls=True)
        assert (status, body) == (200, b"hello tls\n")
        out = await raw(port, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")  # plain text to a TLS port
        assert b"hello" not in out
