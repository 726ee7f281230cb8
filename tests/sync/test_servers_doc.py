"""`[upstream] servers`, `host`/`port` and broker failover, checked against the documents alone
(docs/config.md, the `servers` row; docs/payload.md, "Delivery guarantees"; docs/store.md,
`edgeos status --json`; docs/metrics.md; docs/reliability.md, "The next broker of the list is
tried at once"), with real mosquittos on loopback (random ports; 127.0.0.2 and ::1 for the
default-port and IPv6 cases) and the gateway run in process (`Runtime`, whose `status()` is the
document `edgeos status --json` prints) or as `edgeos run` / `edgeos check` / `edgeos status`.

The doc sentence under test (docs/config.md, `[upstream]`, `servers`):

    brokers tried in turn: after a lost connection or a refused CONNACK the next one, with the
    same backoff; TLS and credentials apply to all. An entry without `:port` takes `port` (else
    1883, 8883 with TLS); `[v6 address]:port` for IPv6. `host`/`port` still work (one broker);
    with `servers` given, `host` is not used (a warning says so)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from edgeos.config import load_config
from edgeos.runtime import Runtime

EDGEOS = str(Path(sys.executable).with_name("edgeos"))
GW = "gw1"


# --------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as mosquitto: TIME_WAIT is no owner
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def write_gateway(d: Path, upstream: str, *, http_port: int | None = None) -> Path:
    """A gateway with one simulated device committing about 20 units a second; `upstream` is
    the body of the `[upstream]` table after `enabled = true` and small backoff bounds."""
    (d / "run").mkdir(parents=True, exist_ok=True)
    http = "enabled = false" if http_port is None else f"port = {http_port}"
    p = d / "edgeos.toml"
    p.write_text(
        f"""
[gateway]
id = "{GW}"
data_dir = "data"
run_dir = "run"
shutdown_timeout = "5s"

[store]
commit_interval = "50ms"

[[devices]]
name = "press"
protocol = "simulated"
poll_interval = "20ms"
tags = [{{ name = "a" }}, {{ name = "b", signal = "random_walk" }}]

[http]
{http}

[upstream]
enabled = true
reconnect_min = "50ms"
reconnect_max = "300ms"
{upstream}
"""
    )
    return p


@contextlib.asynccontextmanager
async def gateway(cfg_path: Path):
    """The daemon in process, stopped in an orderly way after the block."""
    rt = Runtime(load_config(cfg_path))
    task = asyncio.create_task(rt.run())
    try:
        async with asyncio.timeout(10):
            await rt.running.wait()
        yield rt
    finally:
        rt.stop()
        await asyncio.wait_for(task, 20)


def sync(rt: Runtime) -> dict:
    st = rt.status()["sync"]
    assert st is not None, "status: sync is null although upstream is enabled"
    return st


async def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


def names(server: str | None, port: int) -> bool:
    """The status's `server` names the broker of this port (and no longer port)."""
    return server is not None and re.search(rf":{port}(?!\d)", server) is not None


def stored(data_dir: Path) -> dict[int, int]:
    """seq -> samples of every unit the store holds (docs/store.md, Layout: `units(id, ..., n)`;
    the id serves as the upstream sequence number)."""
    db = sqlite3.connect(f"{(data_dir / 'edgeos.db').as_uri()}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT id, n FROM units"))
    finally:
        db.close()


def received(*gots) -> dict[int, int]:
    """seq -> samples, once per (gateway, seq), over every subscriber given."""
    from edgeos import wire

    dedup = wire.Deduplicator()
    out: dict[int, int] = {}
    for got in gots:
        for m in got.messages:
            assert m.gateway == GW
            for seq, unit in zip(m.seqs, m.units, strict=True):
                if dedup.first_time(m.gateway, seq):
                    out[seq] = len(unit.ts)
    return out


async def assert_everything_delivered(rt: Runtime, data_dir: Path, *gots, at_least: int = 10) -> dict[int, int]:
    """After the gateway stopped: every unit the store holds at or below the cursor the sync
    reached was received once (after deduplication by (gateway, seq)) with its samples, and
    nothing was received that the store does not hold (docs/payload.md: "Exactly-once results
    with the (gateway, seq) key ... then every committed sample counts once")."""
    cursor = sync(rt)["cursor"]
    held = stored(data_dir)
    assert len(held) >= at_least, f"only {len(held)} units stored"
    want = {s for s in held if s <= cursor}
    assert len(want) >= at_least, f"the sync's cursor stayed at {cursor} of {max(held)}"
    await wait_until(lambda: want <= set(received(*gots)), 10, "the subscribers have every forwarded unit")
    got = received(*gots)
    assert set(got) <= set(held), f"received seqs the store never held: {sorted(set(got) - set(held))[:10]}"
    bad = {s: (got[s], held[s]) for s in want if got[s] != held[s]}
    assert not bad, f"samples per unit differ (received, stored): {bad}"
    return got


def check(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([EDGEOS, "check", "-c", str(cfg)], capture_output=True, text=True, timeout=60)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("edgeos_sync_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# --------------------------------------------------------------------------- IPv6


@pytest.mark.parametrize("form", ["[::1]:PORT", "[::1] with port"])
async def test_an_ipv6_broker_in_brackets_gets_every_seq(tmp_path, make_broker, subscribe, form):
    """docs/config.md `servers`: "`[v6 address]:port` for IPv6" (and "An entry without `:port`
    takes `port`"). The broker listens on [::1] at a port nothing listens on at 127.0.0.1 (its
    other listener, on 127.0.0.1, is the subscriber's); the gateway reaches it by the v6 entry."""
    p6 = free_port("::1")
    assert port_free("127.0.0.1", p6)
    b = make_broker(extra=[f"listener {p6} ::1"])
    upstream = f'servers = ["[::1]:{p6}"]' if form == "[::1]:PORT" else f'servers = ["[::1]"]\nport = {p6}'
    cfg = write_gateway(tmp_path, upstream)
    async with subscribe(b) as got:
        async with gateway(cfg) as rt:
            await wait_until(lambda: sync(rt)["published_messages"] >= 20, 15, "20 messages acknowledged over ::1")
            st = sync(rt)
            assert st["state"] == "connected" and st["connects"] >= 1, st
            assert names(st["server"], p6) and f"[::1]:{p6}" in st["server"], st["server"]
        await assert_everything_delivered(rt, tmp_path / "data", got)


# --------------------------------------------------------------------------- ports


async def test_an_entry_without_port_takes_port(tmp_path, make_broker, subscribe):
    """docs/config.md `servers`: "An entry without `:port` takes `port`"."""
    b = make_broker()
    cfg = write_gateway(tmp_path, f'servers = ["127.0.0.1"]\nport = {b.port}')
    async with subscribe(b) as got:
        async with gateway(cfg) as rt:
            await wait_until(lambda: sync(rt)["published_messages"] >= 20, 15, "20 messages acknowledged")
            assert names(sync(rt)["server"], b.port), sync(rt)["server"]
        await assert_everything_delivered(rt, tmp_path / "data", got)


async def test_an_entry_without_port_and_no_port_takes_1883(tmp_path, make_broker, subscribe):
    """docs/config.md `servers`: "An entry without `:port` takes `port` (else 1883 ...)".
    Our own mosquitto on 127.0.0.2:1883 (the machine's own broker, if any, is on 127.0.0.1 and
    is never reached: the entry names 127.0.0.2)."""
    if not port_free("127.0.0.2", 1883):
        pytest.fail("127.0.0.2:1883 is taken: this test needs it for its own mosquitto")
    b = make_broker(extra=["listener 1883 127.0.0.2"])
    cfg = write_gateway(tmp_path, 'servers = ["127.0.0.2"]')
    async with subscribe(b) as got:
        async with gateway(cfg) as rt:
            await wait_until(lambda: sync(rt)["published_messages"] >= 10, 15, "10 messages acknowledged")
            assert names(sync(rt)["server"], 1883) and "127.0.0.2" in sync(rt)["server"], sync(rt)["server"]
        await assert_everything_delivered(rt, tmp_path / "data", got)


async def test_an_entry_without_port_with_tls_takes_8883(tmp_path, make_broker, subscribe, certs):
    """docs/config.md `servers`: "An entry without `:port` takes `port` (else 1883, 8883 with
    TLS)"; "TLS and credentials apply to all" (the TLS listener is the only one the entry names).
    Our own mosquitto with a TLS listener on 127.0.0.2:8883 (certificate for IP 127.0.0.2)."""
    if not port_free("127.0.0.2", 8883):
        pytest.fail("127.0.0.2:8883 is taken: this test needs it for its own mosquitto")
    c = certs(tmp_path / "pki", "IP:127.0.0.2")
    b = make_broker(
        extra=["listener 8883 127.0.0.2", f"cafile {c['ca']}", f"certfile {c['cert']}", f"keyfile {c['key']}"]
    )
    (tmp_path / "ca.pem").write_bytes(c["ca"].read_bytes())
    cfg = write_gateway(tmp_path, 'servers = ["127.0.0.2"]\ntls = true\nca_file = "ca.pem"')
    async with subscribe(b) as got:
        async with gateway(cfg) as rt:
            await wait_until(lambda: sync(rt)["published_messages"] >= 10, 15, "10 messages acknowledged over TLS")
            assert names(sync(rt)["server"], 8883), sync(rt)["server"]
        await assert_everything_delivered(rt, tmp_path / "data", got)


async def test_host_and_port_still_work(tmp_path, make_broker, subscribe):
    """docs/config.md `servers`: "`host`/`port` still work (one broker)"."""
    b = make_broker()
    cfg = write_gateway(tmp_path, f'host = "127.0.0.1"\nport = {b.port}')
    r = check(cfg)
    assert r.returncode == 0 and "not used" not in r.stdout + r.stderr, r.stdout + r.stderr
    async with subscribe(b) as got:
        async with gateway(cfg) as rt:
            await wait_until(lambda: sync(rt)["published_messages"] >= 10, 15, "10 messages acknowledged")
            assert names(sync(rt)["server"], b.port), sync(rt)["server"]
        await assert_everything_delivered(rt, tmp_path / "data", got)


# --------------------------------------------------------------------------- host is not used


def test_check_warns_that_host_is_not_used_with_servers(tmp_path):
    """docs/config.md `servers`: "with `servers` given, `host` is not used (a warning says so)";
    `edgeos check` validates a config. Control: the same config without `host` has no warning."""
    cfg = write_gateway(tmp_path, 'host = "10.11.12.13"\nservers = ["127.0.0.1:1884"]')
    r = check(cfg)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    warned = [ln for ln in out.splitlines() if "upstream.host" in ln and "servers" in ln]
    assert warned and "not used" in warned[0], out
    cfg = write_gateway(tmp_path, 'servers = ["127.0.0.1:1884"]')
    r = check(cfg)
    assert r.returncode == 0 and "upstream.host" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_load_warns_in_the_log_that_host_is_not_used(tmp_path, caplog):
    """The same warning reaches the log of a program that embeds edgeos (a WARNING record)."""
    caplog.set_level(logging.DEBUG)
    load_config(write_gateway(tmp_path, 'host = "10.11.12.13"\nservers = ["127.0.0.1:1884"]'))
    warned = [r for r in caplog.records if "host" in r.getMessage() and "servers" in r.getMessage()]
    assert warned and warned[0].levelno == logging.WARNING, [r.getMessage() for r in caplog.records]
    caplog.clear()
    load_config(write_gateway(tmp_path, 'servers = ["127.0.0.1:1884"]'))  # control
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records


async def test_with_servers_host_and_its_port_are_never_connected(tmp_path, make_broker, subscribe, dead_port):
    """docs/config.md `servers`: "with `servers` given, `host` is not used". `host`/`port`
    name a running broker; `servers` names a closed port only: the gateway must never connect."""
    b = make_broker()
    cfg = write_gateway(tmp_path, f'host = "127.0.0.1"\nport = {b.port}\nservers = ["127.0.0.1:{dead_port}"]')
    async with subscribe(b) as got:
        async with gateway(cfg) as rt:
            await wait_until(lambda: sync(rt)["failures"] >= 3, 10, "three refused attempts")
            await asyncio.sleep(0.5)
            st = sync(rt)
        assert st["connects"] == 0 and st["published_messages"] == 0, st
        assert not got.messages, "the broker of host/port received data"


def test_the_warning_is_a_log_line_of_the_chosen_format(tmp_path):
    """docs/operations.md, Logs: "One line per event: level, logger, device, a low-cardinality
    code, message" and "`json` is for log shippers (one object per line ...)". The host-not-used
    warning of docs/config.md is an event of `edgeos run` like any other: with `--log-format
    json`, every line on stderr is a JSON object, and the warning's level is `warning`."""
    cfg = write_gateway(tmp_path, f'host = "10.11.12.13"\nservers = ["127.0.0.1:{free_port()}"]')
    proc = subprocess.Popen([EDGEOS, "run", "-c", str(cfg), "--log-format", "json"], stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    not_json = []
    objects = []
    for line in err.splitlines():
        try:
            objects.append(json.loads(line))
        except ValueError:
            not_json.append(line)
    assert not not_json, f"lines of `edgeos run --log-format json` that are not JSON objects: {not_json}"
    warned = [o for o in objects if "host" in o.get("message", "") and "servers" in o.get("message", "")]
    assert warned and warned[0]["level"] == "warning", objects


# --------------------------------------------------------------------------- failover


async def test_a_closed_first_server_is_passed_over(tmp_path, make_broker, subscribe, dead_port):
    """docs/config.md `servers`: "brokers tried in turn: after a lost connection or a refused
    CONNACK the next one"; the first server's port is closed. docs/metrics.md:
    `edgeos_sync_connects_total`, `edgeos_sync_reconnects_total`: "broker connections made; lost
    or refused"; `edgeos_sync_connected`: "1 while connected to the broker"."""
    b = make_broker()
    http = free_port()
    cfg = write_gateway(tmp_path, f'servers = ["127.0.0.1:{dead_port}", "127.0.0.1:{b.port}"]', http_port=http)
    async with subscribe(b) as got:
        async with gateway(cfg) as rt:
            await wait_until(lambda: sync(rt)["published_messages"] >= 20, 15, "20 messages acknowledged")
            st = sync(rt)
            assert names(st["server"], b.port), st
            assert st["failures"] >= 1, "the first (closed) server was not tried first"
            assert str(dead_port) in (st["last_error"] or ""), st["last_error"]
            metrics = await asyncio.to_thread(scrape, http)
        await assert_everything_delivered(rt, tmp_path / "data", got)
    assert metrics.get("edgeos_sync_connects_total") == 1.0, metrics
    assert metrics.get("edgeos_sync_reconnects_total", 0) >= 1.0, metrics
    assert metrics.get("edgeos_sync_connected") == 1.0, metrics


async def test_at_start_the_next_server_is_tried_at_once(tmp_path, make_broker, caplog, dead_port):
    """docs/reliability.md: "**The next broker of the list is tried at once.** With several
    `servers`, only the first try of a round of the list waits the jittered backoff ...; the
    other brokers of the round follow within a quarter of `reconnect_min`." At start the first
    server's port is closed: the second (running) server is the next broker of the first round,
    and with `reconnect_min` 2 s it must be connected within 0.5 s (+ 0.5 s slack) of the first
    server's refusal, not after a backoff."""
    b = make_broker()
    cfg = write_gateway(tmp_path, f'servers = ["127.0.0.1:{dead_port}", "127.0.0.1:{b.port}"]')
    text = cfg.read_text().replace('reconnect_min = "50ms"\nreconnect_max = "300ms"', "")
    cfg.write_text(text + 'reconnect_min = "2s"\nreconnect_max = "4s"\n')
    caplog.set_level(logging.INFO, logger="edgeos")
    async with gateway(cfg) as rt:
        await wait_until(lambda: sync(rt)["connects"] >= 1, 10, "a connection")
        connected_at = time.time()
        assert names(sync(rt)["server"], b.port), sync(rt)
    tried = [r.created for r in caplog.records if f":{dead_port}" in r.getMessage()]
    assert tried, "no log line names the closed server"
    assert connected_at - tried[0] < 0.5 + 0.5, (
        f"the next server was connected {connected_at - tried[0]:.2f} s after the first one's refusal"
    )


async def test_a_refused_connack_goes_to_the_next_and_credentials_apply_to_all(tmp_path, make_broker, subscribe):
    """docs/config.md `servers`: "after ... a refused CONNACK the next one ...; TLS and
    credentials apply to all". Both brokers require a password; the first knows another one."""
    first = make_broker(users={"gw": "an-older-one"})
    second = make_broker(users={"gw": "right", "central": "c"})
    (tmp_path / "pw").write_text("right\n")
    (tmp_path / "pw").chmod(0o600)
    cfg = write_gateway(
        tmp_path,
        f'servers = ["127.0.0.1:{first.port}", "127.0.0.1:{second.port}"]\nusername = "gw"\npassword_file = "pw"',
    )
    async with subscribe(second, username="central", password="c") as got:
        async with gateway(cfg) as rt:
            await wait_until(lambda: sync(rt)["published_messages"] >= 10, 15, "10 messages acknowledged")
            st = sync(rt)
            assert names(st["server"], second.port) and st["failures"] >= 1, st
        await assert_everything_delivered(rt, tmp_path / "data", got)


async def test_a_lost_broker_passes_the_stream_to_the_next_in_turn(tmp_path, make_broker, subscribe):
    """docs/config.md `servers`: "brokers tried in turn: after a lost connection ... the next
    one". Three running brokers; each is stopped in turn mid-stream. After A is lost the gateway
    goes to B (not C); after B is lost, to C, although A is up again; after C is lost, round to
    A. docs/payload.md: at least once, and "Exactly-once results with the (gateway, seq) key":
    the union of what the three subscribers received, deduplicated, is every forwarded unit."""
    a, b, c = make_broker(), make_broker(), make_broker()
    cfg = write_gateway(tmp_path, f"servers = {json.dumps([f'127.0.0.1:{x.port}' for x in (a, b, c)])}")

    async def lose_and_follow(rt, lost, nxt, others: list) -> None:
        before = sync(rt)["connects"]
        lost.stop()
        await wait_until(lambda: sync(rt)["connects"] > before, 10, f"a new connection after losing :{lost.port}")
        first = sync(rt)["server"]
        assert names(first, nxt.port), f"after losing :{lost.port} the gateway went to {first}, not :{nxt.port}"
        base = sync(rt)["published_messages"]
        await wait_until(lambda: sync(rt)["published_messages"] >= base + 10, 10, f"data through :{nxt.port}")
        st = sync(rt)
        assert names(st["server"], nxt.port), st["server"]

    async with subscribe(a) as ga, subscribe(b) as gb, subscribe(c) as gc:
        async with gateway(cfg) as rt:
            await wait_until(lambda: sync(rt)["published_messages"] >= 10, 15, "data through the first broker")
            assert names(sync(rt)["server"], a.port), sync(rt)["server"]
            await lose_and_follow(rt, a, b, [c])
            await asyncio.sleep(0.3)
            assert not gc.messages, "the third broker got data while the second was the next in turn"
            a.start()
            await lose_and_follow(rt, b, c, [a])
            await lose_and_follow(rt, c, a, [b])
            st = sync(rt)
            assert st["connects"] == 4, st
        b.start()
        c.start()  # their subscribers' persistent sessions get what the brokers queued
        got = await assert_everything_delivered(rt, tmp_path / "data", ga, gb, gc, at_least=40)
    for g in (ga, gb, gc):
        assert g.messages, "a broker of the list carried nothing"
    assert len(got) >= 40


# --------------------------------------------------------------------------- status and check


def test_status_json_names_the_connected_server(tmp_path, make_broker, dead_port):
    """docs/store.md, `edgeos status --json`: `sync` holds `connects`, `failures`, `server`
    (README: `edgeos status --format json`, `--json` too). With the first server closed, the
    running daemon's status names the second one, the one connected."""
    b = make_broker()
    cfg = write_gateway(tmp_path, f'servers = ["127.0.0.1:{dead_port}", "127.0.0.1:{b.port}"]')
    proc = subprocess.Popen([EDGEOS, "run", "-c", str(cfg)], stderr=subprocess.PIPE, text=True)
    try:
        doc = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = subprocess.run([EDGEOS, "status", "--json", "-c", str(cfg)], capture_output=True, text=True, timeout=30)
            with contextlib.suppress(ValueError):
                doc = json.loads(r.stdout)
                if doc.get("running") and (doc.get("sync") or {}).get("published_messages", 0) > 0:
                    break
            time.sleep(0.2)
        assert doc and doc.get("running"), doc
        st = doc["sync"]
        assert st["state"] == "connected" and st["connects"] >= 1 and st["failures"] >= 1, st
        assert names(st["server"], b.port) and not names(st["server"], dead_port), st["server"]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err


MALFORMED = {
    "host:notaport": '["127.0.0.1:notaport"]',
    "unclosed bracket": '["[::1"]',
    "text after the bracket": '["[::1]x"]',
    "a second bracket": '["[::1]]:1883"]',
    "IPv6 without brackets": '["::1"]',  # the doc since 208d73e: "an address with colons must be in brackets"
    "IPv6 and port without brackets": '["::1:1883"]',
    "IPv4 in brackets": '["[127.0.0.1]:1883"]',  # "only an IPv6 address may be" (in brackets)
    "port above 65535": '["127.0.0.1:65536"]',
    "port 0": '["127.0.0.1:0"]',
    "empty entry": '[""]',
    "empty list": "[]",
    "a number": "[1883]",
    "not a list": '"127.0.0.1:1883"',
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_check_refuses_a_malformed_servers_entry(tmp_path, case):
    """docs/config.md: "The whole file is checked at load ... the daemon refuses to start while
    any [problem] remains"; "Messages name the place: `FILE: KEY.PATH: found X, expected Y`";
    `servers` is a "list of `"host:port"`" with "`[v6 address]:port` for IPv6".
    `edgeos check --help`: "Exit code 2 and one line per problem when the config is invalid"."""
    value = MALFORMED[case]
    cfg = write_gateway(tmp_path, f"servers = {value}")
    r = check(cfg)
    out = r.stdout + r.stderr
    assert r.returncode == 2, f"{case}: exit {r.returncode}:\n{out}"
    lines = [ln for ln in out.splitlines() if re.search(r"upstream\.servers(\[\d+\])?: found .+, expected .+", ln)]
    assert lines, f"{case}: no `FILE: upstream.servers: found X, expected Y` line:\n{out}"
    assert "edgeos.toml" in lines[0], lines[0]
    entry = json.loads(value)
    if isinstance(entry, list) and entry and isinstance(entry[0], str) and entry[0]:
        assert entry[0] in lines[0], f"{case}: the entry is not named: {lines[0]}"


def test_every_malformed_entry_is_reported_in_one_pass(tmp_path):
    """docs/config.md: "Every problem is reported in one pass". Two malformed entries of
    `servers` are two problems: both are named."""
    cfg = write_gateway(tmp_path, 'servers = ["127.0.0.1:notaport", "127.0.0.1:70000"]')
    r = check(cfg)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "127.0.0.1:notaport" in out and "127.0.0.1:70000" in out, out


def test_run_refuses_a_malformed_servers_entry(tmp_path):
    """docs/config.md: "the daemon refuses to start while any [problem] remains"."""
    cfg = write_gateway(tmp_path, 'servers = ["127.0.0.1:notaport"]')
    r = subprocess.run([EDGEOS, "run", "-c", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "upstream.servers" in r.stdout + r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "data" / "edgeos.db").exists(), "the daemon opened its store with an invalid config"
