"""The local store as users query it, checked against README.md ("Using it") and docs/store.md
("Queries", "`edgeos status --json`", I4, I11, I12, I18).

One real daemon (`edgeos run` as a subprocess) reads a Modbus TCP server (pymodbus, in its own
process, registers set by this test) and two simulated devices (one of them failing on purpose,
for Bad samples); the CLI then reads the store while the daemon runs and after it stopped.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
EDGEOS = str(BIN / "edgeos")

SERVER = r"""
import asyncio, sys
from pymodbus import FramerType
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

async def main():
    bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
    regs = [SimData(0, count=32, values=0, datatype=DataType.REGISTERS)]
    dev = SimDevice(1, simdata=(bits, bits, regs, regs))
    server = ModbusTcpServer([dev], framer=FramerType.SOCKET, address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    print("port", server.transport.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "quit":
            break
        _, addr, *vals = line.split()
        start, _, words, _ = server.context.devices[1].block["h"]
        a = int(addr) - start
        words[a : a + len(vals)] = [int(v) & 0xFFFF for v in vals]
        print("ok", flush=True)
    await server.shutdown()

asyncio.run(main())
"""

F64 = 0.1 + 0.2  # 0.30000000000000004: 15 significant digits print 0.3
NAN32 = float("nan")


def regs(fmt: str, value) -> list[int]:
    raw = struct.pack(">" + fmt, value)
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


CONFIG = """
[gateway]
id = "gw-doc"
data_dir = "data"
run_dir = "run"

[http]
enabled = false

[[devices]]
name = "plc"
protocol = "modbus"
host = "127.0.0.1"
port = {port}
poll_interval = "100ms"
timeout = "300ms"
reconnect_min = "20ms"
reconnect_max = "100ms"
tags = [
  {{ name = "count", address = "hr0", type = "uint16" }},
  {{ name = "f32", address = "hr2", type = "float32" }},
  {{ name = "f64", address = "hr4", type = "float64" }},
  {{ name = "big", address = "hr8", type = "uint32" }},
  {{ name = "flag", address = "hr10.0" }},
  {{ name = "scaled", address = "hr11", scale = 0.1 }},
  {{ name = "nan", address = "hr12", type = "float32" }},
]

[[devices]]
name = "sim"
protocol = "simulated"
poll_interval = "200ms"
tags = [
  {{ name = "b", signal = "bool", period = "1s" }},
  {{ name = "s", signal = "text", states = ["idle", "run, fast", "stop"], period = "1s" }},
]

[[devices]]
name = "flaky"
protocol = "simulated"
poll_interval = "100ms"
fail_after = "700ms"
reconnect_min = "200ms"
reconnect_max = "200ms"
tags = [{{ name = "x", signal = "ramp", amplitude = 10.0, period = "1s" }}]
"""


def cli(*args, env=None, timeout=30):
    return subprocess.run(
        [EDGEOS, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd="/tmp", check=False
    )


def jlines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def t_ns(iso: str) -> int:
    """'2026-12-06T02:53:12.102Z' -> ns."""
    assert iso.endswith("Z"), iso
    d = datetime.fromisoformat(iso[:-1]).replace(tzinfo=UTC)
    return int(d.timestamp()) * 10**9 + d.microsecond * 1000


def iso_ms(ns: int, tz=UTC, z=True) -> str:
    d = datetime.fromtimestamp(ns // 10**9, tz) + timedelta(microseconds=(ns % 10**9) // 1000)
    s = d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}"
    if z:
        return s + "Z"
    return s


class Plant:
    pass


@pytest.fixture(scope="module")
def plant(tmp_path_factory):
    root = tmp_path_factory.mktemp("storedoc")
    p = Plant()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/tmp"
    )
    daemon = None
    try:
        head = server.stdout.readline().split()
        assert head and head[0] == "port", head
        port = int(head[1])

        def setreg(addr: int, values: list[int]) -> None:
            server.stdin.write(f"set {addr} {' '.join(map(str, values))}\n")
            server.stdin.flush()
            assert server.stdout.readline().strip() == "ok"

        setreg(0, [100])
        setreg(2, regs("f", 0.1))
        setreg(4, regs("d", F64))
        setreg(8, regs("I", 4294967295))
        setreg(10, [1])
        setreg(11, [123])
        setreg(12, regs("f", NAN32))
        cfg = root / "edgeos.toml"
        cfg.write_text(CONFIG.format(port=port))
        p.cfg = str(cfg)
        p.data = str(root / "data")
        log = open(root / "daemon.log", "w")  # noqa: SIM115
        daemon = subprocess.Popen([EDGEOS, "run", "-c", p.cfg], stdout=log, stderr=subprocess.STDOUT, cwd="/tmp")
        p.pid = daemon.pid

        # wait (bounded) until the Modbus device has a couple of seconds of samples
        deadline = time.monotonic() + 20
        st = None
        while time.monotonic() < deadline:
            r = cli("status", "--json", "-c", p.cfg)
            if r.returncode == 0:
                st = json.loads(r.stdout)
                if st["devices"]["plc"]["samples"] >= 7 * 12:
                    break
            assert daemon.poll() is None, (root / "daemon.log").read_text()
            time.sleep(0.3)
        else:
            raise AssertionError(f"the daemon did not read the Modbus server in 20 s: {st}")
        setreg(0, [200])
        time.sleep(1.5)

        # while it runs (docs/store.md I11: tags/query/export are safe while the daemon runs)
        p.status_running = cli("status", "--json", "-c", p.cfg)
        p.status_running_table = cli("status", "-c", p.cfg)
        p.tags_running = cli("tags", "-c", p.cfg, "--format", "json")
        p.query_running = cli("query", "plc/count", "--since", "1h", "-c", p.cfg, "--format", "json")
        p.export_running = cli("export", "--since", "1h", "--out", "-", "-c", p.cfg)

        daemon.send_signal(signal.SIGTERM)
        p.rc = daemon.wait(20)
        daemon = None
        log.close()
        p.log = (root / "daemon.log").read_text()
        yield p
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        if server.poll() is None:
            try:
                server.stdin.write("quit\n")
                server.stdin.flush()
                server.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                server.kill()
                server.wait(10)


@pytest.fixture(scope="module")
def raw(plant):
    """Every tag's raw history after the stop, as JSON lines from `edgeos query`."""
    tags = ["plc/count", "plc/f32", "plc/f64", "plc/big", "plc/flag", "plc/scaled", "plc/nan", "sim/b", "sim/s"]
    tags.append("flaky/x")
    r = cli("query", *tags, "--since", "1h", "-c", plant.cfg, "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = jlines(r.stdout)
    by = defaultdict(list)
    for row in rows:
        by[row["tag"]].append(row)
    assert set(by) == set(tags), set(by)
    return by


@pytest.fixture(scope="module")
def export_rows(plant):
    r = cli("export", "--since", "1h", "--out", "-", "-c", plant.cfg)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def exact(export_rows):
    """Every tag's samples at full precision (export): tag -> [{time, value, quality}]; numbers
    as floats, NaN as None, text as str."""
    by = defaultdict(list)
    for t, tag, value, q in list(csv.reader(io.StringIO(export_rows)))[1:]:
        if value == "":
            v = None
        else:
            try:
                v = float(value)
            except ValueError:
                v = value
        by[tag].append({"time": t, "value": v, "quality": q})
    return by


def is_bad(q: str) -> bool:
    return q.startswith("BAD")


# ------------------------------------------------------------------------------------------
# the daemon, and edgeos status


def test_orderly_stop_exits_0(plant):
    assert plant.rc == 0, plant.log


def test_status_json_while_running(plant):
    r = plant.status_running
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    for key in ("gateway", "kernels", "time", "pid", "running", "counters", "store", "sync", "devices"):
        assert key in st, key
    assert st["gateway"] == "gw-doc"
    assert st["kernels"] in ("compiled", "reference")
    assert st["running"] is True
    assert "stopped" not in st or not st["stopped"]
    assert st["pid"] == plant.pid
    assert abs(st["time"] - time.time()) < 120
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
        assert key in st["counters"], key
    for key in (
        "committed_samples",
        "committed_units",
        "compacted_samples",
        "dropped_retention",
        "dropped_budget",
        "dropped_unsent",
        "quarantined_units",
        "quarantined_samples",
        "durable_samples",
    ):
        assert key in st["store"], key
    assert st["sync"] is None  # upstream is off
    assert set(st["devices"]) == {"plc", "sim", "flaky"}
    for name, dev in st["devices"].items():
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
    assert st["devices"]["plc"]["up"] is True
    assert st["devices"]["flaky"]["failures"] >= 1
    assert st["store"]["committed_samples"] >= st["counters"]["stored"]


def test_status_table_exit_codes(plant):
    """`edgeos status --help`: exit code 1 when it is not running."""
    assert plant.status_running_table.returncode == 0
    assert "gw-doc" in plant.status_running_table.stdout
    r = cli("status", "-c", plant.cfg)
    assert r.returncode == 1
    assert "gw-doc" in r.stdout


def test_status_json_after_stop(plant, export_rows):
    r = cli("status", "--format", "json", plant.cfg)  # the config as status's one argument
    assert r.returncode == 1
    st = json.loads(r.stdout)
    assert st["running"] is False
    assert st.get("stopped"), "an orderly stop leaves `stopped` in the status"
    c = st["counters"]
    # I4: at every stop read == stored + filtered_out + dropped_store_unavailable + dropped_at_stop
    assert c["read"] == c["stored"] + c["filtered_out"] + c["dropped_store_unavailable"] + c["dropped_at_stop"]
    assert c["dropped_at_stop"] == 0
    assert st["store"]["committed_samples"] == c["stored"]
    # I12: nothing was dropped, so every committed sample is present in the history
    rows = list(csv.reader(io.StringIO(export_rows)))[1:]
    assert len(rows) == st["store"]["committed_samples"]
    # a dead daemon's devices show as stopped, not up
    for name, dev in st["devices"].items():
        assert dev["state"] == "stopped", (name, dev["state"])
        assert dev["up"] is False, name
    # `--json` is the same as `--format json`, and --data-dir finds the same status
    r2 = cli("status", "--json", "--data-dir", plant.data)
    assert r2.returncode == 1
    assert json.loads(r2.stdout)["counters"] == c


def test_status_after_sigkill(tmp_path):
    """store.md: when `running` is false, every device not disabled shows as `stopped`, not
    `up`, and the state its file recorded is kept in `last_state` (a daemon killed with SIGKILL
    left `running`); whether it runs is asked of the lock, so it shows as stopped at once."""
    cfg = tmp_path / "edgeos.toml"
    cfg.write_text(
        '[gateway]\nid = "gw-kill"\ndata_dir = "data"\nrun_dir = "run"\n[http]\nenabled = false\n'
        '[[devices]]\nname = "m"\nprotocol = "simulated"\npoll_interval = "100ms"\n'
        'tags = [{ name = "v", signal = "square", period = "1s" }]\n'
    )
    daemon = subprocess.Popen([EDGEOS, "run", "-c", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = cli("status", "--json", "-c", str(cfg))
            if r.returncode == 0 and json.loads(r.stdout)["devices"]["m"]["samples"] >= 10:
                break
            time.sleep(0.3)
        else:
            raise AssertionError("no samples in 20 s")
    finally:
        daemon.kill()
        daemon.wait(10)
    r = cli("status", "--json", "-c", str(cfg))
    assert r.returncode == 1
    st = json.loads(r.stdout)
    assert st["running"] is False
    dev = st["devices"]["m"]
    assert dev["state"] == "stopped"
    assert dev["up"] is False
    assert dev.get("last_state") == "running", dev
    # committed samples survive a kill -9 and are queryable
    r = cli("query", "m/v", "--since", "1h", "-c", str(cfg), "-f", "json")
    assert r.returncode == 0, r.stderr
    assert len(jlines(r.stdout)) >= 5


# ------------------------------------------------------------------------------------------
# reading while the daemon runs (I11)


def test_reads_while_running(plant):
    for r in (plant.tags_running, plant.query_running, plant.export_running):
        assert r.returncode == 0, r.stderr
    tags = {row["tag"]: row for row in jlines(plant.tags_running.stdout)}
    assert tags["plc/count"]["value"] == 200
    rows = jlines(plant.query_running.stdout)
    assert {row["value"] for row in rows} == {100, 200}
    assert plant.export_running.stdout.startswith("time,tag,value,quality\n")


# ------------------------------------------------------------------------------------------
# edgeos tags


def test_tags_json_last_values(plant):
    r = cli("tags", "-c", plant.cfg, "--format", "json")
    assert r.returncode == 0, r.stderr
    tags = {row["tag"]: row for row in jlines(r.stdout)}
    assert set(tags) == {
        "plc/count",
        "plc/f32",
        "plc/f64",
        "plc/big",
        "plc/flag",
        "plc/scaled",
        "plc/nan",
        "sim/b",
        "sim/s",
        "flaky/x",
    }
    assert tags["plc/count"]["value"] == 200
    assert tags["plc/f32"]["value"] == 0.1  # float32's shortest form, not 0.10000000149011612
    assert tags["plc/f64"]["value"] == 0.3  # 15 significant digits
    assert tags["plc/big"]["value"] == 4294967295
    assert tags["plc/flag"]["value"] is True
    assert tags["plc/scaled"]["value"] == 12.3
    assert tags["sim/s"]["value"] in ("idle", "run, fast", "stop")
    assert tags["sim/b"]["value"] in (True, False)
    for row in tags.values():
        assert row["time"].endswith("Z")
        t_ns(row["time"])
    assert tags["plc/count"]["quality"] == "GOOD"


def test_tags_table_and_csv(plant):
    r = cli("tags", plant.cfg)  # the config as the one argument
    assert r.returncode == 0, r.stderr
    assert "plc/count" in r.stdout and "GOOD" in r.stdout
    r = cli("tags", "-c", plant.cfg, "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    by = {row["tag"]: row for row in rows}
    assert {"tag", "value", "time", "quality"} <= set(rows[0])
    assert by["plc/flag"]["value"] == "true"
    assert by["plc/f32"]["value"] == "0.1"
    assert by["plc/f64"]["value"] == "0.3"
    assert float(by["plc/big"]["value"]) == 4294967295  # whole numbers exact
    assert float(by["plc/count"]["value"]) == 200


# ------------------------------------------------------------------------------------------
# edgeos query: raw


def test_query_raw_known_values(raw):
    count = raw["plc/count"]
    values = [row["value"] for row in count]
    assert set(values) == {100, 200}
    first_200 = values.index(200)
    assert all(v == 100 for v in values[:first_200]) and all(v == 200 for v in values[first_200:])
    times = [t_ns(row["time"]) for row in count]
    assert times == sorted(times)
    assert all(row["quality"] == "GOOD" for row in count)
    assert {row["value"] for row in raw["plc/f32"]} == {0.1}
    assert {row["value"] for row in raw["plc/f64"]} == {0.3}
    assert {row["value"] for row in raw["plc/big"]} == {4294967295}
    assert {row["value"] for row in raw["plc/flag"]} == {True}
    assert {row["value"] for row in raw["plc/scaled"]} == {12.3}
    assert {row["value"] for row in raw["sim/b"]} == {True, False}
    assert {row["value"] for row in raw["sim/s"]} <= {"idle", "run, fast", "stop"}


def test_query_bad_samples_have_no_value(raw):
    """model.md: a failed read is recorded as one Bad sample per tag; README: no value for a
    failed read."""
    bad = [row for row in raw["flaky/x"] if is_bad(row["quality"])]
    assert bad, "fail_after made the device fail: its Bad samples must be in the history"
    assert {row["quality"] for row in bad} == {"BAD_COMM_FAILURE"}
    assert all(row["value"] is None for row in bad)
    good = [row for row in raw["flaky/x"] if row["quality"] == "GOOD"]
    assert good and all(isinstance(row["value"], int | float) for row in good)


def test_query_nan_register_is_good_without_value(raw):
    """modbus README: a float register holding NaN is stored as read, with Good quality."""
    rows = raw["plc/nan"]
    assert rows and all(row["quality"] == "GOOD" for row in rows)
    assert all(row["value"] is None for row in rows)


def test_query_csv_bad_value_empty(plant, raw):
    r = cli("query", "flaky/x", "--since", "1h", "-c", plant.cfg, "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == ["time", "tag", "value", "quality"]
    bad = [row for row in rows[1:] if row[3].startswith("BAD")]
    assert bad and all(row[2] == "" for row in bad)
    assert len(rows) - 1 == len(raw["flaky/x"])


def test_query_tag_name_unique_to_one_device(plant, raw):
    r = cli("query", "count", "--since", "1h", "-c", plant.cfg, "--format", "json")
    assert r.returncode == 0, r.stderr
    assert jlines(r.stdout) == raw["plc/count"]


def test_query_data_dir_same_as_config(plant, raw):
    r = cli("query", "plc/count", "--since", "1h", "--data-dir", plant.data, "--format", "json")
    assert r.returncode == 0, r.stderr
    assert jlines(r.stdout) == raw["plc/count"]


# ------------------------------------------------------------------------------------------
# times: inclusive range, accepted forms


def test_range_includes_both_ends_in_every_time_form(plant, raw):
    times = [t_ns(row["time"]) for row in raw["plc/count"]]
    a, b = times[3], times[8]
    expected = [row for row in raw["plc/count"] if a <= t_ns(row["time"]) <= b]
    assert len(expected) == 6
    plus8 = timezone(timedelta(hours=8))
    forms = [
        (iso_ms(a), iso_ms(b), None),  # ISO 8601 with Z
        (iso_ms(a, plus8, z=False).replace("T", " ") + "+08:00", iso_ms(b, plus8, z=False) + "+08:00", None),
        (f"@{a // 10**6 / 1000:.3f}", f"@{b // 10**6 / 1000:.3f}", None),  # @unix seconds
    ]
    # without an offset: the gateway's local time (TZ of the process)
    shanghai = timezone(timedelta(hours=8))
    env = dict(os.environ, TZ="Asia/Shanghai")
    forms.append((iso_ms(a, shanghai, z=False), iso_ms(b, shanghai, z=False), env))
    for since, until, e in forms:
        r = cli("query", "plc/count", "--since", since, "--until", until, "-c", plant.cfg, "--format", "json", env=e)
        assert r.returncode == 0, (since, until, r.stderr)
        assert jlines(r.stdout) == expected, (since, until)


def test_coarse_time_forms(plant, raw):
    """ISO 8601 to the minute ('2026-11-22T08:00Z', as `query --help` shows) and whole @unix
    seconds."""
    first = t_ns(raw["plc/count"][0]["time"])
    minute = first - first % (60 * 10**9)
    second = first - first % 10**9 + 10**9
    since = datetime.fromtimestamp(minute // 10**9, UTC).strftime("%Y-%m-%dT%H:%MZ")
    r = cli("query", "plc/count", "--since", since, "--until", f"@{second // 10**9}", "-c", plant.cfg, "-f", "json")
    assert r.returncode == 0, r.stderr
    assert jlines(r.stdout) == [row for row in raw["plc/count"] if t_ns(row["time"]) <= second]


def test_relative_time_forms(plant, raw):
    n = len(raw["plc/count"])
    for since in ("1h", "-1h", "1h ago"):
        r = cli("query", "plc/count", "--since", since, "--until", "now", "-c", plant.cfg, "--format", "json")
        assert r.returncode == 0, (since, r.stderr)
        assert len(jlines(r.stdout)) == n, since
    # a relative range that ends before the data: nothing
    r = cli("query", "plc/count", "--since", "2h", "--until", "1h", "-c", plant.cfg, "--format", "json")
    assert r.returncode == 0, r.stderr
    assert jlines(r.stdout) == []


# ------------------------------------------------------------------------------------------
# aggregates


def expected_buckets(rows, every_ns, agg, since_ns=None, until_ns=None):
    buckets = defaultdict(list)
    for row in rows:
        t = t_ns(row["time"])
        if since_ns is not None and not since_ns <= t <= until_ns:
            continue
        if is_bad(row["quality"]):
            continue
        v = row["value"]
        if isinstance(v, str) and agg != "count" or v is None:
            continue
        buckets[t - t % every_ns].append(v)
    out = {}
    for start, vs in buckets.items():
        if agg == "count":
            out[start] = len(vs)
        elif agg == "mean":
            out[start] = math.fsum(vs) / len(vs)
        elif agg == "min":
            out[start] = min(vs)
        elif agg == "max":
            out[start] = max(vs)
        elif agg == "first":
            out[start] = vs[0]
        elif agg == "last":
            out[start] = vs[-1]
    return out


def aggregated(plant, tag, every, agg, since="1h", until="now"):
    r = cli(
        "query", tag, "--since", since, "--until", until, "--every", every, "--agg", agg, "-c", plant.cfg, "-f", "json"
    )
    assert r.returncode == 0, r.stderr
    rows = jlines(r.stdout)
    out = {}
    for row in rows:
        assert row["tag"] == tag
        out[t_ns(row["time"])] = row[agg]
    return out


@pytest.mark.parametrize("agg", ["mean", "min", "max", "first", "last", "count"])
def test_aggregates_match_raw_numbers_with_bad_samples(plant, exact, agg):
    """flaky/x: numbers with Bad samples among them (left out of every aggregate). The values
    (a simulated ramp) are float32 numbers, which print in float32's shortest form: rel 1e-7."""
    assert any(is_bad(row["quality"]) for row in exact["flaky/x"])
    got = aggregated(plant, "flaky/x", "1s", agg)
    want = expected_buckets(exact["flaky/x"], 10**9, agg)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-7), (iso_ms(k), agg)


@pytest.mark.parametrize("agg", ["mean", "min", "max", "first", "last", "count"])
def test_aggregates_known_register_values(plant, exact, agg):
    """plc/count held 100 then 200: each aggregate per 2-s bucket from the known values."""
    got = aggregated(plant, "plc/count", "2s", agg)
    want = expected_buckets(exact["plc/count"], 2 * 10**9, agg)
    assert {v for row in exact["plc/count"] for v in [row["value"]]} == {100.0, 200.0}
    assert got == pytest.approx(want)
    assert all(k % (2 * 10**9) == 0 for k in got)


def test_aggregates_bool_as_0_1(plant, exact):
    got = aggregated(plant, "sim/b", "1s", "mean")
    want = expected_buckets(exact["sim/b"], 10**9, "mean")
    assert got == pytest.approx(want)
    assert any(0 < v < 1 for v in got.values())


def test_aggregates_text_only_count(plant, raw):
    got = aggregated(plant, "sim/s", "1s", "count")
    want = expected_buckets(raw["sim/s"], 10**9, "count")
    assert all(isinstance(row["value"], str) for row in raw["sim/s"])
    assert got == want and sum(got.values()) == len(raw["sim/s"])
    r = cli("query", "sim/s", "--since", "1h", "--every", "1s", "--agg", "mean", "-c", plant.cfg, "-f", "json")
    assert jlines(r.stdout) == []  # no mean of text


def test_bucket_cut_by_range_keeps_aligned_start(plant, raw):
    """'aggregates into buckets aligned to multiples of their length (a bucket cut by the range
    is not marked)': a range starting mid-bucket gives that bucket its aligned start and only
    the samples in the range."""
    times = [t_ns(row["time"]) for row in raw["plc/count"]]
    a = next(t for t in times if 200 * 10**6 < t % 10**9 < 800 * 10**6)
    b = times[-3]
    got = aggregated(plant, "plc/count", "1s", "count", since=iso_ms(a), until=iso_ms(b))
    want = expected_buckets(raw["plc/count"], 10**9, "count", a, b)
    assert got == want
    assert min(got) == a - a % 10**9


# ------------------------------------------------------------------------------------------
# export


def test_export_csv_exact(export_rows, raw):
    rows = list(csv.reader(io.StringIO(export_rows)))
    assert rows[0] == ["time", "tag", "value", "quality"]
    body = rows[1:]
    assert all(len(row) == 4 for row in body), "every row has 4 fields (text quoted)"
    times = [t_ns(row[0]) for row in body]
    assert times == sorted(times), "sorted by time"
    by = defaultdict(list)
    for t, tag, value, q in body:
        assert t.endswith("Z")
        by[tag].append((value, q))
    assert {float(v) for v, _ in by["plc/f32"]} == {struct.unpack(">f", struct.pack(">f", 0.1))[0]}
    assert {v for v, _ in by["plc/f32"]} == {"0.10000000149011612"}
    assert {float(v) for v, _ in by["plc/f64"]} == {F64}
    assert {float(v) for v, _ in by["plc/big"]} == {4294967295.0}
    assert {v for v, _ in by["plc/flag"]} == {"1.0"}
    assert {v for v, _ in by["sim/b"]} == {"0.0", "1.0"}
    assert {float(v) for v, _ in by["plc/count"]} == {100.0, 200.0}
    # NaN (a float register holding NaN, Good) -> an empty value, quality in words
    assert set(by["plc/nan"]) == {("", "GOOD")}
    bad = [(v, q) for v, q in by["flaky/x"] if q != "GOOD"]
    assert bad and set(bad) == {("", "BAD_COMM_FAILURE")}
    # the same samples as the query
    for tag, rows_q in raw.items():
        assert len(by[tag]) == len(rows_q), tag


def test_export_to_file_tags_and_inclusive_range(plant, raw, tmp_path):
    times = [t_ns(row["time"]) for row in raw["plc/count"]]
    a, b = times[2], times[6]
    out = tmp_path / "part.csv"
    r = cli("export", "--since", iso_ms(a), "--until", iso_ms(b), "--out", str(out), "-c", plant.cfg, "plc/count")
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(io.StringIO(out.read_text())))
    assert rows[0] == ["time", "tag", "value", "quality"]
    assert [row[0] for row in rows[1:]] == [iso_ms(t) for t in times[2:7]]
    assert {row[1] for row in rows[1:]} == {"plc/count"}


def test_export_empty_range_header_only(plant):
    r = cli("export", "--since", "2020-01-01", "--until", "2020-01-02", "--out", "-", "-c", plant.cfg)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "time,tag,value,quality\n"


def test_budget_default_in_force(plant):
    """I6: without max_size the budget is a quarter of the data directory's file system, at
    least 64 MiB; `edgeos check` prints the figure in force (and the status's store reports it)."""
    r = cli("check", plant.cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    vfs = os.statvfs(plant.data)
    quarter = max(vfs.f_blocks * vfs.f_frsize // 4, 64 * 2**20)
    m = re.search(r"max_size (\d+) MiB", r.stdout)
    assert m, r.stdout
    assert abs(int(m.group(1)) - quarter / 2**20) <= 1


# ------------------------------------------------------------------------------------------
# errors


def test_unknown_tag_is_an_error(plant):
    for args in (
        ["query", "nope/x", "--since", "1h"],
        ["export", "--since", "1h", "--out", "-", "nope/x"],
    ):
        r = cli(*args, "-c", plant.cfg)
        assert r.returncode != 0, args
        assert "nope/x" in r.stderr, args
        assert "Traceback" not in r.stderr


def test_empty_range_prints_no_rows(plant):
    r = cli("query", "plc/count", "--since", "2020-01-01", "--until", "2020-01-02", "-c", plant.cfg, "-f", "json")
    assert r.returncode == 0
    assert jlines(r.stdout) == []
    assert r.stderr.strip()  # says why there is nothing


@pytest.mark.parametrize(
    "args, word",
    [
        (["--since", "yesterday-ish"], "--since"),
        (["--until", "2026-13-45"], "--until"),
        (["--since", "now", "--until", "1h"], "--until"),
        (["--every", "0s"], "--every"),
        (["--every", "fast"], "--every"),
        (["--every", "1s", "--agg", "median"], "--agg"),
    ],
)
def test_bad_arguments(plant, args, word):
    r = cli("query", "plc/count", *args, "-c", plant.cfg)
    assert r.returncode == 2, (args, r.returncode, r.stderr)
    assert word in r.stderr
    assert "Traceback" not in r.stderr
