"""Log lines (text, journal, json) and secrets: a canary password in a config never shows in a
log line, the status, or CLI output while the connections that use it fail."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import io
import json
import logging
import os
import socket
import subprocess
import time

import pytest
from typer.testing import CliRunner

from edgeos import logs
from edgeos.cli import app
from edgeos.config import load_config
from edgeos.runtime import Runtime

MQTT_CANARY = "canary-Mq7t-pass"
OPCUA_CANARY = "canary-0pcua-pass"
URL_CANARY = "canary-Url-pass"


def _record(msg: str, level: int = logging.WARNING, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("edgeos.device", level, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return rec


def test_formats_text_journal_json():
    rec = _record("press1: read: timed out\nsecond line", device="press1", code="timeout")
    text = logs.Formatter("text").format(rec)
    assert text.endswith(" WARNING edgeos.device press1 timeout: press1: read: timed out | second line")
    assert text[:4].isdigit() and "\n" not in text
    # journald adds its own timestamp and reads the level from the syslog priority prefix.
    assert (
        logs.Formatter("journal").format(rec)
        == "<4>edgeos.device press1 timeout: press1: read: timed out | second line"
    )
    assert logs.Formatter("journal").format(_record("x", logging.ERROR)) == "<3>edgeos.device - -: x"
    doc = json.loads(logs.Formatter("json").format(rec))
    assert doc["level"] == "warning" and doc["device"] == "press1" and doc["code"] == "timeout"
    assert doc["message"] == "press1: read: timed out\nsecond line" and doc["time"].endswith("Z")


def test_library_warnings_are_limited_to_one_a_minute_per_message(restore_logging):
    """An independent tester's finding: asyncua logged two warnings per reconnect attempt per
    device (72 lines in a 5 s outage of three devices); edgeos's own are limited per minute."""
    buf = io.StringIO()
    logs.setup("info", "text", stream=buf)
    lib = logging.getLogger("asyncua.client.ua_client")
    for i in range(50):
        lib.warning("Error while renewing session: %s", f"attempt {i}")
        lib.warning("Connection lost")
    lib.error("a library's error")
    lib.error("a library's error")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 4, lines  # each message once, errors always
    assert "attempt 0" in lines[0] and "Connection lost" in lines[1]
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "_edgeos", False))
    limit = next(f for f in handler.filters if isinstance(f, logs.LibraryLimit))
    limit._last = {k: v - 61 for k, v in limit._last.items()}  # a minute later
    lib.warning("Connection lost")
    assert buf.getvalue().splitlines()[-1].endswith("Connection lost (49 similar suppressed in the last 60s)")


def test_journald_detected_from_journal_stream(tmp_path, monkeypatch):
    with open(tmp_path / "stderr", "w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.under_journald(f)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # inherited, not ours
        assert not logs.under_journald(f)


def test_redact_url_userinfo_and_registered_secrets():
    logs.register_secret("tok-Zz9-abc")
    assert logs.redact("opc.tcp://op:pw@h:4840/x and tok-Zz9-abc") == "opc.tcp://op:***@h:4840/x and ***"
    assert logs.redact("mqtt://h:1883 opc.tcp://h:4840") == "mqtt://h:1883 opc.tcp://h:4840"


def _get(url: str) -> str:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:  # /healthz answers 503 while plc is down
        return e.read().decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def refusing_broker(tmp_path):
    """mosquitto that knows user gw with another password."""
    d = tmp_path / "broker"
    d.mkdir()
    port = _free_port()
    pw = d / "passwords"
    pw.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "gw", "the-right-one"], check=True)
    conf = d / "mosquitto.conf"
    conf.write_text(
        f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {pw}\n"
        f"log_dest file {d}/mosquitto.log\n"
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "mosquitto did not start"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def restore_logging():
    """logs.setup changes process-wide loggers: put them back for the tests that follow."""
    loggers = [logging.getLogger("edgeos"), logging.getLogger()]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


async def test_canary_passwords_never_shown(write_config, refusing_broker, tmp_path, restore_logging):
    dead = _free_port()  # nothing listens: the OPC UA connection fails
    path = write_config(
        f"""
        [gateway]
        id = "gw"
        data_dir = "data"
        shutdown_timeout = "3s"

        [http]
        port = 0
        metrics_per_tag = true

        [upstream]
        enabled = true
        host = "127.0.0.1"
        port = {refusing_broker}
        username = "gw"
        password_file = "mqtt.password"
        reconnect_min = "100ms"
        reconnect_max = "200ms"

        [[devices]]
        name = "plc"
        protocol = "opcua"
        endpoint = "opc.tcp://operator:{URL_CANARY}@127.0.0.1:{dead}/"
        security_mode = "None"
        username = "operator"
        password_file = "opcua.password"
        timeout = "500ms"
        reconnect_min = "100ms"
        reconnect_max = "200ms"
        tags = [{{ name = "speed", node = "ns=2;i=2" }}]

        [[devices]]
        name = "sim"
        protocol = "simulated"
        poll_interval = "100ms"
        tags = [{{ name = "t" }}]
        """,
        mqtt__password=MQTT_CANARY + "\n",
        opcua__password=OPCUA_CANARY + "\n",
    )
    out = io.StringIO()
    logs.setup("debug", "text", stream=out)
    json_out = io.StringIO()
    json_handler = logging.StreamHandler(json_out)
    json_handler.setFormatter(logs.Formatter("json"))
    logging.getLogger("edgeos").addHandler(json_handler)
    try:
        rt = Runtime(load_config(path))
        task = asyncio.create_task(rt.run())
        try:
            async with asyncio.timeout(20):
                await rt.running.wait()
                while not (rt.devices["plc"].failures >= 2 and rt.sync and rt.sync.status.failures >= 2):
                    await asyncio.sleep(0.05)
            assert rt.http is not None
            http = [
                await asyncio.to_thread(_get, f"http://127.0.0.1:{rt.http.port}{p}") for p in ("/metrics", "/healthz")
            ]
            runner = CliRunner()
            cli = [
                await asyncio.to_thread(runner.invoke, app, args)
                for args in (["status", "-c", str(path)], ["status", "--json", "-c", str(path)], ["check", str(path)])
            ]
        finally:
            rt.stop()
            await asyncio.wait_for(task, 15)
    finally:
        logging.getLogger("edgeos").removeHandler(json_handler)
    text, js = out.getvalue(), json_out.getvalue()
    # The failures were logged, naming what failed (the user, the URL without its password).
    assert "refused the credentials" in text, text[-2000:]
    assert "plc" in text and "operator:***@127.0.0.1" in text + "".join(r.output for r in cli), text[-2000:]
    assert 'device="plc"' in http[0] and '"devices_down":1' in http[1], http[1]  # scraped while it failed
    status_file = (tmp_path / "data" / "status.json").read_text()
    for canary in (MQTT_CANARY, OPCUA_CANARY, URL_CANARY):
        assert canary not in text and canary not in js
        assert canary not in status_file
        assert all(canary not in body for body in http)
        for r in cli:
            assert canary not in r.output, r.output


def test_secret_field_problems_never_quote_the_value(write_config):
    path = write_config(
        """
        [gateway]
        id = "gw"
        data_dir = "data"

        [[devices]]
        name = "plc"
        protocol = "opcua"
        endpoint = "opc.tcp://operator:canary-Bad-url@127.0.0.1:99999/"
        security_mode = "Nonee"
        tags = [{ name = "speed", node = "ns=2;i=2" }]
        """
    )
    r = CliRunner().invoke(app, ["check", str(path)])
    assert r.exit_code == 2 and "security_mode" in r.output
    assert "canary-Bad-url" not in r.output


def test_run_under_journald_and_as_json(write_config, tmp_path):
    """`edgeos run` as systemd starts it (stderr is the journal's stream), and for a shipper."""
    import re
    import signal
    import sys

    exe = str(os.path.join(os.path.dirname(sys.executable), "edgeos"))
    path = write_config(
        """
        [gateway]
        id = "gw"
        data_dir = "data"
        [http]
        enabled = false
        [[devices]]
        name = "sim"
        protocol = "simulated"
        tags = [{ name = "t" }]
        """
    )
    runs = []
    for name, args, journal in (("journal", [], True), ("json", ["--log-format", "json"], True)):
        err = open(tmp_path / f"{name}.err", "w")  # noqa: SIM115 - closed below
        st = os.fstat(err.fileno())
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}" if journal else ""
        data = f"data-{name}"
        cfg = path.with_name(f"{name}.toml")
        cfg.write_text(path.read_text().replace('data_dir = "data"', f'data_dir = "{data}"'))
        proc = subprocess.Popen([exe, "run", "-c", str(cfg), *args], stderr=err, env=env)
        runs.append((name, proc, err))
    try:
        for name, proc, _ in runs:
            deadline = time.monotonic() + 30
            while "gateway gw" not in (tmp_path / f"{name}.err").read_text():
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / f"{name}.err").read_text()
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
        for _, proc, _ in runs:
            assert proc.wait(30) == 0
    finally:
        for _, proc, err in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err.close()
    journal = (tmp_path / "journal.err").read_text().splitlines()
    assert journal and all(re.match(r"<[0-7]>edgeos\.\S+ \S+ \S+: ", ln) for ln in journal), journal
    assert any(ln.startswith("<6>edgeos.runtime - ") and "stopped:" in ln for ln in journal), journal
    docs = [json.loads(ln) for ln in (tmp_path / "json.err").read_text().splitlines()]  # --log-format wins
    assert docs and all(d["level"] in ("info", "warning") and d["logger"].startswith("edgeos") for d in docs)
