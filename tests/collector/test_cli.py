"""`edgeos collect check`, `edgeos collect query`, config errors, and the import doors: the daemon
not importing the collector, the collector taking only the MQTT transport from the daemon."""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgeos import wire
from edgeos.collector import db as dbm
from edgeos.collector import schema

EDGEOS = str(Path(sys.executable).with_name("edgeos"))


def test_config_errors_are_reported_together(tmp_path):
    p = tmp_path / "collector.toml"
    p.write_text(
        '[broker]\nservers = ["h:x"]\nmqtt_version = "4"\n[database]\nretention = "soon"\n[collector]\nbatch = 3\n'
    )
    r = subprocess.run([EDGEOS, "collect", "check", "-c", str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    for needle in ["broker.servers", "mqtt_version", "database.dsn", "database.retention", "collector.batch"]:
        assert needle in r.stderr, (needle, r.stderr)
    # Values that passed and then stopped the collector's work or crashed it (an independent
    # tester's findings: writers = 0 wrote nothing while /healthz said ok).
    p.write_text(
        '[broker]\nhost = "b"\nreceive_maximum = 0\nclientid = "x"\n'
        '[database]\ndsn = "postgresql://x/y"\npassword_file = "nowhere.secret"\n'
        '[collector]\nwriters = 0\nbatch_units = -5\npack_min = -1\nreplay_retry = "0s"\ngateways = ["bad name!"]\n'
        '[http]\nlisten = "nonsense"\n'
    )
    r = subprocess.run([EDGEOS, "collect", "-c", str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    for needle in [
        "broker.receive_maximum: found 0, expected 1..65535",
        "broker.clientid: unknown key 'clientid' (did you mean 'client_id'?)",
        "database.password_file: file 'nowhere.secret' not found",
        "collector.writers: found 0, expected 1..64",
        "collector.batch_units: found -5",
        "collector.pack_min: found -1",
        "collector.replay_retry: found '0s'",
        "collector.gateways: found 'bad name!'",
        "http.listen: found 'nonsense', expected \"HOST:PORT\"",
    ]:
        assert needle in r.stderr, (needle, r.stderr)


def test_lag_grows_while_nothing_is_committed():
    # Now minus the newest sample committed, at each scrape: an alert on it sees a stalled
    # collector (it kept the figure of the last commit).
    import time

    from edgeos.collector.service import Metrics

    m = Metrics()
    m.newest_s["line1-gw"] = time.time() - 100.0

    def lag() -> float:
        (line,) = [ln for ln in m.prometheus().splitlines() if ln.startswith("edgeos_collector_lag_seconds{")]
        return float(line.split()[-1])

    first = lag()
    time.sleep(0.3)
    assert 100.0 <= first < lag() < 110.0


def test_the_daemon_never_imports_the_collector():
    code = (
        "import sys, edgeos.runtime, edgeos.cli;"
        "bad = [m for m in sys.modules if m.startswith('edgeos.collector') or m == 'asyncpg'];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_collector_takes_only_the_mqtt_transport_from_the_daemon(tmp_path):
    rooms = ("edgeos.store", "edgeos.sync.engine", "edgeos.runtime", "edgeos.pipeline", "edgeos.protocols")
    code = (
        "import sys, edgeos.collector.service, edgeos.cli.collect;"
        f"bad = [m for m in sys.modules if m.startswith({rooms!r})];"
        "assert not bad, bad;"
        "assert 'edgeos.sync.mqtt' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=tmp_path)


def test_one_module_imports_the_mqtt_library():
    import ast

    import edgeos

    root = Path(edgeos.__file__).parent
    importers = set()
    for f in root.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(n.split(".")[0] in ("aiomqtt", "paho") for n in names):
                importers.add(f.relative_to(root).as_posix())
    assert importers == {"sync/mqtt.py"}, importers


async def test_check_connects_to_both_ends_and_query_prints_a_tag(tmp_path, pg, mosquitto):
    _, dsn = pg
    p = tmp_path / "collector.toml"
    p.write_text(f'[broker]\nservers = ["127.0.0.1:{mosquitto.port}"]\n[database]\ndsn = "{dsn}"\n')
    r = await asyncio.to_thread(
        subprocess.run, [EDGEOS, "collect", "check", "-c", str(p)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert f"postgresql: ok (schema version {schema.SCHEMA_VERSION})" in r.stdout
    assert f"127.0.0.1:{mosquitto.port}: ok" in r.stdout
    d = dbm.Database(dsn)
    await d.connect()
    await d.save_dictionary(
        "line1-gw",
        {
            0: wire.TagEntry(0, "press1", "temperature", "number", "degC"),
            1: wire.TagEntry(1, "press1", "state", "string", ""),
        },
    )
    import time

    now = time.time_ns()
    u = wire.Unit(
        "press1",
        np.zeros(3, np.int32),
        now - np.arange(3, dtype=np.int64) * 10**9,
        np.array([1.5, 2.5, 3.5]),
        np.zeros(3, np.uint32),
    )
    t = wire.Unit(
        "press1",
        np.ones(2, np.int32),
        now - np.arange(2, dtype=np.int64) * 10**9,
        np.full(2, np.nan),
        np.zeros(2, np.uint32),
        ["RUN, fast", 'say "hi"'],
    )
    await d.write([dbm.Pending("line1-gw", 1, u, d.tag_map("line1-gw")[u.tags])])
    await d.write([dbm.Pending("line1-gw", 2, t, d.tag_map("line1-gw")[t.tags])])
    await d.close()

    async def query(tag: str) -> str:
        r = await asyncio.to_thread(
            subprocess.run,
            [EDGEOS, "collect", "query", "-c", str(p), tag, "--since", "1h"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    lines = (await query("line1-gw/press1/temperature")).splitlines()
    assert lines[0] == "ts,value,quality,text" and [ln.split(",")[1] for ln in lines[1:]] == ["3.5", "2.5", "1.5"]
    assert all(ln.endswith(",0,") for ln in lines[1:])  # Good, no text
    rows = list(csv.reader(io.StringIO(await query("line1-gw/press1/state"))))
    assert [(row[1], row[3]) for row in rows[1:]] == [("nan", 'say "hi"'), ("nan", "RUN, fast")]
    r = await asyncio.to_thread(
        subprocess.run,
        [EDGEOS, "collect", "query", "-c", str(p), "line1-gw/press1/temperature", "--since", "bogus"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and '--since: found "bogus"' in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_broker_servers_follow_the_gateways_rules(tmp_path):
    """broker.servers is read as the gateway's upstream.servers (docs/config.md): a bare host
    takes the default port, an IPv6 address goes in brackets, and a malformed entry is refused
    (an unclosed bracket was read as an address)."""
    from edgeos.collector.config import CollectorConfigError, load

    p = tmp_path / "collector.toml"
    body = '[broker]\nservers = [{}]\n[database]\ndsn = "postgresql://x/y"\n'
    p.write_text(body.format('"b.plant", "[::1]:1884", "[fe80::1]"'))
    assert load(p).broker["servers"] == [("b.plant", 1883), ("::1", 1884), ("fe80::1", 1883)]
    for bad in ('"[::1"', '"::1:1884"', '"[::1]x"', '"h:0"'):
        p.write_text(body.format(bad))
        try:
            load(p)
        except CollectorConfigError as e:
            assert "broker.servers" in str(e) and bad.strip('"') in str(e), e
        else:
            raise AssertionError(f"{bad} was accepted")


def test_a_gateway_filter_subscribes_to_those_gateways_only(tmp_path):
    from edgeos.collector.config import load

    p = tmp_path / "collector.toml"
    p.write_text(
        '[broker]\nhost = "b.plant"\ntls = true\n[database]\ndsn = "postgresql://x/y"\n'
        '[collector]\ngateways = ["line1-gw", "line2-gw"]\nbatch_wait = "250ms"\n'
    )
    cfg = load(p)
    assert cfg.broker["servers"] == [("b.plant", 8883)] and cfg.batch_wait == 0.25
    assert cfg.topics() == [
        f"edgeos/{g}/{t}" for g in ("line1-gw", "line2-gw") for t in ("+/data", "tags", "status", "replay/gone")
    ]


async def test_a_newer_schema_stops_the_collector_with_a_clear_message(tmp_path, pg):
    _, dsn = pg
    d = dbm.Database(dsn)
    await d.connect()
    await d.conn.execute("UPDATE edgeos_collector SET version = 99")
    await d.close()
    p = tmp_path / "collector.toml"
    p.write_text(f'[broker]\nservers = ["127.0.0.1:1"]\n[database]\ndsn = "{dsn}"\n[http]\nlisten = ""\n')
    r = await asyncio.to_thread(
        subprocess.run, [EDGEOS, "collect", "-c", str(p)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1 and "schema is version 99, newer" in r.stderr and "Traceback" not in r.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collector(tmp_path: Path, dsn: str, listen: str, broker: str = "127.0.0.1:1") -> tuple[subprocess.Popen, Path]:
    p = tmp_path / "collector.toml"
    p.write_text(f'[broker]\nservers = ["{broker}"]\n[database]\ndsn = "{dsn}"\n[http]\nlisten = "{listen}"\n')
    log = tmp_path / "collector.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([EDGEOS, "collect", "-c", str(p)], stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def _stop(proc: subprocess.Popen, log: Path, sig: int) -> None:
    """`sig` must stop the collector within 10 s, exit code 0 (killed after, if not)."""
    try:
        proc.send_signal(sig)
        assert proc.wait(10) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _healthz(port: int) -> tuple[int, dict] | None:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return None


def test_a_collector_waiting_for_postgresql_answers_healthz_and_stops_on_sigterm(tmp_path):
    # An independent tester's findings: while PostgreSQL was not reached at start, /healthz did
    # not answer (the server started after the database) and SIGTERM/SIGINT were ignored, so a
    # `systemctl stop` waited for its timeout.
    import signal
    import time

    dead, port = free_port(), free_port()
    proc, log = _collector(tmp_path, f"postgresql://postgres@127.0.0.1:{dead}/x", f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        got = None
        while time.monotonic() < deadline and got is None:
            got = _healthz(port)
            time.sleep(0.1)
        assert got == (503, {"ok": False, "postgresql": False, "broker": False}), (got, log.read_text())
        time.sleep(1.0)  # a few retries of the database
    finally:
        _stop(proc, log, signal.SIGTERM)
    text = log.read_text()
    assert "waiting, retrying" in text and "Traceback" not in text, text
    assert text.count("waiting, retrying") == 1, text  # retried every 0.2-2 s, said once a minute


def test_a_busy_http_port_is_logged_and_the_collector_runs_on(tmp_path):
    import signal
    import socket
    import time

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        proc, log = _collector(tmp_path, f"postgresql://postgres@127.0.0.1:{free_port()}/x", f"127.0.0.1:{busy}")
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and "cannot listen" not in log.read_text():
                time.sleep(0.1)
            time.sleep(0.5)
            assert proc.poll() is None, log.read_text()
        finally:
            _stop(proc, log, signal.SIGINT)
    text = log.read_text()
    assert f"http: cannot listen on 127.0.0.1:{busy}" in text and "Traceback" not in text, text


async def test_check_query_and_the_collector_use_the_password_file(tmp_path, pg_cluster, mosquitto):
    # `collect check` and `collect query` ignored database.password_file (only the collector
    # itself read it). A role of its own behind password authentication on this cluster.
    import os
    import signal

    import asyncpg

    hba = pg_cluster.data / "pg_hba.conf"
    if "pwuser" not in hba.read_text():
        hba.write_text("host all pwuser 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        os.kill(pg_cluster.proc.pid, signal.SIGHUP)
        conn = await asyncpg.connect(pg_cluster.dsn())
        try:
            await conn.execute("CREATE ROLE pwuser LOGIN PASSWORD 'right-one'")
            await conn.execute("CREATE DATABASE pwdb OWNER pwuser")
        finally:
            await conn.close()
    dsn = f"postgresql://pwuser@127.0.0.1:{pg_cluster.port}/pwdb"
    (tmp_path / "pg.secret").write_text("right-one\n")
    p = tmp_path / "collector.toml"
    p.write_text(
        f'[broker]\nservers = ["127.0.0.1:{mosquitto.port}"]\n[database]\ndsn = "{dsn}"\n'
        'password_file = "pg.secret"\n[http]\nlisten = ""\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([EDGEOS, "collect", *args], capture_output=True, text=True, timeout=60, env=env)

    r = await asyncio.to_thread(run, "check", "-c", str(p))
    assert r.returncode == 0 and "postgresql: ok" in r.stdout, r.stdout + r.stderr
    r = await asyncio.to_thread(run, "query", "-c", str(p), "line1-gw/press1/temperature")
    assert r.returncode == 1 and "no tag 'line1-gw/press1/temperature' in the historian" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "pg.secret").write_text("wrong-one\n")
    r = await asyncio.to_thread(run, "check", "-c", str(p))
    assert r.returncode == 1 and "password authentication failed" in r.stderr, r.stderr
    r = await asyncio.to_thread(run, "query", "-c", str(p), "line1-gw/press1/temperature")
    assert r.returncode == 1 and "password authentication failed" in r.stderr and "Traceback" not in r.stderr, r.stderr
