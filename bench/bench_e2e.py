"""End to end on a realistic plant, side by side with ThingsBoard IoT Gateway.

The daemon runs as users run it, `edgeos run -c edgeos.toml`, a process of its own; everything
else is on loopback, each in a process of its own:
- the plant (bench/e2e/plant.py): 20 Modbus TCP devices of 500 registers of mixed types polled
  every second, one of 1,000 registers polled every 100 ms, two serial line devices behind TCP
  device servers (`socket://`) sending 20 lines/s each; Modbus registers wander every second;
- an asyncua server (tests/peers/opcua.py) with 5,000 variables changing every 500 ms,
  subscribed with a 50 ms publishing interval (OPC_PUBLISH_MS: a change waits up to one
  interval at the server, so at 100 ms the OPC UA p99 alone is ~100 ms plus the server's and
  our work; the stall once seen at 50 ms is gone, docs/benchmarks.md). The server changes
  them in OPC_SPREAD slices across the 500 ms, each stamped when written, as a PLC's values
  change across its cycle. Written all at once with one stamp (OPC_SPREAD = 1), this Python
  server needs 200-480 ms to write a round, and the late values' latency is mostly that;
- filters: deadband on half the tags, swinging door on a quarter (tag names `db*`, `sd*`; the
  rest `raw*`); the local store; the metrics endpoint when this edgeos has one;
- upstream sync to a mosquitto the bench starts (random loopback port, sessions persisted
  across its restart), and a subscriber decoding with `edgeos.wire`: latency is the arrival
  time minus the sample's timestamp.

Phases: warm-up; the measuring window (samples/s read, stored, delivered; CPU % of one core and
peak RSS of the daemon; latency p50/p99); a broker outage, then the drain (time from the
broker's restart to the arrival of the last sample taken before it); then the plant pauses (its
Modbus devices answer "busy", the OPC UA server is frozen, the lines stop), and once nothing
more arrives, lost = samples the daemon stored - unique samples delivered.

Then the same Modbus load, same broker, same outage, through ThingsBoard IoT Gateway
(bench/e2e/peer_tb.py), one after the other so that neither competes with the other for the 2
cores. Its loss: successful Modbus reads the plant served it (one request per tag, its way)
- data points delivered. Latency there excludes nothing (it has no filters).

Footprint: RSS of a one-tag daemon (idle), and of a 10 x 1,000-tag Modbus gateway (1 s polls);
`EDGEOS_E2E_ONLY=footprint` measures these alone (a few seconds).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from e2e import harness, peer_tb  # noqa: E402

NS = "urn:edgeos:bench"
OPC_BULK = 5000
OPC_PUBLISH_MS = int(os.environ.get("EDGEOS_E2E_OPC_PUBLISH_MS", "50"))
OPC_SPREAD = int(os.environ.get("EDGEOS_E2E_OPC_SPREAD", "10"))

# One 20-register block of 20 tags (as bench_modbus): repeated, it fills a device's registers.
_BLOCK = [
    ("float32", "ABCD", 0),
    ("float32", "CDAB", 2),
    ("float32", "ABCD", 4),
    ("float32", "CDAB", 6),
    ("int32", "ABCD", 8),
    ("uint32", "CDAB", 10),
    ("int16", "ABCD", 12),
    ("uint16", "ABCD", 13),
    ("int16", "ABCD", 14),
    ("uint16", "ABCD", 15),
    ("int16", "BADC", 16),
    *[("bool", "", f"17.{b}") for b in range(4)],
    ("int8", "high", 18),
    ("uint8", "low", 18),
    *[("bool", "", f"19.{b}") for b in (0, 7, 15)],
]
FILTERS = {"db": "deadband(abs=2)", "sd": "swinging_door(deviation=2)", "raw": ""}
# OPC UA values step by 1 every 500 ms: the deadband passes every other change.
OPC_FILTERS = {"db": "deadband(abs=1.5)", "sd": "swinging_door(deviation=0.5)", "raw": ""}


def kind(i: int) -> str:
    """Half the tags deadband, a quarter swinging door, a quarter unfiltered."""
    return ("db", "db", "sd", "raw")[i % 4]


def modbus_rows(registers: int) -> list[tuple[str, str, str, str, str]]:
    """(name, address, type, byte_order, byte) per tag; one tag per register on average."""
    rows = []
    for k in range(registers // 20):
        for typ, order, off in _BLOCK:
            i = len(rows)
            if isinstance(off, str):
                reg, bit = off.split(".")
                address = f"hr{20 * k + int(reg)}.{bit}"
            else:
                address = f"hr{20 * k + off}"
            rows.append(
                (
                    f"{kind(i)}{i}",
                    address,
                    "" if typ == "bool" else typ,
                    order if order in ("ABCD", "CDAB", "BADC") else "",
                    order if order in ("high", "low") else "",
                )
            )
    return rows


def modbus_csv(registers: int, filtered: bool = True) -> str:
    out = ["name,address,type,byte_order,byte,filters"]
    for name, address, typ, order, byte in modbus_rows(registers):
        f = FILTERS[name.rstrip("0123456789")] if filtered else ""
        out.append(f"{name},{address},{typ},{order},{byte},{f}")
    return "\n".join(out) + "\n"


def peer_tags(registers: int) -> list[tuple[str, str, int]]:
    """The same tags for the peer: (key, type, register); bits and bytes read as uint16."""
    out = []
    for name, address, typ, _, _ in modbus_rows(registers):
        reg = int(address[2:].split(".")[0])
        out.append((name, typ if typ in peer_tb.TYPES else "uint16", reg))
    return out


SERIAL = """
[[devices]]
name = "line{k}"
protocol = "serial"
port = "socket://127.0.0.1:{port}"
pattern = '^T=(?P<t>[+-]\\d+\\.\\d+),P=(?P<p>[+-]\\d+\\.\\d+),C=(?P<c>\\d+)$'
checksum = "xor"
checksum_gap = 1
tags = [
  {{ name = "db_t", group = "t", filters = [{{ type = "deadband", abs = 0.5 }}] }},
  {{ name = "sd_p", group = "p", filters = [{{ type = "swinging_door", deviation = 0.5 }}] }},
  {{ name = "raw_c", group = "c", type = "integer" }},
]
"""


def _metrics_table(base: str, port: int, path: Path) -> str:
    """The metrics endpoint's table when this edgeos's config schema has one, else ''. (Where
    it has one that is on by default, a random port keeps it off anything else's.)"""
    import tomllib

    from edgeos.config import parse_config

    for table in (
        f"[http]\nenabled = true\nport = {port}\n",
        f"[metrics]\nenabled = true\nport = {port}\n",
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n',
    ):
        with contextlib.suppress(Exception):
            parse_config(tomllib.loads(base + table), path)
            return table
    return ""


def write_config(
    d: Path, ports: dict, opc_endpoint: str | None, broker: int | None, devices: list[tuple[str, int, str, int]]
) -> Path:
    """`devices`: (name, port, poll interval, registers)."""
    text = f'[gateway]\nid = "e2e"\ndata_dir = "{d / "data"}"\nrun_dir = "{d / "run"}"\n'
    (d / "run").mkdir(parents=True, exist_ok=True)
    for name, port, interval, registers in devices:
        csv = d / f"modbus{registers}.csv"
        if not csv.exists():
            csv.write_text(modbus_csv(registers))
        text += (
            f'[[devices]]\nname = "{name}"\nprotocol = "modbus"\nhost = "127.0.0.1"\nport = {port}\n'
            f'poll_interval = "{interval}"\ntimeout = "2s"\ntags_csv = "{csv.name}"\n'
        )
    if opc_endpoint:
        rows = ["name,node,filters"] + [
            f"{kind(k)}{k},nsu={NS};i={100000 + k},{OPC_FILTERS[kind(k)]}" for k in range(5000)
        ]
        (d / "opcua.csv").write_text("\n".join(rows) + "\n")
        text += (
            f'[[devices]]\nname = "opc"\nprotocol = "opcua"\nendpoint = "{opc_endpoint}"\nsecurity_mode = "None"\n'
            f'mode = "subscribe"\npublishing_interval = "{OPC_PUBLISH_MS}ms"\nsampling_interval = "0ms"\n'
            # A 3 s keep-alive: its tags are marked Bad after 1.5 keep-alives without an answer,
            # and this loaded server is sometimes late by more than 1.5 s (docs/reliability.md).
            f'timeout = "30s"\nkeepalive_count = {3000 // OPC_PUBLISH_MS}\ntags_csv = "opcua.csv"\n'
        )
    for k, port in enumerate(ports.get("serial", [])):
        text += SERIAL.format(k=k, port=port)
    if broker is not None:
        text += (
            f'[upstream]\nenabled = true\nhost = "127.0.0.1"\nport = {broker}\n'
            'reconnect_min = "200ms"\nreconnect_max = "2s"\n'
        )
    p = d / "edgeos.toml"
    text += _metrics_table(text, harness.free_port(), p)
    p.write_text(text)
    return p


def _edgeos_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "edgeos"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "edgeos"]


class Daemon:
    """`edgeos run -c CONFIG` as a process of its own, and its status file."""

    def __init__(self, cfg: Path, env: dict[str, str] | None = None) -> None:
        from edgeos.service.status import live_path

        self.cfg = cfg
        self.status_path = live_path(cfg.parent / "data", cfg.parent / "run")
        self.log = open(cfg.parent / "edgeos.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [*_edgeos_cmd(), "run", "-c", str(cfg)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def status(self) -> dict:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(self.status_path.read_text())
        return {}

    def wait_running(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edgeos exited: {(self.cfg.parent / 'edgeos.log').read_text()[-2000:]}")
            if self.status():
                return
            time.sleep(0.1)
        raise TimeoutError("edgeos did not write its status")

    def wait_flowing(self, opc_samples: int, timeout: float = 60.0) -> None:
        """Until every device runs and has delivered, and the OPC UA device more than its
        subscription's first answer (`opc_samples`: the current value of every item, stamped
        whenever the server last changed it, up to a round old). The window opens `warm`
        seconds after: before this, a quick run's 2 s warm-up could end while the subscription
        was still being made, and its first answer then set the window's OPC UA p99 (a start-up
        figure, not a delivery latency)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            devices = (self.status() or {}).get("devices") or {}
            if devices and all(
                d.get("state") == "running" and d.get("samples", 0) > (opc_samples if name == "opc" else 0)
                for name, d in devices.items()
            ):
                return
            time.sleep(0.1)
        raise TimeoutError(f"not every device delivered within {timeout:.0f} s")

    def stop(self) -> dict:
        harness.stop_process(self.proc, 30)
        self.log.close()
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.cfg.parent / "data" / "status.json").read_text())
        return {}


class Plant:
    def __init__(self, spec: dict) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "e2e" / "plant.py"), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.proc.stdout is not None
        self.ports = json.loads(self.proc.stdout.readline())

    def command(self, cmd: str) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            harness.stop_process(self.proc, 5)


def _opcua_peer():
    path = HERE.parent / "tests" / "peers" / "opcua.py"
    spec = importlib.util.spec_from_file_location("edgeos_bench_peer_opcua", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _wait_quiet(count, timeout: float, quiet: float = 2.0) -> None:
    """Until `count()` has not changed for `quiet` seconds (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def _outage(broker: harness.Broker, seconds: float, delivery: harness.Delivery, sub, timeout: float, caught_up) -> dict:
    """Stop the broker for `seconds`, restart it, and wait for the drain: until `caught_up()`
    and nothing taken before the restart arrived for 3 s."""
    t_down = time.time()
    broker.stop()
    time.sleep(seconds)
    broker.start()
    restart = time.time()
    # The drain is over once a message arrived carrying only samples taken after the restart
    # and nothing older came for 3 s (bounded by `timeout`).
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.25)
        with sub.lock:
            fresh = [a for a, o in zip(delivery.arrivals, delivery.oldest, strict=True) if a > restart and o >= restart]
            end = delivery.drain_end(restart)
        if fresh and time.time() - end > 3.0 and caught_up():
            break
    with sub.lock:
        end = delivery.drain_end(restart)
    return {"down_s": restart - t_down, "restart": restart, "wait_s": time.time() - restart}


def _ours(tmp: Path, plant: Plant, opc, broker: harness.Broker, sub, t: dict, log) -> dict:
    mb = plant.ports["modbus"]
    devices = [(f"m{k}", mb[k], "1s", 500) for k in range(20)] + [("fast", mb[20], "100ms", 1000)]
    d = tmp / "ours"
    d.mkdir()
    cfg = write_config(d, plant.ports, opc.endpoint, broker.port, devices)
    trace = d / "trace.json" if sub.units is not None else None
    daemon = Daemon(cfg, {"EDGEOS_TRACE": str(trace)} if trace else None)
    try:
        daemon.wait_running()
        daemon.wait_flowing(opc_samples=OPC_BULK)
        time.sleep(t["warm"])
        s0, c0, t0 = daemon.status(), harness.cpu_s(daemon.proc.pid), time.time()
        b0 = sub.busy_s
        o0 = harness.cpu_s(opc.proc.pid)
        time.sleep(t["window"])
        s1, c1, t1 = daemon.status(), harness.cpu_s(daemon.proc.pid), time.time()
        if trace is not None:
            print(f"# e2e stage subscriber: busy {100 * (sub.busy_s - b0) / (t1 - t0):.1f} % of the window", flush=True)
        opc_cpu = 100 * (harness.cpu_s(opc.proc.pid) - o0) / (t1 - t0)
        if trace is not None:  # how long the server takes to write a round (its source time is the round's start)
            with contextlib.suppress(Exception):
                stats = json.loads(opc.command("stats"))
                rounds = [r for r in stats.get("rounds", []) if t0 <= r < t1]
                took = sorted(1e3 * (r - r // 0.5 * 0.5) for r in rounds)
                writes = sorted(1e3 * w for w in stats.get("slice_write_s", []))
                starved = [x for x in stats.get("publish_starved", []) if t0 <= x < t1]
                print(
                    f"# e2e stage opcua server: {len(starved)} times data waited for a publish request",
                    flush=True,
                )
                if writes and OPC_SPREAD > 1:
                    print(
                        f"# e2e stage opcua server: {len(writes)} slices of {OPC_BULK // OPC_SPREAD} values written "
                        f"in p50 {writes[len(writes) // 2]:.0f} ms, max {writes[-1]:.0f} ms (stamped at their start)",
                        flush=True,
                    )
                elif took:
                    print(
                        f"# e2e stage opcua server: {len(took)} rounds written in p50 {took[len(took) // 2]:.0f} ms, "
                        f"max {took[-1]:.0f} ms after their source time",
                        flush=True,
                    )
                    # Ours: from the end of the server's round to the arrival of the unit carrying it.
                    end = {int(r // 0.5): r for r in rounds}  # by half-second slot of its source time
                    with sub.lock:
                        ours = sorted(
                            1e3 * (a / 1e9 - end[k])
                            for d, ts, a in sub.units
                            if d == "opc" and (k := int(ts / 1e9 // 0.5)) in end
                        )
                    if ours:
                        print(
                            f"# e2e stage opcua ours (server's round end -> arrival): {len(ours)} units, "
                            f"p50 {ours[len(ours) // 2]:.0f} ms, p99 {ours[int(len(ours) * 0.99)]:.0f} ms",
                            flush=True,
                        )
        cur, peak = harness.rss_mb(daemon.proc.pid)
        with sub.lock:
            win = sub.ours.window(t0, t1)
        span = s1["time"] - s0["time"]
        c_out = harness.cpu_s(daemon.proc.pid)
        # Caught up when every seq up to the highest seen has arrived: no gap left.
        out = _outage(broker, t["outage"], sub.ours, sub, t["drain_timeout"], lambda: not sub.gaps("e2e"))
        outage_cpu = harness.cpu_s(daemon.proc.pid) - c_out
        _, peak = harness.rss_mb(daemon.proc.pid)
    finally:
        # Stop the daemon: its final status counts everything it stored, and what its sync
        # had not sent when it stopped (kept in the store for its next start); then wait
        # until nothing more arrives.
        t_pause = time.monotonic()
        stopped = daemon.stop()
    _wait_quiet(lambda: sub.ours.samples, 15, 2.0)
    settle = time.monotonic() - t_pause
    log(f"# e2e: outage {out['down_s']:.1f} s, drain wait {out['wait_s']:.1f} s, stop and settle {settle:.1f} s")
    with sub.lock:  # what came late counts too
        out["drain_s"] = sub.ours.drain_end(out["restart"]) - out["restart"]
    if trace is not None and trace.exists():
        from e2e import stages

        for line in stages.breakdown(trace, sub.units, t0, t1):
            print(line, flush=True)
    stored = stopped["counters"]["stored"]
    unsent = (stopped.get("sync") or {}).get("backlog_samples", 0)
    print(f"# e2e diag: final sync {stopped.get('sync')} stored {stored} delivered {sub.ours.samples}", flush=True)
    print(f"# e2e diag: gaps {sub.gaps('e2e')[:10]} ranges {sub.ranges('e2e')[:5]}", flush=True)
    return {
        "read_per_s": (s1["counters"]["read"] - s0["counters"]["read"]) / span,
        "stored_per_s": (s1["counters"]["stored"] - s0["counters"]["stored"]) / span,
        "delivered_per_s": win["samples_per_s"],
        "cpu_pct": 100 * (c1 - c0) / (t1 - t0),
        "cpu_s_per_sample": (c1 - c0) / max(1.0, win["samples_per_s"] * (t1 - t0)),
        "rss_mb": peak,
        "rss_mb_now": cur,
        "p50": win["p50"],
        "p99": win["p99"],
        "held_p50": win["held_p50"],
        "held_p99": win["held_p99"],
        "opc_cpu": opc_cpu,
        "by_device": win["by_device"],
        "lost": stored - unsent - sub.ours.samples,
        "unsent_at_stop": unsent,
        "duplicates": sub.ours.duplicates,
        "drain_s": out["drain_s"],
        "outage_s": out["down_s"],
        "outage_cpu_s": outage_cpu,
        "stopped_lost": stopped.get("counters", {}).get("dropped_at_stop", 0),
    }


def _peer(tmp: Path, plant: Plant, broker: harness.Broker, sub, t: dict, log) -> dict:
    why = peer_tb.ensure_venv(log)
    if why:
        return {"error": why}
    mb = plant.ports["modbus"]
    devices = [(f"tb{k}", mb[k], 1000, peer_tags(500)) for k in range(20)] + [("tbfast", mb[20], 100, peer_tags(1000))]
    root = tmp / "peer"
    conf = peer_tb.write_config(root, broker.port, devices)
    reads0 = sum(plant.command("stats")["reads"])
    proc = peer_tb.start(root, conf)
    try:
        deadline = time.monotonic() + t["peer_start"]
        while sub.peer.samples == 0 and time.monotonic() < deadline:
            if proc.poll() is not None:
                return {"error": f"exited with {proc.returncode}: {(root / 'logs' / 'stdout.log').read_text()[-1500:]}"}
            time.sleep(0.2)
        log(f"# e2e: the peer's first telemetry after {time.monotonic() - deadline + t['peer_start']:.1f} s")
        if sub.peer.samples == 0:
            return {
                "error": f"no telemetry within {t['peer_start']:.0f} s (it delivers in bursts under this load); "
                f"session-limit requests answered: {sub.tb_requests}"
            }
        time.sleep(t["warm"])
        c0, t0 = harness.cpu_s(proc.pid), time.time()
        time.sleep(t["window"])
        c1, t1 = harness.cpu_s(proc.pid), time.time()
        with sub.lock:
            win = sub.peer.window(t0, t1)
        out = _outage(broker, t["outage"], sub.peer, sub, t["drain_timeout"], lambda: True)
        reads1 = sum(plant.command("pause")["reads"])
        try:
            _wait_quiet(lambda: sub.peer.samples, t["drain_timeout"], t["quiet"])
        finally:
            plant.command("resume")
        with sub.lock:  # what came late counts too
            out["drain_s"] = sub.peer.drain_end(out["restart"]) - out["restart"]
        _, peak = harness.rss_mb(proc.pid)
    finally:
        t_stop = time.monotonic()
        harness.stop_process(proc, 15)
        log(f"# e2e: the peer took {time.monotonic() - t_stop:.1f} s to stop")
        _peer_log_summary(root / "logs" / "gateway.log", log)
    return {
        "delivered_per_s": win["samples_per_s"],
        "cpu_pct": 100 * (c1 - c0) / (t1 - t0),
        "cpu_s_per_sample": (c1 - c0) / max(1.0, win["samples_per_s"] * (t1 - t0)),
        "rss_mb": peak,
        "p50": win["p50"],
        "p99": win["p99"],
        "read": reads1 - reads0,
        "lost": (reads1 - reads0) - sub.peer.samples,
        "drain_s": out["drain_s"],
        "version": peer_tb.version(),
    }


def _peer_log_summary(path: Path, log) -> None:
    """The peer's warnings and errors, counted by kind (the text before the first digit or
    bracket), so a run shows why it lost what it lost."""
    import collections
    import re

    kinds: collections.Counter[str] = collections.Counter()
    first: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            m = re.match(r"\S+ \S+ (WARNING|ERROR|CRITICAL) (\S+) (.*)", line)
            if m:
                head = re.split(r"[0-9<\[{(]", m[3], maxsplit=1)[0][:80]
                kind = f"{m[1]} {m[2]} {head}"
                kinds[kind] += 1
                first.setdefault(kind, m[3][:300])
    for kind, n in kinds.most_common(6):
        log(f"# e2e: peer log: {n} x {kind} (first: {first[kind]})")


def _footprint(tmp: Path, plant: Plant, settle: float) -> dict:
    """RSS of a one-tag simulated daemon, and of a 10 x 1,000-tag Modbus gateway (no upstream)."""
    d = tmp / "idle"
    d.mkdir()
    text = f'[gateway]\nid = "idle"\ndata_dir = "{d / "data"}"\nrun_dir = "{d / "run"}"\n'
    text += '[[devices]]\nname = "sim"\nprotocol = "simulated"\ntags = [{ name = "t" }]\n'
    (d / "run").mkdir()
    text += _metrics_table(text, harness.free_port(), d / "edgeos.toml")
    (d / "edgeos.toml").write_text(text)
    daemon = Daemon(d / "edgeos.toml")
    try:
        daemon.wait_running()
        time.sleep(settle)
        idle = harness.rss_mb(daemon.proc.pid)
        idle_anon = _rss_anon_mb(daemon.proc.pid)
    finally:
        daemon.stop()
    d = tmp / "10k"
    d.mkdir()
    mb = plant.ports["modbus"]
    devices = [(f"k{k}", mb[21 + k], "1s", 1000) for k in range(10)]
    daemon = Daemon(write_config(d, {}, None, None, devices))
    try:
        daemon.wait_running()
        time.sleep(settle + 2)
        tenk = harness.rss_mb(daemon.proc.pid)
        tenk_anon = _rss_anon_mb(daemon.proc.pid)
        stored = daemon.status().get("counters", {}).get("stored", 0)
    finally:
        daemon.stop()
    return {"idle": idle, "tenk": tenk, "tenk_stored": stored, "idle_anon": idle_anon, "tenk_anon": tenk_anon}


def _rss_anon_mb(pid: int) -> float:
    """RssAnon in MiB: the daemon's own memory, without the mapped pages of its libraries,
    which vary by a few MB with how the page cache holds those files (docs/benchmarks.md)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _footprint_figures(foot: dict):
    yield "rss_mb_idle", foot["idle"][0], "MB (one simulated tag; target <= 45)"
    yield "rss_mb_10k_tags", foot["tenk"][0], "MB (10 x 1,000 Modbus tags at 1 s; target <= 60)"
    yield "rss_mb_10k_tags_peak", foot["tenk"][1], "MB"
    yield "rss_anon_mb_idle", foot["idle_anon"], "MB (RssAnon of rss_mb_idle: without mapped library pages)"
    yield "rss_anon_mb_10k_tags", foot["tenk_anon"], "MB (RssAnon of rss_mb_10k_tags)"


def _footprint_only(quick: bool, log):
    """`EDGEOS_E2E_ONLY=footprint`: the footprint figures alone, with the quick or full settle
    times (a few seconds and 10 plant devices instead of the whole load: for iterating)."""
    with tempfile.TemporaryDirectory(prefix="edgeos-bench-e2e-") as tdir:
        # The 10k gateway reads plant devices 21..30: the same ports layout, only those serve.
        plant = Plant({"modbus": [20] * 21 + [1000] * 10, "serial": 0})
        try:
            foot = _footprint(Path(tdir), plant, 1.0 if quick else 10.0)
        finally:
            plant.stop()
    log(f"# e2e: footprint only, {foot['tenk_stored']} samples stored by the 10k gateway")
    yield from _footprint_figures(foot)


def run(quick: bool):
    t = (
        {"warm": 2.0, "window": 10.0, "outage": 5.0, "drain_timeout": 12.0, "quiet": 3.0, "peer_start": 20.0}
        if quick
        else {"warm": 15.0, "window": 120.0, "outage": 30.0, "drain_timeout": 120.0, "quiet": 10.0, "peer_start": 90.0}
    )
    if not shutil.which("mosquitto"):
        raise RuntimeError("the e2e bench needs mosquitto (scripts/setup --test installs it)")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    began = time.monotonic()
    if os.environ.get("EDGEOS_E2E_ONLY") == "footprint":
        yield from _footprint_only(quick, log)
        return
    with tempfile.TemporaryDirectory(prefix="edgeos-bench-e2e-") as tdir:
        tmp = Path(tdir)
        plant = Plant({"modbus": [500] * 20 + [1000] + [1000] * 10, "serial": 2, "lines_per_s": 20})
        opc = (
            _opcua_peer()
            .OpcUaPeer({"namespaces": [NS], "bulk": OPC_BULK, "period": 0.5, "spread": OPC_SPREAD})
            .start(timeout=120)
        )
        broker = harness.Broker(tmp).start()
        sub = harness.Subscriber(broker.port).start()
        try:
            log(f"# e2e: plant up at {time.monotonic() - began:.0f} s")
            foot = _footprint(tmp, plant, 1.0 if quick else 10.0)
            log(f"# e2e: footprint done at {time.monotonic() - began:.0f} s")
            ours = _ours(tmp, plant, opc, broker, sub, t, log)
            opc.stop()  # the peer reads the Modbus part only
            log(f"# e2e: ours done at {time.monotonic() - began:.0f} s")
            peer = _peer(tmp, plant, broker, sub, t, log) if os.environ.get("EDGEOS_E2E_PEER", "1") != "0" else {}
        finally:
            sub.stop()
            broker.stop()
            opc.stop()
            plant.stop()

    yield "read_per_s", ours["read_per_s"], "samples/s read (Modbus, OPC UA, serial)"
    yield "stored_per_s", ours["stored_per_s"], "samples/s stored (after filters)"
    yield "samples_per_s", ours["delivered_per_s"], "samples/s delivered to the broker"
    yield "cpu_pct", ours["cpu_pct"], "% of one core (target < 25)"
    yield "rss_mb", ours["rss_mb"], "MB peak"
    yield "p50_latency_ms", ours["p50"], "ms (sample time -> subscriber; swinging-door tags apart)"
    yield "p99_latency_ms", ours["p99"], "ms (target < 100)"
    names = {"m": "modbus_1s", "fast": "modbus_100ms", "line": "serial", "opc": "opcua"}
    for kind, (p50, p99) in sorted(ours["by_device"].items()):
        yield f"p50_latency_{names.get(kind, kind)}_ms", p50, "ms"
        yield f"p99_latency_{names.get(kind, kind)}_ms", p99, "ms"
    yield "p50_latency_swinging_door_ms", ours["held_p50"], "ms (the archive holds a point until the next)"
    yield "p99_latency_swinging_door_ms", ours["held_p99"], "ms"
    yield "opcua_server_cpu_pct", ours["opc_cpu"], "% of one core (the OPC UA server, not the daemon)"
    yield "lost", ours["lost"], f"samples (target 0) after a {ours['outage_s']:.0f} s broker outage"
    yield "unsent_at_stop", ours["unsent_at_stop"], "samples stored, not yet sent when it stopped (kept)"
    yield "duplicates", ours["duplicates"], "samples delivered twice (at least once)"
    yield "drain_s", ours["drain_s"], "s from the broker's restart to the last older sample"
    yield "outage_cpu_s", ours["outage_cpu_s"], "CPU s over the outage and the drain"
    yield from _footprint_figures(foot)
    if not peer:
        return
    if "error" in peer:
        print(f"# e2e: the peer did not run: {peer['error']}", flush=True)
        return
    yield "peer_samples_per_s", peer["delivered_per_s"], f"samples/s (thingsboard-gateway {peer['version']})"
    yield "peer_cpu_pct", peer["cpu_pct"], "% of one core"
    yield "peer_rss_mb", peer["rss_mb"], "MB peak"
    yield "peer_p50_latency_ms", peer["p50"], "ms"
    yield "peer_p99_latency_ms", peer["p99"], "ms"
    yield "peer_read", peer["read"], "Modbus reads it made (one tag each)"
    yield "peer_lost", peer["lost"], "samples (read - delivered)"
    yield "peer_drain_s", peer["drain_s"], "s"
    if not peer["delivered_per_s"]:
        print("# e2e: the peer delivered nothing within the window (bursts): no ratios", flush=True)
        return
    yield (
        "cpu_per_sample_vs_peer",
        ours["cpu_s_per_sample"] / peer["cpu_s_per_sample"],
        "ratio, ours / theirs (target <= 0.02)",
    )
    yield "rss_vs_peer", ours["rss_mb"] / peer["rss_mb"], "ratio, ours / theirs"
