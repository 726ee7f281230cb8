"""A cluster, not a toy: three nats-server nodes (JetStream + MQTT 3.1.1 each), the gateway with
all three in `upstream.servers`, the node it is connected to killed mid-stream (issue 25)."""

from __future__ import annotations

import asyncio
import importlib.util
import sqlite3
import sys
from pathlib import Path

import pytest

from edgeos.config import load_config
from edgeos.runtime import Runtime


def _load(name: str, path: Path):
    """A module by path, once (the suite has no package to import from)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _peer():
    return _load("edgeos_test_peers_nats", Path(__file__).parents[1] / "peers" / "nats.py")


_replay = _load("edgeos_test_sync_replay", Path(__file__).with_name("test_replay.py"))
Central, assert_each_once, stored, wait_until, answering_replays = (
    _replay.Central,
    _replay.assert_each_once,
    _replay.stored,
    _replay.wait_until,
    _replay.answering_replays,
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Started once for the module (JetStream elects its leaders in a few seconds)."""
    with _peer().NatsCluster(tmp_path_factory.mktemp("nats")) as c:
        yield c


async def test_gateway_fails_over_when_its_node_dies_and_every_seq_arrives_once(write_config, cluster):
    servers = ", ".join(f'"{s}"' for s in cluster.mqtt_servers())
    path = write_config(
        f"""
[gateway]
id = "gw1"
data_dir = "data"
shutdown_timeout = "5s"
[store]
commit_interval = "50ms"
[[devices]]
name = "press"
protocol = "simulated"
poll_interval = "50ms"
tags = [{{ name = "a" }}, {{ name = "c", signal = "random_walk" }}]
[[devices]]
name = "oven"
protocol = "simulated"
poll_interval = "70ms"
tags = [{{ name = "z", signal = "sine" }}]
[upstream]
enabled = true
servers = [{servers}]
mqtt_version = "3.1.1"
reconnect_min = "200ms"
reconnect_max = "2s"
"""
    )
    cfg = load_config(path)
    consumer_node = 2
    rt = Runtime(cfg)
    task = asyncio.create_task(rt.run())
    try:
        async with Central(cluster.mqtt[consumer_node], reorder_wait=2.0) as central:
            await wait_until(lambda: len(central.delivered) > 20, 30)
            node = cluster.node_of(rt.sync.transport.port)
            assert node != consumer_node
            cluster.kill(node)  # mid-stream: devices keep producing
            await wait_until(lambda: rt.sync.status.connects >= 2, 30)
            assert cluster.node_of(rt.sync.transport.port) != node
            connected_at = rt.sync.status.published_messages
            await wait_until(lambda: rt.sync.status.published_messages > connected_at + 20, 30)
            rt.stop()
            await asyncio.wait_for(task, 20)
            expect = stored(cfg.gateway.data_dir)
            rt, task = answering_replays(path)  # what died with the node comes back by replay
            await wait_until(lambda: set(central.seqs()) >= set(expect), 40)
    finally:
        rt.stop()
        await asyncio.wait_for(task, 20)
    assert_each_once(central, expect)
    with sqlite3.connect(cfg.gateway.data_dir / "edgeos.db") as db:
        cursor = int(db.execute("SELECT value FROM meta WHERE key='sync_cursor'").fetchone()[0])
    assert cursor == max(expect)


def test_the_next_node_of_a_round_is_tried_soon_and_each_round_backs_off():
    """Three servers, reconnect_min 1 s, reconnect_max 60 s: the first try of each round waits
    the jittered backoff (growing per round); the other nodes of a round follow within 0.25 s."""
    from edgeos.sync.engine import _next_try_delay

    lo, hi = 1_000_000_000, 60_000_000_000
    for _ in range(200):
        d = [_next_try_delay(a, 3, lo, hi) for a in range(9)]
        assert all(0 <= d[a] <= 0.25 for a in (1, 2, 4, 5, 7, 8)), d
        assert 0.5 <= d[0] <= 2 and 0.5 <= d[3] <= 4 and 0.5 <= d[6] <= 8, d
        # One server: every try is a round's first (the herd test's policy).
        assert all(0.5 <= _next_try_delay(a, 1, lo, hi) <= 2 ** (a + 1) for a in range(4))
        # At the daemon's start the first try is made at once: it is the first round's first,
        # and the next servers follow it soon (a closed first server costs no backoff).
        d = [_next_try_delay(a, 3, lo, hi, at_once=True) for a in range(8)]
        assert all(0 <= d[a] <= 0.25 for a in (0, 1, 3, 4, 6, 7)), d
        assert 0.5 <= d[2] <= 2 and 0.5 <= d[5] <= 4, d
        assert all(0.5 <= _next_try_delay(a, 1, lo, hi, at_once=True) <= 2 ** (a + 1) for a in range(4))
    # The rounds do grow: over many draws, the third round's mean is well above the first's.
    first = sum(_next_try_delay(0, 3, lo, hi) for _ in range(2000)) / 2000
    third = sum(_next_try_delay(6, 3, lo, hi) for _ in range(2000)) / 2000
    assert third > first + 2, (first, third)
