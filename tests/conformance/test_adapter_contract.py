"""Every protocol plugin against the adapter contract (docs/adapters.md).

Each protocol needs a *peer*: a factory giving a device config it can run against here. Later
protocols add theirs to PEERS (starting the real server the adapter talks to).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Hashable

import numpy as np
import pytest

from edgeos import Adapter, Answer, Batch, ProtocolPlugin, plugins
from edgeos.config import load_config

GATEWAY = '[gateway]\nid = "gw"\ndata_dir = "data"\n'


@contextlib.asynccontextmanager
async def simulated_peer(write_config) -> AsyncIterator[str]:
    yield """
[[devices]]
name = "dev"
protocol = "simulated"
poll_interval = "20ms"
tags = [{ name = "a" }, { name = "b", signal = "text" }, { name = "c", signal = "bool", poll_interval = "50ms" }]
"""


@contextlib.asynccontextmanager
async def misbehaving_peer(write_config) -> AsyncIterator[str]:
    yield '[[devices]]\nname = "dev"\nprotocol = "misbehaving"\ntags = [{ name = "a" }, { name = "b" }]\n'


@contextlib.asynccontextmanager
async def modbus_peer(write_config) -> AsyncIterator[str]:
    """A pymodbus server on a random loopback port (tests/peers/modbus.py, loaded by path)."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "edgeos_test_peers_modbus"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "peers" / "modbus.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    peer = await sys.modules[name].ModbusPeer().start_tcp()
    peer.set_registers(1, "hr", 0, [0x4120, 0x0000, 0x4F4B])
    try:
        yield f"""
[[devices]]
name = "dev"
protocol = "modbus"
host = "127.0.0.1"
port = {peer.port}
poll_interval = "20ms"
tags = [
  {{ name = "a", address = "hr0", type = "float32" }},
  {{ name = "b", address = "hr2", type = "string", length = 2 }},
  {{ name = "c", address = "coil1", poll_interval = "50ms" }},
  {{ name = "d", address = "40001.5" }},
]
"""
    finally:
        await peer.stop()


@contextlib.asynccontextmanager
async def sysfs_peer(write_config) -> AsyncIterator[str]:
    """The example OEM adapter (examples/edgeos-sysfs): real files, one of them missing (Bad)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="edgeos-sysfs-") as d:
        (Path(d) / "temp").write_text("45000\n")
        (Path(d) / "count").write_text("17")
        yield f"""
[[devices]]
name = "dev"
protocol = "sysfs"
poll_interval = "20ms"
tags = [
  {{ name = "a", path = "{d}/temp", scale = 0.001 }},
  {{ name = "b", path = "{d}/count" }},
  {{ name = "c", path = "{d}/missing", poll_interval = "50ms" }},
]
"""


@contextlib.asynccontextmanager
async def serial_peer(write_config) -> AsyncIterator[str]:
    """A TCP serial device server (socket://) sending a scale's lines every 10 ms; the pty peers
    and bad input are in tests/serial."""
    clients: list[asyncio.StreamWriter] = []

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        clients.append(writer)

    async def feed() -> None:
        while True:
            line = b"ST,GS,+0012.34 kg\r\nUS,GS,+0012.30 kg\r\n"
            for w in clients:
                if not w.is_closing():
                    w.write(line)
            await asyncio.sleep(0.01)

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    task = asyncio.create_task(feed())
    try:
        yield f"""
[[devices]]
name = "dev"
protocol = "serial"
port = "socket://127.0.0.1:{port}"
pattern = '^(?P<status>ST|US),GS,(?P<a>[+-][\\d.]+) (?P<b>\\w+)$'
tags = [
  {{ name = "a" }},
  {{ name = "b", type = "string" }},
  {{ name = "c", group = "status", type = "bool", true_values = ["ST"] }},
]
"""
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for w in clients:
            w.close()
        server.close()


@contextlib.asynccontextmanager
async def opcua_peer(write_config) -> AsyncIterator[str]:
    """An asyncua server in its own process on a random loopback port (tests/peers/opcua.py)."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "edgeos_test_peers_opcua"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "peers" / "opcua.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    ns = "urn:edgeos:conformance"
    peer = sys.modules[name].OpcUaPeer(
        {
            "namespaces": [ns],
            "vars": [
                {"ns": ns, "id": "s=A", "name": "A", "type": "Double", "ramp": 0.02},
                {"ns": ns, "id": "s=B", "name": "B", "type": "String", "value": "OK"},
                {"ns": ns, "id": "s=C", "name": "C", "type": "Boolean", "value": True},
            ],
        }
    )
    await asyncio.to_thread(peer.start)
    try:
        yield f"""
[[devices]]
name = "dev"
protocol = "opcua"
endpoint = "{peer.endpoint}"
security_mode = "None"
poll_interval = "20ms"
tags = [
  {{ name = "a", node = "nsu={ns};s=A" }},
  {{ name = "b", node = "nsu={ns};s=B", type = "string" }},
  {{ name = "c", node = "nsu={ns};s=C", type = "bool", mode = "poll", poll_interval = "50ms" }},
  {{ name = "d", node = "nsu={ns};s=Missing" }},
]
"""
    finally:
        await asyncio.to_thread(peer.stop)


PEERS: dict[str, Callable] = {
    "simulated": simulated_peer,
    "misbehaving": misbehaving_peer,
    "modbus": modbus_peer,
    "sysfs": sysfs_peer,
    "serial": serial_peer,
    "opcua": opcua_peer,
}
TESTED = sorted(p.name for p in plugins.available(plugins.PROTOCOLS) if p.name in PEERS)


def test_every_builtin_protocol_has_a_peer():
    builtin = {p.name for p in plugins.available(plugins.PROTOCOLS) if p.dist == "edgeos"}
    assert builtin and builtin <= set(PEERS), f"no conformance peer for {builtin - set(PEERS)}"


@pytest.fixture(params=TESTED)
async def device(request, write_config):
    async with PEERS[request.param](write_config) as body:
        cfg = load_config(write_config(GATEWAY + body))
        yield cfg.devices[0]


async def _collect(adapter: Adapter, n: int, answers: list[Answer | None] | None = None) -> list[Batch]:
    got: list[Batch] = []
    done = asyncio.Event()

    async def emit(b: Batch, *, answer: Answer | None = None, source: Hashable = None) -> None:
        # The keywords are the Emit contract's: an answer is an Answer (or not told), a source
        # a key the runtime can hold in a dict.
        assert answer is None or isinstance(answer, Answer), answer
        hash(source)
        got.append(b)
        if answers is not None:
            answers.append(answer)
        if len(got) >= n:
            done.set()

    task = asyncio.create_task(adapter.run(emit))
    try:
        async with asyncio.timeout(10):
            await done.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return got


async def test_plugin_is_well_formed(device):
    plugin = plugins.load(plugins.PROTOCOLS, device.protocol)
    assert isinstance(plugin, ProtocolPlugin)
    assert isinstance(plugin.create(device), Adapter)


async def test_batches_are_well_formed(device):
    plugin = plugins.load(plugins.PROTOCOLS, device.protocol)
    adapter = plugin.create(device)
    t0 = time.time_ns()
    await adapter.connect()
    answers: list[Answer | None] = []
    try:
        batches = await _collect(adapter, 5, answers)
    finally:
        await adapter.close()
    ids = {t.id for t in device.tags}
    for b, answer in zip(batches, answers, strict=True):
        assert isinstance(b, Batch) and b.device == device.name
        assert len(b) > 0 or answer is not None  # an empty batch only to say an answer
        assert set(b.tags.tolist()) <= ids
        assert (b.ts >= t0 - 10**9).all() and (b.ts <= time.time_ns() + 10**9).all()
        for tid, v, txt in zip(b.tags, b.values, b.text if b.text is not None else [None] * len(b), strict=True):
            kind = next(t.meta.kind for t in device.tags if t.id == tid)
            if kind.value == "string":
                assert isinstance(txt, str) and np.isnan(v)
            elif kind.value == "bool":
                assert v in (0.0, 1.0)
    seen = set(np.concatenate([b.tags for b in batches]).tolist())
    assert seen == ids or len(batches) < 5


async def test_close_is_idempotent_and_safe_before_connect(device):
    plugin = plugins.load(plugins.PROTOCOLS, device.protocol)
    fresh = plugin.create(device)
    await fresh.close()
    adapter = plugin.create(device)
    await adapter.connect()
    await adapter.close()
    await adapter.close()
    assert isinstance(dict(adapter.health()), dict)


async def test_no_task_left_after_cancellation(device):
    before = set(asyncio.all_tasks())
    plugin = plugins.load(plugins.PROTOCOLS, device.protocol)
    adapter = plugin.create(device)
    await adapter.connect()
    await _collect(adapter, 2)
    await adapter.close()
    await asyncio.sleep(0)
    left = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    assert not left, [t.get_name() for t in left]
