"""Fixtures for the OPC UA suite: asyncua servers in their own processes (tests/peers/opcua.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def load_peer_module():
    name = "edgeos_test_peers_opcua"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "peers" / "opcua.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


peers = load_peer_module()


@pytest.fixture
def opcua_peer():
    """Start `OpcUaPeer`s (each its own process); every one is stopped at the end."""
    started = []

    def start(spec, port=None):
        p = peers.OpcUaPeer(spec, port=port)
        started.append(p)
        return p.start()

    yield start
    for p in started:
        p.stop()
