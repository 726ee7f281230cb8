"""docs/metrics.md and docs/operations.md, checked against the real daemon (`edgeos run` as a
subprocess) from the documents alone: the /metrics exposition and its series, /healthz, the
HTTP server's bounds and headers, reload, log formats, and sd_notify with the watchdog.

Peers are real and local: simulated devices, a pymodbus TCP server in its own process, a TCP
server that accepts and never answers, and a unix datagram socket standing in for systemd.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

BIN = Path(sys.executable).parent
EDGEOS = str(BIN / "edgeos")

MB_SERVER = """
import asyncio, sys
from pymodbus.server import StartAsyncTcpServer
from pymodbus.datastore import ModbusSequentialDataBlock, ModbusServerContext
try:
    from pymodbus.datastore import ModbusDeviceContext as Ctx
except ImportError:
    from pymodbus.datastore import ModbusSlaveContext as Ctx

async def main(port):
    block = ModbusSequentialDataBlock(1, list(range(100)))
    ctx = ModbusServerContext(Ctx(hr=block, ir=block), single=True)
    await StartAsyncTcpServer(context=ctx, address=("127.0.0.1", port))

asyncio.run(main(int(sys.argv[1])))
"""


# -- helpers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def http_get(port: int, path: str, method: str = "GET", body: bytes | None = None, headers=None, timeout=5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything the server answers until it closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out and out.startswith(b"HTTP/1.1 "):
                break
        return out


def status_code(raw: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
    assert m, f"not an HTTP response: {raw[:200]!r}"
    return int(m.group(1))


class Daemon:
    """`edgeos run -c CONFIG` in its own process, with its stderr in a file."""

    def __init__(self, tmp: Path, body: str, *, name: str = "edgeos.toml", log_format: str = "json", env=None):
        self.dir = tmp
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / name
        self.config.write_text(textwrap.dedent(body))
        self.log_format = log_format
        self.env = dict(os.environ, **(env or {}))
        for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
            if k not in (env or {}):
                self.env.pop(k, None)
        self.proc: subprocess.Popen | None = None
        self.errpath = self.dir / "stderr.log"

    def start(self, stderr=None) -> Daemon:
        err = stderr if stderr is not None else open(self.errpath, "wb")  # noqa: SIM115
        self._err = err
        self.proc = subprocess.Popen(
            [EDGEOS, "run", "-c", str(self.config), "--log-format", self.log_format],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=self.env,
            cwd=self.dir,
        )
        return self

    @property
    def log(self) -> str:
        return self.errpath.read_text(errors="replace") if self.errpath.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_http(self, port: int, timeout: float = 20.0) -> None:
        def up():
            assert self.alive(), f"daemon exited {self.proc.returncode}: {self.log[-3000:]}"
            try:
                http_get(port, "/healthz", timeout=1.0)
                return True
            except OSError:
                return False

        wait_for(up, timeout, "the daemon's HTTP server")

    def status(self) -> dict:
        r = cli("status", "--json", "-c", str(self.config))
        return json.loads(r.stdout)

    def wait_status(self, cond, timeout: float = 20.0, what: str = "status"):
        def ok():
            assert self.alive(), f"daemon exited {self.proc.returncode}: {self.log[-3000:]}"
            r = cli("status", "--json", "-c", str(self.config))
            if r.returncode != 0:
                return None
            try:
                doc = json.loads(r.stdout)
            except ValueError:
                return None
            return doc if cond(doc) else None

        return wait_for(ok, timeout, what, step=0.3)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        with contextlib.suppress(Exception):
            self._err.close()
        return self.proc.returncode


def cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([EDGEOS, *args], capture_output=True, text=True, timeout=timeout, cwd="/tmp")


def scrape(port: int) -> str:
    st, hdrs, body = http_get(port, "/metrics")
    assert st == 200, (st, body[:300])
    return body.decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} via prometheus_client's parser."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def val(text: str, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    got = samples(text)
    assert key in got, f"no sample {name}{labels} in /metrics"
    return got[key]


def silent_server():
    """A TCP server that accepts connections and never answers a byte."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns = []
    stop = threading.Event()

    def run():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                conns.append(c)
            except (TimeoutError, OSError):
                continue

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def close():
        stop.set()
        t.join(2)
        for c in conns:
            c.close()
        srv.close()

    return srv.getsockname()[1], close


def start_modbus_server(port: int) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", MB_SERVER, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/tmp"
    )

    def listening():
        assert p.poll() is None, "the pymodbus server exited"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        return False

    wait_for(listening, 15, "the pymodbus server")
    return p


# -- the shared daemon ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    """sim1 answers; off1 is disabled; mbrefused has nothing listening on its port; mblate too,
    with a per-device health bound of 1 h; mbsilent is connected to a server that never answers."""
    tmp = tmp_path_factory.mktemp("gw")
    port = free_port()
    closed = free_port()
    silent_port, close_silent = silent_server()
    d = Daemon(
        tmp,
        f"""
        [gateway]
        id = "gw1"
        data_dir = "data"
        run_dir = "run"

        [store]
        retention = "1h"
        max_size = "64MiB"

        [http]
        port = {port}
        max_connections = 4

        [health]
        device_down = "1s"

        [health.devices]
        mblate = "1h"

        [[devices]]
        name = "sim1"
        protocol = "simulated"
        poll_interval = "100ms"
          [[devices.tags]]
          name = "t1"
          signal = "sine"
          period = "10s"
          [[devices.tags]]
          name = "t2"
          signal = "ramp"

        [[devices]]
        name = "off1"
        protocol = "simulated"
        enabled = false
          [[devices.tags]]
          name = "t1"
          signal = "ramp"

        [[devices]]
        name = "mbrefused"
        protocol = "modbus"
        host = "127.0.0.1"
        port = {closed}
        timeout = "200ms"
          [[devices.tags]]
          name = "r1"
          address = "hr0"

        [[devices]]
        name = "mblate"
        protocol = "modbus"
        host = "127.0.0.1"
        port = {closed}
        timeout = "200ms"
          [[devices.tags]]
          name = "r1"
          address = "hr0"

        [[devices]]
        name = "mbsilent"
        protocol = "modbus"
        host = "127.0.0.1"
        port = {silent_port}
        timeout = "200ms"
        retries = 0
        reconnect_after = 1000
        poll_interval = "300ms"
          [[devices.tags]]
          name = "r1"
          address = "hr0"
        """,
    )
    d.start()
    d.port = port
    try:
        d.wait_http(port)
        # every device has been tried and the bound of 1 s has passed
        wait_for(lambda: "mbsilent" in http_get(port, "/healthz")[2].decode(), 15, "mbsilent reported down")
        yield d
    finally:
        rc = d.stop()
        close_silent()
        assert rc == 0, f"exit {rc}: {d.log[-2000:]}"


# -- /metrics: the exposition ---------------------------------------------------------------

LINE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)( -?\d+)?$")
LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"\s*(,|$)')


def check_exposition(text: str) -> dict[str, str]:
    """The text format 0.0.4 by its spec; returns {family: type}."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: set[str] = set()
    seen_samples: set[str] = set()
    current = None
    done: set[str] = set()

    def family_of(name: str) -> str:
        for suffix in ("_bucket", "_sum", "_count"):
            base = name[: -len(suffix)]
            if name.endswith(suffix) and types.get(base) in ("histogram", "summary"):
                return base
        return name

    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helps, f"two HELP lines for {name}"
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            parts = line.split(" ")
            assert len(parts) == 4, line
            name, typ = parts[2], parts[3]
            assert typ in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name not in types, f"two TYPE lines for {name}"
            assert name not in seen_samples, f"TYPE of {name} after its samples"
            types[name] = typ
            continue
        if line.startswith("#"):
            continue
        m = LINE_RE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.group(1), m.group(3), m.group(4)
        fam = family_of(name)
        seen_samples.add(name)
        assert fam in types, f"sample {name} without a TYPE line"
        if fam != current:
            assert fam not in done, f"samples of {fam} are not grouped together"
            if current:
                done.add(current)
            current = fam
        if labels:
            pos, keys = 0, []
            while pos < len(labels):
                lm = LABEL_RE.match(labels, pos)
                assert lm, f"bad label syntax in {line!r}"
                keys.append(lm.group(1))
                pos = lm.end()
            assert len(keys) == len(set(keys)), f"duplicate label in {line!r}"
        assert value in ("NaN", "+Inf", "-Inf") or re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value), line
    return types


DEVICE_SERIES = {
    "edgeos_device_up": "gauge",
    "edgeos_device_down_seconds": "gauge",
    "edgeos_device_polls_total": "counter",
    "edgeos_device_poll_overruns_total": "counter",
    "edgeos_device_batches_total": "counter",
    "edgeos_device_samples_total": "counter",
    "edgeos_device_connects_total": "counter",
    "edgeos_device_reconnects_total": "counter",
    "edgeos_device_errors_total": "counter",
    "edgeos_device_last_success_timestamp_seconds": "gauge",
    "edgeos_device_poll_lateness_seconds": "histogram",
}
GLOBAL_SERIES = {
    "edgeos_samples_read_total": "counter",
    "edgeos_samples_filtered_total": "counter",
    "edgeos_samples_filter_released_total": "counter",
    "edgeos_samples_stored_total": "counter",
    "edgeos_filter_errors_total": "counter",
    "edgeos_store_writable": "gauge",
    "edgeos_store_size_bytes": "gauge",
    "edgeos_store_budget_bytes": "gauge",
    "edgeos_store_units": "gauge",
    "edgeos_store_chunks": "gauge",
    "edgeos_store_oldest_sample_timestamp_seconds": "gauge",
    "edgeos_store_retention_seconds": "gauge",
    "edgeos_store_stats_age_seconds": "gauge",
    "edgeos_store_dropped_samples_total": "counter",
    "edgeos_store_unsent_dropped_samples_total": "counter",
    "edgeos_store_commit_duration_seconds": "histogram",
    "edgeos_store_errors_total": "counter",
    "edgeos_store_recoveries_total": "counter",
    "edgeos_store_committed_units_total": "counter",
    "edgeos_store_compacted_samples_total": "counter",
    "edgeos_store_quarantined_units_total": "counter",
    "edgeos_store_written_bytes_total": "counter",
    "edgeos_process_cpu_seconds_total": "counter",
    "edgeos_process_resident_memory_bytes": "gauge",
    "edgeos_process_virtual_memory_bytes": "gauge",
    "edgeos_process_open_fds": "gauge",
    "edgeos_process_max_fds": "gauge",
    "edgeos_build_info": "gauge",
    "edgeos_tags": "gauge",
    "edgeos_start_time_seconds": "gauge",
}
SYNC_SERIES = [
    "edgeos_sync_connected",
    "edgeos_sync_lag_seconds",
    "edgeos_sync_backlog",
    "edgeos_sync_messages_total",
    "edgeos_sync_connects_total",
    "edgeos_sync_replay_listening",
]
ALLOWED_LABELS = {"device", "code", "cause", "kind", "what", "outcome", "version", "kernels", "le"}
DEVICES = ["sim1", "off1", "mbrefused", "mblate", "mbsilent"]


def test_metrics_is_valid_prometheus_text(gw):
    st, hdrs, body = http_get(gw.port, "/metrics")
    assert st == 200
    assert hdrs["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    types = check_exposition(text)
    fams = families(text)  # prometheus_client's parser accepts it too
    assert fams
    for name, typ in types.items():
        assert name.startswith("edgeos_"), name
        if typ == "counter":
            assert name.endswith("_total"), f"counter {name} does not end in _total"
    help_names = {ln.split(" ")[2] for ln in text.splitlines() if ln.startswith("# HELP ")}
    assert set(types) <= help_names, f"families without HELP: {set(types) - help_names}"


def test_every_documented_series_with_its_type(gw):
    text = scrape(gw.port)
    types = check_exposition(text)
    for name, typ in {**DEVICE_SERIES, **GLOBAL_SERIES}.items():
        assert types.get(name) == typ, f"{name}: documented {typ}, served {types.get(name)}"
    got = samples(text)
    # every configured device has its series, a disabled one too
    for name, typ in DEVICE_SERIES.items():
        if name == "edgeos_device_errors_total":
            continue
        sname = name + ("_count" if typ == "histogram" else "")
        for dev in DEVICES:
            assert (sname, (("device", dev),)) in got, f"{sname} of {dev} missing"
    # documented label values
    assert {dict(k[1]).get("kind") for k in got if k[0] == "edgeos_store_units"} == {"hot", "copy"}
    causes = {dict(k[1]).get("cause") for k in got if k[0] == "edgeos_store_dropped_samples_total"}
    assert causes <= {"memory_buffer", "stop", "retention", "budget"}, causes
    # histogram buckets 1 ms .. 10 s
    les = sorted(
        float(dict(k[1])["le"])
        for k in got
        if k[0] == "edgeos_device_poll_lateness_seconds_bucket" and dict(k[1])["device"] == "sim1"
    )
    assert les[0] == pytest.approx(0.001) and les[-2] == pytest.approx(10.0) and math.isinf(les[-1])
    # upstream is off: no sync series
    for name in SYNC_SERIES:
        assert name not in types, f"{name} served with upstream off"


def test_labels_low_cardinality_and_no_per_tag_series_by_default(gw):
    text = scrape(gw.port)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            extra = set(s.labels) - ALLOWED_LABELS
            assert not extra, f"{s.name} has labels {extra}"
            for v in s.labels.values():
                assert "connection refused" not in v and "/" not in v.replace("+Inf", ""), (s.name, v)
    assert "edgeos_tag_" not in text
    assert "connection refused" not in text  # no error message


def test_counters_are_monotonic(gw):
    scrapes = []
    for _ in range(4):
        scrapes.append(samples(scrape(gw.port)))
        time.sleep(0.4)
    text = scrape(gw.port)
    types = check_exposition(text)

    def is_counterish(name):
        if types.get(name) == "counter":
            return True
        for suffix in ("_bucket", "_count", "_sum"):
            if name.endswith(suffix) and types.get(name[: -len(suffix)]) == "histogram":
                return True
        return False

    for a, b in zip(scrapes, scrapes[1:], strict=False):
        for key, v in a.items():
            if is_counterish(key[0]) and key in b:
                assert b[key] >= v, f"{key} went from {v} to {b[key]}"
    key = ("edgeos_device_polls_total", (("device", "sim1"),))
    assert scrapes[-1][key] > scrapes[0][key] + 5, "a 100 ms device polled fewer than 5 times in 1.2 s"
    # histogram: buckets cumulative, +Inf == count
    last = scrapes[-1]
    buckets = sorted(
        (float(dict(k[1])["le"]), v) for k, v in last.items() if k[0] == "edgeos_store_commit_duration_seconds_bucket"
    )
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)
    assert counts[-1] == last[("edgeos_store_commit_duration_seconds_count", ())]


def test_metrics_agree_with_status_json(gw):
    s1 = gw.status()
    t_scrape = time.time()
    text = scrape(gw.port)
    s3 = gw.wait_status(lambda d: d["time"] > t_scrape + 0.05, timeout=10, what="a status written after the scrape")
    c1, c3 = s1["counters"], s3["counters"]
    m_read = val(text, "edgeos_samples_read_total")
    assert c1["read"] <= m_read <= c3["read"]
    for dev in DEVICES:
        a, b = s1["devices"][dev], s3["devices"][dev]
        m = val(text, "edgeos_device_samples_total", device=dev)
        assert a["samples"] <= m <= b["samples"], (dev, a["samples"], m, b["samples"])
        if dev in ("sim1", "off1", "mbrefused", "mblate"):  # no connection made or lost meanwhile
            assert val(text, "edgeos_device_connects_total", device=dev) == a["connects"] == b["connects"], dev
        assert val(text, "edgeos_device_up", device=dev) == (1.0 if b["up"] else 0.0), dev
    assert val(text, "edgeos_device_connects_total", device="sim1") == s3["devices"]["sim1"]["connects"] == 1
    assert val(text, "edgeos_device_up", device="sim1") == 1
    assert val(text, "edgeos_device_up", device="mbsilent") == 0
    # units: Unix seconds, bytes
    assert val(text, "edgeos_start_time_seconds") == pytest.approx(c3["started_ns"] / 1e9, abs=0.01)
    assert val(text, "edgeos_store_budget_bytes") == 64 * 1024 * 1024 == s3["store_stats"]["max_size"]
    assert val(text, "edgeos_store_retention_seconds") == 3600
    last_ok = val(text, "edgeos_device_last_success_timestamp_seconds", device="sim1")
    assert abs(last_ok - t_scrape) < 2
    assert val(text, "edgeos_device_last_success_timestamp_seconds", device="off1") == 0
    assert val(text, "edgeos_device_last_success_timestamp_seconds", device="mbrefused") == 0
    kernels = {dict(k[1])["kernels"] for k in samples(text) if k[0] == "edgeos_build_info"}
    versions = {dict(k[1])["version"] for k in samples(text) if k[0] == "edgeos_build_info"}
    assert kernels == {s3["kernels"]}
    assert versions == {cli("version").stdout.split()[1]}
    rss = val(text, "edgeos_process_resident_memory_bytes")
    assert 5e6 < rss < 2e9, rss  # bytes, not kB or pages
    assert val(text, "edgeos_process_max_fds") >= val(text, "edgeos_process_open_fds") > 3


def test_disabled_device_series_and_down_time(gw):
    text = scrape(gw.port)
    start = val(text, "edgeos_start_time_seconds")
    assert val(text, "edgeos_device_up", device="off1") == 0
    down = val(text, "edgeos_device_down_seconds", device="off1")
    assert down == pytest.approx(time.time() - start, abs=1.5), "a disabled device's down time counts from the start"
    assert val(text, "edgeos_device_down_seconds", device="sim1") == 0
    assert val(text, "edgeos_device_polls_total", device="off1") == 0


def test_refused_device_counts_reconnects_and_error_code(gw):
    text = scrape(gw.port)
    assert val(text, "edgeos_device_up", device="mbrefused") == 0
    assert val(text, "edgeos_device_connects_total", device="mbrefused") == 0
    assert val(text, "edgeos_device_reconnects_total", device="mbrefused") >= 1
    assert val(text, "edgeos_device_errors_total", device="mbrefused", code="connect") >= 1
    assert val(text, "edgeos_device_down_seconds", device="mbrefused") > 1


def test_healthz_503_names_problems_by_code_only(gw):
    st, hdrs, body = http_get(gw.port, "/healthz")
    assert st == 503
    doc = json.loads(body)
    assert doc["status"] == "unhealthy"
    assert set(doc["checked"]) == {"devices_up", "devices_down", "sync_lag_seconds"}
    assert doc["checked"]["sync_lag_seconds"] is None
    by_dev = {p["device"]: p for p in doc["problems"] if p["check"] == "device_down"}
    # disabled devices are left out; mblate is within its own 1 h bound; sim1 answers
    assert set(by_dev) == {"mbrefused", "mbsilent"}, doc
    for p in by_dev.values():
        assert set(p) == {"check", "device", "state", "down_seconds", "bound_seconds", "last_error_code"}, p
        assert p["bound_seconds"] == 1.0
        assert p["down_seconds"] > 1.0
    assert by_dev["mbrefused"]["last_error_code"] == "connect"
    # connected, every sample of its last batch Bad for want of an answer: state says running
    assert by_dev["mbsilent"]["state"] == "running", by_dev["mbsilent"]
    assert "connection refused" not in body.decode() and "timed out" not in body.decode()
    assert doc["checked"]["devices_up"] == 1
    assert doc["checked"]["devices_down"] == 3  # mbrefused, mblate, mbsilent (off1 is left out)


# -- the HTTP server --------------------------------------------------------------------------

SEC_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def check_security_headers(hdrs: dict, what: str):
    for k, v in SEC_HEADERS.items():
        assert hdrs.get(k) == v, f"{what}: {k} = {hdrs.get(k)!r}"
    csp = hdrs.get("content-security-policy", "")
    assert "frame-ancestors 'none'" in csp, f"{what}: CSP {csp!r}"
    assert "unsafe-inline" not in csp, f"{what}: CSP {csp!r}"


def test_security_headers_on_every_response(gw):
    for path in ("/metrics", "/healthz", "/no-such-page", "/metrics/../healthz"):
        st, hdrs, _ = http_get(gw.port, path)
        check_security_headers(hdrs, f"{path} ({st})")
    raw = raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 17000 + b"\r\n\r\n")
    head = raw.split(b"\r\n\r\n", 1)[0].decode(errors="replace").lower()
    assert "x-frame-options: deny" in head, head


def test_keep_alive_two_requests_on_one_connection(gw):
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        r1 = conn.getresponse()
        r1.read()
        sock1 = conn.sock
        conn.request("GET", "/metrics")
        r2 = conn.getresponse()
        assert r2.status == 200 and b"edgeos_device_up" in r2.read()
        assert conn.sock is sock1, "the server closed a keep-alive connection after one request"
    finally:
        conn.close()


def test_request_head_over_16_kib_is_431(gw):
    raw = raw_exchange(gw.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (17 * 1024) + b"\r\n\r\n")
    assert status_code(raw) == 431
    # a head under the bound is served
    st, _, _ = http_get(gw.port, "/healthz", headers={"X-Big": "a" * (12 * 1024)})
    assert st in (200, 503)


def test_body_over_64_kib_is_413(gw):
    body = b"x" * (64 * 1024 + 1)
    req = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    raw = raw_exchange(gw.port, req)
    assert status_code(raw) == 413


def test_malformed_request_is_400(gw):
    raw = raw_exchange(gw.port, b"THIS IS NOT HTTP\r\n\r\n")
    assert status_code(raw) == 400
    # and the server still serves
    assert http_get(gw.port, "/metrics")[0] == 200


def test_max_connections_then_503(gw):
    socks = []
    try:
        for _ in range(4):  # max_connections = 4
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
            socks.append(s)
        time.sleep(0.3)
        raw = raw_exchange(gw.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_code(raw) == 503
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: http_get(gw.port, "/metrics")[0] == 200, 5, "the server serving again")


def test_slow_request_is_408_after_10_s(gw):
    with socket.create_connection(("127.0.0.1", gw.port), timeout=14) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        data = b""
        while True:
            try:
                chunk = s.recv(4096)
            except (TimeoutError, OSError):
                break
            if not chunk:
                break
            data += chunk
        took = time.monotonic() - t0
    assert data, f"nothing answered within {took:.1f} s"
    assert status_code(data) == 408
    assert 9 <= took <= 13, took


# -- other daemons ----------------------------------------------------------------------------


def sim_device(name: str, interval: str = "100ms", tags=("t1",), extra: str = "") -> str:
    out = f"""
        [[devices]]
        name = "{name}"
        protocol = "simulated"
        poll_interval = "{interval}"
        {extra}
    """
    for t in tags:
        out += f"""
          [[devices.tags]]
          name = "{t}"
          signal = "sine"
          period = "10s"
    """
    return out


def gateway(port: int | None = None, http_extra: str = "", more: str = "") -> str:
    http = f"[http]\nport = {port}\n{http_extra}\n" if port is not None else ""
    return f"""
        [gateway]
        id = "gw2"
        data_dir = "data"
        run_dir = "run"
        {more}
    """ + textwrap.indent(http, " " * 8)


def test_samples_stored_total_counts_fsynced_samples(tmp_path):
    """metrics.md: `edgeos_samples_stored_total` counts stored samples, committed and fsynced
    (store.md I1, the `stored` of `edgeos status`): behind the commits until the fsync; all of
    them once the stop has fsynced."""
    port = free_port()
    d = Daemon(
        tmp_path, gateway(port) + '\n        [store]\n        fsync_interval = "30s"\n' + sim_device("sim1")
    ).start()
    try:
        d.wait_http(port)
        s = d.wait_status(lambda doc: doc["store"]["committed_samples"] >= 10, what="10 committed samples")
        text = scrape(port)
        committed = s["store"]["committed_samples"]
        stored = val(text, "edgeos_samples_stored_total")
        # Within the 30 s fsync interval nothing committed has been fsynced yet.
        assert stored < committed, f"status: {committed} committed; /metrics stored_total = {stored}"
        assert stored == s["counters"]["stored"] == 0, (stored, s["counters"])
    finally:
        assert d.stop() == 0, d.log[-3000:]
    last = d.status()  # the stop fsynced: every committed sample is stored
    assert last["counters"]["stored"] == last["store"]["committed_samples"] >= committed, last["counters"]


def test_per_tag_series_opt_in(tmp_path):
    port = free_port()
    body = (
        gateway(port, "metrics_per_tag = true")
        + sim_device("sim1", tags=("a", "b"))
        + f"""
        [[devices]]
        name = "mb"
        protocol = "modbus"
        host = "127.0.0.1"
        port = {free_port()}
          [[devices.tags]]
          name = "r1"
          address = "hr0"
        """
    )
    d = Daemon(tmp_path, body).start()
    try:
        d.wait_http(port)
        wait_for(
            lambda: (
                samples(scrape(port)).get(("edgeos_tag_quality", (("device", "sim1"), ("tag", "b")))) == 0
                and samples(scrape(port)).get(("edgeos_device_errors_total", (("code", "connect"), ("device", "mb"))))
            ),
            10,
            "Good per-tag series of sim1 and a refused mb",
        )
        text = scrape(port)
        types = check_exposition(text)
        assert types["edgeos_tag_value"] == "gauge"
        got = samples(text)
        for tag in ("a", "b"):
            for name in ("edgeos_tag_value", "edgeos_tag_last_timestamp_seconds", "edgeos_tag_quality"):
                assert (name, (("device", "sim1"), ("tag", tag))) in got, (name, tag)
            assert got[("edgeos_tag_quality", (("device", "sim1"), ("tag", tag)))] == 0
            ts = got[("edgeos_tag_last_timestamp_seconds", (("device", "sim1"), ("tag", tag)))]
            assert abs(ts - time.time()) < 3, ts
        assert math.isnan(got[("edgeos_tag_value", (("device", "mb"), ("tag", "r1")))]), "Bad sample: NaN"
        assert got[("edgeos_tag_quality", (("device", "mb"), ("tag", "r1")))] != 0
    finally:
        d.stop()


def test_modbus_device_up_then_down_when_server_stops(tmp_path):
    mport, port = free_port(), free_port()
    server = start_modbus_server(mport)
    body = (
        gateway(port)
        + '\n        [health]\n        device_down = "1s"\n'
        + f"""
        [[devices]]
        name = "plc"
        protocol = "modbus"
        host = "127.0.0.1"
        port = {mport}
        timeout = "300ms"
        poll_interval = "100ms"
        reconnect_min = "100ms"
        reconnect_max = "200ms"
          [[devices.tags]]
          name = "r1"
          address = "hr2"
        """
    )
    d = Daemon(tmp_path, body).start()
    try:
        d.wait_http(port)
        wait_for(lambda: val(scrape(port), "edgeos_device_up", device="plc") == 1, 10, "plc up")
        st, _, hb = http_get(port, "/healthz")
        assert st == 200, hb
        doc = json.loads(hb)
        assert doc["status"] == "ok" and doc["problems"] == []
        assert doc["checked"]["devices_up"] == 1 and doc["checked"]["devices_down"] == 0
        text = scrape(port)
        assert val(text, "edgeos_device_connects_total", device="plc") == 1
        server.terminate()
        server.wait(10)
        wait_for(lambda: val(scrape(port), "edgeos_device_up", device="plc") == 0, 10, "plc down")
        t_down = time.time()
        wait_for(lambda: http_get(port, "/healthz")[0] == 503, 6, "/healthz 503 after device_down")
        text = scrape(port)
        assert val(text, "edgeos_device_reconnects_total", device="plc") >= 1
        errs = {dict(k[1])["code"] for k in samples(text) if k[0] == "edgeos_device_errors_total"}
        assert errs and all(re.fullmatch(r"[A-Za-z_]+", c) for c in errs), errs
        last = val(text, "edgeos_device_last_success_timestamp_seconds", device="plc")
        assert last < t_down + 0.5
        assert val(text, "edgeos_device_down_seconds", device="plc") > 0
        s = d.status()
        assert s["devices"]["plc"]["connects"] == val(text, "edgeos_device_connects_total", device="plc")
        # the server comes back: up again, one more connection
        server = start_modbus_server(mport)
        wait_for(lambda: val(scrape(port), "edgeos_device_up", device="plc") == 1, 15, "plc up again")
        text = scrape(port)
        assert val(text, "edgeos_device_connects_total", device="plc") >= 2
        assert val(text, "edgeos_device_down_seconds", device="plc") == 0
    finally:
        d.stop()
        server.terminate()
        server.wait(10)


def test_listen_config_port_0_disabled_and_busy(tmp_path):
    # port 0: any free port; `edgeos status` prints the URL
    d = Daemon(tmp_path / "a", gateway(0) + sim_device("sim1")).start()
    try:
        d.wait_status(lambda doc: doc["counters"]["read"] > 20, what="sim1 read 20 samples")
        out = cli("status", "-c", str(d.config)).stdout
        m = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", out)
        assert m, out
        assert int(m.group(1)) != 0
        assert b"edgeos_device_up" in http_get(int(m.group(1)), "/metrics")[2]
    finally:
        d.stop()
    # enabled = false: nothing listens
    port = free_port()
    d = Daemon(tmp_path / "b", gateway(port, "enabled = false") + sim_device("sim1")).start()
    try:
        d.wait_status(lambda doc: doc["devices"]["sim1"]["up"], what="sim1 up")
        with pytest.raises(OSError):
            http_get(port, "/metrics", timeout=1)
    finally:
        assert d.stop() == 0
    # a port that cannot be bound is logged and the daemon runs on without it
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        bport = busy.getsockname()[1]
        d = Daemon(tmp_path / "c", gateway(bport) + sim_device("sim1")).start()
        try:
            d.wait_status(lambda doc: doc["devices"]["sim1"]["up"], what="sim1 up despite the busy port")
            assert d.alive()
            assert str(bport) in d.log
        finally:
            assert d.stop() == 0


def test_https_with_tls_1_2_or_later(tmp_path):
    import ssl

    tmp_path.mkdir(exist_ok=True)
    r = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(tmp_path / "key.pem"),
            "-out",
            str(tmp_path / "cert.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    port = free_port()
    d = Daemon(tmp_path, gateway(port, 'tls_cert = "cert.pem"\ntls_key = "key.pem"') + sim_device("sim1")).start()
    try:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))

        def get():
            assert d.alive(), d.log[-2000:]
            try:
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=3)
                conn.request("GET", "/metrics")
                resp = conn.getresponse()
                version = conn.sock.version()
                out = (resp.status, resp.read(), version)
                conn.close()
                return out
            except (OSError, ssl.SSLError):
                return None

        st, body, version = wait_for(get, 20, "HTTPS /metrics")
        assert st == 200 and b"edgeos_device_up" in body
        assert version in ("TLSv1.2", "TLSv1.3")
    finally:
        d.stop()


# -- reload -----------------------------------------------------------------------------------


def query_times(config: Path, key: str) -> list[float]:
    r = cli("query", key, "--since", "5m", "--format", "json", "-c", str(config))
    assert r.returncode == 0, r.stderr
    out = []
    for line in r.stdout.splitlines():
        if not line.strip():
            continue
        doc = json.loads(line)
        t = doc.get("time", doc.get("t"))
        if isinstance(t, str):
            from datetime import datetime

            t = datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
        out.append(float(t))
    return out


def test_reload_applies_devices_keeps_unchanged_polling_and_names_restart_sections(tmp_path):
    port = free_port()
    base = gateway(port) + sim_device("keep") + sim_device("change", interval="200ms")
    d = Daemon(tmp_path, base).start()
    try:
        d.wait_http(port)
        wait_for(lambda: val(scrape(port), "edgeos_device_polls_total", device="keep") > 5, 10, "keep polling")
        before = scrape(port)
        t_reload = time.time()
        # add a device, change one, leave one identical, change [http]
        new = (
            gateway(port, "max_connections = 8")
            + sim_device("keep")
            + sim_device("change", interval="200ms", tags=("t1", "t2"))
            + sim_device("added")
        )
        d.config.write_text(textwrap.dedent(new))
        r = cli("reload", "-c", str(d.config))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "http" in (r.stdout + r.stderr).lower(), "the reply names [http] as needing a restart"
        wait_for(lambda: ("edgeos_device_up", (("device", "added"),)) in samples(scrape(port)), 10, "the added device")
        wait_for(lambda: val(scrape(port), "edgeos_device_up", device="added") == 1, 10, "the added device up")
        time.sleep(1.0)
        after = scrape(port)
        assert val(after, "edgeos_device_connects_total", device="keep") == val(
            before, "edgeos_device_connects_total", device="keep"
        ), "an identical device was reconnected by the reload"
        assert val(after, "edgeos_device_polls_total", device="keep") > val(
            before, "edgeos_device_polls_total", device="keep"
        )
        assert val(after, "edgeos_tags") == 4
        # no gap in the unchanged device's polling (100 ms; target under 200 ms)
        d.wait_status(lambda doc: doc["time"] > t_reload + 2.0, what="status after the reload")
        times = [t for t in query_times(d.config, "keep/t1") if t_reload - 1.5 <= t <= t_reload + 1.5]
        assert len(times) > 15, times
        gap = max(b - a for a, b in zip(times, times[1:], strict=False))
        assert gap < 0.2, f"keep/t1 had a gap of {gap * 1000:.0f} ms across the reload"
        # [http] is not applied by a reload: the old server still answers on the same port
        assert http_get(port, "/metrics")[0] == 200
        assert re.search(r"reload", d.log)
    finally:
        assert d.stop() == 0


def test_reload_refuses_invalid_config_and_keeps_running(tmp_path):
    port = free_port()
    good = gateway(port) + sim_device("keep")
    d = Daemon(tmp_path, good).start()
    try:
        d.wait_http(port)
        # an unknown key and an added device: refused as a whole
        bad = good + sim_device("added") + '\n        [[devices]]\n        name = "x"\n        protocol = "simulated"\n'
        bad = bad.replace('poll_interval = "100ms"', 'poll_interval = "100ms"\n        pol_interval = "1s"', 1)
        d.config.write_text(textwrap.dedent(bad))
        r = cli("reload", "-c", str(d.config))
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        out = r.stdout + r.stderr
        assert "pol_interval" in out, out
        assert "tag" in out.lower(), f"every problem printed (device x has no tag): {out}"
        wait_for(lambda: "reload_refused" in d.log, 5, "a log line with code reload_refused")
        text = scrape(port)
        assert ("edgeos_device_up", (("device", "added"),)) not in samples(text)
        assert val(text, "edgeos_device_up", device="keep") == 1
        assert d.alive()
        # a TOML syntax error: not sent, exit 2
        d.config.write_text("[gateway\nid = 1\n")
        r = cli("reload", "-c", str(d.config))
        assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
        assert d.alive()
    finally:
        assert d.stop() == 0
    # no daemon on that data directory: exit 1
    d.config.write_text(textwrap.dedent(good))
    r = cli("reload", "-c", str(d.config))
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)


# -- logs ---------------------------------------------------------------------------------------


def refused_body(http_port: int | None = 0) -> str:
    """sim1 answers; mb has nothing listening on its port (a warning with code `connect`)."""
    return (
        gateway(http_port)
        + sim_device("sim1")
        + f"""
        [[devices]]
        name = "mb"
        protocol = "modbus"
        host = "127.0.0.1"
        port = {free_port()}
          [[devices.tags]]
          name = "r1"
          address = "hr0"
        """
    )


def run_for_log(tmp: Path, fmt: str, env=None, stderr_path: Path | None = None) -> list[str]:
    d = Daemon(tmp, refused_body(), log_format=fmt, env=env)
    if stderr_path is not None:
        d.errpath = stderr_path
    with open(d.errpath, "ab") as err:
        d.start(stderr=err)
        try:
            wait_for(lambda: "connect" in d.log and d.log.endswith("\n"), 15, "a connect log line")
        finally:
            d.stop()
    return [ln for ln in d.log.splitlines() if ln]


TEXT_RE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+) (\S+) (\S+): (.+)$"
)
JOURNAL_RE = re.compile(r"^<([0-7])>(\S+) (\S+) (\S+): (.+)$")


def test_log_format_text(tmp_path):
    lines = run_for_log(tmp_path, "text")
    parsed = [TEXT_RE.match(ln) for ln in lines]
    assert all(parsed), [ln for ln, m in zip(lines, parsed, strict=True) if not m]
    warn = [m for m in parsed if m.group(1) == "WARNING" and m.group(3) == "mb"]
    assert warn and warn[0].group(2) == "edgeos.device" and warn[0].group(4) == "connect", lines
    assert any(m.group(3) == "-" and m.group(4) == "-" for m in parsed), "a line without device or code uses -"


def test_log_format_journal_and_auto(tmp_path):
    lines = run_for_log(tmp_path / "j", "journal")
    parsed = [JOURNAL_RE.match(ln) for ln in lines]
    assert all(parsed), lines
    assert not any(re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", ln[:40]) for ln in lines), "no timestamp of our own"
    warn = [m for m in parsed if m.group(3) == "mb" and m.group(4) == "connect"]
    assert warn and warn[0].group(1) == "4" and warn[0].group(2) == "edgeos.device", lines
    assert any(m.group(1) == "6" for m in parsed), "info is priority 6"
    # auto: journal when stderr is the journal (JOURNAL_STREAM names stderr's device:inode)
    tmp = tmp_path / "auto"
    tmp.mkdir()
    errpath = tmp / "stderr.log"
    errpath.touch()
    st = os.stat(errpath)
    lines = run_for_log(tmp, "auto", env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stderr_path=errpath)
    assert lines and all(JOURNAL_RE.match(ln) for ln in lines), lines[:5]
    # auto without the journal: text
    lines = run_for_log(tmp_path / "auto2", "auto")
    assert lines and all(TEXT_RE.match(ln) for ln in lines), lines[:5]


def test_log_format_json(tmp_path):
    lines = run_for_log(tmp_path, "json")
    docs = [json.loads(ln) for ln in lines]
    for doc in docs:
        assert list(doc) == ["time", "level", "logger", "device", "code", "message"] or set(doc) >= {
            "time",
            "level",
            "logger",
            "device",
            "code",
            "message",
        }, doc
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"]), doc
        assert doc["level"] in ("debug", "info", "warning", "error", "critical"), doc
    warn = [d for d in docs if d["device"] == "mb" and d["code"] == "connect"]
    assert warn and warn[0]["level"] == "warning" and warn[0]["logger"] == "edgeos.device", docs
    assert any(d["device"] is None and d["code"] is None for d in docs), "null when none"


# -- sd_notify and the watchdog ---------------------------------------------------------------


class NotifySocket:
    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.msgs: list[tuple[float, str]] = []

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                self.msgs.append((time.monotonic(), line))

    def until(self, pred, timeout: float, what: str):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for i, (_, m) in enumerate(self.msgs):
                if pred(m):
                    return i
            self.pump(0.2)
        raise AssertionError(f"no {what} within {timeout} s; got {[m for _, m in self.msgs][-20:]}")

    def close(self):
        self.sock.close()


def test_sd_notify_ready_status_watchdog_reload_stopping(tmp_path):
    ns = NotifySocket(tmp_path / "notify.sock")
    closed = free_port()
    port = free_port()
    body = (
        gateway(port)
        + sim_device("sim1")
        + sim_device("sim2")
        + f"""
        [[devices]]
        name = "mb"
        protocol = "modbus"
        host = "127.0.0.1"
        port = {closed}
          [[devices.tags]]
          name = "r1"
          address = "hr0"
        """
    )
    d = Daemon(tmp_path / "d", body, env={"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "1000000"}).start()
    try:
        i_ready = ns.until(lambda m: m == "READY=1", 20, "READY=1")
        # READY=1 once the store is open and device tasks started: the HTTP server answers by then
        assert d.alive()
        # watchdog: every fifth of the interval (0.2 s here)
        ns.pump(2.0)
        pings = [t for t, m in ns.msgs[i_ready:] if m == "WATCHDOG=1"]
        assert len(pings) >= 6, f"{len(pings)} WATCHDOG=1 in about 2 s with WatchdogSec=1s"
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert max(gaps) < 0.5, gaps
        # STATUS= line: devices up/down, samples/s
        ns.pump(4.0)
        statuses = [m for _, m in ns.msgs if m.startswith("STATUS=")]
        assert any(re.match(r"STATUS=2 devices up, 1 down; [\d,.]+ samples/s", m) for m in statuses), statuses
        # reload: RELOADING=1 then READY=1
        n = len(ns.msgs)
        d.proc.send_signal(signal.SIGHUP)
        ns.pump(0.1)
        j = ns.until(lambda m: m.startswith("RELOADING=1"), 10, "RELOADING=1")
        assert j >= n
        end = time.monotonic() + 10
        while "READY=1" not in [m for _, m in ns.msgs[j + 1 :]] and time.monotonic() < end:
            ns.pump(0.2)
        assert "READY=1" in [m for _, m in ns.msgs[j + 1 :]], [m for _, m in ns.msgs[j:]]
        # stop: STOPPING=1
        d.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 20
        while time.monotonic() < end and d.proc.poll() is None:
            ns.pump(0.2)
        ns.pump(0.3)
        assert d.proc.poll() == 0
        after = [m for _, m in ns.msgs[j + 1 :]]
        assert any(m.startswith("STOPPING=1") for m in after), after[-10:]
    finally:
        d.stop()
        ns.close()
