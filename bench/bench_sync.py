"""Upstream sync: drain a backlog of 10 million stored samples to a local mosquitto.

Side by side in one run: a bare aiomqtt publisher sending the same number of equally sized
QoS 1 messages to the same broker, with the same MQTT version and the same number in flight,
alternating with the drain after a warm-up round of each, 9 rounds each (15 without --quick):
`drain_vs_bare` is the median of the paired rounds' ratios, `drain_vs_bare_best` the ratio of
each side's best round (the absolute figures are the best rounds'). The broker is started
here (random loopback port, no persistence) and stopped at the end. Messages are capped at
`upstream.max_message` (128 KiB by default), the bare publisher's at the same size.

Then (issue 25): a 1 M-sample range requested on the replay topic and received by a
subscriber (`replay_samples_per_s`), and a 3-node nats-server cluster (tests/peers/nats.py)
whose node the gateway is connected to is killed: the time to the first PUBACK from another
node (`failover_s`, default backoff).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import aiomqtt
import numpy as np

from edgeos import wire
from edgeos.config import load_config
from edgeos.model import Batch
from edgeos.store import StoreWriter
from edgeos.sync import Sync
from edgeos.sync.mqtt import MqttTransport

SAMPLES = 10_000_000
UNIT = 1_000  # samples per stored unit: one poll of a 1,000-tag device


def _broker(tmp: Path, nodelay: bool = True) -> tuple[subprocess.Popen, int]:
    """mosquitto on a random loopback port. set_tcp_nodelay: with mosquitto's default (Nagle
    on), the PUBACK of a burst's last message waits for the client's delayed ACK, ~40 ms on
    Linux. Both publishers paid it once per round, a constant as long as the bare publisher's
    whole 20 ms round, which lifted the ratio (0.55-0.6 with it, about 0.3 without;
    docs/benchmarks.md). bench/broker_nodelay.py starts both kinds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp / f"mosquitto-{port}.conf"
    conf.write_text(
        f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        + ("set_tcp_nodelay true\n" if nodelay else "")
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
    for _ in range(200):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
            return proc, port
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def _config(tmp: Path, port: int) -> Path:
    p = tmp / "edgeos.toml"
    p.write_text(
        f'[gateway]\nid = "bench"\ndata_dir = "data"\n'
        f'[[devices]]\nname = "plant"\nprotocol = "simulated"\ntags_csv = "tags.csv"\n'
        f'[upstream]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\n'
    )
    (tmp / "tags.csv").write_text("name\n" + "".join(f"t{i}\n" for i in range(UNIT)))
    return p


def _backlog(cfg) -> None:
    w = StoreWriter(cfg.gateway.data_dir, cfg.tags)
    rng = np.random.default_rng(0)
    ids = np.arange(UNIT, dtype=np.int32)
    values = np.round(rng.normal(50, 5, (16, UNIT)), 2)
    t0 = time.time_ns() - 3 * 86_400 * 10**9
    for k in range(SAMPLES // UNIT):
        # One unit per poll of a 1,000-tag device, as the daemon commits them.
        batch = Batch("plant", ids, np.full(UNIT, t0 + k * 10**9), values[k % 16], np.zeros(UNIT, np.uint32))
        w.write([batch])
    w.close()


class _Timed(MqttTransport):
    """The sync's transport, noting when a session is ready: the drain is timed from there, as
    the bare publisher is timed from its connection (both after their CONNACK)."""

    ready = 0.0

    @contextlib.asynccontextmanager
    async def session(self):
        async with super().session() as session:
            self.ready = time.perf_counter()
            yield session


async def _drain(cfg) -> tuple[float, int, int]:
    transport = _Timed(cfg.gateway.id, cfg.upstream.options, cfg.source.parent)
    sync = Sync(cfg.gateway.id, cfg.gateway.data_dir, cfg.upstream.options, transport)
    head = sync._head()
    task = asyncio.create_task(sync.run())
    # Timed to the acknowledgement that takes the cursor to the head, as the bare publisher's
    # time ends with its last PUBACK: woken by each acknowledgement, not a polling interval.
    async with asyncio.timeout(300):
        while sync.cursor < head:
            sync._acked.clear()
            await sync._acked.wait()
    elapsed = time.perf_counter() - transport.ready
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    sync.close()
    return elapsed, sync.status.published_messages, sync.status.published_bytes


async def _bare(port: int, messages: int, size: int, inflight: int, version: str) -> float:
    payload = np.random.default_rng(1).bytes(size)
    protocol = aiomqtt.ProtocolVersion.V5 if version == "5" else aiomqtt.ProtocolVersion.V311
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier="bare", protocol=protocol, max_inflight_messages=inflight * 2
    ) as client:
        client.pending_calls_threshold = 4 * inflight  # as the sync sets it
        window = asyncio.Semaphore(inflight)

        async def one(i: int) -> None:
            try:
                await client.publish(f"bare/{i % 8}", payload, qos=1)
            finally:
                window.release()

        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for i in range(messages):
                await window.acquire()
                tg.create_task(one(i))
        return time.perf_counter() - t0


async def _replay(cfg, port: int, units: int) -> float:
    """Seconds from a replay request for `units` units (from seq 1) to the last one received."""
    transport = MqttTransport(cfg.gateway.id, cfg.upstream.options, cfg.source.parent)
    sync = Sync(cfg.gateway.id, cfg.gateway.data_dir, cfg.upstream.options, transport)
    head = sync._head()
    task = asyncio.create_task(sync.run())
    try:
        async with aiomqtt.Client("127.0.0.1", port, identifier="replay-bench") as client:
            while sync.cursor < head or not sync.status.replay_listening:  # noqa: ASYNC110 - a poll, in a bench
                await asyncio.sleep(0.005)
            await client.subscribe("edgeos/bench/+/data", qos=1)
            got: set[int] = set()
            t0 = time.perf_counter()
            await client.publish("edgeos/bench/replay", wire.encode_replay_request("bench", 1, units), qos=1)
            async with asyncio.timeout(120):
                async for msg in client.messages:
                    env = wire.decode_envelope(bytes(msg.payload))
                    if env.replay:
                        got.update(env.seqs)
                        if len(got) >= units:
                            break
            return time.perf_counter() - t0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sync.close()


def _nats_peer():
    import importlib.util
    import sys

    name = "edgeos_test_peers_nats"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "tests" / "peers" / "nats.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


async def _failover(tmp: Path) -> float:
    """Seconds from SIGKILL of the connected NATS node to the first PUBACK from another."""
    from edgeos.runtime import Runtime

    cluster = _nats_peer().NatsCluster(tmp / "nats")
    cluster.start_all(60)
    try:
        servers = ", ".join(f'"{s}"' for s in cluster.mqtt_servers())
        (tmp / "failover.toml").write_text(
            f'[gateway]\nid = "failover"\ndata_dir = "failover-data"\n'
            f'[[devices]]\nname = "plant"\nprotocol = "simulated"\npoll_interval = "20ms"\n'
            f'tags = [{{ name = "a" }}]\n'
            f'[upstream]\nenabled = true\nmqtt_version = "3.1.1"\nservers = [{servers}]\n'
        )
        rt = Runtime(load_config(tmp / "failover.toml"))
        task = asyncio.create_task(rt.run())
        try:
            async with asyncio.timeout(60):
                while rt.sync is None or rt.sync.status.published_messages < 50:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            dead = rt.sync.transport.port
            cluster.kill(cluster.node_of(dead))
            t0 = time.perf_counter()
            acked = rt.sync.status.published_messages
            async with asyncio.timeout(120):
                while rt.sync.status.published_messages <= acked or rt.sync.transport.port == dead:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
            return time.perf_counter() - t0
        finally:
            rt.stop()
            await asyncio.wait_for(task, 30)
    finally:
        cluster.stop()


def run(quick: bool):
    with tempfile.TemporaryDirectory(prefix="edgeos-bench-sync-") as d:
        tmp = Path(d)
        proc, port = _broker(tmp)
        try:
            cfg = load_config(_config(tmp, port))
            _backlog(cfg)
            o = cfg.upstream.options  # same protocol version and window as the sync
            # A drain takes well under a second here, so one stall of a shared VM skews a single
            # round: after one warm-up round of each (not counted), alternate both sides. The
            # ratio is the median of the paired (back-to-back) rounds' ratios; the ratio of each
            # side's best round is reported beside it (on a loaded machine the shorter bare run
            # is the likelier to get a lucky quiet moment, so it swings more).
            # Each drain starts from cursor 0 (the bench never persists it): the whole backlog.
            _, messages, nbytes = asyncio.run(_drain(cfg))
            size = nbytes // messages
            asyncio.run(_bare(port, messages, size, o["max_inflight"], o["mqtt_version"]))
            drains, bares = [], []
            for _ in range(9 if quick else 15):
                drains.append(asyncio.run(_drain(cfg))[0])
                bares.append(asyncio.run(_bare(port, messages, size, o["max_inflight"], o["mqtt_version"])))
            elapsed, bare = min(drains), min(bares)
            ratios = sorted(b / d for d, b in zip(drains, bares, strict=True))
            replay = min(asyncio.run(_replay(cfg, port, 1_000_000 // UNIT)) for _ in range(3))
            failover = asyncio.run(_failover(tmp))
        finally:
            proc.terminate()
            proc.wait(10)
    yield "drain", SAMPLES / elapsed, "samples/s"
    yield "drain_mb_per_s", nbytes / elapsed / 1e6, "MB/s"
    yield "messages_per_s", messages / elapsed, "messages/s"
    yield "message_bytes", nbytes / messages, "bytes"
    yield "bare_messages_per_s", messages / bare, "messages/s"
    yield "drain_vs_bare", ratios[len(ratios) // 2], "ratio (median of paired rounds)"
    yield "drain_vs_bare_best", bare / elapsed, "ratio (best round of each side)"
    yield "replay_samples_per_s", 1_000_000 / replay, "samples/s"
    yield "failover_s", failover, "s"
