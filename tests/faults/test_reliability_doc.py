"""docs/reliability.md (with the config, store, metrics and operations pages it leans on), tested
from outside: the real daemon (`edgeos run -c FILE`) in a subprocess, real faults (a device that
refuses or never answers, a mosquitto stopped and started again, kill -9, a full tmpfs, a
non-SQLite store file, a held lock, malformed input), and what the daemon reports about each
(exit status, `edgeos status --json`, `/metrics`, `/healthz`, its log).

Expectations come from the documents only; every peer runs on a random loopback port.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest

BIN = Path(sys.executable).parent
EDGEOS = str(BIN / "edgeos")
MOSQUITTO = "/usr/sbin/mosquitto"


# ---------------------------------------------------------------------------------------------
# helpers


def wait_for(cond: Callable[[], object], timeout: float = 8.0, what: str = "condition", step: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    out: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)", line)
        if not m:
            continue
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def metric(metrics: dict, name: str, **labels: str) -> float | None:
    want = set(labels.items())
    for (n, ls), v in metrics.items():
        if n == name and want <= set(ls):
            return v
    return None


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([EDGEOS, *args], capture_output=True, text=True, timeout=timeout)


class Daemon:
    def __init__(self, cfg: Path, http_port: int | None, log: Path) -> None:
        self.cfg = cfg
        self.http_port = http_port
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [EDGEOS, "run", "-c", str(cfg), "--log-format", "text"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict:
        """The live status (docs/store.md I18: rewritten every second in run_dir, the document
        `edgeos status --json` prints less `running`); read directly to keep the waits cheap.
        Final states are asked of `edgeos status --json` itself."""
        run_dir = self.cfg.parent / "run"
        for f in sorted(run_dir.glob("status-*.json")):
            with contextlib.suppress(OSError, ValueError):
                return json.loads(f.read_text())
        return {}

    def counters(self) -> dict:
        return self.status().get("counters") or {}

    def metrics(self) -> dict:
        # the HTTP server comes up a moment after the process starts
        code, body = wait_for(lambda: (r := http_get(self.http_port, "/metrics"))[0] == 200 and r, 5, "/metrics")
        return parse_metrics(body)

    def wait_stored(self, n: int, timeout: float = 8.0) -> dict:
        def ok():
            st = self.status()
            mine = st.get("pid") == self.pid  # not a previous run's last word
            return st if mine and (st.get("counters") or {}).get("stored", 0) >= n else None

        return wait_for(ok, timeout, f"{n} samples stored\n{self.log()[-2000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


class Broker:
    """A mosquitto of our own on a random loopback port (persistence in tmp, so sessions and
    queued QoS 1 messages survive an orderly restart)."""

    def __init__(self, tmp: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = tmp / f"mosq-{self.port}"
        self.dir.mkdir(exist_ok=True)
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            + ("user root\n" if os.geteuid() == 0 else "")  # else it drops to `mosquitto`, who cannot write here
            + f"persistence_location {self.dir}/\nlog_dest file {self.dir}/log\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def up():
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return True
            return False

        wait_for(up, 5, "mosquitto listening")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Subscriber:
    """A paho client on the broker, persistent session, collecting every message."""

    def __init__(
        self, port: int, topic: str = "edgeos/#", client_id: str = "tester", auth: tuple[str, str] | None = None
    ) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.c.reconnect_delay_set(0.05, 0.3)
        self.c.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, qos=1)
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_message = self._on_message
        if auth:
            self.c.username_pw_set(*auth)
        self.c.connect("127.0.0.1", port, keepalive=5)
        self.c.loop_start()
        assert self.subscribed.wait(5), "test subscriber did not subscribe"

    def _on_message(self, c, u, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def data(self) -> list[dict]:
        with self.lock:
            msgs = list(self.messages)
        return [msgpack.unpackb(p, raw=False) for t, p, _ in msgs if t.endswith("/data")]

    def topic(self, name: str) -> list[tuple[bytes, bool]]:
        with self.lock:
            return [(p, r) for t, p, r in self.messages if t == name]

    def close(self) -> None:
        self.c.loop_stop()
        with contextlib.suppress(Exception):
            self.c.disconnect()


def unit_chain(messages: list[dict]) -> dict[int, int]:
    """seq -> the seq of the device's unit before it, from the data messages received."""
    prev: dict[int, int] = {}
    for m in messages:
        p = m.get("pv", 0)
        for s in m["seq"]:
            prev[s] = p
            p = s
    return prev


def store_unit_ids(data_dir: Path, upto: int) -> list[int]:
    con = sqlite3.connect(f"file:{data_dir / 'edgeos.db'}?mode=ro", uri=True, timeout=5)
    try:
        return [r[0] for r in con.execute("SELECT id FROM units WHERE id <= ? ORDER BY id", (upto,))]
    finally:
        con.close()


def max_unit_id(data_dir: Path) -> int:
    con = sqlite3.connect(f"file:{data_dir / 'edgeos.db'}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute("SELECT max(id) FROM units").fetchone()[0] or 0
    finally:
        con.close()


def export_rows(cfg: Path, out: Path) -> list[dict]:
    r = run_cli("export", "--since", "1h", "--out", str(out), "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Callable[..., tuple[Path, Daemon | None]]]:
    """gw(body, start=True): write a config (gateway, http on a free port, run_dir in tmp) plus
    `body`, and start `edgeos run` on it."""
    started: list[Daemon] = []

    def make(body: str, *, start: bool = True, name: str = "edgeos.toml", http: bool = True, gateway_extra: str = ""):
        port = free_port()
        head = textwrap.dedent(f"""\
            [gateway]
            id = "gw1"
            data_dir = "data"
            run_dir = "run"
            shutdown_timeout = "5s"
            {gateway_extra}
            """)
        if http:
            head += f"\n[http]\nport = {port}\n"
        if "[store]" not in body:
            head += '\n[store]\nfsync_interval = "250ms"  # "stored" means fsynced: keep the waits short\n'
        cfg = tmp_path / name
        cfg.write_text(head + "\n" + textwrap.dedent(body))
        if not start:
            return cfg, None
        d = Daemon(cfg, port if http else None, tmp_path / f"{name}.{len(started)}.log")
        started.append(d)
        return cfg, d

    yield make
    for d in started:
        d.kill()


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    made: list[Broker] = []

    def make(port: int | None = None) -> Broker:
        b = Broker(tmp_path, port)
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop(signal.SIGKILL)


SIM = """\
[[devices]]
name = "{name}"
protocol = "simulated"
poll_interval = "{poll}"
{extra}
  [[devices.tags]]
  name = "t"
  signal = "ramp"
"""


def sim(name: str = "d1", poll: str = "50ms", extra: str = "") -> str:
    return SIM.format(name=name, poll=poll, extra=extra)


def upstream(port: int, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        [upstream]
        enabled = true
        port = {port}
        keepalive = "2s"
        reconnect_min = "100ms"
        reconnect_max = "400ms"
        {extra}
        """)


# ---------------------------------------------------------------------------------------------
# bad config: refused as a whole, named, nothing half-run (docs/config.md "Rules")


def test_unknown_key_is_refused_with_the_closest_key_and_the_daemon_never_starts(gw, tmp_path):
    cfg, d = gw(sim() + '\n[store]\nretension = "1d"\n')
    rc = d.proc.wait(15)
    out = d.log()
    assert rc != 0, out
    assert "retension" in out and "retention" in out, out
    assert "edgeos.toml" in out, out
    assert not (tmp_path / "data" / "edgeos.db").exists(), "a refused config must not run (no store opened)"


def test_every_problem_is_reported_in_one_pass_naming_its_place(gw):
    body = textwrap.dedent("""\
        [[devices]]
        name = "press1"
        protocol = "simulated"
          [[devices.tags]]
          name = "t"
          signal = "ramp"
          poll_interval = 1
        [store]
        max_size = "lots"
        """)
    cfg, d = gw(body)
    rc = d.proc.wait(15)
    out = d.log()
    assert rc != 0, out
    # both problems, each at its place, in one run
    # under a tag, the device's and the tag's names follow their indices
    assert "devices[0](press1).tags[0](t).poll_interval: found 1" in out, out
    assert "store.max_size" in out, out


def test_toml_syntax_error_names_file_and_line(gw):
    cfg, d = gw(sim() + "\n[store\nretention = '1d'\n")
    rc = d.proc.wait(15)
    out = d.log()
    assert rc != 0, out
    line = cfg.read_text().splitlines().index("[store") + 1
    assert re.search(rf"edgeos\.toml:{line}\b", out), out


def test_a_password_in_the_config_itself_is_refused(gw, brokers):
    cfg, d = gw(sim() + upstream(free_port(), 'username = "u"\npassword = "hunter2"'))
    rc = d.proc.wait(15)
    out = d.log()
    assert rc != 0, out
    assert "password" in out
    assert "hunter2" not in out, "a secret must never appear in a log line or error text"


def test_secret_file_writable_by_others_is_refused(gw, tmp_path):
    pw = tmp_path / "mqtt.pw"
    pw.write_text("s3cret\n")
    os.chmod(pw, 0o666)
    cfg, _ = gw(sim() + upstream(free_port(), 'username = "u"\npassword_file = "mqtt.pw"'), start=False)
    r = run_cli("check", "-c", str(cfg))
    assert r.returncode != 0, r.stdout + r.stderr
    assert "mqtt.pw" in r.stdout + r.stderr
    run = subprocess.run([EDGEOS, "run", "-c", str(cfg)], capture_output=True, text=True, timeout=15)
    assert run.returncode != 0, run.stdout + run.stderr
    assert "mqtt.pw" in run.stdout + run.stderr
    assert "s3cret" not in run.stdout + run.stderr


def test_secret_file_readable_by_others_is_a_warning_not_a_refusal(gw, tmp_path):
    pw = tmp_path / "mqtt.pw"
    pw.write_text("s3cret\n")
    os.chmod(pw, 0o644)
    cfg, d = gw(sim() + upstream(free_port(), 'username = "u"\npassword_file = "mqtt.pw"'))
    d.wait_stored(5)
    out = d.log()
    assert "mqtt.pw" in out and "chmod 600" in out, out
    assert "s3cret" not in out
    assert d.stop() == 0


def test_http_port_that_cannot_be_bound_is_logged_and_the_daemon_runs_on(gw, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cfg, _ = gw(sim(), start=False)
        cfg.write_text(re.sub(r"port = \d+", f"port = {port}", cfg.read_text()))
        d = Daemon(cfg, None, tmp_path / "portlog")
        try:
            d.wait_stored(10)
            assert d.alive()
            assert str(port) in d.log(), d.log()
            assert d.stop() == 0
        finally:
            d.kill()


def test_invalid_reload_is_refused_and_the_old_config_keeps_running(gw):
    cfg, d = gw(sim())
    d.wait_stored(3)
    good = cfg.read_text()
    cfg.write_text(good.replace('signal = "ramp"', 'signal = "ramp"\n  bogus_key = 1'))
    r = run_cli("reload", "-c", str(cfg))
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "bogus_key" in r.stdout + r.stderr
    before = d.counters()["stored"]
    wait_for(lambda: d.counters().get("stored", 0) > before + 5, 8, "polling on after the refused reload")
    assert "reload_refused" in d.log()
    assert d.alive()
    assert d.stop() == 0


# ---------------------------------------------------------------------------------------------
# device faults: the daemon keeps running, reports the device, other devices go on


def test_device_refusing_every_connection_is_reported_and_others_poll_on(gw):
    body = sim("bad", extra='fail_connect = true\nreconnect_min = "50ms"\nreconnect_max = "200ms"') + sim("good")
    body += '\n[health]\ndevice_down = "1s"\n'
    cfg, d = gw(body)

    def reported():
        st = d.status()
        bad = (st.get("devices") or {}).get("bad") or {}
        return st if bad.get("failures", 0) >= 2 and not bad.get("up") and bad.get("last_error_code") else None

    st = wait_for(reported, 8, "the refusing device reported down")
    assert st["devices"]["good"]["up"] is True
    m = d.metrics()
    assert metric(m, "edgeos_device_up", device="bad") == 0
    assert metric(m, "edgeos_device_up", device="good") == 1
    assert (metric(m, "edgeos_device_reconnects_total", device="bad") or 0) >= 2
    assert (metric(m, "edgeos_device_connects_total", device="bad") or 0) == 0

    def unhealthy():
        code, body = http_get(d.http_port, "/healthz")
        return (code, json.loads(body)) if code == 503 else None

    code, doc = wait_for(unhealthy, 6, "/healthz 503")
    assert doc["status"] == "unhealthy"
    downs = [p for p in doc["problems"] if p["check"] == "device_down"]
    assert [p["device"] for p in downs] == ["bad"], doc
    s0 = d.counters()["stored"]
    wait_for(lambda: d.counters().get("stored", 0) > s0 + 5, 6, "the good device's samples stored")
    assert d.alive()
    assert d.stop() == 0


def test_device_failing_while_running_reconnects_by_itself(gw):
    cfg, d = gw(
        sim("flaky", poll="20ms", extra='fail_after = "300ms"\nreconnect_min = "50ms"\nreconnect_max = "150ms"')
    )
    st = wait_for(
        lambda: (s := d.status()) and ((s.get("devices") or {}).get("flaky") or {}).get("connects", 0) >= 3 and s,
        10,
        "three connects of a device failing every 300 ms",
    )
    assert st["devices"]["flaky"]["failures"] >= 2
    m = d.metrics()
    errors = sum(v for (n, ls), v in m.items() if n == "edgeos_device_errors_total" and ("device", "flaky") in ls)
    assert errors >= 2
    assert (metric(m, "edgeos_device_connects_total", device="flaky") or 0) >= 3
    assert d.alive()
    assert d.stop() == 0


def test_modbus_device_refusing_connections_is_down_and_unhealthy(gw):
    port = free_port()  # nobody listens there
    body = textwrap.dedent(f"""\
        [[devices]]
        name = "plc"
        protocol = "modbus"
        host = "127.0.0.1"
        port = {port}
        timeout = "200ms"
        poll_interval = "100ms"
        reconnect_min = "50ms"
        reconnect_max = "200ms"
          [[devices.tags]]
          name = "speed"
          address = "40001"
        [health]
        device_down = "1s"
        """) + sim("sim")
    cfg, d = gw(body)

    def unhealthy():
        code, body = http_get(d.http_port, "/healthz")
        return json.loads(body) if code == 503 else None

    doc = wait_for(unhealthy, 8, "/healthz 503 for the unreachable PLC")
    p = [p for p in doc["problems"] if p["check"] == "device_down"]
    assert p and p[0]["device"] == "plc" and p[0]["last_error_code"], doc
    m = d.metrics()
    assert metric(m, "edgeos_device_up", device="plc") == 0
    errors = sum(v for (n, ls), v in m.items() if n == "edgeos_device_errors_total" and ("device", "plc") in ls)
    assert errors >= 1
    assert metric(m, "edgeos_device_up", device="sim") == 1
    assert d.stop() == 0


def test_modbus_device_that_accepts_and_never_answers_gives_bad_samples_not_values(gw, tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                c, _ = srv.accept()
                held.append(c)  # read nothing, answer nothing

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        body = textwrap.dedent(f"""\
            [[devices]]
            name = "plc"
            protocol = "modbus"
            host = "127.0.0.1"
            port = {port}
            timeout = "300ms"
            retries = 0
            poll_interval = "100ms"
              [[devices.tags]]
              name = "speed"
              address = "40001"
            [health]
            device_down = "1s"
            """)
        cfg, d = gw(body)
        wait_for(
            lambda: metric(d.metrics(), "edgeos_device_up", device="plc") == 0 and (d.counters().get("stored", 0) >= 3),
            8,
            "silent PLC marked down with its Bad samples stored",
        )
        code, hb = wait_for(lambda: (r := http_get(d.http_port, "/healthz"))[0] == 503 and r, 6, "/healthz 503")
        assert any(p["check"] == "device_down" and p["device"] == "plc" for p in json.loads(hb)["problems"])
        assert d.alive()
        assert d.stop() == 0
        rows = [r for r in export_rows(cfg, tmp_path / "x.csv") if r["tag"] == "plc/speed"]
        assert rows, "the outage must be in the history as Bad samples"
        assert all(r["quality"] != "GOOD" and r["value"] == "" for r in rows), rows[:5]
    finally:
        stop.set()
        t.join(2)
        for c in held:
            c.close()
        srv.close()


# ---------------------------------------------------------------------------------------------
# broker outages: data accumulates, then everything stored reaches the broker


def _assert_everything_acked_was_received(sub: Subscriber, data_dir: Path, cursor: int) -> None:
    chain = unit_chain(sub.data())
    ids = store_unit_ids(data_dir, cursor)
    assert ids, "no unit stored"
    missing = [i for i in ids if i not in chain]
    assert not missing, f"{len(missing)} stored units never reached the broker: {missing[:10]}"
    # the pv chain from the acknowledged cursor back to the first unit has no hole
    s, walked = cursor, []
    while s:
        assert s in chain, f"unit {s} is named as a predecessor but never arrived"
        walked.append(s)
        s = chain[s]
    assert sorted(walked) == ids


def test_broker_absent_at_start_data_accumulates_then_all_is_delivered(gw, brokers, tmp_path):
    b = brokers().start()
    sub = Subscriber(b.port)  # a persistent session, so nothing published before it reconnects is missed
    b.stop()  # the broker is down before the gateway starts
    cfg, d = gw(sim(poll="50ms") + upstream(b.port))
    d.wait_stored(20)
    st = d.status()
    assert st["sync"] and st["sync"]["state"] != "connected", st["sync"]
    head_in_outage = max_unit_id(tmp_path / "data")
    m = d.metrics()
    assert metric(m, "edgeos_sync_connected") == 0
    wait_for(lambda: (metric(d.metrics(), "edgeos_sync_backlog", what="units") or 0) > 0, 5, "backlog reported")
    b.start()
    try:
        wait_for(lambda: metric(d.metrics(), "edgeos_sync_connected") == 1, 8, "sync connected")
        wait_for(
            lambda: (d.status().get("sync") or {}).get("cursor", 0) >= head_in_outage, 10, "the backlog acknowledged"
        )
        assert d.stop() == 0
        final = json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)
        cursor = final["sync"]["cursor"]
        wait_for(lambda: cursor in unit_chain(sub.data()), 5, "the last acknowledged unit at the subscriber")
        _assert_everything_acked_was_received(sub, tmp_path / "data", cursor)
    finally:
        sub.close()


def test_broker_restart_midstream_loses_nothing(gw, brokers, tmp_path):
    b = brokers().start()
    sub = Subscriber(b.port)
    try:
        cfg, d = gw(sim(poll="50ms") + upstream(b.port))
        wait_for(lambda: (d.status().get("sync") or {}).get("cursor", 0) >= 5, 8, "first units acknowledged")
        b.stop()
        wait_for(lambda: metric(d.metrics(), "edgeos_sync_connected") == 0, 6, "outage seen")
        t_out = time.time()
        # a status written during the outage (the live file is up to a second old)
        st = wait_for(
            lambda: (s := d.status()).get("time", 0) > t_out + 0.5 and s, 5, "a status written during the outage"
        )
        assert st["sync"]["state"] != "connected", st["sync"]
        wait_for(lambda: (metric(d.metrics(), "edgeos_sync_backlog", what="units") or 0) >= 5, 5, "backlog growing")
        head_in_outage = max_unit_id(tmp_path / "data")  # the newest unit stored during the outage
        # docs/reliability.md, MQTT TLS refusals: the log names the cause
        assert f"lost the connection to broker 127.0.0.1:{b.port}" in d.log(), d.log()[-3000:]
        b.start()
        wait_for(
            lambda: (d.status().get("sync") or {}).get("cursor", 0) >= head_in_outage,
            10,
            "the outage's backlog acknowledged",
        )
        m = d.metrics()
        assert (metric(m, "edgeos_sync_reconnects_total") or 0) >= 1
        assert (metric(m, "edgeos_sync_connects_total") or 0) >= 2, (st["sync"], d.status()["sync"], d.log()[-2000:])
        assert d.stop() == 0
        final = json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)
        # the test subscriber's persistent session needs a moment to get its queued messages
        cursor = final["sync"]["cursor"]
        wait_for(lambda: cursor in unit_chain(sub.data()), 5, "the last acknowledged unit at the subscriber")
        _assert_everything_acked_was_received(sub, tmp_path / "data", cursor)
    finally:
        sub.close()


def test_gateway_killed_shows_offline_through_its_last_will(gw, brokers):
    b = brokers().start()
    sub = Subscriber(b.port)
    try:
        cfg, d = gw(sim() + upstream(b.port))

        def state():
            msgs = sub.topic("edgeos/gw1/status")
            return json.loads(msgs[-1][0])["state"] if msgs else None

        wait_for(lambda: state() == "online", 8, "status online")
        d.proc.kill()
        d.proc.wait(5)
        wait_for(lambda: state() == "offline", 6, "last will: offline after kill -9")
    finally:
        sub.close()


def test_malformed_replay_requests_are_counted_and_the_daemon_goes_on(gw, brokers):
    import paho.mqtt.publish as publish

    b = brokers().start()
    cfg, d = gw(sim() + upstream(b.port))
    wait_for(lambda: metric(d.metrics(), "edgeos_sync_replay_listening") == 1, 8, "replay topic subscribed")
    for payload in (b"\x00\xff garbage", b'{"first": "x"}', b"[]", b'{"first": 5, "last": 2}'):
        publish.single("edgeos/gw1/replay", payload, qos=1, hostname="127.0.0.1", port=b.port)
    wait_for(
        lambda: (metric(d.metrics(), "edgeos_sync_replay_requests_total", outcome="malformed") or 0) >= 4,
        6,
        "4 malformed replay requests counted",
    )
    c0 = d.status()["sync"]["cursor"]
    wait_for(lambda: d.status()["sync"]["cursor"] > c0 + 3, 6, "forwarding goes on")
    assert d.alive()
    assert d.stop() == 0


# ---------------------------------------------------------------------------------------------
# kill -9 and restart: no sample reported stored is lost


def test_kill9_loses_no_sample_reported_stored_and_restarts(gw, tmp_path):
    cfg, d = gw(sim(poll="20ms"))
    d.wait_stored(50)
    reported = d.counters()["stored"]  # what the daemon reported stored, just before the kill
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(5)
    st = json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)
    assert st["running"] is False, "a daemon killed with SIGKILL shows as stopped at once"
    # docs/store.md, `edgeos status --json`: the dead daemon's devices show as stopped, not up,
    # with the state its file recorded in `last_state` (a daemon killed with SIGKILL left `running`)
    dev = st["devices"]["d1"]
    assert dev["state"] == "stopped" and dev["up"] is False, dev
    assert dev.get("last_state") == "running", dev
    rows = export_rows(cfg, tmp_path / "after_kill.csv")
    assert len(rows) >= reported, f"reported {reported} stored, {len(rows)} present after kill -9"

    _, d2 = gw(sim(poll="20ms"), name="edgeos.toml")
    d2.wait_stored(20)
    assert d2.stop() == 0
    rows2 = export_rows(cfg, tmp_path / "after_restart.csv")
    assert len(rows2) >= len(rows) + 20
    # what was there after the kill is still there, unchanged
    assert {(r["time"], r["value"]) for r in rows} <= {(r["time"], r["value"]) for r in rows2}


def test_kill9_and_restart_never_reuse_a_sequence_number_upstream(gw, brokers):
    b = brokers().start()
    sub = Subscriber(b.port)
    try:
        cfg, d = gw(sim(poll="30ms") + upstream(b.port))
        wait_for(lambda: (d.status().get("sync") or {}).get("cursor", 0) >= 10, 8, "units forwarded")
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(5)
        _, d2 = gw(sim(poll="30ms") + upstream(b.port))
        first_run = max(unit_chain(sub.data()))
        wait_for(lambda: max(unit_chain(sub.data())) > first_run + 10, 10, "units of the second run")
        assert d2.stop() == 0
        seen: dict[int, bytes] = {}
        for m in sub.data():
            for s, u in zip(m["seq"], m["units"], strict=True):
                assert seen.setdefault(s, u) == u, f"seq {s} carried two different units"
    finally:
        sub.close()


def test_orderly_stop_exits_0_and_accounts_for_every_sample(gw):
    cfg, d = gw(sim(poll="20ms") + sim("d2", poll="30ms"))
    d.wait_stored(30)
    assert d.stop() == 0
    st = json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)
    c = st["counters"]
    assert st.get("stopped") is True and st["running"] is False
    assert c["read"] == c["stored"] + c["filtered_out"] + c["dropped_store_unavailable"] + c["dropped_at_stop"], c
    assert c["read"] > 0 and c["dropped_at_stop"] == 0


# ---------------------------------------------------------------------------------------------
# store faults: one writer, bad files set aside, start errors not taken for damage, full disk


def test_second_daemon_on_the_same_data_dir_is_refused(gw, tmp_path):
    cfg, d = gw(sim())
    d.wait_stored(3)
    r = subprocess.run([EDGEOS, "run", "-c", str(cfg)], capture_output=True, text=True, timeout=20)
    assert r.returncode != 0
    assert f"is in use by another edgeos process (pid {d.pid})" in r.stdout + r.stderr, r.stdout + r.stderr
    s0 = d.counters()["stored"]
    wait_for(lambda: d.counters().get("stored", 0) > s0, 5, "the first daemon goes on")
    assert d.stop() == 0


def test_a_file_that_is_not_sqlite_is_moved_aside_never_deleted(gw, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    junk = b"this is not a database\n" * 200
    (data / "edgeos.db").write_bytes(junk)
    cfg, d = gw(sim())
    d.wait_stored(5)
    bad = sorted(data.glob("edgeos.db.bad-*"))
    bad = [p for p in bad if not p.name.endswith(("-wal", "-shm"))]
    assert len(bad) == 1, list(data.iterdir())
    assert bad[0].read_bytes() == junk
    assert re.search(r"ERROR|CRITICAL", d.log()), d.log()
    assert d.stop() == 0


def test_store_locked_by_another_program_is_an_error_not_damage(gw, tmp_path):
    cfg, d = gw(sim())
    d.wait_stored(3)
    assert d.stop() == 0
    db = tmp_path / "data" / "edgeos.db"
    con = sqlite3.connect(db, timeout=1, isolation_level=None)
    try:
        con.execute("BEGIN EXCLUSIVE")  # as an sqlite3 shell holding a write lock would
        digest = hashlib.sha256(db.read_bytes()).hexdigest()
        r = subprocess.run([EDGEOS, "run", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
        out = r.stdout + r.stderr
        assert r.returncode != 0, out
        assert "edgeos.db" in out, out
        assert not list(db.parent.glob("edgeos.db.bad-*")), "a lock is not damage: nothing moved aside"
        assert hashlib.sha256(db.read_bytes()).hexdigest() == digest, "the file must be left untouched"
    finally:
        con.execute("ROLLBACK")
        con.close()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, f"cannot mount a tmpfs for the full-disk test: {r.stderr}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_keeps_polling_reports_unhealthy_and_resumes(gw, small_tmpfs, tmp_path):
    reserve = small_tmpfs / "reserve"
    reserve.write_bytes(b"\1" * (1536 * 1024))  # freed later: space returns
    tags = "".join(f'  [[devices.tags]]\n  name = "t{i}"\n  signal = "random_walk"\n' for i in range(50))
    body = f'[[devices]]\nname = "d1"\nprotocol = "simulated"\npoll_interval = "20ms"\n{tags}'
    cfg, _ = gw(body, start=False)
    cfg.write_text(cfg.read_text().replace('data_dir = "data"', f'data_dir = "{small_tmpfs}"'))
    d = Daemon(cfg, int(re.search(r"port = (\d+)", cfg.read_text()).group(1)), tmp_path / "full.log")
    try:
        d.wait_stored(100)
        filler = small_tmpfs / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            for _ in range(4096):
                f.write(b"\0" * 4096)
                f.flush()
        wait_for(lambda: metric(d.metrics(), "edgeos_store_writable") == 0, 10, "store refusing writes")
        code, hb = http_get(d.http_port, "/healthz")
        assert code == 503 and any(p["check"] == "store_refuses_writes" for p in json.loads(hb)["problems"]), hb
        r0 = d.counters()["read"]
        wait_for(lambda: d.counters().get("read", 0) > r0 + 500, 5, "polling goes on while the disk is full")
        assert d.alive()
        stored_full = d.counters()["stored"]
        filler.unlink(missing_ok=True)
        reserve.unlink()
        wait_for(lambda: metric(d.metrics(), "edgeos_store_writable") == 1, 10, "writing resumes by itself")
        wait_for(lambda: d.counters().get("stored", 0) > stored_full, 8, "stored again")
        assert d.stop() == 0
        c = json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)["counters"]
        assert c["read"] == c["stored"] + c["filtered_out"] + c["dropped_store_unavailable"] + c["dropped_at_stop"], c
        assert c["store_errors"] >= 1
    finally:
        d.kill()


# ---------------------------------------------------------------------------------------------
# malformed input on the local HTTP server (docs/metrics.md, "The HTTP server")


def test_http_oversized_head_and_garbage_do_not_hurt_the_daemon(gw):
    cfg, d = gw(sim())
    d.wait_stored(3)
    with socket.create_connection(("127.0.0.1", d.http_port), 3) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        s.settimeout(3)
        head = s.recv(200)
    assert head.startswith(b"HTTP/1.1 431"), head
    for junk in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64), b"NOT HTTP AT ALL\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", d.http_port), 3) as s:
            s.sendall(junk)
            s.settimeout(1)
            with contextlib.suppress(OSError):
                s.recv(200)
    code, _ = http_get(d.http_port, "/healthz")
    assert code == 200
    s0 = d.counters()["stored"]
    wait_for(lambda: d.counters().get("stored", 0) > s0, 5, "ingest goes on")
    assert d.stop() == 0


# ---------------------------------------------------------------------------------------------
# I/O errors injected with libfiu into the running daemon (docs/reliability.md, "I/O errors")


class FiuDaemon(Daemon):
    def __init__(self, cfg: Path, http_port: int | None, log: Path, ctl: Path) -> None:
        self.cfg, self.http_port, self.log_path, self.ctl = cfg, http_port, log, ctl
        self._log = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["fiu-run", "-x", "-f", str(ctl), EDGEOS, "run", "-c", str(cfg), "--log-format", "text"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def inject(self, command: str) -> None:
        r = subprocess.run(
            ["fiu-ctrl", "-f", str(self.ctl), "-c", command, str(self.pid)], capture_output=True, text=True, timeout=5
        )
        assert r.returncode == 0, r.stderr


def _fiu_daemon(gw, tmp_path: Path, store: str = "") -> tuple[Path, FiuDaemon]:
    assert subprocess.run(["which", "fiu-run"], capture_output=True).returncode == 0, "fiu-run (fiu-utils) is needed"
    cfg, _ = gw(sim(poll="20ms") + store, start=False)
    port = int(re.search(r"port = (\d+)", cfg.read_text()).group(1))
    return cfg, FiuDaemon(cfg, port, tmp_path / "fiu.log", tmp_path / "fiuctl")


def test_a_failed_fsync_stops_the_daemon_with_status_1_and_loses_nothing_reported_stored(gw, tmp_path):
    cfg, d = _fiu_daemon(gw, tmp_path, '\n[store]\nfsync_interval = "200ms"\n')
    try:
        d.wait_stored(30)
        t0 = time.monotonic()
        d.inject("enable_random name=posix/io/sync/*,probability=0.5,failinfo=5")
        rc = d.proc.wait(10)
        out = d.log()
        assert rc == 1, out
        assert time.monotonic() - t0 < 8
        assert "CRITICAL" in out and re.search(r"^edgeos: .*fsync", out, re.M), out
        st = json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)
        c = st["counters"]
        assert c["read"] == c["stored"] + c["filtered_out"] + c["dropped_store_unavailable"] + c["dropped_at_stop"], c
        reported = c["stored"]
    finally:
        d.kill()
    # systemd's Restart=on-failure, by hand: the next start reads what is on the disk
    _, d2 = gw(sim(poll="20ms"))
    d2.wait_stored(5)
    assert d2.stop() == 0
    rows = export_rows(cfg, tmp_path / "x.csv")
    assert len(rows) >= reported + 5, f"{reported} reported stored before the failed fsync, {len(rows)} present"


def test_failing_writes_are_retried_the_daemon_keeps_running_and_loses_nothing_acknowledged(gw, tmp_path):
    cfg, d = _fiu_daemon(gw, tmp_path)
    try:
        d.wait_stored(20)
        d.inject("enable_random name=posix/io/rw/pwrite*,probability=0.05,failinfo=5")
        wait_for(lambda: (d.counters().get("store_errors") or 0) >= 1, 8, "a failed commit counted")
        s0 = d.counters()["stored"]
        wait_for(lambda: d.counters().get("stored", 0) > s0 + 20, 8, "commits go on through the errors")
        assert d.alive()
        d.inject("disable name=posix/io/rw/pwrite*")
        assert d.stop() == 0, d.log()[-3000:]
        c = json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)["counters"]
        assert c["read"] == c["stored"] + c["filtered_out"] + c["dropped_store_unavailable"] + c["dropped_at_stop"], c
        assert c["store_errors"] >= 1
    finally:
        d.kill()
    rows = export_rows(cfg, tmp_path / "x.csv")
    assert len(rows) >= c["stored"], f"{c['stored']} stored, {len(rows)} present"
    r = subprocess.run(
        ["sqlite3", str(tmp_path / "data" / "edgeos.db"), "PRAGMA integrity_check"], capture_output=True, text=True
    )
    if r.returncode == 0:
        assert r.stdout.strip() == "ok", r.stdout


# ---------------------------------------------------------------------------------------------
# broker refusing the credentials (docs/reliability.md, "MQTT TLS refusals")


def test_wrong_password_is_named_data_accumulates_and_a_fixed_config_delivers_it(gw, brokers, tmp_path):
    b = brokers()
    pwfile = b.dir / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "gw", "right-pass"], check=True, capture_output=True)
    b.conf.write_text(
        b.conf.read_text().replace("allow_anonymous true", f"allow_anonymous false\npassword_file {pwfile}")
    )
    b.start()
    sub = Subscriber(b.port, auth=("gw", "right-pass"))
    secret = tmp_path / "mqtt.pw"
    secret.write_text("wrong-pass\n")
    os.chmod(secret, 0o600)
    cfg, d = gw(sim() + upstream(b.port, 'username = "gw"\npassword_file = "mqtt.pw"'))
    d.wait_stored(10)
    wait_for(lambda: "refused the credentials" in d.log(), 8, "the cause in the log")
    line = next(ln for ln in d.log().splitlines() if "refused the credentials" in ln)
    assert f"broker 127.0.0.1:{b.port} refused the credentials" in line, line
    assert "wrong-pass" not in d.log()
    assert metric(d.metrics(), "edgeos_sync_connected") == 0
    assert d.stop() == 0
    stored_before = json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)["store"]["committed_units"]
    assert stored_before > 0
    secret.write_text("right-pass\n")
    _, d2 = gw(sim() + upstream(b.port, 'username = "gw"\npassword_file = "mqtt.pw"'))
    try:
        wait_for(
            lambda: (d2.status().get("sync") or {}).get("cursor", 0) >= stored_before,
            10,
            "the accumulated units delivered",
        )
        assert d2.stop() == 0
        cursor = json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)["sync"]["cursor"]
        wait_for(lambda: cursor in unit_chain(sub.data()), 5, "the last acknowledged unit at the subscriber")
        _assert_everything_acked_was_received(sub, tmp_path / "data", cursor)
        # in order: each device's units arrive in seq order the first time
        firsts = [s for m in sub.data() for s in m["seq"] if not m.get("rp")]
        seen: set[int] = set()
        order = [s for s in firsts if not (s in seen or seen.add(s))]
        assert order == sorted(order)
    finally:
        sub.close()
