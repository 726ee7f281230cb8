"""The OPC UA adapter as a plant engineer configures it, checked against protocols/opcua/README.md.

A real asyncua server runs in its own process on a random loopback port (a PLC-like address space:
numeric and string node ids in a non-zero namespace, every documented scalar type, an array,
Uncertain/Bad statuses, source/server timestamps), the real daemon runs as `edgeos run -c CONFIG`,
and what it stored is read back with `edgeos tags`, `edgeos query`, `edgeos export` and
`edgeos status --json`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

EDGEOS = str(Path(sys.executable).with_name("edgeos"))
URI = "urn:doc:plc"
OLD = datetime(2020, 1, 1, tzinfo=UTC)
SRV_T = datetime(2021, 3, 4, 5, 6, 7, tzinfo=UTC)

SERVER = r"""
import asyncio, json, sys
from datetime import datetime, timezone, timedelta
from asyncua import Server, ua

URI = "urn:doc:plc"
OLD = datetime(2020, 1, 1, tzinfo=timezone.utc)
SRV_T = datetime(2021, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
FT0 = datetime(1601, 1, 1, tzinfo=timezone.utc)

async def main(spec):
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{spec['port']}")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    if spec.get("renumber"):
        await server.register_namespace("urn:doc:other")
    ns = await server.register_namespace(URI)
    objs = server.nodes.objects
    line1 = await objs.add_folder(ua.NodeId("Line1", ns), ua.QualifiedName("Line1", ns))
    V = ua.VariantType
    vars_ = {}

    async def add(name, nid, value, vt, parent=line1, array=False):
        node = await parent.add_variable(nid, ua.QualifiedName(name, ns), ua.Variant(value, vt, is_array=array))
        vars_[name] = node
        return node

    speed = await add("Speed", ua.NodeId(1001, ns), float(spec.get("speed", 12.5)), V.Double)
    await speed.add_property(ua.NodeId("Line1.Speed.EU", ns), ua.QualifiedName("EngineeringUnits", 0),
                             ua.Variant(ua.EUInformation(DisplayName=ua.LocalizedText("rpm")), V.ExtensionObject))
    await speed.set_writable()
    await add("Running", ua.NodeId("Line1.Running", ns), True, V.Boolean)
    scalars = [(V.SByte, -5), (V.Byte, 200), (V.Int16, -300), (V.UInt16, 60000), (V.Int32, -70000),
               (V.UInt32, 4000000000), (V.Int64, -(2**40)), (V.UInt64, 2**53 + 1), (V.Float, 0.1),
               (V.Double, 3.25)]
    for vt, val in scalars:
        await add(vt.name, ua.NodeId(f"T.{vt.name}", ns), val, vt)
    await add("Text", ua.NodeId("T.Text", ns), "Recipe-42", V.String)
    await add("When", ua.NodeId("T.When", ns), datetime(2021, 6, 1, 12, tzinfo=timezone.utc), V.DateTime)
    en = await add("State", ua.NodeId("T.State", ns), 2, V.Int32)
    await en.write_attribute(ua.AttributeIds.DataType, ua.DataValue(ua.Variant(ua.NodeId(852, 0), V.NodeId)))
    await add("Arr", ua.NodeId("T.Arr", ns), [1.0, 2.0, 3.0], V.Double, array=True)
    vars_["GoodNull"] = await line1.add_variable(  # Good, and a null Variant
        ua.NodeId("T.GoodNull", ns), ua.QualifiedName("GoodNull", ns), ua.Variant(), datatype=ua.NodeId(11, 0))
    for name in ["Uncertain", "BadNoValue", "OldStamp", "NoSource", "ZeroSource", "Const", "ToDelete"]:
        await add(name, ua.NodeId(f"T.{name}", ns), 1.0, V.Double)
    await server.start()
    now = lambda: datetime.now(timezone.utc)  # noqa: E731

    async def w(name, value, **kw):
        await server.write_attribute_value(vars_[name].nodeid, ua.DataValue(value, **kw))

    def dbl(x):
        return ua.Variant(x, V.Double)

    status = ua.StatusCode
    await w("Uncertain", dbl(7.0), StatusCode_=status(ua.StatusCodes.UncertainLastUsableValue), SourceTimestamp=now())
    await w("BadNoValue", ua.Variant(), StatusCode_=status(ua.StatusCodes.BadSensorFailure), SourceTimestamp=now())
    await w("OldStamp", dbl(5.0), SourceTimestamp=OLD, ServerTimestamp=now())
    await w("NoSource", dbl(6.0), SourceTimestamp=None, ServerTimestamp=SRV_T)
    await w("ZeroSource", dbl(8.0), SourceTimestamp=FT0, ServerTimestamp=SRV_T)  # encoded as 0: null
    await w("Const", dbl(42.0), SourceTimestamp=OLD + timedelta(days=1), ServerTimestamp=now())
    print("READY", ns, flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().split():
        cmd, name = line[0], line[1]
        if cmd == "set":
            await w(name, dbl(float(line[2])), SourceTimestamp=now())
        elif cmd == "delete":
            await server.delete_nodes([vars_[name]])
        print("OK", flush=True)
    await server.stop()

asyncio.run(main(json.loads(sys.argv[1])))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Plc:
    """The asyncua server in its own process; one command per stdin line, answered "OK"."""

    def __init__(self, script: Path, port: int) -> None:
        self.script, self.port, self.proc = script, port, None

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}"

    def start(self, **spec) -> None:
        spec["port"] = self.port
        self.proc = subprocess.Popen(
            [sys.executable, str(self.script), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        line = self._line(30)
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"the OPC UA server did not start: {line!r}")

    def _line(self, timeout: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
        return self.proc.stdout.readline().strip()

    def command(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        assert self._line(10) == "OK", line

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is not None:
            p.kill()
            p.wait(10)
            for f in (p.stdin, p.stdout):
                with contextlib.suppress(OSError):
                    f.close()


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([EDGEOS, *args], capture_output=True, text=True, timeout=timeout, cwd="/tmp")


def tags_json(cfg: Path) -> dict[str, dict]:
    r = cli("tags", "-c", str(cfg), "--format", "json")
    assert r.returncode == 0, r.stderr
    return {(d := json.loads(line))["tag"]: d for line in r.stdout.splitlines() if line.strip()}


def export_rows(cfg: Path, *tags: str) -> list[dict]:
    r = cli("export", "-c", str(cfg), "--since", "2000-01-01", "--out", "-", *tags)
    assert r.returncode == 0, r.stderr
    return list(csv.DictReader(r.stdout.splitlines()))


def status(cfg: Path) -> dict:
    r = cli("status", "--json", "-c", str(cfg))
    return json.loads(r.stdout)


def wait_for(what, pred, timeout: float = 20.0, every: float = 0.4):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = what()
        if pred(last):
            return last
        time.sleep(every)
    raise AssertionError(f"timed out; last seen: {last!r}")


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


# edgeos's own words for codes (docs/model.md, Quality)
WORDS = {"BAD_COMM_FAILURE": 0x80050000, "BAD_NOT_CONNECTED": 0x808A0000, "BAD_TIMEOUT": 0x800A0000}


def is_quality(q: str, code: int, opc_name: str) -> bool:
    """The StatusCode unchanged: shown as its hex code or as a word naming that very code."""
    if q in WORDS:
        return WORDS[q] == code
    return q.lower() == f"0x{code:08x}" or (q.isupper() and snake(opc_name).startswith(q))


def nsu(ident: str) -> str:
    return f"nsu={URI};s={ident}"


@pytest.fixture(scope="module")
def plc(tmp_path_factory):
    d = tmp_path_factory.mktemp("plc")
    script = d / "plc_server.py"
    script.write_text(SERVER)
    p = Plc(script, free_port())
    p.start()
    yield p
    p.stop()


def write_cfg(path: Path, body: str) -> Path:
    path.write_text(
        textwrap.dedent(
            """\
            [gateway]
            id = "gw"
            data_dir = "data"
            run_dir = "run"

            [http]
            enabled = false
            """
        )
        + textwrap.dedent(body)
    )
    return path


@pytest.fixture(scope="module")
def gw(plc, tmp_path_factory):
    d = tmp_path_factory.mktemp("gw")
    dead = free_port()
    tags = {
        "speed": ("nsu=urn:doc:plc;i=1001", ""),
        "speed_ns": ("ns=2;i=1001", ""),
        "running": (nsu("Line1.Running"), 'type = "bool"'),
        "running_n": (nsu("Line1.Running"), ""),
        "sbyte": (nsu("T.SByte"), ""),
        "byte": (nsu("T.Byte"), ""),
        "int16": (nsu("T.Int16"), ""),
        "uint16": (nsu("T.UInt16"), ""),
        "int32": (nsu("T.Int32"), ""),
        "uint32": (nsu("T.UInt32"), ""),
        "int64": (nsu("T.Int64"), ""),
        "uint64": (nsu("T.UInt64"), ""),
        "float": (nsu("T.Float"), ""),
        "double": (nsu("T.Double"), ""),
        "text": (nsu("T.Text"), 'type = "string"'),
        "when": (nsu("T.When"), 'type = "datetime"'),
        "state": (nsu("T.State"), ""),
        "arr": (nsu("T.Arr"), ""),
        "uncertain": (nsu("T.Uncertain"), ""),
        "badnovalue": (nsu("T.BadNoValue"), ""),
        "goodnull": (nsu("T.GoodNull"), ""),
        "oldstamp": (nsu("T.OldStamp"), ""),
        "nosource": (nsu("T.NoSource"), ""),
        "zerosource": (nsu("T.ZeroSource"), ""),
        "nope": (nsu("Nope"), ""),
        "text_as_num": (nsu("T.Text"), ""),
    }
    plc_tags = "\n".join(
        f'  {{ name = "{n}", node = "{node}"{", " + extra if extra else ""} }},' for n, (node, extra) in tags.items()
    )
    cfg = write_cfg(
        d / "edgeos.toml",
        f"""
        [[devices]]
        name = "plc"
        protocol = "opcua"
        endpoint = "{plc.endpoint}"
        security_mode = "None"
        poll_interval = "200ms"
        publishing_interval = "100ms"
        reconnect_min = "200ms"
        reconnect_max = "1s"
        tags = [
        {plc_tags}
        ]

        [[devices]]
        name = "srv"
        protocol = "opcua"
        endpoint = "{plc.endpoint}"
        security_mode = "None"
        mode = "poll"
        timestamp = "server"
        poll_interval = "300ms"
        tags = [
          {{ name = "oldstamp", node = "{nsu("T.OldStamp")}" }},
          {{ name = "nosource", node = "{nsu("T.NoSource")}" }},
        ]

        [[devices]]
        name = "pol"
        protocol = "opcua"
        endpoint = "{plc.endpoint}"
        security_mode = "None"
        mode = "poll"
        poll_interval = "200ms"
        tags = [
          {{ name = "const", node = "{nsu("T.Const")}" }},
          {{ name = "todelete", node = "{nsu("T.ToDelete")}" }},
          {{ name = "speed", node = "nsu=urn:doc:plc;i=1001" }},
        ]

        [[devices]]
        name = "gwt"
        protocol = "opcua"
        endpoint = "{plc.endpoint}"
        security_mode = "None"
        mode = "poll"
        timestamp = "gateway"
        poll_interval = "200ms"
        tags = [{{ name = "const", node = "{nsu("T.Const")}" }}]

        [[devices]]
        name = "dead"
        protocol = "opcua"
        endpoint = "opc.tcp://127.0.0.1:{dead}"
        security_mode = "None"
        tags = [{{ name = "x", node = "ns=2;i=1" }}]
        """,
    )
    log = (d / "daemon.log").open("w")
    proc = subprocess.Popen([EDGEOS, "run", "-c", str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd="/tmp")
    try:
        want = {f"plc/{n}" for n in tags} | {"srv/oldstamp", "srv/nosource", "pol/const", "gwt/const"}
        wait_for(lambda: tags_json(cfg), lambda t: want <= set(t), timeout=30)
        yield cfg
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_every_documented_scalar_type_is_read(gw):
    expect = {
        "plc/speed": 12.5,
        "plc/speed_ns": 12.5,  # ns=<index>;i=... and nsu=...;i=... are the same node
        "plc/running": True,  # type = "bool"
        "plc/running_n": 1.0,  # Boolean as 0/1 in a number tag
        "plc/sbyte": -5.0,
        "plc/byte": 200.0,
        "plc/int16": -300.0,
        "plc/uint16": 60000.0,
        "plc/int32": -70000.0,
        "plc/uint32": 4000000000.0,
        "plc/int64": float(-(2**40)),
        "plc/uint64": float(2**53),  # 2**53 + 1 rounds to float64, Good
        "plc/float": 0.1,  # a float32 value in float32's shortest form
        "plc/double": 3.25,
        "plc/text": "Recipe-42",
        "plc/when": 1622548800.0,  # 2021-06-01T12:00Z, seconds since 1970
        "plc/state": 2.0,  # an enumeration (ServerState) as its Int32
    }
    # The fixture waits for the tags to be listed; their first values may come later (a loaded
    # machine): wait, bounded, for each to have one (a tag that never turns Good fails below).
    try:
        t = wait_for(lambda: tags_json(gw), lambda t: all(t.get(k, {}).get("quality") == "GOOD" for k in expect), 30)
    except AssertionError:
        t = tags_json(gw)
    good = {k: v for k, v in t.items() if v["quality"] == "GOOD"}
    for tag, value in expect.items():
        assert tag in good, (tag, t.get(tag))
        assert good[tag]["value"] == value, (tag, good[tag])


def test_status_codes_pass_through_and_nothing_is_dropped(gw):
    t = tags_json(gw)
    u = t["plc/uncertain"]
    assert u["value"] == 7.0 and is_quality(u["quality"], 0x40900000, "UncertainLastUsableValue"), u
    b = t["plc/badnovalue"]
    assert b["value"] is None and is_quality(b["quality"], 0x808C0000, "BadSensorFailure"), b
    g = t["plc/goodnull"]  # "A Good status with a null value ... is stored as it came: Good, value NaN"
    assert g["quality"] == "GOOD" and g["value"] is None, g
    # An array node, and a String node in a number tag: held Bad with BadTypeMismatch.
    for tag in ("plc/arr", "plc/text_as_num"):
        assert t[tag]["value"] is None and is_quality(t[tag]["quality"], 0x80740000, "BadTypeMismatch"), t[tag]
    # A node the server does not know: only that tag Bad, the others flow.
    assert is_quality(t["plc/nope"]["quality"], 0x80340000, "BadNodeIdUnknown"), t["plc/nope"]
    # The status file is rewritten once a second: it may not show the held tags yet.
    held = wait_for(
        lambda: status(gw)["devices"]["plc"]["health"]["held_tags"],
        lambda held: {"arr", "text_as_num", "nope"} <= set(held),
        timeout=10,
    )
    assert {"arr", "text_as_num", "nope"} <= set(held), held


def test_source_time_server_time_and_null_fallbacks(gw):
    t = tags_json(gw)
    # timestamp = "source" (default): a value stamped long ago is stored at that time.
    assert ts(t["plc/oldstamp"]["time"]) == OLD.timestamp(), t["plc/oldstamp"]
    # No SourceTimestamp, or one encoded as 0 (null): the ServerTimestamp.
    assert ts(t["plc/nosource"]["time"]) == SRV_T.timestamp(), t["plc/nosource"]
    assert ts(t["plc/zerosource"]["time"]) == SRV_T.timestamp(), t["plc/zerosource"]
    # timestamp = "server": the ServerTimestamp, not the source's.
    assert abs(ts(t["srv/oldstamp"]["time"]) - time.time()) < 120, t["srv/oldstamp"]
    assert ts(t["srv/nosource"]["time"]) == SRV_T.timestamp(), t["srv/nosource"]
    # Stamped long ago: outside `query --since 1h`, though `edgeos tags` shows it.
    r = cli("query", "plc/oldstamp", "--since", "1h", "-c", str(gw), "--format", "json")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x) for x in r.stdout.splitlines() if x.strip()] == []
    r = cli("query", "plc/oldstamp", "--since", "2019-12-31T00:00Z", "--until", "2020-01-02T00:00Z", "-c", str(gw))
    assert r.returncode == 0 and "2020-01-01T00:00:00" in r.stdout, r.stdout + r.stderr


def test_poll_unchanged_source_value_stored_once_gateway_time_every_poll(gw):
    time.sleep(1.5)  # several 200 ms polls
    pol = export_rows(gw, "pol/const")
    assert [(r["time"][:19], r["value"], r["quality"]) for r in pol] == [("2020-01-02T00:00:00", "42.0", "GOOD")]
    gwt = export_rows(gw, "gwt/const")
    assert len(gwt) >= 4 and {r["value"] for r in gwt} == {"42.0"}, gwt
    assert len({r["time"] for r in gwt}) == len(gwt)


def test_status_json_counters_limits_and_unreachable_device(gw):
    s = status(gw)
    assert s["running"] is True
    plc = s["devices"]["plc"]
    assert plc["up"] is True, plc
    h = plc["health"]
    for key in ("connects", "publishes", "keepalives", "notifications", "reads", "writes", "silent_rebuilds", "stalls"):
        assert isinstance(h[key], int), (key, h)
    assert h["connects"] == 1 and h["notifications"] >= 20 and h["publishes"] >= 1, h
    assert {"max_nodes_per_read", "max_monitored_items_per_call"} <= set(h["operation_limits"]), h
    assert s["devices"]["pol"]["health"]["reads"] >= 3, s["devices"]["pol"]
    dead = s["devices"]["dead"]
    assert dead["up"] is False and dead["last_error"], dead
    x = tags_json(gw)["dead/x"]
    assert x["value"] is None and x["quality"] != "GOOD", x


def test_subscribed_change_and_node_deleted_mid_run(gw, plc):
    plc.command("set Speed 33.5")
    wait_for(lambda: tags_json(gw)["plc/speed"], lambda v: v["value"] == 33.5 and v["quality"] == "GOOD")
    plc.command("delete ToDelete")
    v = wait_for(lambda: tags_json(gw)["pol/todelete"], lambda v: v["quality"] != "GOOD", timeout=15)
    assert v["value"] is None and is_quality(v["quality"], 0x80340000, "BadNodeIdUnknown"), v
    # only that tag: the device's other tags still flow
    plc.command("set Speed 34.5")
    wait_for(lambda: tags_json(gw)["pol/speed"], lambda v: v["value"] == 34.5 and v["quality"] == "GOOD")


def test_browse_csv_is_accepted_as_tags_csv(plc, tmp_path):
    out = tmp_path / "cell1_tags.csv"
    r = cli("browse", plc.endpoint, "--depth", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert list(rows[0]) == ["name", "node", "type", "unit", "writable", "description"]
    by = {r["name"]: r for r in rows}
    sp = by["Line1.Speed"]
    assert (sp["node"], sp["type"], sp["unit"], sp["writable"], sp["description"]) == (
        "nsu=urn:doc:plc;i=1001",
        "number",
        "rpm",
        "true",
        "Double",
    )
    assert by["Line1.Running"]["node"] == nsu("Line1.Running") and by["Line1.Running"]["type"] == "bool"
    assert by["Line1.Text"]["type"] == "string" and by["Line1.When"]["type"] == "datetime"
    assert by["Line1.UInt64"]["description"] == "UInt64"
    assert "Line1.Arr" not in by  # arrays are left out
    assert all(r["node"].startswith("nsu=") for r in rows if r["name"].startswith("Line1.")), rows
    cfg = write_cfg(
        tmp_path / "edgeos.toml",
        f"""
        [[devices]]
        name = "cell1"
        protocol = "opcua"
        endpoint = "{plc.endpoint}"
        security_mode = "None"
        tags_csv = "cell1_tags.csv"
        """,
    )
    r = cli("check", "-c", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(rf"cell1\s+opcua\s+{len(rows)}\s", r.stdout), r.stdout


@pytest.mark.parametrize(
    "device, place",
    [
        ('security_mode = "None"\nendpoint = "ENDPOINT"\ntags = [{ name = "t", node = "ns=2;q=7" }]', "node"),
        ('security_mode = "None"\nendpoint = "ENDPOINT"\ntags = [{ name = "t", node = "ns=x;i=7" }]', "node"),
        ('security_mode = "None"\nendpoint = "http://127.0.0.1:4840"\ntags = [{ name = "t", node = "i=2258" }]', ""),
        ('endpoint = "ENDPOINT"\ntags = [{ name = "t", node = "i=2258" }]', "security_mode"),
        (
            'security_mode = "Sign"\nsecurity_policy = "Basic256"\nendpoint = "ENDPOINT"\n'
            'tags = [{ name = "t", node = "i=2258" }]',
            "security_policy",
        ),
    ],
)
def test_config_errors_are_refused_with_their_place(tmp_path, device, place):
    body = '[[devices]]\nname = "plc"\nprotocol = "opcua"\n' + device.replace("ENDPOINT", "opc.tcp://127.0.0.1:1")
    cfg = write_cfg(tmp_path / "edgeos.toml", body + "\n")
    r = cli("check", "-c", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    text = r.stdout + r.stderr
    assert "edgeos.toml" in text and "devices[0]" in text, text
    if place == "node":
        assert "devices[0](plc).tags[0](t).node" in text, text
    elif place:
        assert f"devices[0](plc).{place}" in text or f"devices[0].{place}" in text, text
    r = cli("run", "-c", str(cfg), timeout=30)
    assert r.returncode != 0, r.stdout + r.stderr
    assert not (tmp_path / "data" / "edgeos.db").exists()


def test_export_writes_quality_in_words(gw):
    # README: `export` writes CSV `time,tag,value,quality` with ... the quality in words
    # (`GOOD`, `BAD_TIMEOUT`, ...): also for the codes the OPC UA adapter itself sets.
    rows = export_rows(gw, "plc/arr", "plc/nope", "plc/uncertain")
    assert rows
    bad = [r for r in rows if not re.fullmatch(r"[A-Z][A-Z0-9_]*", r["quality"])]
    assert bad == [], bad


def test_server_restart_reconnects_resolves_nsu_again_and_resubscribes(gw, plc):
    before = status(gw)["devices"]["plc"]["health"]["connects"]
    plc.stop()
    v = wait_for(lambda: tags_json(gw)["plc/speed"], lambda v: v["quality"] != "GOOD", timeout=20)
    assert v["value"] is None and is_quality(v["quality"], 0x80050000, "BadCommunicationError"), v
    # The restarted server registers another namespace first: urn:doc:plc moves from 2 to 3.
    plc.start(renumber=True, speed=99.0)
    wait_for(lambda: tags_json(gw)["plc/speed"], lambda v: v["value"] == 99.0 and v["quality"] == "GOOD", timeout=30)
    plc.command("set Speed 100.5")  # resubscribed: a change after the restart arrives
    wait_for(lambda: tags_json(gw)["plc/speed"], lambda v: v["value"] == 100.5, timeout=15)
    rows = export_rows(gw, "plc/speed")
    seq = [(r["value"], r["quality"]) for r in rows]
    i = seq.index(("34.5", "GOOD"))
    gap = seq[i + 1 :]
    assert gap[0][0] == "" and gap[0][1] != "GOOD", seq  # one Bad sample for the outage
    assert [q for _, q in gap].count(gap[0][1]) == 1, seq
    assert gap[1:] == [("99.0", "GOOD"), ("100.5", "GOOD")], seq
    h = status(gw)["devices"]["plc"]["health"]
    assert h["connects"] >= before + 1, h  # counters survive reconnects
    assert h["notifications"] >= 20, h
