"""Pieces of the end-to-end bench: the broker, the subscriber (with the ThingsBoard responder),
and what the bench reads of a process from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeos import wire

from . import peer_tb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- processes ----------------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set of a process, in MiB."""
    cur = peak = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return cur, peak


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; only the process the bench started (its group
    when it was started in a session of its own)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


# -- broker -------------------------------------------------------------------------------------


class Broker:
    """mosquitto on a random loopback port, restartable on the same port. Sessions persist across
    a restart (saved at its orderly stop), so the subscriber's persistent session keeps queueing
    what gateways publish while it reconnects: the bench never loses a message on its own side."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.conf = tmp / "mosquitto.conf"
        (tmp / "mosquitto").mkdir(exist_ok=True)
        self.conf.write_text(
            f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {tmp / 'mosquitto'}/\nautosave_interval 0\n"
            "max_queued_messages 0\nmax_inflight_messages 0\nmessage_size_limit 0\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stderr=subprocess.DEVNULL)
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.1):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)
            self.proc = None


# -- subscriber ---------------------------------------------------------------------------------


@dataclass
class Delivery:
    """What reached the broker from one gateway, as the subscriber saw it."""

    samples: int = 0  # unique samples (edgeos: first copy of each unit)
    duplicates: int = 0
    messages: int = 0
    # Per message: arrival (s), samples, latencies (ms) of samples no filter holds back,
    # latencies of swinging-door samples (held by design), earliest sample time (s).
    arrivals: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    latency: list[np.ndarray] = field(default_factory=list)
    latency_held: list[np.ndarray] = field(default_factory=list)
    oldest: list[float] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)

    def add(self, arrival: float, n: int, lat: np.ndarray, held: np.ndarray, oldest: float, device: str = "") -> None:
        self.devices.append(device)
        self.samples += n
        self.messages += 1
        self.arrivals.append(arrival)
        self.counts.append(n)
        self.latency.append(lat)
        self.latency_held.append(held)
        self.oldest.append(oldest)

    def window(self, t0: float, t1: float) -> dict[str, float]:
        """Samples/s delivered and latency percentiles over messages arriving in [t0, t1)."""
        a = np.array(self.arrivals)
        idx = np.nonzero((a >= t0) & (a < t1))[0]
        n = sum(self.counts[i] for i in idx)
        lat = np.concatenate([self.latency[i] for i in idx]) if len(idx) else np.zeros(0)
        held = np.concatenate([self.latency_held[i] for i in idx]) if len(idx) else np.zeros(0)

        def pct(x: np.ndarray, q: float) -> float:
            return float(np.percentile(x, q)) if x.size else float("nan")

        return {
            "samples_per_s": n / (t1 - t0),
            "p50": pct(lat, 50),
            "p99": pct(lat, 99),
            "held_p50": pct(held, 50),
            "held_p99": pct(held, 99),
            "by_device": {  # p50, p99 per kind of device (names without their number)
                kind: (round(pct(x, 50)), round(pct(x, 99)))
                for kind in sorted({self.devices[i].rstrip("0123456789") for i in idx})
                for x in [
                    np.concatenate(
                        [self.latency[i] for i in idx if self.devices[i].rstrip("0123456789") == kind] or [[]]
                    )
                ]
            },
        }

    def drain_end(self, restart: float) -> float:
        """Arrival of the last message that still carried a sample taken before `restart`."""
        last = restart
        for arrival, oldest in zip(self.arrivals, self.oldest, strict=True):
            if arrival >= restart and oldest < restart:
                last = max(last, arrival)
        return last


class Subscriber:
    """Subscribes to everything both gateways publish (QoS 1, persistent session), decodes
    edgeos units with `edgeos.wire` and ThingsBoard JSON telemetry, and answers the
    ThingsBoard gateway's start-up request in the server's place. Runs its own event loop in a
    thread; reconnects within 50 ms when the broker comes back."""

    def __init__(self, port: int, held_prefix: str = "sd") -> None:
        self.port = port
        self.held_prefix = held_prefix
        self.ours = Delivery()
        self.peer = Delivery()
        self.tb_requests = 0
        self.connected = threading.Event()
        self._dedup = wire.Deduplicator()
        self._held_ids = np.zeros(0, np.int64)
        self.busy_s = 0.0  # time spent handling messages (is the subscriber the bottleneck?)
        # EDGEOS_E2E_TRACE=1: (device, newest sample ns, arrival ns) per unit, for bench/e2e/stages.py.
        self.units: list[tuple[str, int, int]] | None = [] if os.environ.get("EDGEOS_E2E_TRACE") else None
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._main, name="e2e-subscriber", daemon=True)
        self.lock = threading.Lock()

    def start(self) -> Subscriber:
        self._thread.start()
        if not self.connected.wait(30):
            raise RuntimeError("subscriber could not connect")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
            with contextlib.suppress(asyncio.CancelledError):
                await self._run()

        asyncio.run(main())

    async def _run(self) -> None:
        import aiomqtt

        while not self._stop.is_set():
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    self.port,
                    identifier="e2e-subscriber",
                    clean_session=False,
                    protocol=aiomqtt.ProtocolVersion.V311,
                    max_queued_incoming_messages=0,
                ) as client:
                    await client.subscribe([("edgeos/#", 1), ("v1/#", 1)])
                    self.connected.set()
                    async for msg in client.messages:
                        self._handle(client, str(msg.topic), bytes(msg.payload))
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.05)

    def gaps(self, gateway: str) -> list[tuple[int, int]]:
        with self.lock:
            return self._dedup.gaps(gateway)

    def ranges(self, gateway: str) -> list[tuple[int, int]]:
        with self.lock:
            return self._dedup.ranges(gateway)

    def _handle(self, client, topic: str, payload: bytes) -> None:
        now = time.time()
        try:
            self._dispatch(client, topic, payload, now)
        finally:
            self.busy_s += time.time() - now

    def _dispatch(self, client, topic: str, payload: bytes, now: float) -> None:
        if topic.startswith("edgeos/"):
            if topic.endswith("/data"):
                self._ours(now, payload)
            elif topic.endswith("/tags"):
                tags = wire.decode_dictionary(payload)
                held = [i for i, t in tags.items() if t.name.startswith(self.held_prefix)]
                self._held_ids = np.array(sorted(held), np.int64)
        elif topic == peer_tb.TELEMETRY:
            self._peer(now, payload)
        elif topic.startswith(peer_tb.RPC_REQUEST):
            req = json.loads(payload)
            if req.get("method") == "getSessionLimits":
                self.tb_requests += 1
                rid = topic[len(peer_tb.RPC_REQUEST) :]
                reply = json.dumps(peer_tb.SESSION_LIMITS)
                # Published from the handler: aiomqtt's publish is a coroutine on this loop.
                asyncio.get_running_loop().create_task(  # noqa: RUF006 (the loop runs until the bench ends)
                    client.publish(peer_tb.RPC_RESPONSE + rid, reply, qos=1)
                )

    def _ours(self, now: float, payload: bytes) -> None:
        msg = wire.decode(payload)
        now_ms = now * 1e3
        n, lats, helds, oldest, dups = 0, [], [], now, 0
        for seq, unit in zip(msg.seqs, msg.units, strict=True):
            with self.lock:
                first = self._dedup.first_time(msg.gateway, seq)
            if not first:
                dups += len(unit)
                continue
            n += len(unit)
            lat = now_ms - unit.ts / 1e6
            if self.units is not None and len(unit):
                self.units.append((msg.device, int(unit.ts.max()), int(now * 1e9)))
            held = np.isin(unit.tags, self._held_ids)
            lats.append(lat[~held].astype(np.float32))
            helds.append(lat[held].astype(np.float32))
            if (~held).any():
                oldest = min(oldest, float(unit.ts[~held].min()) / 1e9)
        with self.lock:
            self.ours.duplicates += dups
            if n:
                self.ours.add(now, n, np.concatenate(lats), np.concatenate(helds), oldest, msg.device)

    def _peer(self, now: float, payload: bytes) -> None:
        doc = json.loads(payload)
        n, lats = 0, []
        oldest = now
        for entries in doc.values():
            for e in entries if isinstance(entries, list) else [entries]:
                k = len(e.get("values", {}))
                ts = e.get("ts", now * 1e3) / 1e3
                n += k
                lats.append(np.full(k, (now - ts) * 1e3, np.float32))
                oldest = min(oldest, ts)
        with self.lock:
            if n:
                self.peer.add(now, n, np.concatenate(lats), np.zeros(0, np.float32), oldest)
