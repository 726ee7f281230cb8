"""Thundering herd: many MQTT clients reconnecting to one mosquitto that is restarted.

Each client mirrors the sync engine's connection loop (edgeos/sync/engine.py): connect (TCP,
MQTT CONNECT, CONNACK), hold the session, and after it ends start over at attempt 0 with the
policy's delay, counting attempts up while refused. Groups with different policies run in the
same broker restart, so their peak connection rates compare under one load. Shared by
tests/faults/test_herd.py and bench/bench_faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from edgeos.retry import backoff_delay

WINDOW = 0.1  # s: the peak rate is the most connections completed in any 100 ms


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """A mosquitto of our own on a random loopback port (never the machine's :1883)."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\nallow_anonymous true\n"
            "max_connections -1\nlog_type error\n"
        )
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read().decode() if self.proc.stderr else ""
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.02)
        raise TimeoutError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


def connect_packet(client_id: str, keepalive: int = 0) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session."""
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x04\x02" + keepalive.to_bytes(2, "big")
    payload = len(cid).to_bytes(2, "big") + cid
    body = var + payload
    return b"\x10" + bytes([len(body)]) + body


def edgeos_policy(lo_ns: int, hi_ns: int) -> Callable[[int], float]:
    return lambda attempt: backoff_delay(attempt, lo_ns, hi_ns)


def no_jitter_policy(lo_ns: int, hi_ns: int) -> Callable[[int], float]:
    return lambda attempt: min(hi_ns, lo_ns * 2 ** min(attempt, 30)) / 1e9


async def client(name: str, port: int, policy: Callable[[int], float], log: list, stop: asyncio.Event) -> None:
    """Logs (name, opened, detected): when each successful connection was opened, and when this
    client saw its previous session end (None for the first)."""
    attempt = 0
    detected: float | None = None
    planned = time.monotonic()  # when this attempt was due (the loop may start it later)
    while not stop.is_set():
        w = None
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
            w.write(connect_packet(name))
            await w.drain()
            ack = await asyncio.wait_for(r.readexactly(4), 5)
            if ack[:2] != b"\x20\x02" or ack[3] != 0:
                raise ConnectionError(f"refused: {ack!r}")
            log.append((name, planned, detected))
            attempt = 0  # a session that lasted: the next outage starts over (as the engine does)
            stop_wait = asyncio.ensure_future(stop.wait())
            eof = asyncio.ensure_future(r.read())
            await asyncio.wait({stop_wait, eof}, return_when=asyncio.FIRST_COMPLETED)
            detected = time.monotonic()
            stop_wait.cancel()
            eof.cancel()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if w is not None:
                w.close()
        if stop.is_set():
            return
        delay = policy(attempt)
        planned = time.monotonic() + delay
        await asyncio.sleep(delay)
        attempt += 1


def peak(times: list[float], window: float = WINDOW) -> int:
    """The most events in any `window` seconds."""
    times = sorted(times)
    best, i = 0, 0
    for j, t in enumerate(times):
        while t - times[i] >= window:
            i += 1
        best = max(best, j - i + 1)
    return best


async def restart_herd(
    directory: Path, groups: dict[str, Callable[[int], float]], n: int, down_s: float, settle_s: float = 20.0
) -> dict[str, dict[str, float]]:
    """Per group in turn (one process's event loop would couple the groups' timings): connect n
    clients, restart the broker (down for `down_s`), and return the peak successful connection
    openings per 100 ms after the restart (each placed by its own client's delay, see below),
    and how long the last one took."""
    out: dict[str, dict[str, float]] = {}
    for g, policy in groups.items():
        out[g] = await _one_group(directory / g, g, policy, n, down_s, settle_s)
    return out


async def _one_group(
    directory: Path, g: str, policy: Callable[[int], float], n: int, down_s: float, settle_s: float
) -> dict[str, float]:
    broker = Mosquitto(directory)
    broker.start()
    log: list[tuple[str, float, float | None]] = []
    stop = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as tg:
            for i in range(n):
                tg.create_task(client(f"{g}-{i}", broker.port, policy, log, stop), name=f"herd:{g}{i}")
            deadline = time.monotonic() + 30
            while len({c for c, _, _ in log}) < n and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len({c for c, _, _ in log}) == n, "not every client connected at first"
            await asyncio.sleep(0.2)
            stopped_at = time.monotonic()
            await asyncio.to_thread(broker.stop)
            await asyncio.sleep(down_s)
            await asyncio.to_thread(broker.start)
            deadline = time.monotonic() + settle_s
            while time.monotonic() < deadline:
                if len({c for c, t, _ in log if t > stopped_at}) == n:
                    break
                await asyncio.sleep(0.05)
            stop.set()
    finally:
        broker.stop()
    # One process sees 200 sessions end, and starts 200 connections, one after another (the loop
    # handles one at a time, slower on a loaded machine); gateways on their own machines see a
    # broker go at once and connect when their policy says. Each reconnection is placed at the
    # stop plus the time its client's policy planned it after it saw its session end: what the
    # broker would see, the same for every policy.
    after = [stopped_at + (t - d) for _, t, d in log if t > stopped_at and d is not None]
    return {
        "reconnected": len({c for c, t, _ in log if t > stopped_at}),
        "peak_per_100ms": peak(after),
        "last_s": (max(after) - stopped_at) if after else float("nan"),
    }
