"""systemd's notify protocol (sd_notify) and the watchdog's judge of progress.

sd_notify is one datagram of `KEY=value` lines to the Unix socket named by NOTIFY_SOCKET (a
path, or an abstract name written with a leading '@'); a few lines of the standard library, no
libsystemd. Without NOTIFY_SOCKET (not under systemd, in tests, embedded) every call is a no-op.

The watchdog (WatchdogSec=, passed as WATCHDOG_USEC) must be pinged with WATCHDOG=1 only while
the daemon really works: a ping from a timer that runs whatever happens would keep a daemon
whose disk hangs alive forever. So each ping is earned: it is sent from the event loop (a loop
that is blocked sends none), and only while every registered check sees progress: the store's
writer thread answers a probe (a hung fsync or a paused thread does not), and the sync, when
enabled, moves its cursor while it is connected and has something to send.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("edgeos.service")


class Notifier:
    """Sends sd_notify messages; every method is a no-op returning False outside systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if addr.startswith("@"):
            self.address = b"\0" + addr[1:].encode()  # Linux abstract namespace
        elif addr.startswith("/"):
            self.address = addr
        self._sock: socket.socket | None = None
        self._failed = False
        self.watchdog_s = watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """One datagram; False (logged once) when it could not be sent. Never raises: the
        daemon's work does not depend on systemd hearing about it."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as e:
            if not self._failed:
                self._failed = True
                log.warning("sd_notify to %r failed: %s", self.address, e, extra={"code": "notify_failed"})
            return False
        self._failed = False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC pairs it with the reload request (Type=notify-reload, systemd 253+).
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """WatchdogSec in seconds, or None when no watchdog is asked of this process."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # meant for another process (a parent that exec'd us keeps it)
    return int(usec) / 1e6


Check = Callable[[float], str | None]
"""Given monotonic now, None while making progress, else why not (for the log)."""


class Watchdog:
    """Named progress checks; `stalled` lists what does not progress."""

    def __init__(self) -> None:
        self.checks: dict[str, Check] = {}

    def add(self, name: str, check: Check) -> None:
        self.checks[name] = check

    def stalled(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        out = []
        for name, check in self.checks.items():
            try:
                why = check(now)
            except Exception as e:  # a check that fails is a stall, not a crash
                why = f"check failed: {type(e).__name__}: {e}"
            if why:
                out.append(f"{name}: {why}")
        return out


class ExecutorProbe:
    """Progress of a one-thread executor (the store's): a no-op is queued behind whatever it
    runs; the thread makes progress while no probe has waited longer than `bound` seconds.
    A commit stuck in fsync, a paused thread, a maintenance that never returns: all stall it."""

    def __init__(self, executor: concurrent.futures.Executor, bound: float) -> None:
        self.executor = executor
        self.bound = bound
        self._probe: concurrent.futures.Future[None] | None = None
        self._since = 0.0

    def __call__(self, now: float) -> str | None:
        if self._probe is not None and not self._probe.done():
            waited = now - self._since
            if waited > self.bound:
                return f"its thread has not answered for {waited:.1f}s (a hung disk?)"
            return None
        try:
            self._probe = self.executor.submit(_noop)
        except RuntimeError:  # shut down: the stop is under way
            return None
        self._since = now
        return None


def _noop() -> None:
    return None


class CursorProbe:
    """Progress of the sync: while connected with units to send, its cursor must move, or a
    publish be acknowledged (a rate-capped backlog holds the cursor while live data flows), at
    least once every `bound` seconds. Disconnected and retrying (backoff) is progress of its
    kind: the outage is reported elsewhere, and a restart would not bring a broker back."""

    def __init__(self, state: Callable[[], tuple[str, int, int, int]], bound: float) -> None:
        self.state = state  # () -> (state, cursor, head, acknowledged messages)
        self.bound = bound
        self._last: tuple[str, int, int] | None = None
        self._since = 0.0

    def __call__(self, now: float) -> str | None:
        state, cursor, head, acked = self.state()
        key = (state, cursor, acked)
        if key != self._last or state != "connected" or cursor >= head:
            self._last = key
            self._since = now
            return None
        waited = now - self._since
        if waited > self.bound:
            return f"connected, {head - cursor} units to send, cursor stuck at {cursor} for {waited:.1f}s"
        return None


def status_line(status: Mapping[str, Any], samples_per_s: float | None, *, store_failing: bool = False) -> str:
    """The one line `systemctl status` shows: `12 devices up, 1 down; 48,000 samples/s;
    upstream lag 0.4 s` (from Runtime.status())."""
    devices = status.get("devices") or {}
    up = sum(1 for d in devices.values() if d.get("up", d.get("state") == "running"))
    down = sum(1 for d in devices.values() if d.get("state") != "disabled") - up
    parts = [f"{up} device{'s' if up != 1 else ''} up, {down} down"]
    if samples_per_s is not None:
        parts.append(f"{samples_per_s:,.0f} samples/s")
    if store_failing:
        parts.append("store refusing writes")
    sync = status.get("sync")
    if sync:
        if sync.get("state") == "connected":
            parts.append(f"upstream lag {float(sync.get('lag_seconds', 0.0)):.1f} s")
        else:
            parts.append(f"upstream {sync.get('state')}, lag {float(sync.get('lag_seconds', 0.0)):.1f} s")
    return "; ".join(parts)
