"""The web console against its documents (docs/console.md, docs/config.md `[console]`/`[http]`,
docs/metrics.md "The HTTP server"), over HTTP only (http.client), against one real daemon.

One `edgeos run` in its own process, with a simulated device, a Modbus TCP device read from a
pymodbus server in its own process (stopped and started again once, so the history holds a Bad
period), a disabled OPC UA device whose options hold secrets, the server on 127.0.0.2 and a
console password file made with `edgeos console passwd`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
import socket
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
EDGEOS = str(BIN / "edgeos")
HOST = "127.0.0.2"
USER, PASSWORD = "alice", "correct-horse-7"
SECRET_URL_PW = "urlpass-canary-55"
SECRET_FILE_PW = "opcua-pw-canary-93"
MQTT_FILE_PW = "mqtt-pw-canary-41"

MODBUS_SERVER = """\
import asyncio, sys
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

async def main(port):
    regs = [0] * 100
    regs[0] = 1234  # level: 123.4 l with scale 0.1
    regs[1] = 42
    bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
    dev = SimDevice(1, simdata=(bits, bits, [SimData(0, count=100, values=regs, datatype=DataType.REGISTERS)],
                                [SimData(0, count=100, values=0, datatype=DataType.REGISTERS)]))
    server = ModbusTcpServer([dev], address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1])))
"""

PAGES = ["/", "/tags", "/trend", "/config"]
DATA = ["/api/overview", "/api/tags", "/api/trend?tag=filler/level&since=1m", "/api/export.csv?since=1m", "/api/config"]
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


AUTH = basic(USER, PASSWORD)


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Gateway:
    dir: Path
    config: Path
    port: int
    proc: subprocess.Popen
    modbus: list[subprocess.Popen] = field(default_factory=list)
    outage: dict = field(default_factory=dict)

    def request(self, path: str, method: str = "GET", headers: dict | None = None, timeout: float = 5) -> Resp:
        import http.client

        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request(method, path, headers=AUTH if headers is None else headers)
            r = conn.getresponse()
            body = r.read()
            return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, body)
        finally:
            conn.close()

    def get_json(self, path: str):
        r = self.request(path)
        assert r.status == 200, (path, r.status, r.body[:300])
        return r.json()

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [EDGEOS, *args, "-c", str(self.config)], capture_output=True, text=True, timeout=15, cwd="/tmp"
        )
        assert out.returncode == 0, out.stderr
        return out.stdout


def start_modbus(script: Path, port: int) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, str(script), str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    line = p.stdout.readline()  # bounded by the server printing or dying
    assert line.startswith("ready"), line
    return p


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def wait_for(pred, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, AssertionError, KeyError, ValueError):
            last = pred()
            if last:
                return last
        time.sleep(step)
    raise AssertionError(f"not within {timeout} s (last: {last!r})")


def rows_by_key(gw: Gateway, query: str = "") -> dict[str, dict]:
    d = gw.get_json("/api/tags" + query)
    return {r["device"] + "/" + r["name"]: r for r in d["rows"]}


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> Gateway:
    d = tmp_path_factory.mktemp("console-doc")
    script = d / "modbus_server.py"
    script.write_text(MODBUS_SERVER)
    mport, hport = free_port("127.0.0.1"), free_port(HOST)
    (d / "opc.pw").write_text(SECRET_FILE_PW + "\n")
    (d / "mqtt.pw").write_text(MQTT_FILE_PW + "\n")
    os.chmod(d / "opc.pw", 0o600)
    os.chmod(d / "mqtt.pw", 0o600)
    pw = subprocess.run(
        [EDGEOS, "console", "passwd", str(d / "console.passwd"), "--user", USER, "--stdin"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=15,
        cwd="/tmp",
    )
    assert pw.returncode == 0, pw.stderr
    config = d / "edgeos.toml"
    config.write_text(
        textwrap.dedent(f"""\
        [gateway]
        id = "doc-console-gw"
        data_dir = "data"

        [[devices]]
        name = "press"
        protocol = "simulated"
        poll_interval = "200ms"
        tags = [
          {{ name = "temperature", signal = "sine", amplitude = 20.0, offset = 60.0, period = "30s", unit = "degC" }},
          {{ name = "state", signal = "text", period = "15s", states = ["RUN", "IDLE"] }},
        ]

        [[devices]]
        name = "filler"
        protocol = "modbus"
        host = "127.0.0.1"
        port = {mport}
        poll_interval = "250ms"
        reconnect_min = "100ms"
        reconnect_max = "300ms"
        tags = [
          {{ name = "level", address = "40001", type = "uint16", scale = 0.1, unit = "l" }},
          {{ name = "count", address = "40002", type = "uint16" }},
        ]

        [[devices]]
        name = "cell"
        protocol = "opcua"
        enabled = false
        endpoint = "opc.tcp://operator:{SECRET_URL_PW}@127.0.0.1:1/"
        security_mode = "None"
        username = "operator"
        password_file = "opc.pw"
        tags = [{{ name = "speed", node = "ns=2;s=Speed" }}]

        [upstream]
        enabled = false
        username = "line-7"
        password_file = "mqtt.pw"

        [http]
        address = "{HOST}"
        port = {hport}

        [console]
        password_file = "console.passwd"
        """)
    )
    mb = start_modbus(script, mport)
    with open(d / "daemon.log", "w") as log:
        proc = subprocess.Popen([EDGEOS, "run", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=log, cwd="/tmp")
    g = Gateway(d, config, hport, proc, [mb])
    try:

        def good():
            r = rows_by_key(g)
            return all(r[k]["quality"] == "GOOD" for k in ("press/temperature", "filler/level", "filler/count"))

        wait_for(good, 15)
        time.sleep(0.5)
        # An outage of the Modbus server: a Bad period in the history, then Good again.
        stop(mb)
        g.outage["bad_rows"] = wait_for(
            lambda: (r := rows_by_key(g, "?device=filler")) and r["filler/level"]["quality"] != "GOOD" and r, 5
        )
        g.outage["bad_overview"] = g.get_json("/api/overview")
        time.sleep(1.0)
        g.modbus.append(start_modbus(script, mport))
        wait_for(lambda: rows_by_key(g, "?device=filler")["filler/level"]["quality"] == "GOOD", 8)
        time.sleep(0.5)
        yield g
    finally:
        stop(proc)
        for p in g.modbus:
            stop(p)


# -- pages and assets ---------------------------------------------------------------------


def asset_refs(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)


def external_urls(text: str) -> list[str]:
    found = re.findall(r"""https?://[^\s"'()<>`]+""", text)
    namespaces = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink", "http://www.w3.org/1999/xhtml"}
    return [u for u in found if u.rstrip("/") not in namespaces and not u.startswith(f"http://{HOST}")]


def test_pages_are_html_and_load_nothing_from_elsewhere(gw):
    assets: set[str] = set()
    for page in PAGES:
        r = gw.request(page)
        assert r.status == 200, page
        assert r.headers["content-type"].startswith("text/html"), page
        html = r.body.decode()
        assert external_urls(html) == [], page
        # script-src 'self', no inline script anywhere
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), page
        assert not re.search(r"\son[a-z]+\s*=", html), page
        for ref in asset_refs(html):
            if ref.startswith("/static/"):
                assets.add(ref)
            else:
                assert ref.startswith("/") and not ref.startswith("//"), (page, ref)
    assert "/static/console.js" in assets
    kinds = {".js": "javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    total = 0
    for a in assets:
        r = gw.request(a)
        assert r.status == 200, a
        ext = os.path.splitext(a)[1]
        if ext in kinds:
            assert kinds[ext] in r.headers["content-type"], (a, r.headers["content-type"])
        assert external_urls(r.body.decode(errors="replace")) == [], a
        total += len(r.body)
    assert total < 60_000  # "about 30 KB in all"


def test_every_response_carries_the_security_headers(gw):
    responses = {
        "page": gw.request("/"),
        "asset": gw.request("/static/console.js"),
        "json": gw.request("/api/overview"),
        "csv": gw.request("/api/export.csv?since=10s"),
        "401": gw.request("/api/tags", headers={}),
        "404": gw.request("/static/nope.js"),
        "405": gw.request("/api/tags", method="POST"),
        "400": gw.request("/api/trend?tag=press/temperature&since=garbage"),
        "metrics": gw.request("/metrics", headers={}),
        "healthz": gw.request("/healthz", headers={}),
    }
    for what, r in responses.items():
        for name, value in SECURITY_HEADERS.items():
            assert r.headers.get(name) == value, (what, name, r.headers)
        csp = r.headers.get("content-security-policy", "")
        directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
        assert directives.get("script-src") == ["'self'"], (what, csp)
        assert directives.get("frame-ancestors") == ["'none'"], (what, csp)
        assert "'unsafe-inline'" not in csp, (what, csp)


def test_paths_outside_the_fixed_table_are_404(gw):
    import http.client

    for path in [
        "/static/",
        "/static/../edgeos.toml",
        "/static/%2e%2e/edgeos.toml",
        "/static/..%2fedgeos.toml",
        "/static/.hidden",
        "/static/nope.js",
        "/nope",
        "/api/nope",
        "/edgeos.toml",
        "/console.passwd",
    ]:
        conn = http.client.HTTPConnection(HOST, gw.port, timeout=5)
        conn.putrequest("GET", path, skip_accept_encoding=True)  # sent as written, no normalising
        for k, v in AUTH.items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        body = r.read()
        conn.close()
        assert r.status == 404, (path, r.status)
        assert b"[gateway]" not in body and b"scrypt$" not in body, path


# -- read-only ----------------------------------------------------------------------------


def test_routes_answer_get_and_head_only(gw):
    before = gw.config.read_bytes(), (gw.dir / "console.passwd").read_bytes()
    for path in PAGES + DATA + ["/static/console.js", "/api/stream?ids=0"]:
        head = gw.request(path, method="HEAD")
        assert head.status == 200, (path, head.status)
        assert head.body == b"", path
        for method in ["POST", "PUT", "DELETE", "PATCH"]:
            r = gw.request(path, method=method)
            assert r.status == 405, (method, path, r.status)
    assert (gw.config.read_bytes(), (gw.dir / "console.passwd").read_bytes()) == before
    assert gw.proc.poll() is None


# -- authentication -----------------------------------------------------------------------


def test_console_needs_a_password_and_metrics_keep_their_own_rules(gw):
    for path in PAGES + DATA + ["/static/console.js", "/api/stream?ids=0"]:
        for headers in [
            {},
            basic(USER, "wrong-password"),
            basic("mallory", PASSWORD),
            basic(USER, PASSWORD + "x"),
            {"Authorization": "Basic !!!not-base64!!!"},
            {"Authorization": "Bearer " + PASSWORD},
        ]:
            r = gw.request(path, headers=headers)
            assert r.status == 401, (path, headers, r.status)
            assert PASSWORD.encode() not in r.body
        r = gw.request(path, headers={})
        assert r.headers.get("www-authenticate", "").lower().startswith("basic"), path  # what makes browsers ask
    assert gw.request("/", headers=AUTH).status == 200
    metrics = gw.request("/metrics", headers={})
    assert metrics.status == 200
    assert b"edgeos_device_up" in metrics.body
    assert gw.request("/healthz", headers={}).status in (200, 503)


def test_passwd_command_writes_a_salted_hash_file(gw, tmp_path):
    f = tmp_path / "users.passwd"
    run = [EDGEOS, "console", "passwd", str(f), "--stdin"]
    r = subprocess.run(run, input="short7\n", capture_output=True, text=True, timeout=15, cwd="/tmp")
    assert r.returncode != 0
    assert not f.exists() or "admin:" not in f.read_text()
    r = subprocess.run(run, input="long-enough-1\n", capture_output=True, text=True, timeout=15, cwd="/tmp")
    assert r.returncode == 0, r.stderr
    r = subprocess.run(run + ["--user", "op"], input="long-enough-1\n", capture_output=True, text=True, timeout=15)
    assert r.returncode == 0, r.stderr
    text = f.read_text()
    lines = text.splitlines()
    assert [ln.split(":", 1)[0] for ln in lines] == ["admin", "op"]  # --user defaults to admin
    assert all(ln.split(":", 1)[1].startswith("scrypt$") for ln in lines)
    assert lines[0].split(":", 1)[1] != lines[1].split(":", 1)[1]  # salted
    assert "long-enough-1" not in text
    assert stat.S_IMODE(f.stat().st_mode) == 0o600


def test_password_file_is_reread_when_it_changes(gw):
    f = gw.dir / "console.passwd"

    def passwd(user: str, password: str) -> None:
        r = subprocess.run(
            [EDGEOS, "console", "passwd", str(f), "--user", user, "--stdin"],
            input=password + "\n",
            capture_output=True,
            text=True,
            timeout=15,
            cwd="/tmp",
        )
        assert r.returncode == 0, r.stderr

    assert gw.request("/api/overview", headers=basic("bob", "first-pass-1")).status == 401
    passwd("bob", "first-pass-1")
    wait_for(lambda: gw.request("/api/overview", headers=basic("bob", "first-pass-1")).status == 200, 8, 0.3)
    passwd("bob", "second-pass-2")
    wait_for(lambda: gw.request("/api/overview", headers=basic("bob", "second-pass-2")).status == 200, 8, 0.3)
    assert gw.request("/api/overview", headers=basic("bob", "first-pass-1")).status == 401
    assert gw.request("/api/overview").status == 200  # alice untouched


def check_config(tmp_path: Path, name: str, http: str, console: str) -> subprocess.Popen:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(
        textwrap.dedent("""\
        [gateway]
        id = "chk"
        data_dir = "data"

        [[devices]]
        name = "press"
        protocol = "simulated"
        tags = [{ name = "t", signal = "sine" }]
        """)
        + f"\n[http]\n{http}\n\n[console]\n{console}\n"
    )
    return subprocess.Popen(
        [EDGEOS, "check", "-c", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/tmp"
    )


def test_non_loopback_address_is_refused_at_load_without_a_password(tmp_path):
    made = subprocess.run(
        [EDGEOS, "console", "passwd", str(tmp_path / "c.passwd"), "--stdin"],
        input="long-enough-1\n",
        capture_output=True,
        text=True,
        timeout=15,
        cwd="/tmp",
    )
    assert made.returncode == 0, made.stderr
    cases = {
        "any": ('address = "0.0.0.0"', "", False),
        "plant": ('address = "10.20.30.40"', "", False),
        "anonymous": ('address = "0.0.0.0"', "allow_anonymous = true", True),
        "off": ('address = "0.0.0.0"', "enabled = false", True),
        "password": ('address = "0.0.0.0"', 'password_file = "c.passwd"', True),
    }
    procs = {k: check_config(tmp_path, k, http, console) for k, (http, console, _) in cases.items()}
    for k, p in procs.items():
        out, err = p.communicate(timeout=20)
        ok = cases[k][2]
        assert (p.returncode == 0) == ok, (k, p.returncode, out, err)
        if not ok:
            assert "password_file" in out + err, (k, out, err)


# -- overview -----------------------------------------------------------------------------


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def test_overview_reports_gateway_devices_store_and_upstream(gw):
    t0 = time.time_ns()
    o = gw.get_json("/api/overview")
    version = subprocess.run([EDGEOS, "version"], capture_output=True, text=True, timeout=15, cwd="/tmp")
    text = json.dumps(o)
    g = o["gateway"]
    assert g["id"] == "doc-console-gw"
    assert f"edgeos {g['version']}" in version.stdout
    kernels = re.search(r"kernels: (\w+)", version.stdout).group(1)
    assert g["kernels"] == kernels
    assert 2 < g["uptime_s"] < 120
    devices = {d["name"]: d for d in o["devices"]}
    assert set(devices) == {"press", "filler", "cell"}
    for name in ("press", "filler"):
        dev = devices[name]
        assert dev["state"] == "running" and dev["up"] is True
        assert abs(dev["last_ok_ns"] - t0) < 3e9  # last good poll, ns since the epoch
        assert "lateness_ms" in dev
    assert devices["filler"]["errors"] >= 1  # the outage
    assert devices["cell"]["enabled"] is False and devices["cell"]["up"] is False
    bad = {d["name"]: d for d in gw.outage["bad_overview"]["devices"]}["filler"]
    assert bad["up"] is False and bad["errors"] >= 1 and bad["last_error"]
    metrics = gw.request("/metrics").body.decode()
    s = o["store"]
    assert s["max_size"] == metric(metrics, "edgeos_store_budget_bytes")
    assert 0 < s["used_bytes"] <= s["max_size"]
    assert s["horizon_ns"] / 1e9 == pytest.approx(
        metric(metrics, "edgeos_store_oldest_sample_timestamp_seconds"), abs=2
    )
    assert t0 - 120e9 < s["horizon_ns"] < t0
    u = o["upstream"]
    assert u["enabled"] is False and u["connected"] is False
    assert "lag_s" in u and ("backlog_samples" in u or "backlog" in u)
    for secret in (SECRET_URL_PW, SECRET_FILE_PW, MQTT_FILE_PW, PASSWORD):
        assert secret not in text
    later = gw.get_json("/api/overview")
    assert later["gateway"]["uptime_s"] > g["uptime_s"]


# -- tags ---------------------------------------------------------------------------------


def test_tags_rows_match_edgeos_tags(gw):
    d = gw.get_json("/api/tags")
    assert d["limit"] == 100 and d["offset"] == 0  # pages of 100
    assert d["total"] == d["matched"] == 5  # every tag, the disabled device's too
    rows = {r["device"] + "/" + r["name"]: r for r in d["rows"]}
    assert set(rows) == {"press/temperature", "press/state", "filler/level", "filler/count", "cell/speed"}
    for key, r in rows.items():
        if key == "cell/speed":
            assert r["quality"] != "GOOD" and r["value"] is None
            continue
        assert r["quality"] == "GOOD"
        assert 0 <= d["now_ns"] - r["ts"] < 3e9  # age
    assert rows["press/temperature"]["unit"] == "degC"
    assert rows["filler/level"]["unit"] == "l"
    assert rows["filler/level"]["value"] == 123.4
    assert rows["filler/count"]["value"] == 42
    assert rows["press/state"]["value"] in ("RUN", "IDLE")
    cli = {j["tag"]: j for j in map(json.loads, gw.cli("tags", "--format", "json").splitlines())}
    for key in ("filler/level", "filler/count", "press/temperature", "press/state"):
        assert cli[key]["unit"] == rows[key]["unit"], key
        assert cli[key]["quality"] == rows[key]["quality"], key
    assert cli["filler/level"]["value"] == rows["filler/level"]["value"]
    assert cli["filler/count"]["value"] == rows["filler/count"]["value"]
    # the value shown for the sine is one the store holds at that time
    t = rows["press/temperature"]
    ts_s = t["ts"] / 1e9
    out = gw.cli(
        "query", "press/temperature", "--since", f"@{ts_s - 1:.3f}", "--until", f"@{ts_s + 1:.3f}", "-f", "json"
    )
    near = [j for j in map(json.loads, out.splitlines()) if j["value"] is not None]
    assert any(math.isclose(j["value"], t["value"], rel_tol=1e-12) for j in near), (t, near)


def test_tags_quality_names_during_the_outage(gw):
    rows = gw.outage["bad_rows"]
    for key in ("filler/level", "filler/count"):
        assert re.fullmatch(r"BAD_[A-Z_]+", rows[key]["quality"]), rows[key]
        assert rows[key]["value"] is None
    cli = [json.loads(ln) for ln in gw.cli("query", "filler/level", "--since", "5m", "-f", "json").splitlines()]
    assert rows["filler/level"]["quality"] in {j["quality"] for j in cli}


def test_tags_filter_by_text_and_device_and_paging(gw):
    def keys(q: str) -> list[str]:
        return [r["device"] + "/" + r["name"] for r in gw.get_json("/api/tags?" + q)["rows"]]

    assert keys("q=ller/le") == ["filler/level"]  # any part of device/tag, across the slash
    assert keys("q=temp") == ["press/temperature"]
    assert set(keys("q=press/")) == {"press/temperature", "press/state"}
    assert set(keys("device=filler")) == {"filler/level", "filler/count"}
    assert keys("device=filler&q=count") == ["filler/count"]
    assert keys("q=no-such-tag") == []
    d = gw.get_json("/api/tags?device=press")
    assert d["matched"] == 2 and d["total"] == 5
    assert set(gw.get_json("/api/tags")["devices"]) >= {"press", "filler"}
    everything = keys("")
    pages = keys("limit=3&offset=0") + keys("limit=3&offset=3")
    assert pages == everything


def test_tags_stream_sends_the_shown_tags_live(gw):
    import http.client

    rows = rows_by_key(gw)
    ids = [rows["press/temperature"]["id"], rows["filler/level"]["id"]]
    conn = http.client.HTTPConnection(HOST, gw.port, timeout=5)
    conn.request("GET", "/api/stream?ids=" + ",".join(map(str, ids)), headers=AUTH)
    r = conn.getresponse()
    assert r.status == 200
    assert r.getheader("content-type").startswith("text/event-stream")
    events = []
    t0 = time.monotonic()
    buf = b""
    while time.monotonic() - t0 < 1.3 and len(events) < 12:
        buf += r.fp.read1(65536)
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            data = [ln[5:].strip() for ln in ev.split(b"\n") if ln.startswith(b"data:")]
            if data:
                events.append((time.monotonic() - t0, json.loads(b"\n".join(data))))
    conn.close()
    assert len(events) >= 3, events
    span = events[-1][0] - events[0][0]
    assert len(events) - 1 <= 4 * span + 2  # checked 4 times a second
    seen = {row["id"] for _, e in events for row in e["rows"]}
    assert seen <= set(ids) and rows["press/temperature"]["id"] in seen
    temps = [row["value"] for _, e in events for row in e["rows"] if row["id"] == ids[0]]
    assert len(set(temps)) >= 2  # the sine moves: values as they change
    assert gw.proc.poll() is None


# -- trend --------------------------------------------------------------------------------


def trend(gw: Gateway, query: str) -> Resp:
    return gw.request("/api/trend?" + query)


def test_trend_buckets_match_the_raw_history(gw):
    now = time.time() - 0.5
    since, until = now - 8, now
    d = gw.get_json(f"/api/trend?tag=press/temperature&since=@{since:.3f}&until=@{until:.3f}&width=16")
    assert d["buckets"] == 16
    (s,) = d["series"]
    assert s["tag"] == "press/temperature" and s["unit"] == "degC"
    assert len(s["mean"]) == len(s["min"]) == len(s["max"]) == 16
    raw = [
        j
        for j in map(
            json.loads,
            gw.cli(
                "query", "press/temperature", "--since", f"@{since:.3f}", "--until", f"@{until:.3f}", "-f", "json"
            ).splitlines(),
        )
    ]
    assert s["samples"] == len(raw)
    t0, step = d["since_ns"], d["step_ns"]
    checked = 0
    for i in range(16):
        lo, hi = t0 + i * step, t0 + (i + 1) * step
        vals = []
        for j in raw:
            ns = round(datetime.fromisoformat(j["time"].replace("Z", "+00:00")).timestamp() * 1000) * 1_000_000
            # leave out samples within 1 ms of a bucket edge (the store keeps ms)
            if lo + 1_000_000 <= ns < hi - 1_000_000:
                vals.append(j["value"])
            elif lo - 1_000_000 <= ns < hi + 1_000_000:
                vals = None
                break
        if not vals:
            continue
        checked += 1
        assert s["min"][i] == pytest.approx(min(vals), rel=1e-9), i
        assert s["max"][i] == pytest.approx(max(vals), rel=1e-9), i
        assert s["mean"][i] == pytest.approx(sum(vals) / len(vals), rel=1e-9), i
    assert checked >= 4


def test_trend_bad_period_is_reported_and_left_out(gw):
    raw = [json.loads(ln) for ln in gw.cli("query", "filler/level", "--since", "5m", "-f", "json").splitlines()]
    first_bad = next(i for i, j in enumerate(raw) if j["quality"] != "GOOD")
    next_good = next(i for i in range(first_bad, len(raw)) if raw[i]["quality"] == "GOOD")

    def ns(j):
        return round(datetime.fromisoformat(j["time"].replace("Z", "+00:00")).timestamp() * 1000) * 1_000_000

    b0, b1 = ns(raw[first_bad]), ns(raw[next_good])
    assert b1 - b0 > 1e9  # the server was away for more than a second
    since, until = (b0 - 3e9) / 1e9, (b1 + 3e9) / 1e9
    d = gw.get_json(f"/api/trend?tag=filler/level&since=@{since:.3f}&until=@{until:.3f}&width=200")
    (s,) = d["series"]
    assert len(s["bad"]) == 1, s["bad"]
    lo, hi = s["bad"][0]
    assert abs(lo - b0) <= 1_000_000 and abs(hi - b1) <= 1_000_000  # first Bad sample to next usable one
    t0, step = d["since_ns"], d["step_ns"]
    inside = [i for i in range(d["buckets"]) if t0 + i * step > b0 + 1e6 and t0 + (i + 1) * step < b1 - 1e6]
    assert inside and all(s["mean"][i] is None for i in inside)  # line broken across it
    good = [v for v in s["mean"] if v is not None]
    assert good and all(v == pytest.approx(123.4) for v in good)  # no Bad (NaN) sample in a bucket


def test_trend_several_tags_limit_and_duplicates(gw):
    tags = ["press/temperature", "press/state", "filler/level", "filler/count"]
    d = gw.get_json("/api/trend?" + "&".join(f"tag={t}" for t in tags) + "&since=1m&width=100")
    assert [s["tag"] for s in d["series"]] == tags
    d = gw.get_json("/api/trend?tag=press/temperature&tag=press/temperature&since=1m&width=100")
    assert [s["tag"] for s in d["series"]] == ["press/temperature"]  # named twice, shown once
    nine = "&".join(f"tag={t}" for t in tags * 2 + ["press/temperature"])
    r = trend(gw, nine + "&since=1m")  # 9 names, 4 distinct: not over the limit
    assert r.status == 200, r.body
    many = "&".join(f"tag=press/t{i}" for i in range(9))
    r = trend(gw, many + "&since=1m")
    assert r.status == 400
    assert "8" in r.body.decode()  # naming the limit


def test_trend_ranges_and_downsampling(gw):
    now = time.time_ns()
    for rng, span in [("1h", 3600e9), ("24h", 86400e9), ("7d", 7 * 86400e9)]:
        d = gw.get_json(f"/api/trend?tag=press/temperature&since={rng}&until=now&width=1000")
        assert d["until_ns"] == pytest.approx(now, abs=10e9)
        assert d["until_ns"] - d["since_ns"] == pytest.approx(span, rel=1e-6)
        assert d["buckets"] <= 1000  # a week arrives as about 1,000 points
        (s,) = d["series"]
        assert len(s["mean"]) == d["buckets"]
        assert d["step_ns"] * d["buckets"] >= d["until_ns"] - d["since_ns"]
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now / 1e9 - 120))
    d = gw.get_json(f"/api/trend?tag=press/temperature&since={iso}&until=now&width=300")
    assert d["since_ns"] == pytest.approx(now - 120e9, abs=5e9)
    assert d["buckets"] == 300  # one per pixel


def test_trend_bad_inputs_are_errors_not_crashes(gw):
    cases = [
        "tag=nope/nothing&since=1h",
        "tag=press/temperature&since=garbage",
        "tag=press/temperature&since=now&until=1h",
        "tag=press/temperature&since=@99999999999999",
        "tag=press/temperature&since=1h&width=abc",
        "since=1h",
        "tag=press/temperature&since=1h&until=yesterday-ish",
    ]
    for q in cases:
        r = trend(gw, q)
        assert r.status == 400, (q, r.status, r.body[:200])
        assert r.headers["content-type"].startswith("application/json"), q
        assert r.json()["error"], q
    assert "nope/nothing" in trend(gw, cases[0]).json()["error"]
    for q in ["tag=press/temperature&since=100000d", "tag=press/temperature&since=1h&width=10000000"]:
        r = trend(gw, q)
        assert r.status in (200, 400), (q, r.status)
        if r.status == 200:
            assert r.json()["buckets"] <= 10_000
    for q in ["tag=nope/nothing&since=1h", "tag=press/temperature&since=garbage"]:
        r = gw.request("/api/export.csv?" + q)
        assert r.status == 400, (q, r.status)
    assert gw.request("/api/overview").status == 200
    assert gw.proc.poll() is None


def test_download_csv_is_the_export_file(gw):
    now = time.time()
    since, until = now - 6, now - 1
    q = f"tag=filler/level&tag=press/temperature&since=@{since:.3f}&until=@{until:.3f}"
    r = gw.request("/api/export.csv?" + q)
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/csv")
    out = subprocess.run(
        [EDGEOS, "export", "--since", f"@{since:.3f}", "--until", f"@{until:.3f}"]
        + ["filler/level", "press/temperature", "-o", "-", "-c", str(gw.config)],
        capture_output=True,
        timeout=15,
        cwd="/tmp",
    )
    assert out.returncode == 0, out.stderr
    assert r.body == out.stdout
    assert r.body.startswith(b"time,tag,value,quality\n")
    assert r.body.count(b"\n") > 20


# -- config -------------------------------------------------------------------------------


def test_config_hides_every_secret(gw):
    d = gw.get_json("/api/config")
    cfg = d["config"]
    assert cfg["gateway"]["id"] == "doc-console-gw"
    assert cfg["console"]["password_file"] == "********"
    assert cfg["upstream"]["password_file"] == "********"
    assert cfg["upstream"]["username"] == "line-7"  # not a secret
    cell = next(x for x in cfg["devices"] if x["name"] == "cell")
    assert cell["password_file"] == "********"  # device options too
    page = gw.request("/config").body
    for body in (gw.request("/api/config").body, page):
        for secret in (SECRET_FILE_PW, MQTT_FILE_PW, PASSWORD, "scrypt$"):
            assert secret.encode() not in body, secret
    # "what reaches the browser has no secret": the endpoint URL's password is one too
    assert SECRET_URL_PW not in json.dumps(d), cell.get("endpoint")


# -- the server ---------------------------------------------------------------------------


def test_port_taken_daemon_runs_on_without_the_server(gw, tmp_path):
    cfg = tmp_path / "second.toml"
    cfg.write_text(
        textwrap.dedent(f"""\
        [gateway]
        id = "second"
        data_dir = "data"

        [[devices]]
        name = "press"
        protocol = "simulated"
        poll_interval = "100ms"
        tags = [{{ name = "t", signal = "sine" }}]

        [http]
        address = "{HOST}"
        port = {gw.port}
        """)
    )
    log = tmp_path / "second.log"
    with open(log, "w") as err:
        p = subprocess.Popen([EDGEOS, "run", "-c", str(cfg)], stdout=subprocess.DEVNULL, stderr=err, cwd="/tmp")
    try:

        def stored():
            out = subprocess.run([EDGEOS, "tags", "-c", str(cfg), "-f", "json"], capture_output=True, text=True)
            return p.poll() is None and '"press/t"' in out.stdout

        wait_for(stored, 10, 0.3)
        assert str(gw.port) in log.read_text()
        assert p.poll() is None
        assert gw.get_json("/api/overview")["gateway"]["id"] == "doc-console-gw"
    finally:
        stop(p)
