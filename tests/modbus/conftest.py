"""Fixtures for the Modbus suite: real pymodbus servers (tests/peers/modbus.py) and pty pairs."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest


def load_peer_module():
    """tests/peers/modbus.py, loaded once by path (the suite has no package to import from)."""
    name = "edgeos_test_peers_modbus"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "peers" / "modbus.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


peers = load_peer_module()


@pytest.fixture
def peer_module():
    return peers


@pytest.fixture
async def tcp_peer():
    """Start `ModbusPeer`s on random loopback ports; every one is stopped at the end."""
    started = []

    async def start(units=None, framer="socket", port=0):
        p = peers.ModbusPeer(units, framer=framer)
        started.append(p)
        return await p.start_tcp(port)

    yield start
    for p in started:
        await p.stop()


@pytest.fixture
async def raw_peer():
    """Start hand-written `RawModbusPeer`s (faults pymodbus's server cannot make); all stopped at the end."""
    started = []

    async def start(framing="socket", pty=None):
        p = peers.RawModbusPeer(framing)
        started.append(p)
        return await (p.start_pty(pty) if pty else p.start_tcp())

    yield start
    for p in started:
        await p.stop()


@pytest.fixture
def pty_pair():
    pair = peers.PtyPair()
    yield pair
    pair.close()


GATEWAY = '[gateway]\nid = "gw"\ndata_dir = "data"\nshutdown_timeout = "5s"\n'


@pytest.fixture
def modbus_config(write_config):
    """Load a config made of the gateway header plus `body`."""
    from edgeos.config import load_config

    def make(body: str, **files: str):
        return load_config(write_config(GATEWAY + textwrap.dedent(body), **files))

    return make
