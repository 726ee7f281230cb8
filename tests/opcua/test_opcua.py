"""The OPC UA adapter against a real asyncua server in another process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from edgeos import Batch, plugins
from edgeos.config import load_config
from edgeos.model import Quality

GATEWAY = '[gateway]\nid = "gw"\ndata_dir = "data"\n'
NS = "urn:edgeos:test:line1"


# A 2 s keep-alive at the tests' 50 ms publishing interval: the adapter marks a subscription's
# tags Bad after 1.5 keep-alives of silence (docs/reliability.md), and a test server on a loaded
# machine can pause longer than the default's 0.75 s. Tests of that mark set their own.
_KEEPALIVE = "keepalive_count = 40"


def device(endpoint: str, tags: str, extra: str = "", name: str = "plc") -> str:
    return f"""
[[devices]]
name = "{name}"
protocol = "opcua"
endpoint = "{endpoint}"
security_mode = "None"
poll_interval = "100ms"
{extra}
{_KEEPALIVE if "keepalive_count" not in extra else ""}
tags = [
{tags}
]
"""


class Sink:
    def __init__(self, cfg) -> None:
        self.keys = [m.key for m in cfg.tags]
        self.rows: dict[str, list[tuple[int, float, int]]] = {}

    async def put(self, b: Batch) -> None:
        for t, ts, v, q in zip(b.tags.tolist(), b.ts.tolist(), b.values.tolist(), b.quality.tolist(), strict=True):
            self.rows.setdefault(self.keys[t], []).append((ts, v, q))

    async def flush(self) -> None:
        return None

    def good(self, key: str) -> list[tuple[int, float, int]]:
        return [r for r in self.rows.get(key, []) if r[2] == 0]


async def collect(adapter, until, timeout: float = 10.0) -> list[Batch]:
    got: list[Batch] = []

    async def emit(b: Batch, **_: object) -> None:
        got.append(b)

    task = asyncio.create_task(adapter.run(emit))
    try:
        async with asyncio.timeout(timeout):
            while not until(got):
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return got


def freeze_once(peer, ready):
    """An `until` for `collect` that freezes the peer (SIGSTOP) once `ready(batches)`, and never
    ends the wait itself; and the list that holds True once it froze it."""
    frozen: list[bool] = []

    def until(g) -> bool:
        if not frozen and ready(g):
            peer.freeze()
            frozen.append(True)
        return False

    return until, frozen


def rows(batches: list[Batch], tag_id: int) -> list[tuple[int, float, int]]:
    out = []
    for b in batches:
        m = b.tags == tag_id
        out += list(zip(b.ts[m].tolist(), b.values[m].tolist(), b.quality[m].tolist(), strict=True))
    return out


def test_importing_edgeos_and_the_plugin_does_not_import_asyncua() -> None:
    code = "import edgeos, edgeos.protocols.opcua, edgeos.config; import sys; assert 'asyncua' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd="/")


def test_a_gateway_without_opcua_devices_never_imports_asyncua(write_config) -> None:
    body = '[[devices]]\nname = "sim"\nprotocol = "simulated"\npoll_interval = "20ms"\ntags = [{ name = "a" }]\n'
    path = write_config(GATEWAY + body)
    code = (
        "import asyncio, sys\n"
        "from edgeos.config import load_config\n"
        "from edgeos.runtime import Runtime\n"
        f"cfg = load_config({str(path)!r})\n"
        "async def main():\n"
        "    rt = Runtime(cfg, store=False)\n"
        "    t = asyncio.create_task(rt.run())\n"
        "    await asyncio.sleep(0.5)\n"
        "    rt.stop(); await t\n"
        "asyncio.run(main())\n"
        "assert 'asyncua' not in sys.modules, 'asyncua imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd="/")


def test_a_config_with_opcua_devices_says_how_to_install_asyncua_when_it_is_missing(write_config) -> None:
    body = device("opc.tcp://127.0.0.1:4840", '{ name = "a", node = "ns=2;s=A" }')
    path = write_config(GATEWAY + body)
    code = (
        "import sys\n"
        "sys.modules['asyncua'] = None  # as if not installed\n"
        "from edgeos.config import load_config\n"
        "from edgeos.errors import ConfigError\n"
        "try:\n"
        f"    load_config({str(path)!r})\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd="/", capture_output=True, text=True)
    assert "devices[0].protocol: the opcua protocol needs asyncua: pip install 'edgeos[opcua]'" in out.stdout


def spec_basic(**kw):
    return {
        "namespaces": [NS, "urn:edgeos:test:other"],
        "vars": [
            {"ns": NS, "id": "s=Counter", "name": "Counter", "type": "Double", "ramp": 0.1, "folder": "Line1"},
            {"ns": NS, "id": "i=1001", "name": "Flag", "type": "Boolean", "value": True, "folder": "Line1"},
            {"ns": NS, "id": "s=Label", "name": "Label", "type": "String", "value": "hello", "folder": "Line1"},
            {
                "ns": NS,
                "id": "s=Setpoint",
                "name": "Setpoint",
                "type": "Int16",
                "value": 5,
                "writable": True,
                "unit": "rpm",
                "folder": "Line1",
            },
            {"ns": "urn:edgeos:test:other", "id": "s=Other", "name": "Other", "type": "Double", "value": 7.5},
        ],
        **kw,
    }


TAGS = f"""
  {{ name = "counter", node = "nsu={NS};s=Counter" }},
  {{ name = "flag", node = "nsu={NS};i=1001", type = "bool" }},
  {{ name = "label", node = "nsu={NS};s=Label", type = "string" }},
  {{ name = "setpoint", node = "nsu={NS};s=Setpoint", writable = true }},
  {{ name = "other", node = "nsu=urn:edgeos:test:other;s=Other" }},
"""


def make(cfg_path):
    cfg = load_config(cfg_path)
    dev = cfg.devices[0]
    return cfg, dev, plugins.load(plugins.PROTOCOLS, "opcua").create(dev)


async def test_subscribe_delivers_every_change_with_source_timestamps(opcua_peer, write_config) -> None:
    peer = opcua_peer(spec_basic())
    cfg, dev, adapter = make(write_config(GATEWAY + device(peer.endpoint, TAGS, 'publishing_interval = "50ms"')))
    await adapter.connect()
    try:
        got = await collect(adapter, lambda g: len(rows(g, 0)) >= 15)
    finally:
        await adapter.close()
    counter = rows(got, 0)
    values = [v for _, v, q in counter if q == 0]
    # The server steps the counter every 100 ms: every step arrives, once, in order.
    assert values == list(np.arange(values[0], values[0] + len(values)))
    # Source timestamps: the server's step times (on its 100 ms grid), not the arrival time.
    assert all(abs(ts / 1e9 - v * 0.1) < 0.05 for ts, v, _ in counter[1:])
    assert rows(got, 1)[0][1:] == (1.0, 0)
    assert rows(got, 3)[0][1:] == (5.0, 0)
    assert rows(got, 4)[0][1:] == (7.5, 0)
    texts = [b.text[b.tags == 2] for b in got if b.text is not None and (b.tags == 2).any()]
    assert texts and texts[0][0] == "hello"


async def test_bad_and_uncertain_statuses_are_kept_exactly(opcua_peer, write_config) -> None:
    peer = opcua_peer(spec_basic())
    # Two changes within one sampling interval: a queue of 10 keeps both (queue 1 keeps the last).
    extra = 'publishing_interval = "50ms"\nqueue_size = 10\nsampling_interval = "0ms"'
    cfg, dev, adapter = make(write_config(GATEWAY + device(peer.endpoint, TAGS, extra)))
    await adapter.connect()
    sent = False

    def until(g):
        nonlocal sent
        if not sent and rows(g, 4):
            assert peer.command("status Other 0x40940000") == "ok"
            assert peer.command("status Other 0x808B0000") == "ok"
            sent = True
        return len(rows(g, 4)) >= 3

    try:
        got = await collect(adapter, until)
    finally:
        await adapter.close()
    qs = [q for _, _, q in rows(got, 4)]
    assert qs[:3] == [0, Quality.UNCERTAIN_ENGINEERING_UNITS_EXCEEDED, 0x808B0000]


async def test_poll_reads_every_tag_in_chunks_of_max_nodes_per_read(opcua_peer, write_config) -> None:
    peer = opcua_peer({"namespaces": [NS], "bulk": 120, "period": 0.5, "max_nodes_per_read": 50})
    tags = ",\n".join(f'{{ name = "b{k}", node = "nsu={NS};i={100000 + k}" }}' for k in range(120))
    cfg, dev, adapter = make(write_config(GATEWAY + device(peer.endpoint, tags, 'mode = "poll"')))
    await adapter.connect()
    try:
        # Polls at 100 ms of values changed every 500 ms: a poll between changes reads the same
        # samples again (same source time), which are not stored twice; every tag is read.
        got = await collect(adapter, lambda g: adapter.counters.reads >= 8 and sum(map(len, g)) >= 240)
    finally:
        await adapter.close()
    assert adapter.state.limits["max_nodes_per_read"] == 50
    assert set(np.concatenate([b.tags for b in got]).tolist()) == set(range(120))
    assert all((b.quality == 0).all() for b in got)
    stats = __import__("json").loads(peer.command("stats"))
    assert 0 < stats["max_read"] <= 50


async def test_monitored_items_are_created_in_chunks_of_max_monitored_items_per_call(opcua_peer, write_config):
    peer = opcua_peer({"namespaces": [NS], "bulk": 30, "period": 0.2, "max_monitored_items_per_call": 8})
    tags = ",\n".join(f'{{ name = "b{k}", node = "nsu={NS};i={100000 + k}" }}' for k in range(30))
    cfg, dev, adapter = make(write_config(GATEWAY + device(peer.endpoint, tags, 'publishing_interval = "50ms"')))
    await adapter.connect()
    try:
        got = await collect(adapter, lambda g: all(any(r[2] == 0 for r in rows(g, k)) for k in range(30)))
    finally:
        await adapter.close()
    assert not any((b.quality != 0).any() for b in got)
    assert __import__("json").loads(peer.command("stats"))["max_items"] == 8


async def test_nsu_ids_follow_a_server_that_renumbers_its_namespaces(opcua_peer, write_config) -> None:
    spec = spec_basic()
    peer = opcua_peer(spec)
    path = write_config(GATEWAY + device(peer.endpoint, TAGS, 'publishing_interval = "50ms"'))
    cfg, dev, adapter = make(path)
    await adapter.connect()
    try:
        first = await collect(adapter, lambda g: rows(g, 4) and rows(g, 3))
    finally:
        await adapter.close()
    peer.stop()
    spec["namespaces"] = list(reversed(spec["namespaces"]))  # the other namespace gets index 2
    opcua_peer(spec, port=peer.port)
    adapter = plugins.load(plugins.PROTOCOLS, "opcua").create(dev)
    await adapter.connect()
    try:
        second = await collect(adapter, lambda g: rows(g, 4) and rows(g, 3))
    finally:
        await adapter.close()
    for got in (first, second):
        assert rows(got, 4)[0][1:] == (7.5, 0) and rows(got, 3)[0][1:] == (5.0, 0)


async def test_an_unknown_node_is_bad_alone_and_tried_again(opcua_peer, write_config) -> None:
    peer = opcua_peer(spec_basic())
    tags = TAGS + f'  {{ name = "later", node = "nsu={NS};s=Later" }},\n'
    cfg, dev, adapter = make(
        write_config(GATEWAY + device(peer.endpoint, tags, 'publishing_interval = "50ms"\nretry_unknown = "200ms"'))
    )
    await adapter.connect()
    added = False

    def until(g):
        nonlocal added
        if not added and rows(g, 5) and len(rows(g, 0)) >= 3:
            peer.command("add Later 42.5")
            added = True
        return any(q == 0 for _, _, q in rows(g, 5))

    try:
        got = await collect(adapter, until)
    finally:
        await adapter.close()
    later = rows(got, 5)
    assert later[0][2] == 0x80340000 and np.isnan(later[0][1])  # BadNodeIdUnknown, once
    assert later[-1][1:] == (42.5, 0)
    assert len(rows(got, 0)) >= 3  # the others kept flowing meanwhile


async def test_write_round_trip_converts_and_range_checks(opcua_peer, write_config) -> None:
    from edgeos.errors import DeviceError

    peer = opcua_peer(spec_basic())
    cfg, dev, adapter = make(write_config(GATEWAY + device(peer.endpoint, TAGS)))
    await adapter.connect()
    try:
        tag = dev.tags[3]
        assert await adapter.write(tag, 1234.0) == 1234
        assert peer.command("get Setpoint") == "1234"
        with pytest.raises(DeviceError, match="out of range for Int16"):
            await adapter.write(tag, 40000)
        with pytest.raises(DeviceError, match="whole number"):
            await adapter.write(tag, 1.5)
        assert peer.command("get Setpoint") == "1234"
    finally:
        await adapter.close()


async def test_a_server_reporting_its_items_unreachable_is_up_it_answers(opcua_peer, write_config, run_runtime):
    """An OPC UA gateway server whose PLC is offline sets its items BadNoCommunication: the
    samples keep that status, but the server answered, so the device is up (health, metrics,
    status). Only the adapter's own stall mark is no answer (docs/adapters.md, Answers)."""
    peer = opcua_peer(spec_basic())
    tags = '{ name = "other", node = "nsu=urn:edgeos:test:other;s=Other" },'
    cfg = load_config(write_config(GATEWAY + device(peer.endpoint, tags, 'publishing_interval = "50ms"')))
    sink = Sink(cfg)
    looks: list[bool] = []

    def until(rt) -> bool:
        st = rt.devices["plc"]
        got = sink.rows.get("plc/other", [])
        if len(got) == 1 and not looks:
            assert peer.command("status Other 0x80310000") == "ok"  # BadNoCommunication
            looks.append(st.up)
        elif got and got[-1][2] == 0x80310000:
            looks.append(st.up)
        return len(looks) >= 25

    rt = await run_runtime(cfg, sinks=[sink], store=False, until=until, timeout=20)
    assert [q for _, _, q in sink.rows["plc/other"]][:2] == [0, 0x80310000]
    assert all(looks), looks
    assert rt.devices["plc"].last_ok_ns >= sink.rows["plc/other"][1][0] - 1_000_000_000


async def test_a_server_back_after_a_stall_without_the_nodes_is_up(opcua_peer, write_config, run_runtime):
    """The subscribed node is deleted, then the server freezes: the stall takes the device down
    and its session is rebuilt. Back, the server answers the new session but knows none of the
    device's nodes, so nothing will ever change: the device is up (the server answers), its tag
    Bad (BadNodeIdUnknown), not down for good."""
    peer = opcua_peer(spec_basic())
    tags = f'{{ name = "flag", node = "nsu={NS};i=1001", type = "bool" }},'  # no ramp writes it
    extra = (
        'publishing_interval = "50ms"\nkeepalive_count = 5\ntimeout = "1s"\nsilence_timeout = "1s"\n'
        'reconnect_min = "500ms"\nreconnect_max = "1s"'
    )
    cfg = load_config(write_config(GATEWAY + device(peer.endpoint, tags, extra)))
    sink = Sink(cfg)
    seen: list[str] = []

    def until(rt) -> bool:
        st = rt.devices["plc"]
        if not seen and sink.good("plc/flag") and st.up:
            assert peer.command("delete Flag") == "ok"
            seen.append("deleted")
        elif seen == ["deleted"]:
            peer.freeze()
            seen.append("frozen")
        elif seen[-1:] == ["frozen"] and st.silent and st.state == "running":
            seen.append("down")
        elif seen[-1:] == ["down"] and st.failures:
            peer.thaw()
            seen.append("thawed")
        elif seen[-1:] == ["thawed"] and st.connects >= 2 and st.state == "running" and st.up:
            seen.append("up")
            return True
        return False

    try:
        rt = await run_runtime(cfg, sinks=[sink], store=False, until=until, timeout=25)
    finally:
        peer.thaw()
    assert seen == ["deleted", "frozen", "down", "thawed", "up"], seen
    assert sink.rows["plc/flag"][-1][2] == 0x80340000  # BadNodeIdUnknown
    assert rt.devices["plc"].adapter.health()["silent_rebuilds"] == 1


async def test_a_server_that_never_publishes_stays_down_across_rebuilds(opcua_peer, write_config, run_runtime):
    """The server answers sessions and reads but sends no publish response (muted): each
    rebuilt session is down too, though one tag is held (unknown node) and the connect itself
    answered; the live tag would say, and says nothing. Up again once it publishes."""
    peer = opcua_peer(spec_basic())
    tags = f'{{ name = "counter", node = "nsu={NS};s=Counter" }},\n{{ name = "ghost", node = "nsu={NS};i=9999" }},'
    extra = (
        'publishing_interval = "50ms"\nkeepalive_count = 5\ntimeout = "1s"\nsilence_timeout = "1s"\n'
        'reconnect_min = "200ms"\nreconnect_max = "400ms"'
    )
    cfg = load_config(write_config(GATEWAY + device(peer.endpoint, tags, extra)))
    sink = Sink(cfg)
    marks: dict[str, int] = {}
    looks: list[tuple[int, bool]] = []

    def until(rt) -> bool:
        st = rt.devices["plc"]
        if "muted" not in marks:
            if sink.good("plc/counter") and st.up:
                assert peer.command("mute") == "ok"
                marks["muted"] = st.connects
            return False
        if "unmuted" not in marks:
            if st.state == "running":
                looks.append((st.connects, st.up))
            if st.connects >= marks["muted"] + 3:
                assert peer.command("unmute") == "ok"
                marks["unmuted"] = st.connects
            return False
        return st.up

    rt = await run_runtime(cfg, sinks=[sink], store=False, until=until, timeout=30)
    later = [up for n, up in looks if n > marks["muted"]]
    assert later and not any(later), looks  # connected again and again, never up
    assert rt.devices["plc"].connects >= marks["muted"] + 3


async def test_a_frozen_server_is_detected_and_the_subscription_rebuilt(opcua_peer, write_config) -> None:
    from edgeos.errors import DeviceError

    peer = opcua_peer(spec_basic())
    # Requests may take 5 s, so asyncua's own checks would take longer: the silence bound acts.
    extra = 'publishing_interval = "100ms"\nkeepalive_count = 3\ntimeout = "5s"\nsilence_timeout = "1s"'
    cfg, dev, adapter = make(write_config(GATEWAY + device(peer.endpoint, TAGS, extra)))
    await adapter.connect()
    until, _ = freeze_once(peer, lambda g: len(rows(g, 0)) >= 3)
    try:
        with pytest.raises(DeviceError) as info:
            await collect(adapter, until, timeout=10)
        assert info.value.code == "silent" and "no data nor keep-alive" in str(info.value)
        assert adapter.health()["silent_rebuilds"] == 1
    finally:
        await adapter.close()
        peer.thaw()
    # Thawed, a new adapter subscribes again.
    adapter = plugins.load(plugins.PROTOCOLS, "opcua").create(dev)
    await adapter.connect()
    try:
        await collect(adapter, lambda g: len(rows(g, 0)) >= 2)
    finally:
        await adapter.close()


async def test_a_restarted_server_leaves_one_bad_gap_and_no_change_lost_or_doubled(
    opcua_peer, write_config, run_runtime
) -> None:
    spec = spec_basic()
    peer = opcua_peer(spec)
    body = device(peer.endpoint, TAGS, 'publishing_interval = "50ms"\nreconnect_min = "100ms"\nreconnect_max = "300ms"')
    cfg = load_config(write_config(GATEWAY + body))
    sink = Sink(cfg)
    state = {"phase": 0, "t": 0.0}

    skipped: set[float] = set()  # steps a loaded server never wrote (its loop was late)

    def server_skipped(p) -> None:
        skipped.update(float(k) for k in json.loads(p.command("stats"))["ramp_skipped"]["Counter"])

    def until(rt):
        good = sink.good("plc/counter")
        if state["phase"] == 0 and len(good) >= 5:
            server_skipped(peer)
            peer.stop()
            state["phase"], state["t"] = 1, time.monotonic()
        elif state["phase"] == 1 and time.monotonic() - state["t"] > 1.0:
            state["peer"] = opcua_peer(spec, port=peer.port)
            state["phase"] = 2
            state["n"] = len(sink.rows["plc/counter"])
        elif state["phase"] == 2:
            return len(sink.rows["plc/counter"]) >= state["n"] + 10
        return False

    await run_runtime(cfg, sinks=[sink], store=False, until=until, timeout=30)
    server_skipped(state["peer"])
    counter = sink.rows["plc/counter"]
    bad = [i for i, r in enumerate(counter) if r[2] != 0]
    assert len(bad) == 1 and counter[bad[0]][2] == Quality.BAD_COMM_FAILURE  # once per outage
    assert all(r[2] == Quality.BAD_COMM_FAILURE for tag in sink.rows.values() for r in tag if r[2])

    def steps(first: float, last: float) -> list[float]:
        return [float(k) for k in np.arange(first, last + 1) if float(k) not in skipped]

    after = [v for _, v, q in counter[bad[0] + 1 :]]
    # Every step the server wrote after the restart arrives once, in order (the first is the
    # value at subscribe).
    assert after == steps(after[0], after[-1])
    before = [v for _, v, q in counter[: bad[0]]]
    assert before == steps(before[0], before[-1])


async def test_the_server_side_deadband_filters_changes(opcua_peer, write_config) -> None:
    peer = opcua_peer(spec_basic())
    # The counter steps by 1: a deadband of 1.5 lets none of its steps through, 0.5 lets all.
    tags = f"""
  {{ name = "wide", node = "nsu={NS};s=Counter", deadband = "absolute", deadband_value = 1.5 }},
  {{ name = "narrow", node = "nsu={NS};s=Counter", deadband = "absolute", deadband_value = 0.5 }},
"""
    cfg, dev, adapter = make(write_config(GATEWAY + device(peer.endpoint, tags, 'publishing_interval = "50ms"')))
    await adapter.connect()
    try:
        got = await collect(adapter, lambda g: len(rows(g, 1)) >= 8)
    finally:
        await adapter.close()
    assert len(rows(got, 0)) == 1  # the first value only
    narrow = [v for _, v, _ in rows(got, 1)]
    assert narrow == list(np.arange(narrow[0], narrow[0] + len(narrow)))


async def test_timestamps_follow_the_timestamp_option(opcua_peer, write_config) -> None:
    peer = opcua_peer(spec_basic())
    tags = '  { name = "other", node = "nsu=urn:edgeos:test:other;s=Other", mode = "poll" },\n'
    stamps = {}
    for choice in ("source", "gateway"):
        path = write_config(GATEWAY + device(peer.endpoint, tags, f'timestamp = "{choice}"'), name=f"{choice}.toml")
        cfg, dev, adapter = make(path)
        await adapter.connect()
        try:
            before = time.time_ns()
            got = await collect(adapter, lambda g: len(g) >= 1)
            stamps[choice] = (before, rows(got, 0)[0][0])
        finally:
            await adapter.close()
    # The node was written once when the server started: its source time is before this test read.
    assert stamps["source"][1] < stamps["source"][0]
    assert stamps["gateway"][1] >= stamps["gateway"][0]


def test_every_nodeid_form_parses() -> None:
    import uuid

    from edgeos.protocols.opcua.config import format_nodeid, parse_nodeid

    assert parse_nodeid("ns=3;i=1001") == parse_nodeid("ns=3;i=1001")
    r = parse_nodeid("ns=2;s=Line 1;Speed")  # a ';' inside a string identifier is kept
    assert (r.ns, r.kind, r.ident) == (2, "s", "Line 1;Speed")
    assert parse_nodeid("i=2258").ns == 0
    g = "09087e75-8e5e-499b-954f-f2a9603db28a"
    assert parse_nodeid(f"ns=4;g={g}").ident == uuid.UUID(g)
    assert parse_nodeid("ns=4;b=AQID").ident == b"\x01\x02\x03"
    r = parse_nodeid("nsu=urn:a%3Bb;s=X")
    assert (r.ns, r.uri, r.ident) == (None, "urn:a;b", "X")
    assert parse_nodeid(format_nodeid("urn:a;b", "b", b"\x01")) == parse_nodeid("nsu=urn:a%3Bb;b=AQ==")


def test_a_string_tag_without_a_value_has_none_not_an_empty_string() -> None:
    """An independent tester's finding: a string tag sent no value, or a value of another type
    (Bad, BadTypeMismatch), read "" as if the server had sent an empty string; no value is
    None (null), as a number's NaN and as the runtime's own Bad marks. An empty string stays."""
    from asyncua import ua
    from edgeos.protocols.opcua.client import KIND_NUMBER, KIND_STRING, columns, numeric_columns

    dvs = [
        ua.DataValue(ua.Variant("", ua.VariantType.String)),
        ua.DataValue(ua.Variant("x", ua.VariantType.String)),
        ua.DataValue(StatusCode_=ua.StatusCode(0x808B0000)),  # Bad, no value
        ua.DataValue(ua.Variant(2.5)),  # a number for a string tag
        ua.DataValue(ua.Variant(1.5)),
    ]
    kinds = np.array([KIND_STRING] * 4 + [KIND_NUMBER], np.int8)
    _, quality, _, text = columns(dvs, kinds, "gateway", 1)
    assert text.tolist() == ["", "x", None, None, None]
    assert quality.tolist()[2:] == [0x808B0000, 0x80740000, 0]
    nums = np.array([2.5, 1.5])
    _, quality, _, text = numeric_columns(nums, np.zeros(2, np.uint32), None, None, kinds[3:], "gateway", 1)
    assert text.tolist() == [None, None] and quality.tolist() == [0x80740000, 0]


def test_timestamps_fall_back_source_then_server_then_arrival() -> None:
    import datetime as dt

    from asyncua import ua
    from edgeos.protocols.opcua.client import KIND_NUMBER, columns

    t1 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    t2 = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    dvs = [
        ua.DataValue(ua.Variant(1.0), SourceTimestamp=t1, ServerTimestamp=t2),
        ua.DataValue(ua.Variant(2.0), ServerTimestamp=t2),
        ua.DataValue(ua.Variant(3.0)),
        ua.DataValue(StatusCode_=ua.StatusCode(0x808B0000), ServerTimestamp=t2),
    ]
    kinds = np.full(4, KIND_NUMBER, np.int8)
    values, quality, ts, _ = columns(dvs, kinds, "source", 123)
    s1, s2 = int(t1.timestamp()) * 10**9, int(t2.timestamp()) * 10**9
    assert ts.tolist() == [s1, s2, 123, s2]
    assert quality.tolist() == [0, 0, 0, 0x808B0000] and np.isnan(values[3])
    assert columns(dvs, kinds, "server", 123)[2].tolist() == [s2, s2, 123, s2]
    assert columns(dvs, kinds, "gateway", 123)[2].tolist() == [123] * 4


async def test_datetime_bool_and_string_nodes_read_and_write(opcua_peer, write_config) -> None:
    spec = {
        "namespaces": [NS],
        "vars": [
            {"ns": NS, "id": "s=Stamp", "name": "Stamp", "type": "DateTime", "value": 1700000000.5},
            {"ns": NS, "id": "s=On", "name": "On", "type": "Boolean", "value": False, "writable": True},
            {"ns": NS, "id": "s=Text", "name": "Text", "type": "String", "value": "a", "writable": True},
        ],
    }
    peer = opcua_peer(spec)
    tags = f"""
  {{ name = "stamp", node = "nsu={NS};s=Stamp", type = "datetime" }},
  {{ name = "on", node = "nsu={NS};s=On", type = "bool", writable = true }},
  {{ name = "text", node = "nsu={NS};s=Text", type = "string", writable = true }},
  {{ name = "wrong", node = "nsu={NS};s=Text" }},
"""
    cfg, dev, adapter = make(write_config(GATEWAY + device(peer.endpoint, tags, 'mode = "poll"')))
    await adapter.connect()
    try:
        assert await adapter.write(dev.tags[1], "true") is True
        assert await adapter.write(dev.tags[2], "b;c") == "b;c"
        got = await collect(adapter, lambda g: rows(g, 0))  # the first batch is the held tag alone
    finally:
        await adapter.close()
    b = got[-1]
    assert rows(got, 0)[0][1:] == (1700000000.5, 0)
    assert rows(got, 1)[0][1:] == (1.0, 0)
    assert b.text[b.tags == 2][0] == "b;c"
    assert rows(got, 3)[0][2] == 0x80740000  # a String node for a number tag: BadTypeMismatch, not a guess


async def test_polled_an_unknown_node_is_bad_once_and_an_unchanged_value_stored_once(opcua_peer, write_config) -> None:
    """Poll mode, source timestamps: a node the server does not know gives one Bad sample, not
    one per poll; a value that did not change is read again with its old source time, and is
    the same sample (stored once, not a row per poll at one instant)."""
    peer = opcua_peer(spec_basic())
    tags = TAGS + f'  {{ name = "missing", node = "nsu={NS};s=Missing" }},\n'
    extra = 'mode = "poll"\nretry_unknown = "60s"'
    cfg, dev, adapter = make(write_config(GATEWAY + device(peer.endpoint, tags, extra)))
    await adapter.connect()
    try:
        got = await collect(adapter, lambda g: adapter.counters.reads >= 10)
    finally:
        await adapter.close()
    missing = rows(got, 5)
    assert [q for _, _, q in missing] == [0x80340000]  # BadNodeIdUnknown, once
    other = rows(got, 4)  # a value the test server never changes
    assert len(other) == 1 and other[0][1:] == (7.5, 0)
    assert len({ts for ts, _, _ in rows(got, 0)}) == len(rows(got, 0))  # no instant twice


async def test_a_request_whose_answer_is_late_is_a_timeout(opcua_peer, write_config) -> None:
    """asyncua reports a late answer as "Failed to send request" (UaError from the TimeoutError):
    the request was sent and the answer is late, so the error is said as a timeout."""
    from edgeos.errors import DeviceError

    peer = opcua_peer(spec_basic())
    extra = 'mode = "poll"\ntimeout = "1s"'
    cfg, dev, adapter = make(write_config(GATEWAY + device(peer.endpoint, TAGS, extra)))
    await adapter.connect()
    until, frozen = freeze_once(peer, lambda g: adapter.counters.reads >= 2)
    try:
        with pytest.raises(DeviceError) as info:
            await collect(adapter, until, timeout=10)
    finally:
        await adapter.close()
        peer.thaw()
    assert frozen
    assert info.value.code == "timeout" and "no answer in time" in str(info.value), info.value
    assert "Failed to send request" not in str(info.value)


async def test_64_bit_integer_writes_are_exact(opcua_peer, write_config) -> None:
    """Whole numbers go to Int64/UInt64 nodes as they are: through a float, 2**64 - 1 was refused
    as out of range (it rounds to 2**64) and 2**53 + 1 was written as 2**53."""
    from edgeos.errors import DeviceError

    spec = {
        "namespaces": [NS],
        "vars": [
            {"ns": NS, "id": "s=Big", "name": "Big", "type": "UInt64", "value": 0, "writable": True},
            {"ns": NS, "id": "s=Wide", "name": "Wide", "type": "Int64", "value": 0, "writable": True},
        ],
    }
    peer = opcua_peer(spec)
    tags = f"""
  {{ name = "big", node = "nsu={NS};s=Big", writable = true }},
  {{ name = "wide", node = "nsu={NS};s=Wide", writable = true }},
"""
    cfg, dev, adapter = make(write_config(GATEWAY + device(peer.endpoint, tags, 'mode = "poll"')))
    await adapter.connect()
    try:
        assert await adapter.write(dev.tags[0], 2**64 - 1) == 2**64 - 1
        assert peer.command("get Big") == str(2**64 - 1)
        assert await adapter.write(dev.tags[1], str(-(2**53) - 1)) == -(2**53) - 1
        assert peer.command("get Wide") == str(-(2**53) - 1)
        with pytest.raises(DeviceError, match=r"out of range for UInt64"):
            await adapter.write(dev.tags[0], 2**64)
        with pytest.raises(DeviceError, match=r"out of range for Int64"):
            await adapter.write(dev.tags[1], str(2**63))
        assert await adapter.write(dev.tags[1], 12.0) == 12  # a whole float still goes
        assert peer.command("get Wide") == "12"
    finally:
        await adapter.close()


async def test_a_value_unchanged_across_an_outage_ends_its_bad_gap_once(opcua_peer, write_config, run_runtime):
    """An independent tester's finding: after a rebuilt session, values that did not change
    come back with their old source times. Stored as they came, they were a second row of an
    instant already stored, sorted before the outage's Bad mark, so every query showed the tags
    Bad until they next changed. Now each is stored once more, at the time it came back (after
    the mark), and only once: not again at its old time, nor at each poll."""
    peer = opcua_peer(spec_basic())
    tags = f"""
  {{ name = "flag", node = "nsu={NS};i=1001", type = "bool" }},
  {{ name = "label", node = "nsu={NS};s=Label", type = "string" }},
  {{ name = "setpoint", node = "nsu={NS};s=Setpoint", mode = "poll" }},
"""
    extra = (
        'publishing_interval = "50ms"\nkeepalive_count = 5\ntimeout = "1s"\nsilence_timeout = "1s"\n'
        'reconnect_min = "200ms"\nreconnect_max = "500ms"'
    )
    cfg = load_config(write_config(GATEWAY + device(peer.endpoint, tags, extra)))
    sink = Sink(cfg)
    seen: list[str] = []
    at: dict[str, int] = {}

    def until(rt) -> bool:
        st = rt.devices["plc"]
        if not seen and all(sink.good(f"plc/{t}") for t in ("flag", "label", "setpoint")) and st.up:
            time.sleep(0.3)  # a few polls of the unchanged setpoint
            peer.freeze()
            seen.append("frozen")
        elif seen == ["frozen"] and st.failures:
            peer.thaw()
            at["thawed"] = time.time_ns()
            seen.append("thawed")
        elif seen == ["frozen", "thawed"] and st.connects >= 2 and st.state == "running" and st.up:
            at["up"] = time.monotonic_ns()
            seen.append("up")
        elif seen == ["frozen", "thawed", "up"] and time.monotonic_ns() - at["up"] > 600e6:
            return True  # more polls of the unchanged setpoint, after the rebuild
        return False

    try:
        await run_runtime(cfg, sinks=[sink], store=False, until=until, timeout=30)
    finally:
        peer.thaw()
    assert seen == ["frozen", "thawed", "up"], seen
    for tag in ("plc/flag", "plc/label", "plc/setpoint"):
        got = sink.rows[tag]
        good = [r for r in got if r[2] == 0]
        bad = [r for r in got if r[2] & 0x80000000]
        assert bad, got
        assert len(good) == 2, got  # once before the outage, once after it: no repeat at a poll
        assert good[0][0] < min(b[0] for b in bad) < good[1][0], got  # by time: Good, Bad, Good
        assert good[1][0] >= at["thawed"], got  # stamped when it came back
        assert np.array_equal([good[0][1]], [good[1][1]], equal_nan=True), got  # the same value
