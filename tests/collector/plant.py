"""A small plant for end-to-end tests: real `edgeos run` gateways, real `edgeos collect` collectors,
and the exactly-once check of PostgreSQL against each gateway's own store."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import asyncpg

from edgeos.store.reader import StoreReader

EDGEOS = str(Path(sys.executable).with_name("edgeos"))


def gateway_config(directory: Path, gw: str, port: int, *, tags: int = 20, extra: str = "", upstream: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tag_lines = ", ".join(f'{{ name = "t{i}", signal = "random_walk" }}' for i in range(tags))
    body = f"""
[gateway]
id = "{gw}"
data_dir = "data"
shutdown_timeout = "5s"
[store]
commit_interval = "50ms"
{extra}
[[devices]]
name = "press1"
protocol = "simulated"
poll_interval = "20ms"
tags = [{tag_lines}]
[[devices]]
name = "oven"
protocol = "simulated"
poll_interval = "50ms"
tags = [{{ name = "temperature", signal = "sine" }}, {{ name = "door", signal = "bool" }}]
[upstream]
enabled = true
host = "127.0.0.1"
port = {port}
reconnect_min = "50ms"
reconnect_max = "300ms"
{upstream}
"""
    p = directory / "edgeos.toml"
    p.write_text(body)
    return p


def collector_config(
    directory: Path,
    name: str,
    ports: list[int],
    dsn: str,
    http_port: int,
    extra: str = "",
    broker: str = "",
    maintain_every: str = "1h",
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    servers = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
    p = directory / f"{name}.toml"
    p.write_text(
        f"""
[broker]
servers = [{servers}]
client_id = "{name}"
keepalive = "5s"
{broker}
[database]
dsn = "{dsn}"
[collector]
batch_wait = "50ms"
reorder_wait = "1s"
replay_retry = "2s"
maintain_every = "{maintain_every}"
{extra}
[http]
listen = "127.0.0.1:{http_port}"
"""
    )
    return p


class Proc:
    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self.p: subprocess.Popen | None = None

    def start(self) -> Proc:
        with open(self.log, "ab") as f:
            self.p = subprocess.Popen(self.args, stdout=f, stderr=f)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.p = None


def gateway(cfg: Path) -> Proc:
    return Proc([EDGEOS, "run", "-c", str(cfg)], cfg.parent / "edgeos.log")


def collector(cfg: Path) -> Proc:
    return Proc([EDGEOS, "collect", "-c", str(cfg), "--log-level", "info"], cfg.with_suffix(".log"))


async def healthy(http_port: int, timeout: float = 20.0) -> None:
    """Until the collector's /healthz says both ends are up (it has subscribed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            body = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1).read()
            )
            if json.loads(body).get("ok") is True:
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"collector on :{http_port} did not become healthy")


def metrics(http_port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=2).read().decode()
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def store_truth(data_dir: Path, gw: str) -> dict[str, tuple[int, float]]:
    """tag key -> (count, sum of values) from the gateway's own store."""
    out = {}
    with StoreReader(data_dir) as r:
        for t in r.tags():
            h = r.history(t)
            out[f"{gw}/{t.device}/{t.name}"] = (len(h), float(h.values.sum()))
    return out


async def pg_totals(dsn: str) -> dict[str, tuple[int, float]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT tag, count(*) AS n, sum(value) AS s FROM samples GROUP BY tag")
    finally:
        await conn.close()
    return {r["tag"]: (r["n"], r["s"]) for r in rows}


async def assert_exactly_once(dsn: str, truths: dict[str, tuple[int, float]], timeout: float = 30.0) -> None:
    """Wait (bounded) until PostgreSQL holds as many samples as the stores, then compare per tag."""
    want = sum(n for n, _ in truths.values())
    deadline = time.monotonic() + timeout
    got: dict[str, tuple[int, float]] = {}
    while time.monotonic() < deadline:
        got = await pg_totals(dsn)
        if sum(n for n, _ in got.values()) >= want:
            break
        await asyncio.sleep(0.25)
    assert set(got) == set(truths)
    for key, (n, s) in truths.items():
        gn, gs = got[key]
        assert gn == n, f"{key}: {gn} samples in PostgreSQL, {n} in the gateway's store"
        assert math.isclose(gs, s, rel_tol=1e-9, abs_tol=1e-6), f"{key}: sum {gs} != {s}"
