"""The command line as README.md shows it, and adapter errors and drops as docs/adapters.md
promises a user sees them (error codes, logs, status, metrics, stored Bad samples).

Everything runs as a user would: the venv's `edgeos` entry point as a subprocess, configs in
tmp_path, the `simulated` protocol, the test-only `misbehaving` plugin (an OEM plugin that breaks
the contract) and a pymodbus server (tests/peers/modbus.py) in a subprocess on a random loopback
port. Expectations come from README.md, docs/adapters.md, docs/model.md, docs/store.md,
docs/metrics.md and docs/config.md.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EDGEOS = str(BIN / "edgeos") if (BIN / "edgeos").exists() else str(ROOT / ".venv-test" / "bin" / "edgeos")
PYTHON = str(BIN / "python") if (BIN / "python").exists() else sys.executable
PEERS = ROOT / "tests" / "peers"

BAD_QUALITIES = {"BAD_COMM_FAILURE", "BAD_NOT_CONNECTED"}


# -- helpers ---------------------------------------------------------------------------------


def cli(*args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [EDGEOS, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def wait_for(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def write_cfg(directory: Path, body: str, name: str = "edgeos.toml") -> Path:
    p = directory / name
    p.write_text(textwrap.dedent(body))
    return p


GATEWAY = """
[gateway]
id = "gw1"
data_dir = "data"

[http]
port = 0
"""


class Daemon:
    """`edgeos run` in a subprocess, its JSON log lines in a file."""

    def __init__(self, config: Path, log_format: str = "json") -> None:
        self.config = config
        self.log_path = config.parent / "daemon.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [EDGEOS, "run", "-c", str(config), "--log-format", log_format],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=config.parent,
        )
        self.rc: int | None = None

    def status(self) -> dict | None:
        r = cli("status", "--json", "-c", str(self.config))
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def wait_running(self, timeout: float = 15.0) -> dict:
        def ready():
            assert self.proc.poll() is None, f"daemon exited early:\n{self.log_text()}"
            s = self.status()
            return s if s and s.get("running") and s.get("devices") else None

        return wait_for(ready, timeout, "the daemon to run")

    def wait_status(self, cond: Callable[[dict], bool], timeout: float = 10.0, what: str = "status") -> dict:
        def check():
            s = self.status()
            return s if s and cond(s) else None

        return wait_for(check, timeout, what)

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def log_records(self) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.rc is None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                self.rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                self.rc = -9
            self._log.close()
        return self.rc


def metrics(status: dict) -> str:
    port = status["http"]["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        m = re.match(r"^(\w+)(?:\{(.*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


PEER_SCRIPT = r"""
import asyncio, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("edgeos_test_peers_modbus", sys.argv[1])
m = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = m
spec.loader.exec_module(m)

async def main():
    opts = json.loads(sys.argv[2])
    peer = m.ModbusPeer({1: m.UnitMap(), 2: m.UnitMap(), 3: m.UnitMap()})
    await peer.start_tcp()
    for u in (1, 2):
        peer.set_registers(u, "hr", 0, list(range(100, 120)))
    for a in opts.get("refuse", []):
        peer.refuse[(1, "hr", a)] = 2
    peer.short.update(opts.get("short", []))
    peer.silent.update(opts.get("silent", []))
    print(peer.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await peer.stop()

asyncio.run(main())
"""


class ModbusServer:
    """A pymodbus server (tests/peers/modbus.py) in its own process; hr0..19 hold 100..119."""

    def __init__(self, tmp: Path, **opts) -> None:
        script = tmp / "modbus_peer.py"
        script.write_text(PEER_SCRIPT)
        self.proc = subprocess.Popen(
            [PYTHON, str(script), str(PEERS / "modbus.py"), json.dumps(opts)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        assert line.strip().isdigit(), f"modbus peer did not start: {line!r}"
        self.port = int(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("\n")
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


def query_rows(config: Path, *tags: str, extra: tuple[str, ...] = ()) -> list[dict]:
    r = cli("query", *tags, "--since", "1h", "-f", "json", "-c", str(config), *extra)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def export_rows(config: Path, *tags: str) -> list[dict]:
    r = cli("export", *tags, "--since", "1h", "--out", "-", "-c", str(config))
    assert r.returncode == 0, r.stderr
    return list(csv.DictReader(io.StringIO(r.stdout)))


# -- a gateway with healthy and failing devices, shared by the adapter-error tests ----------


@pytest.fixture(scope="module")
def fault_gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faultgw")
    server = ModbusServer(tmp, refuse=[5], short=[2], silent=[3])
    body = (
        GATEWAY
        + f"""
[[devices]]
name = "good"
protocol = "simulated"
poll_interval = "100ms"
tags = [
  {{ name = "level", signal = "ramp", amplitude = 10 }},
  {{ name = "on", signal = "bool", period = "1s" }},
  {{ name = "state", signal = "text", states = ["idle", "run"] }},
  {{ name = "setpoint", signal = "step", writable = true }},
]

[[devices]]
name = "dead"
protocol = "simulated"
poll_interval = "100ms"
reconnect_min = "20ms"
reconnect_max = "50ms"
fail_connect = true
tags = [ {{ name = "a", signal = "ramp" }}, {{ name = "b", signal = "sine" }} ]

[[devices]]
name = "flaky"
protocol = "simulated"
poll_interval = "100ms"
reconnect_min = "50ms"
reconnect_max = "100ms"
fail_after = "400ms"
tags = [ {{ name = "x", signal = "ramp" }} ]

[[devices]]
name = "breach"
protocol = "misbehaving"
mode = "foreign_ids"
reconnect_min = "20ms"
reconnect_max = "50ms"
tags = [ {{ name = "t" }} ]

[[devices]]
name = "ender"
protocol = "misbehaving"
mode = "run_returns"
reconnect_min = "20ms"
reconnect_max = "50ms"
tags = [ {{ name = "t" }} ]

[[devices]]
name = "buggy"
protocol = "misbehaving"
mode = "create_raises"
reconnect_min = "20ms"
reconnect_max = "50ms"
tags = [ {{ name = "t" }} ]

[[devices]]
name = "plc"
protocol = "modbus"
host = "127.0.0.1"
port = {server.port}
unit_id = 1
poll_interval = "100ms"
timeout = "500ms"
max_gap = 0
tags = [
  {{ name = "ok0", address = "hr0" }},
  {{ name = "refused5", address = "hr5" }},
  {{ name = "ok10", address = "hr10" }},
]

[[devices]]
name = "shorty"
protocol = "modbus"
host = "127.0.0.1"
port = {server.port}
unit_id = 2
poll_interval = "100ms"
timeout = "500ms"
tags = [ {{ name = "r0", address = "hr0" }} ]

[[devices]]
name = "mute"
protocol = "modbus"
host = "127.0.0.1"
port = {server.port}
unit_id = 3
poll_interval = "100ms"
timeout = "150ms"
retries = 0
reconnect_min = "20ms"
reconnect_max = "50ms"
tags = [ {{ name = "r0", address = "hr0" }} ]

[[devices]]
name = "ahead"
protocol = "misbehaving"
mode = "ok"
period = "100ms"
clock_ahead = "2m"
tags = [ {{ name = "t" }} ]

[[devices]]
name = "stranger"
protocol = "misbehaving"
mode = "other_device"
reconnect_min = "20ms"
reconnect_max = "50ms"
tags = [ {{ name = "t" }} ]

[[devices]]
name = "notbatch"
protocol = "misbehaving"
mode = "not_a_batch"
reconnect_min = "20ms"
reconnect_max = "50ms"
tags = [ {{ name = "t" }} ]
"""
    )
    cfg = write_cfg(tmp, body)
    d = Daemon(cfg)
    try:
        d.wait_running()
        live = d.wait_status(
            lambda s: (
                s["devices"]["dead"]["failures"] >= 5
                and s["devices"]["flaky"]["failures"] >= 3
                and s["devices"]["breach"]["failures"] >= 3
                and s["devices"]["ender"]["failures"] >= 3
                and s["devices"]["buggy"]["failures"] >= 3
                and s["devices"]["plc"]["samples"] >= 9
                and s["devices"]["shorty"]["samples"] >= 3
                and s["devices"]["mute"]["samples"] >= 3
                and s["devices"]["stranger"]["failures"] >= 2
                and s["devices"]["notbatch"]["failures"] >= 2
            ),
            timeout=20,
            what="every fault to have happened a few times",
        )
        text = metrics(live)
        running_status = cli("status", "-c", str(cfg))
        rc = d.stop()
        yield {
            "cfg": cfg,
            "live": live,
            "metrics": text,
            "logs": d.log_records(),
            "rc": rc,
            "running_status": running_status,
            "after": json.loads(cli("status", "--json", "-c", str(cfg)).stdout),
        }
    finally:
        d.stop()
        server.close()


def device_logs(fg: dict, device: str, level: str = "warning") -> list[dict]:
    return [r for r in fg["logs"] if r.get("device") == device and r.get("level") == level]


# -- README: every command and its help ---------------------------------------------------


HELP_COMMANDS = [
    ["run"],
    ["check"],
    ["init"],
    ["reload"],
    ["version"],
    ["status"],
    ["write"],
    ["tags"],
    ["query"],
    ["export"],
    ["demo"],
    ["service", "install"],
    ["console", "passwd"],
    ["browse"],
    ["opcua", "cert"],
    ["serial", "test"],
]


def test_every_documented_command_has_help():
    # README: "Every command takes the config with `-c FILE` ... and has `--help`."
    for command in HELP_COMMANDS:
        r = cli(*command, "--help")
        assert r.returncode == 0, (command, r.stderr)
        assert "Usage:" in r.stdout and command[-1] in r.stdout, command
        if command[0] in ("run", "check", "reload", "status", "write", "tags", "query", "export"):
            assert "-c, --config" in r.stdout, command


def test_version_says_whether_kernels_are_compiled():
    # README: "edgeos version  # versions, and whether the compiled kernels are in use"
    r = cli("version")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^edgeos \d+\.\d+", r.stdout, re.M)
    assert re.search(r"^kernels: (compiled|reference)$", r.stdout, re.M)
    for dep in ("numpy", "msgpack", "pymodbus"):
        assert re.search(rf"^{dep} \d", r.stdout, re.M), dep


# -- init and check ------------------------------------------------------------------------


def test_init_writes_a_config_that_checks(tmp_path):
    # README: "edgeos init edgeos.toml  # a commented example config (runs as written: a simulated device)"
    # "edgeos check -c edgeos.toml  # validate; prints devices, tags, reads/s, plugins, kernels"
    r = cli("init", "edgeos.toml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "edgeos.toml").read_text()
    assert 'protocol = "simulated"' in text and "#" in text
    r = cli("check", "-c", "edgeos.toml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "press1" in out and "simulated" in out
    assert re.search(r"READS/S", out) and re.search(r"\b3 tags\b", out)
    assert re.search(r"kernels\s+(compiled|reference)", out)
    assert "plugins" in out and "simulated" in out.split("plugins", 1)[1]
    # "`check`, `run` and `status` also take it as their one argument"
    r2 = cli("check", "edgeos.toml", cwd=tmp_path)
    assert r2.returncode == 0 and r2.stdout == out


def test_init_system_and_local_data_dir(tmp_path):
    # README: "under /etc it points data_dir at /var/lib/edgeos (--system/--local)"
    assert cli("init", "sys.toml", "--system", cwd=tmp_path).returncode == 0
    assert cli("init", "loc.toml", "--local", cwd=tmp_path).returncode == 0
    assert cli("init", "plain.toml", cwd=tmp_path).returncode == 0
    dd = re.compile(r'^\s*data_dir\s*=\s*"([^"]*)"', re.M)
    assert dd.search((tmp_path / "sys.toml").read_text()).group(1) == "/var/lib/edgeos"
    assert not dd.search((tmp_path / "loc.toml").read_text()).group(1).startswith("/var/lib")
    assert not dd.search((tmp_path / "plain.toml").read_text()).group(1).startswith("/var/lib")
    # `init --help`: "--force  Overwrite an existing file."
    p = tmp_path / "edgeos.toml"
    p.write_text("# mine\n")
    r = cli("init", str(p))
    assert r.returncode != 0
    assert p.read_text() == "# mine\n"
    assert "--force" in r.stdout + r.stderr
    assert cli("init", str(p), "--force").returncode == 0
    assert 'protocol = "simulated"' in p.read_text()


def test_init_config_runs_as_written(tmp_path):
    # README: "runs as written: a simulated device"; the only change: the HTTP port, so as not
    # to take 9180 on a shared machine.
    assert cli("init", "edgeos.toml", cwd=tmp_path).returncode == 0
    cfg = tmp_path / "edgeos.toml"
    cfg.write_text(cfg.read_text() + "\n[http]\nport = 0\n")
    d = Daemon(cfg)
    try:
        d.wait_running()
        d.wait_status(lambda s: s["devices"]["press1"]["up"] and s["devices"]["press1"]["samples"] > 0)
    finally:
        assert d.stop() == 0, d.log_text()
    r = cli("tags", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "press1/temperature" in r.stdout and "GOOD" in r.stdout


def test_check_reports_every_problem_in_one_pass_exit_2(tmp_path):
    # docs/config.md: "Every problem is reported in one pass"; "Unknown keys are errors, with the
    # closest allowed key suggested"; `edgeos check --help`: "Exit code 2 and one line per problem".
    cfg = write_cfg(
        tmp_path,
        GATEWAY
        + """
[[devices]]
name = "m"
protocol = "simulated"
poll_intervall = "1s"
tags = [ { name = "a", signal = "ramp", amplitude = "lots" } ]
""",
    )
    r = cli("check", "-c", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "poll_intervall" in out and "poll_interval" in out.split("poll_intervall", 1)[1]
    assert re.search(r"devices\[0\]\(m\)\.tags\[0\]\(a\)\.amplitude: found", out), out
    assert "edgeos.toml" in out
    # run refuses the same config as a whole: it never runs half a config
    r = cli("run", "-c", str(cfg), timeout=20)
    assert r.returncode != 0
    assert "amplitude" in r.stdout + r.stderr
    assert not (tmp_path / "data" / "edgeos.db").exists()


def test_check_security_lists_listeners_and_exposure(tmp_path):
    # README: "edgeos check --security ... + TLS/OPC UA modes, certificate days left, listeners, unit exposure"
    assert cli("init", "edgeos.toml", "--local", cwd=tmp_path).returncode == 0
    r = cli("check", "--security", "-c", "edgeos.toml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "security" in r.stdout
    assert "127.0.0.1:9180" in r.stdout  # the default HTTP listener
    assert re.search(r"exposure \d+\.\d", r.stdout)


# -- status, tags, query, export, write, reload --------------------------------------------


def test_status_json_has_the_documented_fields(fault_gw):
    # docs/store.md, `edgeos status --json`; README: "--log-format auto|text|journal|json"
    assert fault_gw["logs"]
    for r in fault_gw["logs"]:
        assert {"time", "level", "message"} <= set(r)
    s = fault_gw["live"]
    for key in ("gateway", "kernels", "time", "pid", "running", "counters", "store", "sync", "devices"):
        assert key in s, key
    assert s["gateway"] == "gw1" and s["running"] is True and s["sync"] is None
    assert s["kernels"] in ("compiled", "reference")
    for key in (
        "read",
        "filtered_out",
        "filter_released",
        "stored",
        "store_errors",
        "filter_errors",
        "dropped_store_unavailable",
        "dropped_at_stop",
        "store_recoveries",
        "started_ns",
    ):
        assert key in s["counters"], key
    for key in ("committed_samples", "committed_units", "dropped_retention", "dropped_budget", "quarantined_units"):
        assert key in s["store"], key
    for name, dev in s["devices"].items():
        for key in (
            "state",
            "up",
            "connects",
            "failures",
            "samples",
            "last_error",
            "last_error_code",
            "last_error_ns",
            "last_ok_ns",
            "down_since_ns",
            "health",
        ):
            assert key in dev, (name, key)


def test_status_after_orderly_stop(fault_gw):
    # docs/store.md: "`stopped` (present at an orderly stop)"; "When `running` is false ...
    # `edgeos status` shows every device that was not `disabled` as `stopped`, not `up`"
    assert fault_gw["rc"] == 0  # `run --help`: "On SIGTERM ... the exit code is 0."
    s = fault_gw["after"]
    assert s["running"] is False and "stopped" in s
    assert s["counters"]["dropped_at_stop"] == 0
    for name, dev in s["devices"].items():
        assert dev["state"] == "stopped", name
        assert dev["up"] is False, name
    r = cli("status", "-c", str(fault_gw["cfg"]))
    assert r.returncode == 1
    assert "not running" in r.stdout

    # --json and --format json print the same document; the table shows every device stopped
    cfg = str(fault_gw["cfg"])
    a = json.loads(cli("status", "--json", "-c", cfg).stdout)
    b = json.loads(cli("status", "--format", "json", "-c", cfg).stdout)
    a.pop("time", None), b.pop("time", None)
    assert a == b
    table = cli("status", cfg).stdout
    for dev in ("good", "dead", "flaky", "plc"):
        assert re.search(rf"^{dev}\s+stopped", table, re.M), table


def test_tags_formats(fault_gw):
    # README: "`tags` and `query` print a table, or with `--format csv|json` CSV or one JSON
    # object per line; ... booleans as `true`/`false`, no value for a failed read."
    cfg = str(fault_gw["cfg"])
    table = cli("tags", "-c", cfg)
    assert table.returncode == 0
    assert re.search(r"^TAG\s+VALUE", table.stdout)
    rows = [json.loads(x) for x in cli("tags", "-f", "json", "-c", cfg).stdout.splitlines() if x.strip()]
    by = {r["tag"]: r for r in rows}
    assert by["good/on"]["value"] in (True, False)
    assert isinstance(by["good/state"]["value"], str)
    assert by["dead/a"]["value"] is None and by["dead/a"]["quality"] == "BAD_NOT_CONNECTED"
    c = list(csv.DictReader(io.StringIO(cli("tags", "-f", "csv", "-c", cfg).stdout)))
    byc = {r["tag"]: r for r in c}
    assert byc["good/on"]["value"] in ("true", "false")
    assert byc["dead/a"]["value"] == ""
    assert set(by) == set(byc)


def test_query_raw_and_aggregated(fault_gw):
    cfg = fault_gw["cfg"]
    raw = query_rows(cfg, "good/level")
    assert len(raw) >= 5 and all(r["quality"] == "GOOD" for r in raw)
    # a tag name unique to one device is enough (`query --help`)
    assert query_rows(cfg, "level") == raw
    # README: "`query --every 1m --agg ...` aggregates into buckets aligned to multiples of their length"
    agg = query_rows(cfg, "good/level", extra=("--every", "1s", "--agg", "count"))
    assert agg, "no buckets"
    assert sum(float(r["count"]) for r in agg) == len(raw)
    for r in agg:
        assert re.search(r"T\d\d:\d\d:\d\d(\.000)?Z$", r["time"]), r["time"]


def test_query_aggregates_leave_out_bad_samples(fault_gw):
    # README: "Bad samples are left out"
    cfg = fault_gw["cfg"]
    raw = query_rows(cfg, "flaky/x")
    good = [r for r in raw if r["quality"] == "GOOD"]
    assert any(r["quality"] == "BAD_COMM_FAILURE" for r in raw)
    agg = query_rows(cfg, "flaky/x", extra=("--every", "1h", "--agg", "count"))
    assert sum(float(r["count"]) for r in agg) == len(good)
    mx = query_rows(cfg, "flaky/x", extra=("--every", "1h", "--agg", "max"))
    assert mx and all(r["max"] is not None for r in mx)
    assert max(r["max"] for r in mx) == max(r["value"] for r in good)


def test_export_csv(fault_gw, tmp_path):
    # README: "`export` writes CSV `time,tag,value,quality` with values exact (...; booleans
    # 0.0/1.0), an empty value for NaN (a failed read), and the quality in words"
    out = tmp_path / "day.csv"
    r = cli("export", "--since", "1h", "--out", str(out), "-c", str(fault_gw["cfg"]))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert text.splitlines()[0] == "time,tag,value,quality"
    rows = list(csv.DictReader(io.StringIO(text)))
    times = [r["time"] for r in rows]
    assert times == sorted(times)  # `export --help`: "sorted by time"
    assert {r["value"] for r in rows if r["tag"] == "good/on"} <= {"0.0", "1.0"}
    dead = [r for r in rows if r["tag"].startswith("dead/")]
    assert dead and all(r["value"] == "" and r["quality"] == "BAD_NOT_CONNECTED" for r in dead)
    assert all(re.fullmatch(r"[A-Z_]+(\+0x[0-9A-F]{4})?|0x[0-9A-Fa-f]{8}", r["quality"]) for r in rows)
    # README: "edgeos export --since 2026-11-01 --until 2026-11-02 --out day.csv" (dates)
    from datetime import UTC, datetime, timedelta

    today = datetime.now(UTC).date()
    day = tmp_path / "days.csv"
    since, until = str(today - timedelta(days=1)), str(today + timedelta(days=1))
    r = cli("export", "--since", since, "--until", until, "--out", str(day), "-c", str(fault_gw["cfg"]))
    assert r.returncode == 0, r.stderr
    # the same rows, but for the samples stamped in the future (device "ahead"), past --until now
    by_day = [r for r in csv.DictReader(io.StringIO(day.read_text())) if r["tag"] != "ahead/t"]
    assert by_day == [r for r in rows if r["tag"] != "ahead/t"]


def test_write_through_running_daemon_and_refusals(tmp_path):
    # README: "edgeos write press1 setpoint 72.5 -c edgeos.toml   # while the daemon runs; a writable tag"
    assert cli("init", "edgeos.toml", "--local", cwd=tmp_path).returncode == 0
    cfg = tmp_path / "edgeos.toml"
    cfg.write_text(cfg.read_text() + "\n[http]\nport = 0\n")
    # sample.toml: "A simulated device exists only inside the running daemon, so with no daemon
    # running the write is refused."
    r = cli("write", "press1", "setpoint", "72.5", "-c", str(cfg))
    assert r.returncode != 0
    # `edgeos status --help`: "Exit code 1 when it is not running."
    assert cli("status", str(cfg)).returncode == 1
    # `edgeos reload --help`: "Exit 1 too when no daemon runs."
    assert cli("reload", "-c", str(cfg)).returncode == 1
    d = Daemon(cfg)
    try:
        d.wait_running()
        d.wait_status(lambda s: s["devices"]["press1"]["up"])
        r = cli("write", "press1", "setpoint", "72.5", "-c", str(cfg))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "72.5" in r.stdout
        r = cli("write", "press1", "temperature", "1", "-c", str(cfg))
        assert r.returncode != 0  # not writable
        assert "writable" in (r.stdout + r.stderr).lower()

        def written():
            rows = [json.loads(x) for x in cli("tags", "-f", "json", "-c", str(cfg)).stdout.splitlines() if x]
            return any(x["tag"] == "press1/setpoint" and x["value"] == 72.5 for x in rows)

        wait_for(written, 10, "the written value to be read back")
    finally:
        assert d.stop() == 0
    # README's own example: edgeos query press1/temperature --since 1h --every 1m --agg mean
    r = cli("query", "press1/temperature", "--since", "1h", "--every", "1m", "--agg", "mean", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\S+Z\s+press1/temperature\s+[\d.]+", r.stdout, re.M), r.stdout


def test_console_passwd(tmp_path):
    # README: "edgeos console passwd /etc/edgeos/console.passwd   # a console user (needed off
    # loopback; 8+ characters)"
    f = tmp_path / "console.passwd"
    r = subprocess.run(
        [EDGEOS, "console", "passwd", "--stdin", str(f)], input="short\n", capture_output=True, text=True, timeout=30
    )
    assert r.returncode != 0 and "8" in r.stdout + r.stderr
    assert not f.exists()
    r = subprocess.run(
        [EDGEOS, "console", "passwd", "--stdin", str(f)],
        input="longenough-1\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    text = f.read_text()
    assert text.startswith("admin:") and "longenough-1" not in text
    assert (f.stat().st_mode & 0o777) == 0o600


def test_reload_running_daemon(tmp_path):
    # README: "edgeos reload -c edgeos.toml  # the running daemon re-reads its config"
    body = (
        GATEWAY
        + """
[[devices]]
name = "a"
protocol = "simulated"
poll_interval = "100ms"
tags = [ { name = "x", signal = "ramp" } ]
"""
    )
    cfg = write_cfg(tmp_path, body)
    d = Daemon(cfg)
    try:
        d.wait_running()
        cfg.write_text(
            body + '\n[[devices]]\nname = "b"\nprotocol = "simulated"\npoll_interval = "100ms"\n'
            'tags = [ { name = "y", signal = "sine" } ]\n'
        )
        r = cli("reload", "-c", str(cfg))
        assert r.returncode == 0, r.stdout + r.stderr
        d.wait_status(lambda s: "b" in s["devices"] and s["devices"]["b"]["up"], what="device b up")
        cfg.write_text(body.replace('signal = "ramp"', 'signal = "nope"'))
        r = cli("reload", "-c", str(cfg))
        # `reload --help`: "An invalid config is refused: the daemon keeps running the old one,
        # and this prints the problems and exits 1."
        assert r.returncode == 1
        assert "signal" in r.stdout + r.stderr
        assert d.status()["devices"]["b"]["up"]
    finally:
        assert d.stop() == 0


def test_demo_runs_for_a_duration(tmp_path):
    # README: "`edgeos demo`: three simulated machines and a filling machine that speaks Modbus
    # TCP on 127.0.0.1 ..., the full runtime with filters and a store ... and the URL of the web console"
    r = cli("demo", "--duration", "3", "--dir", str(tmp_path / "demo"), timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.search(r"http://127\.0\.0\.1:\d+/", r.stdout + r.stderr)
    assert any((tmp_path / "demo").rglob("edgeos.db"))


# -- docs/adapters.md: errors and drops as a user sees them ----------------------------------


def test_connect_failure_code_and_one_bad_point_per_tag(fault_gw):
    # docs/adapters.md: connect raises DeviceError with code `connect`; "The runtime then records
    # one Bad sample per tag of the device (... `BAD_NOT_CONNECTED` if it never connected) when the
    # device goes down, not again at each failed reconnect"
    dev = fault_gw["live"]["devices"]["dead"]
    assert dev["last_error_code"] == "connect"
    assert dev["up"] is False and dev["failures"] >= 5 and dev["connects"] == 0
    rows = query_rows(fault_gw["cfg"], "dead/a", "dead/b")
    assert sorted(r["tag"] for r in rows) == ["dead/a", "dead/b"]
    assert all(r["quality"] == "BAD_NOT_CONNECTED" and r["value"] is None for r in rows)
    assert metric_value(fault_gw["metrics"], "edgeos_device_errors_total", device="dead", code="connect") >= 5
    assert metric_value(fault_gw["metrics"], "edgeos_device_up", device="dead") == 0
    # docs/adapters.md: "Other devices are not affected." / "other devices go on"
    live = fault_gw["live"]["devices"]
    assert live["good"]["up"] is True and live["good"]["failures"] == 0
    rows = query_rows(fault_gw["cfg"], "good/level")
    assert rows and all(r["quality"] == "GOOD" for r in rows)
    ts = [r["time"] for r in rows]
    assert len(ts) >= 10


def test_errors_logged_once_per_minute_per_device_and_code(fault_gw):
    # docs/adapters.md: "The runtime logs a device's errors at most once per minute per (device,
    # error code), with the number suppressed"
    logs = [r for r in device_logs(fault_gw, "dead") if r.get("code") == "connect"]
    assert len(logs) == 1, logs
    assert "dead" in logs[0]["message"]
    logs = [r for r in device_logs(fault_gw, "buggy")]
    assert len(logs) == 1, logs


def test_recovery_logged_once_and_resets_the_limit(fault_gw):
    # docs/adapters.md: "recovery is logged once and resets the limit"
    seq = [r for r in fault_gw["logs"] if r.get("device") == "flaky"]
    errors = [r for r in seq if r["level"] == "warning"]
    recoveries = [r for r in seq if r["level"] == "info" and "recover" in (r.get("code") or "") + r["message"]]
    assert len(errors) >= 2 and len(recoveries) >= 1
    kinds = ["E" if r in errors else "R" for r in seq if r in errors or r in recoveries]
    assert "EE" not in "".join(kinds), kinds  # no error logged twice without a recovery between


def test_lost_connection_one_bad_comm_failure_per_outage(fault_gw):
    # docs/adapters.md: "`BAD_COMM_FAILURE` ... when the device goes down, not again at each failed
    # reconnect (the history shows one Bad point, then nothing until it answers again)"
    rows = query_rows(fault_gw["cfg"], "flaky/x")
    qs = [r["quality"] for r in rows]
    assert "BAD_COMM_FAILURE" in qs and "GOOD" in qs
    joined = ",".join(qs)
    assert "BAD_COMM_FAILURE,BAD_COMM_FAILURE" not in joined, joined
    dev = fault_gw["live"]["devices"]["flaky"]
    assert dev["last_error_code"] and dev["last_error"]


def test_contract_breach_is_code_contract_batch_dropped_and_counted(fault_gw):
    # docs/adapters.md: "a breach is a `DeviceError` (code `contract`) raised from `emit`, that
    # batch is dropped (the log says how many samples), and the device is restarted";
    # "Drops are always counted, never silent."
    dev = fault_gw["live"]["devices"]["breach"]
    assert dev["last_error_code"] == "contract"
    assert dev["failures"] >= 3
    logs = device_logs(fault_gw, "breach")
    assert logs and logs[0].get("code") == "contract"
    assert re.search(r"\b1 samples? (are |is )?dropped|dropped.*\b1 sample", logs[0]["message"]), logs[0]
    n = metric_value(fault_gw["metrics"], "edgeos_device_errors_total", device="breach", code="contract")
    assert n is not None and n >= 3
    assert not [r for r in query_rows(fault_gw["cfg"], "breach/t") if r["quality"] == "GOOD"]


def test_run_returned_is_code_ended(fault_gw):
    # docs/adapters.md: 'Returning is treated as a failure ("run() returned")'; docs/metrics.md:
    # "`ended` when an adapter's `run()` returned"
    logs = device_logs(fault_gw, "ender")
    assert logs and logs[0]["code"] == "ended" and "run() returned" in logs[0]["message"]
    assert metric_value(fault_gw["metrics"], "edgeos_device_errors_total", device="ender", code="ended") >= 3


def test_create_raising_is_retried_with_backoff(fault_gw):
    # docs/adapters.md: "`create(device)` ... If it raises, that device fails and is retried with
    # backoff, as after a failed connect"; docs/metrics.md: "the exception's class name, such as
    # `RuntimeError`, when an adapter raised something other than a `DeviceError`"
    dev = fault_gw["live"]["devices"]["buggy"]
    assert dev["failures"] >= 3 and dev["up"] is False
    assert dev["last_error_code"] == "RuntimeError"
    assert metric_value(fault_gw["metrics"], "edgeos_device_errors_total", device="buggy", code="RuntimeError") >= 3
    rows = query_rows(fault_gw["cfg"], "buggy/t")
    assert [r["quality"] for r in rows] == ["BAD_NOT_CONNECTED"]


def test_modbus_exception_marks_exactly_the_refused_tag(fault_gw):
    # docs/adapters.md: "A failure of part of a read (a Modbus exception for one range ...) MUST be
    # reported as samples with a Bad quality for exactly the affected tags ... and MUST NOT raise."
    # docs/model.md: BAD_DEVICE_FAILURE "the device answered with an exception"
    cfg = fault_gw["cfg"]
    refused = query_rows(cfg, "plc/refused5")
    assert refused and {r["quality"] for r in refused} == {"BAD_DEVICE_FAILURE"}
    assert all(r["value"] is None for r in refused)
    for tag, value in (("plc/ok0", 100), ("plc/ok10", 110)):
        rows = query_rows(cfg, tag)
        assert rows and all(r["quality"] == "GOOD" and r["value"] == value for r in rows), tag
    dev = fault_gw["live"]["devices"]["plc"]
    assert dev["up"] is True and dev["failures"] == 0  # refusals are answers; nothing raised

    # docs/adapters.md: "A response of the wrong length or garbage MUST be rejected, never turned
    # into values: the affected tags get `BAD_DECODING_ERROR`." (unit 2 answers one register short)
    rows = query_rows(cfg, "shorty/r0")
    assert rows
    assert all(r["quality"] == "BAD_DECODING_ERROR" and r["value"] is None for r in rows), rows[:5]


def test_modbus_lost_connection_then_unreachable(tmp_path):
    # docs/adapters.md: "A connection failure raises. The runtime then records one Bad sample per
    # tag of the device (`BAD_COMM_FAILURE` ...) when the device goes down, not again at each
    # failed reconnect"; `edgeos status`: devices up/down, last error.
    server = ModbusServer(tmp_path)
    cfg = write_cfg(
        tmp_path,
        GATEWAY
        + f"""
[[devices]]
name = "plc"
protocol = "modbus"
host = "127.0.0.1"
port = {server.port}
poll_interval = "100ms"
timeout = "300ms"
reconnect_min = "20ms"
reconnect_max = "100ms"
tags = [ {{ name = "r0", address = "hr0" }}, {{ name = "r1", address = "hr1" }} ]
""",
    )
    d = Daemon(cfg)
    try:
        d.wait_running()
        d.wait_status(lambda s: s["devices"]["plc"]["up"] and s["devices"]["plc"]["samples"] >= 4)
        server.kill()
        s = d.wait_status(
            lambda s: not s["devices"]["plc"]["up"] and s["devices"]["plc"]["failures"] >= 3,
            what="plc down after several failed reconnects",
        )
        assert s["devices"]["plc"]["last_error_code"]
        assert s["devices"]["plc"]["down_since_ns"] > 0
        table = cli("status", "-c", str(cfg)).stdout
        assert re.search(r"^plc\s+\S+\s+down", table, re.M), table
    finally:
        assert d.stop() == 0
        server.close()
    for tag in ("plc/r0", "plc/r1"):
        qs = [r["quality"] for r in query_rows(cfg, tag)]
        assert qs[0] == "GOOD"
        bad = [q for q in qs if q != "GOOD"]
        assert bad == ["BAD_COMM_FAILURE"], qs


def test_modbus_nothing_listening_is_connect_error(tmp_path):
    # docs/adapters.md: connect raises "SHOULD be `edgeos.DeviceError` with a low-cardinality
    # `code`, e.g. `connect`, `timeout`"; one BAD_NOT_CONNECTED per tag (docs/model.md)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = write_cfg(
        tmp_path,
        GATEWAY
        + f"""
[[devices]]
name = "gone"
protocol = "modbus"
host = "127.0.0.1"
port = {port}
poll_interval = "100ms"
timeout = "200ms"
reconnect_min = "20ms"
reconnect_max = "50ms"
tags = [ {{ name = "r0", address = "hr0" }} ]
""",
    )
    d = Daemon(cfg)
    try:
        d.wait_running()
        s = d.wait_status(lambda s: s["devices"]["gone"]["failures"] >= 3, what="three failed connects")
        assert s["devices"]["gone"]["last_error_code"] == "connect"
        assert metric_value(metrics(s), "edgeos_device_errors_total", device="gone", code="connect") >= 3
    finally:
        assert d.stop() == 0
    assert [r["quality"] for r in query_rows(cfg, "gone/r0")] == ["BAD_NOT_CONNECTED"]
    warnings = [r for r in d.log_records() if r.get("device") == "gone" and r["level"] == "warning"]
    assert len(warnings) == 1, warnings


def test_status_while_running(fault_gw):
    # README: "edgeos status -c edgeos.toml  # is it running (asks the store's lock); devices up/down,
    # age of their last values, last error; store usage; upstream lag"
    r = fault_gw["running_status"]
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "running" in out.splitlines()[0]
    assert re.search(r"^good\s+running\s+up\b", out, re.M), out
    assert re.search(r"^dead\s+\S+\s+down\b", out, re.M), out
    assert re.search(r"^dead\b.*connection refused", out, re.M), out
    assert "usage" in out and "upstream" in out


def test_query_range_includes_both_ends(fault_gw):
    # README: "A range includes both ends."
    cfg = fault_gw["cfg"]
    raw = query_rows(cfg, "good/level")
    first, last = raw[1]["time"], raw[-2]["time"]
    rows = query_rows(cfg, "good/level", extra=("--since", first, "--until", last))
    assert [r["time"] for r in rows] == [r["time"] for r in raw[1:-1]]

    def unix(iso: str) -> str:
        from datetime import datetime

        dt = datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ")
        whole = int((dt.replace(microsecond=0) - datetime(1970, 1, 1)).total_seconds())
        return f"@{whole}.{dt.microsecond // 1000:03d}"

    one = query_rows(cfg, "good/level", extra=("--since", unix(first), "--until", unix(first)))
    assert [r["time"] for r in one] == [first]


def test_numbers_without_binary_noise(fault_gw):
    # README: "numbers without binary noise (whole numbers exact, ..., others to 15 significant
    # digits)"; "`export` writes ... values exact (full float64 precision ...)"
    cfg = str(fault_gw["cfg"])
    out = cli("query", "plc/ok0", "good/level", "--since", "1h", "-f", "csv", "-c", cfg).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    whole = {r["value"] for r in rows if r["tag"] == "plc/ok0"}
    assert whole and whole <= {"100", "100.0"}, whole
    levels = [r["value"] for r in rows if r["tag"] == "good/level"]
    assert levels
    for v in levels:
        digits = v.replace("-", "").replace(".", "").lstrip("0")
        assert len(digits) <= 15, v
    exported = {r["time"]: r["value"] for r in export_rows(fault_gw["cfg"], "good/level")}
    for r in rows:
        if r["tag"] == "good/level":
            full = float(exported[r["time"]])
            is_f32 = float(np.float32(full)) == full
            shown = float(r["value"])
            if is_f32:  # "a float32 value in float32's shortest form"
                assert r["value"] == str(np.float32(full)).rstrip("0").rstrip(".") or np.float32(shown) == full
            else:
                assert float(f"{full:.15g}") == shown, (full, r["value"])
            assert repr(full) == exported[r["time"]] or float(exported[r["time"]]) == full


def test_aggregates_of_booleans_and_text(fault_gw):
    # README: "booleans count as 0/1, text samples only count (`count`)"
    cfg = fault_gw["cfg"]
    on = query_rows(cfg, "good/on")
    mean = query_rows(cfg, "good/on", extra=("--every", "1h", "--agg", "mean"))
    expected = sum(1 for r in on if r["value"] is True) / len(on)
    assert len(mean) == 1 and abs(mean[0]["mean"] - expected) < 1e-9
    text = query_rows(cfg, "good/state")
    assert text and all(isinstance(r["value"], str) for r in text)
    cnt = query_rows(cfg, "good/state", extra=("--every", "1h", "--agg", "count"))
    assert sum(r["count"] for r in cnt) == len(text)


def test_silent_device_is_down_and_records_no_success(fault_gw):
    # docs/adapters.md: "A `NO` records no success (`last_success` does not move) ... a server that
    # accepts connections and never answers ... is down however often it is reconnected."
    dev = fault_gw["live"]["devices"]["mute"]
    assert dev["up"] is False
    assert dev["last_ok_ns"] == 0
    assert metric_value(fault_gw["metrics"], "edgeos_device_up", device="mute") == 0
    assert metric_value(fault_gw["metrics"], "edgeos_device_last_success_timestamp_seconds", device="mute") == 0
    rows = query_rows(fault_gw["cfg"], "mute/r0")
    assert rows and not [r for r in rows if r["quality"] == "GOOD"]
    # "A `NO` ... logs no recovery"
    recoveries = [r for r in fault_gw["logs"] if r.get("device") == "mute" and "recover" in r["message"]]
    assert not recoveries, recoveries


def test_clock_ahead_warning_once_samples_stored_as_given(fault_gw):
    # docs/adapters.md: "They are stored as given; one more than a minute ahead of the gateway's
    # clock is said in a warning (code `clock_ahead`, once a minute per device)."
    logs = [r for r in device_logs(fault_gw, "ahead") if r.get("code") == "clock_ahead"]
    assert len(logs) == 1, logs
    future = f"@{int(time.time()) + 600}"
    rows = query_rows(fault_gw["cfg"], "ahead/t", extra=("--until", future))
    assert len(rows) >= 5
    from datetime import UTC, datetime

    first = datetime.strptime(rows[0]["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert first.timestamp() > fault_gw["live"]["counters"]["started_ns"] / 1e9 + 90


def test_other_contract_breaches_are_code_contract(fault_gw):
    # docs/adapters.md: "MUST come from this adapter's device ... The runtime checks both, and that
    # it is a `Batch` at all ...: a breach is a `DeviceError` (code `contract`)"
    for device in ("stranger", "notbatch"):
        dev = fault_gw["live"]["devices"][device]
        assert dev["last_error_code"] == "contract", dev
        n = metric_value(fault_gw["metrics"], "edgeos_device_errors_total", device=device, code="contract")
        assert n is not None and n >= 2, device
        assert len(device_logs(fault_gw, device)) == 1, device


def test_stop_during_device_failures_loses_nothing_read(tmp_path):
    # docs/adapters.md: "Shutdown is cancellation of `run`." ... "If the adapter's task is cancelled
    # while `emit` waits, the batch is still enqueued: a sample the adapter has read is never lost
    # at shutdown." `edgeos run --help`: "On SIGTERM polling stops, every sample already read is
    # committed to the store, and the exit code is 0."
    # Devices that fail and reconnect every millisecond, so a stop meets a failure in flight.
    devices = "".join(
        f"""
[[devices]]
name = "m{i}"
protocol = "simulated"
poll_interval = "1ms"
reconnect_min = "1ms"
reconnect_max = "1ms"
fail_after = "1ms"
tags = [ {{ name = "a", signal = "ramp" }} ]
"""
        for i in range(30)
    )
    cfg = write_cfg(
        tmp_path,
        '[gateway]\nid = "gw1"\ndata_dir = "data"\nshutdown_timeout = "2s"\n[http]\nenabled = false\n' + devices,
    )
    for attempt in range(6):
        data = tmp_path / "data"
        if data.exists():
            shutil.rmtree(data)
        d = Daemon(cfg, log_format="text")
        try:
            wait_for(lambda d=d: d.log_text().count("fail_after") >= 60, 10, "devices failing and reconnecting")
            t0 = time.monotonic()
            rc = d.stop()
            took = time.monotonic() - t0
        finally:
            d.stop()
        log = d.log_text()
        s = json.loads(cli("status", "--json", "-c", str(cfg)).stdout)
        assert rc == 0, log[-2000:]
        assert s["counters"]["dropped_at_stop"] == 0, (attempt, [x for x in log.splitlines() if "lost" in x])
        assert "did not close" not in log, (attempt, took)
