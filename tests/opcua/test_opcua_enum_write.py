"""Enumeration nodes, and `edgeos write` through the running daemon, against a real asyncua server."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from typer.testing import CliRunner

from edgeos import Batch, plugins
from edgeos.cli import app
from edgeos.config import load_config
from edgeos.errors import DeviceError
from edgeos.runtime import Runtime
from edgeos.service import control

GATEWAY = '[gateway]\nid = "gw"\ndata_dir = "data"\n'
NS = "urn:edgeos:test:line1"


# A 2 s keep-alive at the tests' 50 ms publishing interval: the adapter marks a subscription's
# tags Bad after 1.5 keep-alives of silence (docs/reliability.md), and a test server on a loaded
# machine can pause longer than the default's 0.75 s. Tests of that mark set their own.
_KEEPALIVE = "keepalive_count = 40"


def device(endpoint: str, tags: str, extra: str = "") -> str:
    return f"""
[[devices]]
name = "plc"
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


def make(cfg_path):
    cfg = load_config(cfg_path)
    dev = cfg.devices[0]
    return cfg, dev, plugins.load(plugins.PROTOCOLS, "opcua").create(dev)


async def collect(adapter, until, timeout: float = 10.0) -> list[Batch]:
    """Run the adapter until `until(batches)` holds (bounded)."""
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


def rows(batches: list[Batch], tag_id: int) -> list[tuple[int, float, int]]:
    out = []
    for b in batches:
        m = b.tags == tag_id
        out += list(zip(b.ts[m].tolist(), b.values[m].tolist(), b.quality[m].tolist(), strict=True))
    return out


class Sink:
    """Rows per tag key, as the runtime's sinks receive them."""

    def __init__(self, cfg) -> None:
        self.keys = [m.key for m in cfg.tags]
        self.rows: dict[str, list[tuple[int, float, int]]] = {}

    async def put(self, b: Batch) -> None:
        for t, ts, v, q in zip(b.tags.tolist(), b.ts.tolist(), b.values.tolist(), b.quality.tolist(), strict=True):
            self.rows.setdefault(self.keys[t], []).append((ts, v, q))

    async def flush(self) -> None:
        return None


MODES = ["Stopped", "Running", "Faulted", "Maintenance"]


def spec_enum() -> dict:
    return {
        "namespaces": [NS],
        "vars": [
            # A custom enumeration DataType (a subtype of Enumeration, i=29), as PLCs expose states.
            {"ns": NS, "id": "s=Mode", "name": "Mode", "type": "Int32", "enum": MODES, "value": 1, "writable": True},
        ],
    }


ENUM_TAGS = f"""
  {{ name = "mode_poll", node = "nsu={NS};s=Mode", mode = "poll", writable = true }},
  {{ name = "mode_sub", node = "nsu={NS};s=Mode", mode = "subscribe" }},
  {{ name = "server_state", node = "ns=0;i=2259", mode = "poll" }},
"""


async def test_an_enumeration_node_reads_as_its_integer_in_both_modes_and_writes_as_int32(
    opcua_peer, write_config
) -> None:
    peer = opcua_peer(spec_enum())
    # A 2 s keep-alive: the node does not change while the test waits, and the all-Good check
    # below is about enumerations, not about a loaded machine's 0.75 s stall bound.
    extra = 'publishing_interval = "50ms"\nkeepalive_count = 40'
    cfg, dev, adapter = make(write_config(GATEWAY + device(peer.endpoint, ENUM_TAGS, extra)))
    await adapter.connect()
    try:
        # The node's DataType is the server's own enumeration, not Int32 itself.
        dtype = (await adapter.session.read([adapter.nodes[0]], 14))[0].Value.Value  # 14 = DataType
        assert dtype.NamespaceIndex != 0
        assert not adapter.held, adapter.held
        got = await collect(adapter, lambda g: rows(g, 0) and rows(g, 1) and rows(g, 2))
        assert rows(got, 0)[0][1:] == (1.0, 0)  # poll: Running, Good
        assert rows(got, 1)[0][1:] == (1.0, 0)  # subscribe: Running, Good
        # A standard enumeration too: Server.ServerStatus.State (ServerState, i=852) is 0, Running.
        assert rows(got, 2)[0][1:] == (0.0, 0)
        assert adapter.enums[2][0] == "Running" and adapter.enums[0] == dict(enumerate(MODES))

        assert await adapter.write(dev.tags[0], 2.0) == 2
        assert peer.command("get Mode") == "2"
        assert await adapter.write(dev.tags[0], "3") == 3
        assert peer.command("get Mode") == "3"
        with pytest.raises(DeviceError, match="out of range for Int32"):
            await adapter.write(dev.tags[0], 2**31)
        with pytest.raises(DeviceError, match="whole number"):
            await adapter.write(dev.tags[0], 1.5)
        with pytest.raises(DeviceError, match="not a number"):
            await adapter.write(dev.tags[0], "Faulted")
        # In Int32's range but no value of the enumeration: refused, as a PLC state must be one of its states.
        with pytest.raises(DeviceError, match=r"4 is not a value of its enumeration \(0 Stopped, 1 Running, 2 Fau"):
            await adapter.write(dev.tags[0], 4)
        with pytest.raises(DeviceError, match="-1 is not a value of its enumeration"):
            await adapter.write(dev.tags[0], -1)
        assert peer.command("get Mode") == "3"

        # The written value comes back in both modes, still Good.
        got = await collect(adapter, lambda g: (3.0, 0) in [r[1:] for r in rows(g, 0)] and rows(g, 1))
        assert rows(got, 1)[-1][1:] == (3.0, 0)
        assert all(q == 0 for b in got for q in b.quality.tolist())
    finally:
        await adapter.close()


async def test_edgeos_write_through_the_running_daemon_reaches_the_opcua_node(opcua_peer, write_config) -> None:
    spec = {
        "namespaces": [NS],
        "vars": [{"ns": NS, "id": "s=Setpoint", "name": "Setpoint", "type": "Int16", "value": 5, "writable": True}],
    }
    peer = opcua_peer(spec)
    tags = f'  {{ name = "setpoint", node = "nsu={NS};s=Setpoint", writable = true }},'
    path = write_config(GATEWAY + device(peer.endpoint, tags, 'publishing_interval = "50ms"'))
    cfg = load_config(path)
    sink = Sink(cfg)
    rt = Runtime(cfg, sinks=[sink])
    task = asyncio.create_task(rt.run())
    d = cfg.gateway.data_dir
    try:
        async with asyncio.timeout(15):
            await rt.running.wait()
            await rt.wait_connected()
            while not control.socket_path(d).exists():
                await asyncio.sleep(0.02)
            # As `edgeos write` sends it: the daemon's session converts the value to the node's Int16.
            reply = await control.request(d, {"op": "write", "device": "plc", "tag": "setpoint", "value": 1234.0})
            assert reply == {"ok": True, "written": 1234}
            assert peer.command("get Setpoint") == "1234"
            refused = await control.request(d, {"op": "write", "device": "plc", "tag": "setpoint", "value": 40000})
            assert refused["ok"] is False and "out of range for Int16" in refused["error"]
            assert peer.command("get Setpoint") == "1234"
            # The command itself, in a thread (it runs its own event loop).
            out = await asyncio.to_thread(CliRunner().invoke, app, ["write", "plc", "setpoint", "321", "-c", str(path)])
            assert out.exit_code == 0, out.output
            assert "wrote plc/setpoint = 321" in out.output and "through the running daemon" in out.output
            assert peer.command("get Setpoint") == "321"
            # The daemon's own subscription then delivers it.
            while (321.0, 0) not in [r[1:] for r in sink.rows.get("plc/setpoint", [])]:
                await asyncio.sleep(0.02)
    finally:
        rt.stop()
        await asyncio.wait_for(task, 15)
