"""Fixtures for the serial suite: pty lines from socat, a TCP serial server (tests/peers/serial.py)."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest


def load_peer_module():
    name = "edgeos_test_peers_serial"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "peers" / "serial.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


peers = load_peer_module()


@pytest.fixture
def line(tmp_path):
    ln = peers.Line(tmp_path)
    yield ln
    ln.kill()


@pytest.fixture
async def tcp_server():
    srv = await peers.TcpSerialServer().start()
    yield srv
    await srv.stop()


GATEWAY = '[gateway]\nid = "gw"\ndata_dir = "data"\nshutdown_timeout = "5s"\n'


@pytest.fixture
def serial_config(write_config):
    """Load a config made of the gateway header plus `body`."""
    from edgeos.config import load_config

    def make(body: str):
        return load_config(write_config(GATEWAY + textwrap.dedent(body)))

    return make


class Run:
    """An adapter running in a task, its batches gathered as rows (tag name, ts, value, quality, text)."""

    def __init__(self, device) -> None:
        from edgeos import plugins

        self.device = device
        self.adapter = plugins.load(plugins.PROTOCOLS, "serial").create(device)
        self.names = {t.id: t.name for t in device.tags}
        self.batches = []
        self.task = None
        self.error: BaseException | None = None

    async def emit(self, b, **_) -> None:
        self.batches.append(b)

    @property
    def rows(self) -> list[tuple]:
        out = []
        for b in self.batches:
            text = b.text.tolist() if b.text is not None else [None] * len(b)
            cols = (b.tags.tolist(), b.ts.tolist(), b.values.tolist(), b.quality.tolist(), text)
            for t, ts, v, q, x in zip(*cols, strict=True):
                out.append((self.names[t], ts, v, q, x))
        return out

    def of(self, name: str) -> list[tuple]:
        return [r for r in self.rows if r[0] == name]

    async def start(self) -> Run:
        import asyncio

        await self.adapter.connect()

        async def go():
            try:
                await self.adapter.run(self.emit)
            except Exception as e:
                self.error = e

        self.task = asyncio.create_task(go())
        return self

    async def wait(self, cond, timeout: float = 5.0) -> None:
        import asyncio

        async with asyncio.timeout(timeout):
            while not cond(self):
                if self.task.done():
                    raise AssertionError(f"adapter ended: {self.error!r}")
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        import asyncio
        import contextlib

        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.adapter.close()


@pytest.fixture
async def run_adapter():
    started: list[Run] = []

    async def start(device) -> Run:
        r = Run(device)
        started.append(r)
        return await r.start()

    yield start
    for r in started:
        await r.stop()
