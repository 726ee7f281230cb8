"""sd_notify against a real datagram socket: READY, STATUS, WATCHDOG, STOPPING, and a store
writer that hangs stops the watchdog pings (so systemd restarts the service)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid

import pytest

from edgeos.config import load_config
from edgeos.runtime import Runtime
from edgeos.service.notify import CursorProbe, Notifier, status_line, watchdog_interval

CONFIG = """
[gateway]
id = "gw"
data_dir = "data"
shutdown_timeout = "5s"

[http]
enabled = false

[[devices]]
name = "press1"
protocol = "simulated"
poll_interval = "50ms"
tags = [{ name = "t", signal = "ramp" }]

[[devices]]
name = "dead"
protocol = "simulated"
fail_connect = true
reconnect_min = "50ms"
reconnect_max = "100ms"
tags = [{ name = "x" }]
"""


class Listener:
    """The systemd side: a datagram socket that records (monotonic time, message)."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self) -> list[tuple[float, str]]:
        return [(t, ln) for t, m in list(self.messages) for ln in m.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def listener(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    lst = Listener(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # WatchdogSec=2s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    yield lst
    lst.close()


async def _until(cond, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


async def test_ready_status_watchdog_stopping_and_a_hung_store_writer(listener, write_config):
    rt = Runtime(load_config(write_config(CONFIG)))
    task = asyncio.create_task(rt.run())
    released = threading.Event()
    try:
        await _until(lambda: any(ln == "WATCHDOG=1" for _, ln in listener.lines()))
        lines = [ln for _, ln in listener.lines()]
        assert lines[0] == "READY=1", lines
        assert any(ln.startswith("STATUS=") and "device" in ln for ln in lines), lines
        assert "STOPPING=1" not in lines

        # The store's thread hangs in a commit or an fsync (a disk that stopped answering): the
        # pings must stop within WatchdogSec of it, and nothing else on the loop is blocked.
        store = rt.store
        assert store is not None
        entered: list[float] = []

        def hang(method):
            def hung(*args, **kw):
                entered.append(time.monotonic())
                released.wait(30)
                return method(*args, **kw)

            return hung

        store.write = hang(store.write)  # type: ignore[method-assign]
        store.flush = hang(store.flush)  # type: ignore[method-assign]
        await _until(lambda: entered)
        await asyncio.sleep(3.0)  # 1.5 x WatchdogSec
        hung_at = entered[0]
        pings = [t for t, ln in listener.lines() if ln == "WATCHDOG=1" and t > hung_at]
        assert not pings or max(pings) - hung_at < 2.0, [round(p - hung_at, 2) for p in pings]
        assert rt.running.is_set()  # the daemon itself did not notice: only systemd can help

        # The disk answers again: pings resume, and nothing read was lost.
        released.set()
        resumed = time.monotonic()
        await _until(lambda: any(ln == "WATCHDOG=1" and t > resumed for t, ln in listener.lines()))
    finally:
        released.set()
        rt.stop()
        await asyncio.wait_for(task, 15)
    lines = [ln for _, ln in listener.lines()]
    assert lines.count("READY=1") == 1 and lines[-1] == "STOPPING=1", lines[-3:]
    c = rt.counters
    assert c.read == c.stored + c.filtered_out and c.dropped_at_stop == 0


def test_abstract_socket_and_no_socket(monkeypatch):
    name = f"@edgeos-test-{uuid.uuid4().hex}"
    lst = Listener(b"\0" + name[1:].encode())
    try:
        n = Notifier({"NOTIFY_SOCKET": name})
        assert n.enabled and n.ready("1 device up, 0 down") and n.stopping()
        deadline = time.monotonic() + 5
        while len(lst.messages) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [m for _, m in lst.messages] == ["READY=1\nSTATUS=1 device up, 0 down", "STOPPING=1"]
        n.close()
    finally:
        lst.close()
    off = Notifier({})
    assert not off.enabled and not off.ready() and not off.watchdog()
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # another process's


def test_status_line_and_sync_progress():
    status = {
        "devices": {f"d{i}": {"state": "running"} for i in range(12)} | {"x": {"state": "backoff"}},
        "sync": {"state": "connected", "lag_seconds": 0.42},
    }
    assert status_line(status, 48000.0) == "12 devices up, 1 down; 48,000 samples/s; upstream lag 0.4 s"
    state = ["connected", 5, 9, 100]
    probe = CursorProbe(lambda: tuple(state), bound=10.0)
    assert probe(0.0) is None and probe(5.0) is None
    assert "cursor stuck at 5" in probe(10.5)
    state[1] = 6  # the cursor moved: progress
    assert probe(11.0) is None and probe(20.0) is None
    state[3] = 101  # a live publish acknowledged while a capped backlog holds the cursor: progress
    assert probe(30.0) is None and "stuck" in probe(40.5)
    state[0] = "backoff"  # disconnected and retrying: not a stall of the daemon
    assert probe(40.0) is None
