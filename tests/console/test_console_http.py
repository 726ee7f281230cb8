"""The console over HTTP without a browser: auth, TLS, headers, no escape from the assets,
the config rules at load, the password file, masking and the tag page's paging."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import ssl
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edgeos.config import load_config
from edgeos.errors import ConfigError

BASE = """\
[gateway]
id = "gw-http"
data_dir = "data"

[[devices]]
name = "press"
protocol = "simulated"
poll_interval = "100ms"
tags = [{ name = "temperature", signal = "sine", amplitude = 20.0, offset = 60.0, period = "30s" }]
"""


def _write(tmp_path: Path, console: str) -> Path:
    p = tmp_path / "edgeos.toml"
    p.write_text(BASE + textwrap.dedent(console))
    return p


def test_non_loopback_bind_without_auth_is_refused_at_load(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, '[http]\naddress = "0.0.0.0"\n'))
    assert "console.password_file" in str(e.value) and '"0.0.0.0" is not loopback' in str(e.value)
    assert load_config(_write(tmp_path, '[http]\naddress = "0.0.0.0"\n[console]\nallow_anonymous = true\n'))
    assert load_config(_write(tmp_path, '[http]\naddress = "0.0.0.0"\n[console]\nenabled = false\n'))
    (tmp_path / "console.passwd").write_text("admin:scrypt$x\n")
    cfg = load_config(_write(tmp_path, '[http]\naddress = "192.0.2.1"\n[console]\npassword_file = "console.passwd"\n'))
    assert cfg.console.password_file == tmp_path / "console.passwd"
    for ok in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert load_config(_write(tmp_path, f'[http]\naddress = "{ok}"\n')).http.address == ok
    cfg = load_config(_write(tmp_path, ""))
    assert cfg.console.enabled and cfg.http.address == "127.0.0.1"
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, '[console]\npassword_file = "missing.passwd"\n'))
    assert "console.password_file: file 'missing.passwd' not found" in str(e.value)


def test_passwd_command_writes_a_salted_hash_only(tmp_path):
    from edgeos.console.auth import read_users, verify_password

    pw = tmp_path / "console.passwd"
    for _ in range(2):  # the same password twice: two different salts, one line per user
        done = subprocess.run(
            [sys.executable, "-m", "edgeos", "console", "passwd", str(pw), "--user", "op", "--stdin"],
            input="correct horse\n", capture_output=True, text=True, cwd=tmp_path, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    text = pw.read_text()
    assert "correct horse" not in text and text.startswith("op:scrypt$") and text.count("\n") == 1
    assert os.stat(pw).st_mode & 0o777 == 0o600
    assert verify_password("correct horse", read_users(pw)["op"])
    assert not verify_password("correct horsf", read_users(pw)["op"])
    short = subprocess.run(
        [sys.executable, "-m", "edgeos", "console", "passwd", str(pw), "--stdin"],
        input="short\n", capture_output=True, text=True, cwd=tmp_path, timeout=30,
    )  # fmt: skip
    assert short.returncode == 2 and "8 characters" in short.stderr


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "console.crt", tmp_path / "console.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def _get(url: str, ctx: ssl.SSLContext | None, auth: tuple[str, str] | None = None, method: str = "GET"):
    req = urllib.request.Request(url, method=method)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


async def test_tls_and_password_wrong_password_gets_401(tmp_path, tls_files):
    from edgeos.console.auth import set_password
    from edgeos.runtime import Runtime

    cert, key = tls_files
    set_password(tmp_path / "console.passwd", "op", "correct horse")
    cfg = load_config(
        _write(
            tmp_path,
            f"""
            [http]
            port = 0
            tls_cert = "{cert.name}"
            tls_key = "{key.name}"

            [console]
            password_file = "console.passwd"
            """,
        )
    )
    rt = Runtime(cfg)
    task = asyncio.create_task(rt.run())
    try:
        async with asyncio.timeout(15):
            while rt.console_url is None:
                await asyncio.sleep(0.02)
        url = rt.console_url
        assert url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(cert))

        def checks() -> None:
            status, headers, _ = _get(url, ctx)
            assert status == 401 and headers["www-authenticate"].startswith("Basic ")
            assert _get(url + "api/overview", ctx, ("op", "wrong horse"))[0] == 401
            assert _get(url + "api/overview", ctx, ("nobody", "correct horse"))[0] == 401
            assert _get(url + "static/console.js", ctx)[0] == 401  # assets too
            assert _get(url + "healthz", ctx)[0] == 200  # the server's own routes keep their own auth
            status, headers, body = _get(url, ctx, ("op", "correct horse"))
            assert status == 200 and b"/static/console.js" in body
            csp = headers["content-security-policy"]
            assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
            assert headers["x-content-type-options"] == "nosniff"
            status, _, body = _get(url + "api/overview", ctx, ("op", "correct horse"))
            assert status == 200 and b'"gw-http"' in body
            # Read-only: no method but GET and HEAD.
            assert _get(url + "api/overview", ctx, ("op", "correct horse"), method="POST")[0] == 405
            # No listing, nothing outside the assets, however it is spelled.
            for path in ("static/", "static/../app.py", "static/%2e%2e/app.py", "static/.x", "api/", "app.py",
                         "static/..%2fdata.py", "../../etc/passwd"):  # fmt: skip
                assert _get(url + path, ctx, ("op", "correct horse"))[0] == 404, path
            with pytest.raises(urllib.error.URLError):  # a client that does not trust the cert
                urllib.request.urlopen(url, context=ssl.create_default_context(), timeout=10)

        await asyncio.to_thread(checks)
    finally:
        rt.stop()
        await asyncio.wait_for(task, 15)


def test_masked_hides_every_secret_looking_key():
    from edgeos.console.data import MASK, masked

    raw = {
        "upstream": {"username": "u", "password_file": "p.txt", "password_env": "PW"},
        "devices": [
            {"name": "d", "options": {"api_token": "t0k", "Secret": "s", "private_key": "k"}, "port": 502},
            {"name": "o", "endpoint": "opc.tcp://operator:pw-in-url@plc:4840/", "nodes": ["opc.tcp://a:b@x/"]},
        ],
    }
    m = masked(raw)
    assert m["upstream"] == {"username": "u", "password_file": MASK, "password_env": MASK}
    assert m["devices"][0]["options"] == {"api_token": MASK, "Secret": MASK, "private_key": MASK}
    assert m["devices"][0]["port"] == 502
    # A URL's password is masked wherever it is, as the logs mask it.
    assert m["devices"][1]["endpoint"] == "opc.tcp://operator:***@plc:4840/"
    assert m["devices"][1]["nodes"] == ["opc.tcp://a:***@x/"] and "pw-in-url" not in str(m)


def test_tags_page_filters_and_pages_10000_tags(tmp_path):
    from edgeos.console.data import ConsoleData
    from edgeos.runtime import Runtime

    rows = "\n".join(f"t{i:05d},sine" for i in range(5000))
    (tmp_path / "tags.csv").write_text("name,signal\n" + rows + "\n")
    body = "\n".join(f'[[devices]]\nname = "{d}"\nprotocol = "simulated"\ntags_csv = "tags.csv"\n' for d in ("a", "b"))
    p = tmp_path / "big.toml"
    p.write_text('[gateway]\nid = "big"\ndata_dir = "data"\n' + body)
    data = ConsoleData(Runtime(load_config(p)))
    try:
        page = data.tags(limit=100)
        assert (page["total"], page["matched"], len(page["rows"])) == (10_000, 10_000, 100)
        page = data.tags(q="t0004", device="b", offset=5, limit=3)
        assert page["matched"] == 10 and [r["name"] for r in page["rows"]] == ["t00045", "t00046", "t00047"]
        assert {r["device"] for r in page["rows"]} == {"b"}
        assert page["rows"][0]["quality"] == "BAD_WAITING_FOR_INITIAL_DATA" and page["rows"][0]["severity"] == "bad"
        assert data.tags(q="nothing")["rows"] == []
        assert len(data.tags(limit=10**6)["rows"]) == 500  # a page is bounded
    finally:
        data.close()


def test_demo_prints_the_console_url(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "edgeos", "demo", "--dir", str(tmp_path / "demo"), "--duration", "1.5"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    first = done.stdout.split("\n\n")[0]
    assert re.search(r"console: http://127\.0\.0\.1:\d+/ ", first), first
