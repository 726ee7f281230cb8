"""A line that goes away and comes back (socat killed, started again at the same path), through
the runtime: Bad meanwhile, reopened with backoff, counters kept across reopens."""

from __future__ import annotations

import asyncio
import os
import time

from edgeos import Quality

BODY = """
[[devices]]
name = "scale"
protocol = "serial"
port = "{port}"
terminator = "LF"
reconnect_min = "20ms"
reconnect_max = "100ms"
pattern = '^W=(?P<w>[\\d.]+)$'
tags = [{{ name = "w" }}]
"""


class Collect:
    def __init__(self) -> None:
        self.rows: list[tuple[float, int]] = []

    async def put(self, b) -> None:
        self.rows += list(zip(b.values.tolist(), b.quality.tolist(), strict=True))

    async def flush(self) -> None:
        return None


async def test_unplugged_line_is_reopened_with_backoff(line, serial_config, run_runtime):
    cfg = serial_config(BODY.format(port=line.adapter))
    sink = Collect()
    phase = {"n": 0}

    async def device():
        # Frames until the adapter reads them, then the line goes away, then comes back.
        async with asyncio.timeout(10):
            while not any(q == Quality.GOOD for _, q in sink.rows):
                line.send(b"W=1.5\n")
                await asyncio.sleep(0.02)
            line.kill()
            phase["n"] = 1
            while not any(q == Quality.BAD_COMM_FAILURE for _, q in sink.rows):
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # a few reopen attempts on a missing path
            line.start()
            phase["n"] = 2
            while sink.rows[-1] != (2.5, Quality.GOOD):
                line.send(b"W=2.5\n")
                await asyncio.sleep(0.02)

    task = asyncio.create_task(device())
    rt = await run_runtime(cfg, sinks=[sink], until=lambda rt: task.done())
    await task
    st = rt.devices["scale"]
    assert st.failures >= 2  # lost once, then at least one reopen of a missing path
    assert st.last_error_code in ("missing", "lost")
    health = st.adapter.health()
    assert health["opens"] >= 2 and health["frames"] >= 2  # counters outlive the adapters
    qs = [q for _, q in sink.rows]
    first_bad = qs.index(Quality.BAD_COMM_FAILURE)
    assert Quality.GOOD in qs[:first_bad] and qs[-1] == Quality.GOOD


async def test_a_listened_port_that_opens_late_is_up_before_its_first_frame(line, serial_config, run_runtime):
    """Listening without silence_timeout, an open port is all there is to know (README,
    Modes): a port missing at the start (a USB adapter not plugged yet) is down; once it
    opens, the device is up at once, though the scale has sent nothing yet."""
    later = line.adapter + ".later"  # missing until linked
    cfg = serial_config(BODY.format(port=later))
    state: dict[str, object] = {}

    def until(rt) -> bool:
        st = rt.devices["scale"]
        if "linked" not in state:
            if st.failures >= 1:
                state["down"] = not st.up
                os.symlink(line.adapter, later)
                state["linked"] = True
            return False
        return st.state == "running" and st.up

    rt = await run_runtime(cfg, until=until, timeout=10)
    assert state["down"] and rt.devices["scale"].adapter.health()["frames"] == 0


async def test_a_listened_device_that_stops_sending_is_down_until_it_sends_again(line, serial_config, run_runtime):
    """silence_timeout: a scale sending every 50 ms is up; silent for 300 ms, its tags are
    marked Bad once (BadTimeout) and it is down, its port still open; its next frame brings it
    up again with a Good sample."""
    cfg = serial_config(BODY.format(port=line.adapter).replace("tags =", 'silence_timeout = "300ms"\ntags ='))
    sink = Collect()
    state = {"phase": 0, "looks": [], "quiet_from": 0.0}

    def until(rt) -> bool:
        st = rt.devices["scale"]
        if state["phase"] == 0:  # sending: up at every look, nothing marked
            line.send(b"W=1.5\n")
            if any(q == Quality.GOOD for _, q in sink.rows):
                state["looks"].append(st.up)
            if len(state["looks"]) >= 40:
                state["phase"], state["quiet_from"] = 1, time.monotonic()
        elif state["phase"] == 1:  # quiet: down once the silence is seen
            if not st.up and "down_after" not in state:
                state["down_after"] = time.monotonic() - state["quiet_from"]
            # The Bad samples reach the sink through the pipeline, after the state flips: wait
            # for them (a loaded run looked before they arrived).
            if "down_after" in state and any(q == Quality.BAD_TIMEOUT for _, q in sink.rows):
                state["marked"] = list(sink.rows)
                state["phase"] = 2
        elif state["phase"] == 2:  # talking again
            line.send(b"W=2.5\n")
            return st.up and sink.rows[-1] == (2.5, Quality.GOOD)
        return False

    rt = await run_runtime(cfg, sinks=[sink], until=until, timeout=20)
    st = rt.devices["scale"]
    assert all(state["looks"]), state["looks"]
    assert 0.25 <= state["down_after"] < 3.0, state["down_after"]
    assert [q for _, q in state["marked"]].count(Quality.BAD_TIMEOUT) == 1  # marked once
    assert state["marked"][-1][1] == Quality.BAD_TIMEOUT
    assert st.failures == 0 and st.adapter.health()["silences"] == 1  # the port stayed open


async def test_socket_url_to_a_tcp_serial_server(tcp_server, serial_config, run_adapter):
    cfg = serial_config(BODY.format(port=f"socket://127.0.0.1:{tcp_server.port}"))
    run = await run_adapter(cfg.devices[0])
    await tcp_server.wait_client()
    await tcp_server.send(b"W=1")
    await asyncio.sleep(0.05)
    await tcp_server.send(b".25\nW=2\nW=x\n")
    await run.wait(lambda r: len(r.of("w")) >= 3)
    assert [(r[2], r[3]) for r in run.of("w")][:2] == [(1.25, Quality.GOOD), (2.0, Quality.GOOD)]
    assert run.of("w")[2][3] == Quality.BAD_DECODING_ERROR
    # The server goes away: run() raises (the runtime would back off and reconnect).
    tcp_server.drop_clients()
    async with asyncio.timeout(5):
        while not run.task.done():
            await asyncio.sleep(0.01)
    assert run.error is not None and run.error.code == "closed"


async def test_ten_megabytes_without_terminator_keep_the_adapter_bounded(tcp_server, serial_config, run_adapter):
    cfg = serial_config(BODY.format(port=f"socket://127.0.0.1:{tcp_server.port}") + "max_frame = 4096\n")
    run = await run_adapter(cfg.devices[0])
    await tcp_server.wait_client()
    chunk = b"7" * 65536
    for _ in range(160):  # 10 MiB, no terminator
        await tcp_server.send(chunk)
    await tcp_server.send(b"\nW=3\n")
    await run.wait(lambda r: any(x[3] == Quality.GOOD for x in r.of("w")), timeout=30)
    h = run.adapter.health()
    assert h["bytes"] >= 160 * 65536
    assert h["peak_buffered_bytes"] <= 4096 and h["bad_overlong"] == 1
    assert run.of("w")[-1][2:4] == (3.0, Quality.GOOD)
    assert run.of("w")[0][3] == Quality.BAD_DECODING_ERROR  # the overlong frame's Bad sample


async def test_rfc2217_url(serial_config, run_adapter):
    peers = __import__("edgeos_test_peers_serial")
    server = peers.Rfc2217Server()
    try:
        cfg = serial_config(BODY.format(port=f"rfc2217://127.0.0.1:{server.port}"))
        run = await run_adapter(cfg.devices[0])
        server.send(b"W=4.5\nW=5")
        await asyncio.sleep(0.1)
        server.send(b".5\n")
        await run.wait(lambda r: len(r.of("w")) >= 2)
        assert [(r[2], r[3]) for r in run.of("w")] == [(4.5, Quality.GOOD), (5.5, Quality.GOOD)]
    finally:
        server.stop()
    # The server gone, run() raises (the runtime would back off and reconnect).
    async with asyncio.timeout(5):
        while not run.task.done():
            await asyncio.sleep(0.01)
    assert run.error is not None and run.error.code in ("lost", "closed")


async def test_poll_over_socket_counts_unsolicited_frames(tcp_server, serial_config, run_adapter):
    body = """
    [[devices]]
    name = "ctl"
    protocol = "serial"
    port = "socket://127.0.0.1:{port}"
    terminator = "CR"
    mode = "poll"
    requests = [{{ send = "R\\r", pattern = '^R=(?P<r>\\d+)$', interval = "50ms", timeout = "300ms" }}]
    tags = [{{ name = "r", type = "integer" }}]
    """
    # One frame more than asked with each reply: counted as unsolicited, never taken as a reply.
    tcp_server.reply = lambda req: b"R=42\rR=7\r" if req == b"R" else None
    cfg = serial_config(body.format(port=tcp_server.port))
    run = await run_adapter(cfg.devices[0])
    await run.wait(lambda r: len(r.of("r")) >= 3)
    h = run.adapter.health()
    assert h["unsolicited"] >= 1 and h["requests"] >= 1
    assert all(x[2:4] == (42.0, Quality.GOOD) for x in run.of("r"))
