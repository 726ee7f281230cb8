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
