"""OPC UA end to end: 10,000 Double nodes changing once a second, subscribed and polled.

An asyncua server in its own process (tests/peers/opcua.py) holds the nodes and changes them
all every second: 10,000 values/s offered (its rate and CPU are reported, and kept out of the
client figures). Each client runs in a process of its own, so its CPU and RSS are its alone:

- a bare asyncua client subscribed to every node, with a handler that only counts (the
  baseline), and one reading every node once a second with `read_values`;
- the edgeos runtime (store on) subscribed to every node, then polling them every second.

Figures: values/s delivered into the store, CPU % of one core, RSS, and the ratios
`*_vs_bare` = (bare CPU s per value) / (edgeos CPU s per value): 1.0 is as cheap as bare
asyncua, above 1 cheaper.

Latency (the OPC UA part of the e2e bench, issue 27): a second server with 5,000 Double nodes
changing every 500 ms, the runtime subscribed as bench_e2e configures it (publishing interval
100 ms, store on); latency = the sample's arrival at a sink after its commit - its source
timestamp (the start of the server's round of writes). `latency_after_round_end` leaves out the
server's own time to write a round (its stats give each round's end). `EDGEOS_BENCH_OPCUA=latency`
runs only this part; `EDGEOS_BENCH_OPCUA_PUBLISHING=50ms` tries another publishing interval.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.util
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

N = 10_000
NS = "urn:edgeos:bench"
HERE = Path(__file__).parent


def _peer_module():
    spec = importlib.util.spec_from_file_location(
        "edgeos_bench_peer_opcua", HERE.parent / "tests" / "peers" / "opcua.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Rounds:
    """Values seen per round of changes (the server writes the round number into every node)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[float] = collections.Counter()

    def add(self, values: np.ndarray) -> None:
        ks, ns = np.unique(values, return_counts=True)
        self.counts.update(dict(zip(ks.tolist(), ns.tolist(), strict=True)))

    def last(self) -> float:
        return max(self.counts, default=0.0)


async def _window(count, seconds: float, warm: int, rounds: Rounds) -> dict[str, float]:
    """Wait until `warm` values arrived, then measure `seconds`: values, CPU seconds, RSS, and
    the share of the values of each round changed within the window that arrived."""
    for _ in range(600):  # at most a minute to subscribe and get the first values
        if count() >= warm:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)  # past the initial values, into the steady once-a-second changes
    v0, c0, t0, k0 = count(), _cpu(), time.perf_counter(), rounds.last()
    await asyncio.sleep(seconds)
    v1, c1, t1, k1 = count(), _cpu(), time.perf_counter(), rounds.last()
    await asyncio.sleep(1.5)  # let the last complete round arrive in full
    inside = [k for k in rounds.counts if k0 < k < k1]  # rounds begun and ended in the window
    complete = sum(rounds.counts[k] for k in inside) / (N * len(inside)) if inside else float("nan")
    return {
        "values": v1 - v0,
        "cpu_s": c1 - c0,
        "wall_s": t1 - t0,
        "rss_mb": _rss_mb(),
        "rounds": len(inside),
        "complete": complete,
    }


def _bare(endpoint: str, mode: str, seconds: float, out: mp.Queue) -> None:
    from asyncua import Client, ua

    async def main() -> dict[str, float]:
        n = 0
        rounds = Rounds()

        class Count:
            def datachange_notification(self, node, val, data) -> None:
                nonlocal n
                n += 1
                rounds.counts[val] += 1

        async with Client(endpoint, timeout=30) as c:
            idx = (await c.get_namespace_array()).index(NS)
            nodes = [c.get_node(ua.NodeId(100000 + k, idx)) for k in range(N)]
            if mode == "subscribe":
                sub = await c.create_subscription(1000, Count())
                await sub.subscribe_data_change(nodes, sampling_interval=0)
                return await _window(lambda: n, seconds, N, rounds)

            async def poll() -> None:
                nonlocal n
                while True:
                    await asyncio.sleep(1.0 - time.time() % 1.0)
                    values = await c.read_values(nodes)
                    n += len(values)
                    rounds.add(np.array(values))

            task = asyncio.create_task(poll())
            try:
                return await _window(lambda: n, seconds, N, rounds)
            finally:
                task.cancel()

    out.put(asyncio.run(main()))


def _edgeos(endpoint: str, mode: str, seconds: float, out: mp.Queue) -> None:
    from edgeos.config import load_config
    from edgeos.runtime import Runtime

    with tempfile.TemporaryDirectory(prefix="edgeos-bench-opcua-") as tmp:
        d = Path(tmp)
        rows = ["name,node"] + [f"b{k},nsu={NS};i={100000 + k}" for k in range(N)]
        (d / "tags.csv").write_text("\n".join(rows) + "\n")
        (d / "edgeos.toml").write_text(
            '[gateway]\nid = "bench"\ndata_dir = "data"\n'
            f'[[devices]]\nname = "srv"\nprotocol = "opcua"\nendpoint = "{endpoint}"\nsecurity_mode = "None"\n'
            f'mode = "{mode}"\npoll_interval = "1s"\npublishing_interval = "1s"\nsampling_interval = "0ms"\n'
            'timeout = "30s"\ntags_csv = "tags.csv"\n'
        )
        cfg = load_config(d / "edgeos.toml")
        rounds = Rounds()

        class Sink:
            async def put(self, batch) -> None:
                rounds.add(batch.values[batch.quality == 0])

            async def flush(self) -> None:
                return None

        rt = Runtime(cfg, sinks=[Sink()])

        async def main() -> dict[str, float]:
            task = asyncio.create_task(rt.run())
            try:
                await rt.running.wait()
                r = await _window(lambda: rt.counters.stored, seconds, N, rounds)
                adapter = rt.devices["srv"].adapter
                r["overruns"] = adapter.health().get("poll_overruns", 0) if adapter is not None else -1
                return r
            finally:
                rt.stop()
                await task

        out.put(asyncio.run(main()))


LAT_N, LAT_PERIOD = 5000, 0.5
LAT_PUBLISHING = os.environ.get("EDGEOS_BENCH_OPCUA_PUBLISHING", "100ms")  # bench_e2e's


def _latency(endpoint: str, mode: str, seconds: float, out: mp.Queue) -> None:
    """The e2e bench's OPC UA device alone: per-sample latency at a sink after the commit."""
    from edgeos.config import load_config
    from edgeos.runtime import Runtime

    with tempfile.TemporaryDirectory(prefix="edgeos-bench-opcua-lat-") as tmp:
        d = Path(tmp)
        rows = ["name,node"] + [f"v{k},nsu={NS};i={100000 + k}" for k in range(LAT_N)]
        (d / "tags.csv").write_text("\n".join(rows) + "\n")
        (d / "edgeos.toml").write_text(
            '[gateway]\nid = "bench"\ndata_dir = "data"\n'
            f'[[devices]]\nname = "opc"\nprotocol = "opcua"\nendpoint = "{endpoint}"\nsecurity_mode = "None"\n'
            f'mode = "subscribe"\npublishing_interval = "{LAT_PUBLISHING}"\nsampling_interval = "0ms"\n'
            'timeout = "30s"\nkeepalive_count = 30\n'  # as bench_e2e
            'tags_csv = "tags.csv"\n'
        )
        cfg = load_config(d / "edgeos.toml")
        lat: list[np.ndarray] = []  # ms, per sample
        arrivals: list[tuple[float, float, int]] = []  # (round, arrival s, samples)
        counting = False

        class Sink:
            async def put(self, batch) -> None:
                if not counting:
                    return
                now = time.time_ns()
                lat.append((now - batch.ts) / 1e6)
                ks, ns = np.unique(batch.values, return_counts=True)
                arrivals.extend((k, now / 1e9, n) for k, n in zip(ks.tolist(), ns.tolist(), strict=True))

            async def flush(self) -> None:
                return None

        rt = Runtime(cfg, sinks=[Sink()])

        async def main() -> dict[str, Any]:
            nonlocal counting
            task = asyncio.create_task(rt.run())
            try:
                await rt.running.wait()
                for _ in range(600):
                    if rt.counters.stored >= LAT_N:
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(2.0)
                counting = True
                c0, t0 = _cpu(), time.perf_counter()
                await asyncio.sleep(seconds)
                c1, t1 = _cpu(), time.perf_counter()
                counting = False
                values = np.concatenate(lat) if lat else np.zeros(0)
                return {
                    "lat": values.tolist(),
                    "arrivals": arrivals,
                    "cpu_s": c1 - c0,
                    "wall_s": t1 - t0,
                }
            finally:
                rt.stop()
                await task

        out.put(asyncio.run(main()))


def _latency_figures(quick: bool):
    seconds = 10.0 if quick else 60.0
    peers = _peer_module()
    peer = peers.OpcUaPeer({"namespaces": [NS], "bulk": LAT_N, "period": LAT_PERIOD}).start(timeout=120)
    try:
        c0, t0 = _proc_cpu_s(peer.proc.pid), time.perf_counter()
        r = _child(_latency, peer.endpoint, "subscribe", seconds)
        server_cpu = 100 * (_proc_cpu_s(peer.proc.pid) - c0) / (time.perf_counter() - t0)
        stats = json.loads(peer.command("stats"))
    finally:
        peer.stop()
    lat = np.array(r["lat"])
    ends = stats["rounds"]  # the end of round k (its nodes hold k) is ends[k - 1]
    known = [(k, a, n) for k, a, n in r["arrivals"] if 0 < k <= len(ends)]
    after = np.repeat([1e3 * (a - ends[int(k) - 1]) for k, a, _ in known], [n for _, _, n in known])
    took = np.array([1e3 * (e % LAT_PERIOD) for e in ends[2:]])  # round end - its start (the source time)

    def pct(x: np.ndarray, q: float) -> float:
        return float(np.percentile(x, q)) if len(x) else float("nan")

    yield "latency_samples", len(lat), f"samples in {r['wall_s']:.0f} s (offered {LAT_N / LAT_PERIOD:.0f}/s)"
    yield "p50_latency_ms", pct(lat, 50), "ms (source time -> after the commit)"
    yield "p99_latency_ms", pct(lat, 99), "ms (issue 27 target for the whole e2e: < 100)"
    yield "server_round_write_p50_ms", pct(took, 50), "ms (the server's round end - its source time)"
    yield "server_round_write_max_ms", pct(took, 100), "ms"
    yield "p50_after_round_end_ms", pct(after, 50), "ms (the server's round end -> after the commit)"
    yield "p99_after_round_end_ms", pct(after, 99), "ms"
    yield "latency_cpu_pct", 100 * r["cpu_s"] / r["wall_s"], "% of one core (the runtime, 10,000 values/s)"
    yield "latency_server_cpu_pct", server_cpu, "% of one core (the server)"


def _child(target, endpoint: str, mode: str, seconds: float) -> dict[str, float]:
    ctx = mp.get_context("fork")  # the bench module is loaded by path: not importable by a spawned child
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(endpoint, mode, seconds, q), daemon=True)
    p.start()
    try:
        return q.get(timeout=seconds + 120)
    finally:
        p.join(30)
        if p.is_alive():
            p.terminate()
            p.join(5)


def run(quick: bool):
    if os.environ.get("EDGEOS_BENCH_OPCUA") == "latency":
        yield from _latency_figures(quick)
        return
    seconds = 5.0 if quick else 20.0
    peers = _peer_module()
    peer = peers.OpcUaPeer({"namespaces": [NS], "bulk": N, "period": 1.0}).start(timeout=120)
    try:
        c0, t0 = _proc_cpu_s(peer.proc.pid), time.perf_counter()
        bare_sub = _child(_bare, peer.endpoint, "subscribe", seconds)
        ours_sub = _child(_edgeos, peer.endpoint, "subscribe", seconds)
        bare_poll = _child(_bare, peer.endpoint, "poll", seconds)
        ours_poll = _child(_edgeos, peer.endpoint, "poll", seconds)
        server_cpu = 100 * (_proc_cpu_s(peer.proc.pid) - c0) / (time.perf_counter() - t0)
        stats = json.loads(peer.command("stats"))
    finally:
        peer.stop()

    def per_value(r: dict[str, float]) -> float:
        return r["cpu_s"] / max(r["values"], 1)

    done = stats["rounds"]
    offered = N * (len(done) - 1) / (done[-1] - done[0])
    yield "server_offered_values_per_s", offered, "values/s (rounds of 10,000 changes it completed)"
    yield "server_cpu_pct", server_cpu, "% of one core (not in the figures below)"
    yield "bare_subscribe_values_per_s", bare_sub["values"] / bare_sub["wall_s"], "values/s"
    yield "bare_subscribe_cpu_pct", 100 * bare_sub["cpu_s"] / bare_sub["wall_s"], "% of one core"
    yield "bare_subscribe_us_per_value", 1e6 * per_value(bare_sub), "us CPU"
    yield "bare_rss_mb", bare_sub["rss_mb"], "MB"
    yield "subscribe_values_per_s", ours_sub["values"] / ours_sub["wall_s"], "values/s"
    yield "bare_subscribe_delivered_of_offered", bare_sub["complete"], "share of each round's changes"
    yield (
        "subscribe_delivered_of_offered",
        ours_sub["complete"],
        f"share of each round's changes ({ours_sub['rounds']} rounds)",
    )
    yield "subscribe_cpu_pct", 100 * ours_sub["cpu_s"] / ours_sub["wall_s"], "% of one core (target <= 25)"
    yield "subscribe_us_per_value", 1e6 * per_value(ours_sub), "us CPU"
    yield "subscribe_vs_bare", per_value(bare_sub) / per_value(ours_sub), "ratio (target >= 0.8)"
    yield "bare_poll_values_per_s", bare_poll["values"] / bare_poll["wall_s"], "values/s"
    yield "bare_poll_us_per_value", 1e6 * per_value(bare_poll), "us CPU"
    yield "poll_values_per_s", ours_poll["values"] / ours_poll["wall_s"], "values/s"
    yield (
        "poll_delivered_of_offered",
        ours_poll["values"] / ours_poll["wall_s"] / N,
        "of 10,000 values/s (one read a second)",
    )
    yield "poll_overruns", ours_poll.get("overruns", -1), "ticks skipped (a Read longer than 1 s)"
    yield "poll_cpu_pct", 100 * ours_poll["cpu_s"] / ours_poll["wall_s"], "% of one core"
    yield "poll_vs_bare", per_value(bare_poll) / per_value(ours_poll), "ratio (target >= 0.8)"
    yield "rss_mb", max(ours_sub["rss_mb"], ours_poll["rss_mb"]), "MB (target <= 100)"
    yield from _latency_figures(quick)
