"""Faults of real peers on real wires: late answers, per-device timeouts on a shared connection,
a connection that goes silent, refused ranges, busy devices, silence counted per poll group,
exclusive serial ports, write limits and exact 64-bit writes. Faults pymodbus's server cannot
make come from a small hand-written server (`RawModbusPeer`, tests/peers/modbus.py)."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
import time

import edgeos_test_peers_modbus as peers  # tests/peers/modbus.py, loaded by conftest.py
import numpy as np
import pytest
from edgeos.protocols.modbus import transport
from typer.testing import CliRunner

from edgeos import DeviceError, Quality, plugins
from edgeos.cli import app


def device(*args, retries: int = 0, **kw) -> str:
    """These tests fail fast: no retries unless asked for."""
    return peers.device(*args, retries=retries, **kw)


def modbus() -> plugins.ProtocolPlugin:
    return plugins.load(plugins.PROTOCOLS, "modbus")


def rows(batch) -> list[tuple[int, float, int]]:
    return list(zip(batch.tags.tolist(), batch.values.tolist(), batch.quality.tolist(), strict=True))


async def raw_endpoint(kind: str, raw_peer, pty_pair):
    """A hand-written peer of framing `kind` (tcp, rtu_over_tcp, or rtu on a pty) and the
    transport endpoint that reaches it."""
    if kind == "rtu":
        peer = await raw_peer("rtu", pty=pty_pair.a)
        return peer, transport.Endpoint("rtu", pty_pair.b, 0, (115200, "N", 8, 1), 0.00175)
    peer = await raw_peer("rtu" if kind == "rtu_over_tcp" else "socket")
    return peer, transport.Endpoint(kind, "127.0.0.1", peer.port)


# -- 1. RTU: a late answer is never taken for the next request's ---------------------------


@pytest.mark.parametrize("kind", ["tcp", "rtu_over_tcp", "rtu"])
async def test_a_late_answer_is_never_taken_for_the_next_request(kind, raw_peer, pty_pair):
    peer, ep = await raw_endpoint(kind, raw_peer, pty_pair)
    # The first answer comes 0.3 s after its request: after the client gave up (0.2 s), while
    # the next request, same unit, function and count, is due. RTU frames carry nothing else
    # that tells the two answers apart.
    peer.late[1] = 0.3
    link = transport.acquire("d", ep)
    try:
        await link.connect("d", 0.2)
        with pytest.raises(transport.ResponseTimeout):
            await link.read("d", 1, "hr", 0, 2, 0.2, 0)
        for _ in range(2):
            try:
                got = await link.read("d", 1, "hr", 100, 2, 0.2, 0)
            except (transport.ResponseTimeout, transport.BadResponse):
                got = None  # Bad is allowed; stale values are not
            assert got in ([1100, 1101], None)
        assert await link.read("d", 1, "hr", 200, 2, 0.5, 0) == [1200, 1201]
        assert [r[3] for r in peer.requests[:2]] == [0, 100]
        if kind != "tcp":
            assert link.drained >= 1
    finally:
        transport.release(link)


@pytest.mark.parametrize("kind", ["tcp", "rtu_over_tcp", "rtu"])
async def test_a_garbled_answer_or_another_units_never_becomes_values(kind, raw_peer, pty_pair):
    # An answer from another unit, and on RTU framing a frame with a bad CRC, is discarded
    # while the answer is awaited, as the serial-line specification has a master do (pymodbus
    # does so on Modbus TCP too): no valid answer in time is a timeout, never values.
    peer, ep = await raw_endpoint(kind, raw_peer, pty_pair)
    if kind != "tcp":
        peer.garble.add(1)
    peer.as_unit[2] = 7
    link = transport.acquire("d", ep)
    try:
        await link.connect("d", 0.2)
        outcomes = []
        for address in (0, 100, 200):
            try:
                outcomes.append(await link.read("d", 1, "hr", address, 2, 0.2, 0))
            except (transport.ResponseTimeout, transport.BadResponse) as e:
                outcomes.append(type(e).__name__)
        first = [1000, 1001] if kind == "tcp" else "ResponseTimeout"  # Modbus TCP has no CRC
        assert outcomes == [first, "ResponseTimeout", [1200, 1201]]
    finally:
        transport.release(link)


# -- 2. each device's own timeout on a shared connection -----------------------------------


async def test_each_device_keeps_its_own_timeout_on_a_shared_connection(raw_peer, modbus_config):
    peer = await raw_peer()
    tag = '{ name = "a", address = "hr0" }'
    cfg = modbus_config(
        device(peer.port, tag, name="fast", unit=1, timeout="100ms")
        + device(peer.port, tag, name="slow", unit=2, timeout="2s")
    )
    fast, slow = (modbus().create(d) for d in cfg.devices)
    await fast.connect()  # the first device opens the shared connection
    await slow.connect()
    try:
        assert fast.link is slow.link
        peer.late[1] = 0.5  # longer than fast's timeout, well within slow's
        t0 = time.monotonic()
        (batch,) = [await slow.read(g, time.time_ns()) for g in slow.poll_groups()]
        assert rows(batch)[0][1:] == (1000.0, Quality.GOOD) and time.monotonic() - t0 >= 0.45
        peer.late[2] = 0.5
        t0 = time.monotonic()
        (batch,) = [await fast.read(g, time.time_ns()) for g in fast.poll_groups()]
        assert rows(batch)[0][2] == Quality.BAD_TIMEOUT and time.monotonic() - t0 < 0.4
    finally:
        await fast.close()
        await slow.close()
    assert transport.open_links() == 0


# -- 3. a silent shared connection is rebuilt for every device on it -----------------------


async def test_a_silent_shared_connection_is_rebuilt_for_every_device(raw_peer, modbus_config, run_runtime):
    peer = await raw_peer()
    peer.hang_after[1] = 4  # the first connection answers 4 requests, then stays open and silent
    tag = '{ name = "a", address = "hr0" }'
    # "u2" never gives up on its own (reconnect_after = 1000) and keeps the connection referenced:
    # only "u1" restarts, and its restart must give both a fresh socket.
    body = device(peer.port, tag, "reconnect_after = 2", name="u1", unit=1, timeout="100ms")
    body += device(peer.port, tag, "reconnect_after = 1000", name="u2", unit=2, timeout="100ms")
    cfg = modbus_config(body)
    sink = peers.Collect(cfg)
    rt = await run_runtime(
        cfg, sinks=[sink], timeout=10, until=lambda rt: sink.recovered("u1/a") and sink.recovered("u2/a")
    )
    assert peer.connections == 2
    assert rt.devices["u1"].failures >= 1 and "no device on this connection answered" in rt.devices["u1"].last_error
    assert rt.devices["u2"].failures == 0  # it simply got the new connection
    assert transport.open_links() == 0


async def test_a_dead_unit_alone_does_not_rebuild_a_shared_connection(tcp_peer, modbus_config, peer_module):
    peer = await tcp_peer({1: peer_module.UnitMap(), 2: peer_module.UnitMap()})
    peer.silent.add(2)
    tag = '{ name = "a", address = "hr0" }'
    cfg = modbus_config(
        device(peer.port, tag, "reconnect_after = 1", name="ok", unit=1, timeout="100ms")
        + device(peer.port, tag, "reconnect_after = 1", name="dead", unit=2, timeout="50ms")
    )
    ok, dead = (modbus().create(d) for d in cfg.devices)
    await ok.connect()
    await dead.connect()
    try:
        (g_ok,), (g_dead,) = ok.poll_groups(), dead.poll_groups()
        await ok.read(g_ok, time.time_ns())
        with pytest.raises(DeviceError, match="no answer from unit 2") as info:
            await dead.read(g_dead, time.time_ns())
        assert "reconnecting it" not in str(info.value)
        await ok.read(g_ok, time.time_ns())
        assert ok.link.rebuilds == 0 and peer.connections == 1
    finally:
        await ok.close()
        await dead.close()


async def test_a_server_that_never_answers_is_down_not_recovered(tcp_peer, modbus_config, run_runtime, caplog):
    """The TCP connection is accepted, no request is answered: every poll is all BadTimeout.
    That is no success, no recovery, and the device is down for /healthz, device_up and status,
    however often its connection is made again."""
    import logging

    from edgeos.service.health import evaluate
    from edgeos.service.metrics import Metrics

    peer = await tcp_peer()
    peer.silent.add(1)
    cfg = modbus_config(
        device(peer.port, '{ name = "a", address = "hr0" }', "reconnect_after = 2", timeout="50ms")
        + '[health]\ndevice_down = "1s"\n'
    )
    caplog.set_level(logging.INFO, logger="edgeos")
    seen: dict[str, object] = {}

    def unhealthy(rt) -> bool:
        h = evaluate(rt)
        # Down while connected (not only between its reconnects): the silence says it, not the state.
        if h["status"] == "unhealthy" and rt.devices["plc"].state == "running":
            seen["health"] = h
            seen["scrape"] = Metrics(rt).render().decode()
            seen["status"] = rt.status()
            return True
        return False

    rt = await run_runtime(cfg, until=unhealthy, timeout=10)
    st = rt.devices["plc"]
    assert st.connects >= 2 and st.failures >= 2  # it kept connecting, and kept giving up
    assert st.last_ok_ns == 0 and st.samples > 0  # Bad samples stored, no value read
    (problem,) = seen["health"]["problems"]
    assert problem["check"] == "device_down" and problem["device"] == "plc" and problem["state"] == "running"
    assert 'edgeos_device_up{device="plc"} 0' in seen["scrape"]
    assert 'edgeos_device_last_success_timestamp_seconds{device="plc"} 0.0' in seen["scrape"]
    assert seen["status"]["devices"]["plc"]["up"] is False
    assert not [r for r in caplog.records if "producing again" in r.getMessage()]
    # The adapter's own timeout lines carry the device field, as the runtime's do.
    timeouts = [r for r in caplog.records if "no response within" in r.getMessage()]
    assert timeouts and all(getattr(r, "device", None) == "plc" for r in timeouts)


async def test_a_device_that_refuses_every_tag_is_up_it_answers(tcp_peer, modbus_config, run_runtime, caplog):
    """Refusals are answers: every sample Bad (exception 2), but the device is up and its last
    success moves (its tags are reported refused, not the device down)."""
    import logging

    caplog.set_level(logging.INFO, logger="edgeos")
    peer = await tcp_peer()
    peer.refuse[(1, "hr", 0)] = 2
    cfg = modbus_config(device(peer.port, '{ name = "a", address = "hr0" }'))
    rt = await run_runtime(cfg, until=lambda rt: rt.devices["plc"].samples >= 5, timeout=10)
    st = rt.devices["plc"]
    assert st.last_ok_ns > 0 and not st.silent and st.failures == 0
    (line,) = [r for r in caplog.records if "refused alone" in r.getMessage()]
    assert (line.device, line.code) == ("plc", "refused")


@pytest.mark.parametrize("fault", ["closed", "silent"])
async def test_a_device_whose_every_tag_is_refused_goes_down_with_its_server(
    tcp_peer, modbus_config, fault, monkeypatch
):
    """Every tag held refused, next probe 10 minutes away: the polls ask nothing. The server
    then goes (`closed`), or stops answering with its connection open (`silent`: a hung
    gateway, a half-open socket). The device must not pass for one that answers meanwhile:
    once it has not answered for ALIVE_PROBE_MIN_S (1 s here), one held request is asked early
    (not at every poll, though `reconnect_after = 1`); a refusal keeps the device up without
    moving the tag's probe; no answer, or no connection, takes it down."""
    from edgeos.protocols.modbus import adapter as modbus_adapter

    from edgeos.runtime import Runtime

    monkeypatch.setattr(modbus_adapter, "ALIVE_PROBE_MIN_S", 1.0)
    peer = await tcp_peer()
    peer.refuse[(1, "hr", 0)] = 2
    extra = 'retry_refused = "10m"\nreconnect_after = 1'
    cfg = modbus_config(device(peer.port, '{ name = "a", address = "hr0" }', extra, timeout="100ms"))
    rt = Runtime(cfg)
    task = asyncio.create_task(rt.run())
    try:
        async with asyncio.timeout(15):
            await rt.running.wait()
            st = rt.devices["plc"]
            while not (st.up and st.adapter.health()["refused_tags"]):
                await asyncio.sleep(0.02)
            asked = st.adapter.health()["requests"]
            polls = st.batches
            t0 = time.monotonic()
            while time.monotonic() - t0 < 2.5:  # asked early, refused again: up
                await asyncio.sleep(0.02)
                assert st.up
            h = st.adapter.health()
            assert st.batches - polls >= 40  # 50 ms polls
            assert h["requests"] - asked in (2, 3), (h["requests"], asked)  # about once a second, not every poll
            (ref,) = st.adapter.state.refused.values()
            assert ref.delay_s == 600.0  # the early asks did not move the probe's schedule
            if fault == "closed":
                await peer.stop()
            else:
                peer.silent.add(1)
            while st.up:
                await asyncio.sleep(0.02)
        if fault == "closed":  # seen by the next early ask, or by the check of a poll that asked nothing
            assert st.failures >= 1 and st.last_error_code in ("connect", "connection_lost"), st.last_error
        else:
            assert st.silent or st.state != "running"
    finally:
        rt.stop()
        await asyncio.wait_for(task, 15)


async def test_a_held_group_is_not_asked_early_while_another_group_answers(
    tcp_peer, modbus_config, run_runtime, monkeypatch
):
    """Poll group `a` (50 ms) has its only tag held refused; group `b` (100 ms) answers. The
    device plainly answers, so `a`'s refused address is asked only on its own schedule (10
    minutes), not early, though `reconnect_after = 1`."""
    from edgeos.protocols.modbus import adapter as modbus_adapter

    monkeypatch.setattr(modbus_adapter, "ALIVE_PROBE_MIN_S", 1.0)
    peer = await tcp_peer()
    peer.refuse[(1, "hr", 0)] = 2
    tags = '{ name = "a", address = "hr0" },\n{ name = "b", address = "hr10", poll_interval = "100ms" }'
    cfg = modbus_config(device(peer.port, tags, 'retry_refused = "10m"\nreconnect_after = 1'))
    marks: dict[str, float] = {}

    def until(rt) -> bool:
        st = rt.devices["plc"]
        if "held" not in marks:
            if st.adapter is not None and st.adapter.health()["refused_tags"]:
                marks["held"] = time.monotonic()
                marks["asked"] = sum(1 for r in peer.requests if r[2] == 0)
            return False
        assert st.up
        return time.monotonic() - marks["held"] > 2.5

    rt = await run_runtime(cfg, until=until, timeout=15)
    assert sum(1 for r in peer.requests if r[2] == 0) == marks["asked"]  # not asked again
    assert sum(1 for r in peer.requests if r[2] == 10) >= 20 and rt.devices["plc"].failures == 0


@pytest.mark.parametrize("code", [10, 11])
async def test_a_unit_a_gateway_cannot_reach_is_down(tcp_peer, modbus_config, run_runtime, code):
    """A TCP-to-RTU gateway answers for its unit with exception 10 (path unavailable) or 11
    (target failed to respond): the unit did not answer. Its tags are BadCommunicationError,
    the device is down while the gateway's connection stays up, and after `reconnect_after`
    such polls it restarts, as a silent unit on a line of our own would."""
    peer = await tcp_peer()
    tags = '{ name = "a", address = "hr0" },\n{ name = "b", address = "hr200" }'  # two requests
    cfg = modbus_config(device(peer.port, tags, "reconnect_after = 3"))
    seen: dict[str, object] = {}

    def until(rt) -> bool:
        st = rt.devices["plc"]
        if "up" not in seen:
            if st.up and st.last_ok_ns:
                seen["up"] = True
                seen["from"] = len(peer.requests)
                peer.refuse[(1, "hr", 0)] = code
            return False
        if st.state == "running" and not st.up:
            seen["down while connected"] = True
        return bool(seen.get("down while connected")) and st.failures >= 1

    rt = await run_runtime(cfg, until=until, timeout=10)
    st = rt.devices["plc"]
    assert st.last_error_code == "timeout" and "no answer from unit 1 for 3 polls" in st.last_error, st.last_error
    assert st.adapter.health()["exceptions"] >= 3
    # After the gateway's no, hr200 is not asked in that poll: one wait per poll, not per request.
    after = peer.requests[seen["from"] + 1 :]  # (one poll may have been under way)
    assert [r for r in after if r[2] == 0] and not [r for r in after if r[2] == 200], after


async def test_a_gateway_no_to_one_request_leaves_the_rest_of_the_poll_asked(tcp_peer, modbus_config, run_runtime):
    """The gateway answers exception 11 to hr200 only (its own timeout shorter than the unit
    needs for that read) while the unit answers hr0 and hr400: only hr200's tag is Bad
    (BadCommunicationError); hr400 is still asked, and the device, answering, is up."""
    peer = await tcp_peer()
    tags = '{ name = "a", address = "hr0" },\n{ name = "b", address = "hr200" },\n{ name = "c", address = "hr400" }'
    cfg = modbus_config(device(peer.port, tags, "reconnect_after = 3"))
    peer.refuse[(1, "hr", 200)] = 11
    sink = peers.Collect(cfg)
    looks: list[bool] = []

    def until(rt) -> bool:
        st = rt.devices["plc"]
        if st.batches >= 3:
            looks.append(st.up)
        return st.batches >= 20

    rt = await run_runtime(cfg, until=until, timeout=10, sinks=[sink])
    assert looks and all(looks) and rt.devices["plc"].failures == 0, looks
    assert len([r for r in peer.requests if r[2] == 400]) >= 19
    assert {q for _, _, q in sink.rows["plc/b"]} == {Quality.BAD_COMM_FAILURE}
    assert {q for _, _, q in sink.rows["plc/a"] + sink.rows["plc/c"]} == {Quality.GOOD}


class _OneShotRefuse(dict):
    """`peer.refuse` whose entries serve one request, then are gone (a gateway's passing no)."""

    def items(self):
        it = list(super().items())
        self.clear()
        return it


class _OneShotSilent(set):
    """`peer.silent` whose units stay silent for one request."""

    def __contains__(self, unit) -> bool:
        if super().__contains__(unit):
            self.discard(unit)
            return True
        return False


@pytest.mark.parametrize("fault", ["timeout", "gateway11"])
async def test_one_missed_answer_is_re_sent_and_unseen(tcp_peer, modbus_config, run_runtime, monkeypatch, fault):
    """`retries = 2`: one missed answer, our own timeout or a gateway's exception 11 (its unit
    did not answer it), is re-sent; the device never goes down and no tag is Bad."""
    from edgeos.runtime import DeviceState

    downs: list[str] = []
    plain = DeviceState.__setattr__

    def spy(self, key, value):  # every time the device is marked silent, however briefly
        plain(self, key, value)
        if key == "silent" and value:
            downs.append(self.name)

    monkeypatch.setattr(DeviceState, "__setattr__", spy)
    peer = await tcp_peer()
    tags = '{ name = "a", address = "hr0" },\n{ name = "b", address = "hr200" }'
    cfg = modbus_config(device(peer.port, tags, "reconnect_after = 3", retries=2, timeout="200ms"))
    sink = peers.Collect(cfg)
    armed: dict[str, int] = {}

    def until(rt) -> bool:
        st = rt.devices["plc"]
        if not armed:
            if st.up and st.batches >= 3:
                armed["at"], armed["from"] = st.batches, len(peer.requests)
                if fault == "timeout":
                    peer.silent = _OneShotSilent({1})
                else:
                    peer.refuse = _OneShotRefuse({(1, "hr", 0): 11})
            return False
        return st.batches >= armed["at"] + 10

    rt = await run_runtime(cfg, until=until, timeout=10, sinks=[sink])
    reqs = [r[2] for r in peer.requests[armed["from"] :]]
    assert any(reqs[i] == reqs[i + 1] == 0 for i in range(len(reqs) - 1)), reqs  # hr0 re-sent
    assert not downs and rt.devices["plc"].failures == 0, downs
    assert {q for _, _, q in sink.rows["plc/a"] + sink.rows["plc/b"]} == {Quality.GOOD}


async def test_a_server_that_accepts_and_drops_each_connection_is_down(modbus_config, run_runtime):
    """A TCP endpoint (a dead gateway's, a proxy's) that accepts every connection and drops it
    before answering: it never answers, so it is down on every new connection too, not up
    from each connect until its first poll fails."""

    async def handle(reader, writer):
        await asyncio.sleep(0.05)
        writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = modbus_config(device(port, '{ name = "a", address = "hr0" }').replace('"50ms"', '"1s"'))
    looks: list[tuple[str, bool]] = []

    def until(rt) -> bool:
        st = rt.devices["plc"]
        if st.failures >= 1:
            looks.append((st.state, st.up))
        return st.failures >= 5

    try:
        rt = await run_runtime(cfg, until=until, timeout=20)
    finally:
        server.close()
    assert rt.devices["plc"].last_ok_ns == 0 and rt.devices["plc"].connects >= 5
    assert ("running", False) in looks and not [u for _, u in looks if u], looks


# -- 4. write limits, and the stage named in write errors -----------------------------------


def test_a_writable_tag_must_fit_one_write_request(modbus_config):
    from edgeos import ConfigError

    tags = (
        '{ name = "ok", address = "hr0", type = "string", length = 246, writable = true },\n'
        '{ name = "long", address = "hr200", type = "string", length = 250 },\n'  # read-only: fine
        '{ name = "bad", address = "hr400", type = "string", length = 247, writable = true }'
    )
    with pytest.raises(ConfigError) as info:
        modbus_config(device(502, tags))
    (problem,) = info.value.problems
    assert problem.path == "devices[0](plc).tags[2](bad).length"
    assert "at most 123 registers: at most 246 characters" in problem.message


async def test_the_longest_writable_string_is_written_and_refusals_name_the_write(tcp_peer, modbus_config):
    peer = await tcp_peer()
    peer.refuse[(1, "hr", 300)] = 2
    tags = (
        '{ name = "label", address = "hr0", type = "string", length = 246, writable = true },\n'
        '{ name = "locked", address = "hr300", writable = true }'
    )
    dev = modbus_config(device(peer.port, tags)).devices[0]
    adapter = modbus().create(dev)
    await adapter.connect()
    try:
        await adapter.write(dev.tags[0], "x" * 246)
        with pytest.raises(DeviceError) as info:
            await adapter.write(dev.tags[1], 1)
    finally:
        await adapter.close()
    assert peer.reads(1)[0] == ("hr", 0, 123)
    assert bytes(b for r in peer.registers(1, "hr", 0, 123) for b in struct.pack(">H", r)) == b"x" * 246
    e = info.value
    assert e.stage == "write" and str(e).startswith("plc: write: write hr 300+1 unit 1: exception 2")


# -- 5. a serial port in use is refused by `edgeos write` -----------------------------------


def test_edgeos_write_refuses_a_serial_port_the_daemon_holds(pty_pair, write_config):
    cfg = write_config(
        f"""
[gateway]
id = "gw"
data_dir = "data"
[[devices]]
name = "drive"
protocol = "modbus"
transport = "rtu"
serial_port = "{pty_pair.b}"
baudrate = 115200
timeout = "100ms"
retries = 0
tags = [{{ name = "setpoint", address = "hr1", writable = true }}]
"""
    )
    # Another process holds the port the way the daemon does (pyserial, exclusive=True).
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import serial, sys; s = serial.Serial(sys.argv[1], 115200, exclusive=True); "
            "print('open', flush=True); sys.stdin.read()",
            pty_pair.b,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        out = CliRunner().invoke(app, ["write", "-c", str(cfg), "drive", "setpoint", "7"])
        assert out.exit_code == 1
        assert f"{pty_pair.b} is in use (by the running daemon?)" in out.output
    finally:
        holder.stdin.close()
        holder.wait(5)
        holder.stdout.close()
    # Released: the port opens; nobody answers on the other end, so the write times out instead.
    out = CliRunner().invoke(app, ["write", "-c", str(cfg), "drive", "setpoint", "7"])
    assert out.exit_code == 1 and "no response within 0.1s" in out.output and "in use" not in out.output


# -- 6. 64-bit integers are written exactly ---------------------------------------------------


async def test_64_bit_integers_are_written_exactly(tcp_peer, write_config, peer_module):
    peer = await tcp_peer()
    cfg = write_config(
        f"""
[gateway]
id = "gw"
data_dir = "data"
[[devices]]
name = "plc"
protocol = "modbus"
host = "127.0.0.1"
port = {peer.port}
tags = [
  {{ name = "u", address = "hr0", type = "uint64", writable = true }},
  {{ name = "i", address = "hr4", type = "int64", byte_order = "CDAB", writable = true }},
]
"""
    )
    runner = CliRunner()

    async def write(*args: str):
        return await asyncio.to_thread(runner.invoke, app, ["write", "-c", str(cfg), "--", *args])

    for tag, addr, typ, order, value in [
        ("u", 0, "uint64", "ABCD", 2**64 - 1),
        ("u", 0, "uint64", "ABCD", 9007199254740993),  # 2**53 + 1: not a float64
        ("i", 4, "int64", "CDAB", -9007199254740993),
        ("i", 4, "int64", "CDAB", -(2**63)),
    ]:
        out = await write("plc", tag, str(value))
        assert out.exit_code == 0, out.output
        assert peer.registers(1, "hr", addr, 4) == peer_module.wire_registers(typ, order, value)
    out = await write("plc", "u", "0xFFFFFFFFFFFFFFFF")
    assert out.exit_code == 0 and peer.registers(1, "hr", 0, 4) == [0xFFFF] * 4
    out = await write("plc", "u", str(2**64))
    assert out.exit_code == 1 and "out of range for uint64" in out.output


# -- 7. illegal data value splits too ------------------------------------------------------


async def test_illegal_data_value_splits_the_request_too(tcp_peer, modbus_config, peer_module):
    # Some PLCs answer "illegal data value" (3) for a range reaching an unimplemented register.
    peer = await tcp_peer()
    peer.refuse[(1, "hr", 15)] = 3
    peer.set_registers(1, "hr", 0, list(range(100, 110)))
    tags = ",\n".join(f'{{ name = "r{i}", address = "hr{i}" }}' for i in [*range(0, 10), 15, *range(20, 30)])
    dev = modbus_config(device(peer.port, tags)).devices[0]
    adapter = modbus().create(dev)
    await adapter.connect()
    try:
        (group,) = adapter.poll_groups()
        batch = await adapter.read(group, time.time_ns())
    finally:
        await adapter.close()
    names = [t.name for t in dev.tags]
    bad = {names[i]: q for i, _, q in rows(batch) if q != Quality.GOOD}
    assert bad == {"r15": Quality.BAD_DEVICE_FAILURE}
    assert batch.values[:10].tolist() == list(range(100, 110))
    assert adapter.health()["splits"] >= 1
    assert adapter.health()["refused_tags"] == {"r15": "exception 3 (illegal data value)"}


# -- 8. silence counted per poll group; busy answers re-sent after a pause -----------------


async def test_silence_is_counted_per_poll_group_not_per_read(tcp_peer, modbus_config, peer_module):
    peer = await tcp_peer()
    peer.silent.add(1)
    tags = ",\n".join(
        f'{{ name = "t{i}", address = "hr{i}", poll_interval = "{ms}ms" }}' for i, ms in enumerate((100, 200, 500))
    )
    dev = modbus_config(device(peer.port, tags, "reconnect_after = 2", timeout="30ms")).devices[0]
    adapter = modbus().create(dev)
    await adapter.connect()
    try:
        groups = adapter.poll_groups()
        assert len(groups) == 3
        for g in groups:  # one round of three intervals: one silent poll each, not three
            assert rows(await adapter.read(g, time.time_ns()))[0][2] == Quality.BAD_TIMEOUT
        with pytest.raises(DeviceError, match="for 2 polls in a row"):
            await adapter.read(groups[0], time.time_ns())
    finally:
        await adapter.close()


async def test_a_busy_device_is_asked_again_after_a_pause(tcp_peer, modbus_config):
    peer = await tcp_peer()
    peer.busy[1] = 2
    peer.set_registers(1, "hr", 0, [42])
    dev = modbus_config(device(peer.port, '{ name = "a", address = "hr0" }', retries=2)).devices[0]
    adapter = modbus().create(dev)
    await adapter.connect()
    try:
        t0 = time.monotonic()
        (batch,) = [await adapter.read(g, time.time_ns()) for g in adapter.poll_groups()]
        elapsed = time.monotonic() - t0
    finally:
        await adapter.close()
    assert rows(batch)[0][1:] == (42.0, Quality.GOOD) and peer.count(1) == 3
    assert elapsed >= 0.09  # two pauses of 50 ms
    assert not np.isnan(batch.values).any()


# -- shutdown: a cancellation that meets the answer is not lost ------------------------------


async def test_a_cancellation_arriving_with_the_answer_still_cancels(tcp_peer):
    # pymodbus waits with asyncio.wait_for, which on Python 3.11 drops a cancellation that
    # arrives in the same loop iteration as the answer: a poll task cancelled at shutdown then
    # polled on forever (seen as a hung `edgeos run` shutdown under load). The cancel is made
    # to arrive exactly with the answer: from pymodbus's receive hook.
    peer = await tcp_peer()
    link = transport.acquire("d", transport.Endpoint("tcp", "127.0.0.1", peer.port))
    try:
        await link.connect("d", 1.0)
        ctx = link.client.ctx
        received = ctx.trace_pdu
        reader: asyncio.Task | None = None

        def cancel_on_answer(sending: bool, pdu):
            if not sending and reader is not None:
                reader.cancel()
            return received(sending, pdu)

        ctx.trace_pdu = cancel_on_answer
        reader = asyncio.create_task(link.read("d", 1, "hr", 0, 1, 1.0, 0))
        await asyncio.wait({reader}, timeout=5)
        assert reader.cancelled()
    finally:
        transport.release(link)
