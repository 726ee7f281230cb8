"""What the adapter learns from a device's refusals, against a real pymodbus server: a request
size limit below 125, exception 4 on one address, refused addresses held back and re-probed on
a backoff, and all of it (with the health counters) kept across reconnects."""

from __future__ import annotations

import asyncio
import logging
import time

import edgeos_test_peers_modbus as peers  # tests/peers/modbus.py, loaded by conftest.py

from edgeos import Quality, plugins


def modbus() -> plugins.ProtocolPlugin:
    return plugins.load(plugins.PROTOCOLS, "modbus")


def registers(addresses) -> str:
    return ",\n".join(f'{{ name = "r{a}", address = "hr{a}" }}' for a in addresses)


async def poll(adapter, peer) -> tuple[dict[str, tuple[float, int]], int]:
    """One poll of the adapter's single group: {tag: (value, quality)}, requests the server saw."""
    (group,) = adapter.poll_groups()
    before = len(peer.requests)
    batch = await adapter.read(group, time.time_ns())
    names = {t.id: t.name for t in adapter.device.tags}
    got = {
        names[t]: (v, q)
        for t, v, q in zip(batch.tags.tolist(), batch.values.tolist(), batch.quality.tolist(), strict=True)
    }
    return got, len(peer.requests) - before


async def test_a_request_limit_below_125_is_learned_and_kept(tcp_peer, modbus_config, caplog):
    peer = await tcp_peer()
    peer.max_count = 50  # refuses longer reads with exception 3 (illegal data value)
    peer.set_registers(1, "hr", 0, [1000 + a for a in range(120)])
    dev = modbus_config(peers.device(peer.port, registers(range(120)), retries=0)).devices[0]
    adapter = modbus().create(dev)
    await adapter.connect()
    per_poll = []
    try:
        for k in range(14):
            if k == 10:
                caplog.clear()
                caplog.set_level(logging.INFO, logger="edgeos.protocols.modbus")
            got, n = await poll(adapter, peer)
            per_poll.append(n)
            assert got == {f"r{a}": (1000.0 + a, Quality.GOOD) for a in range(120)}  # complete at every poll
        h = adapter.health()
    finally:
        await adapter.close()
    # 120 registers at most 50 per request: 3 requests, poll after poll, and nothing logged.
    assert per_poll[-4:] == [3, 3, 3, 3], per_poll
    assert max(c for _, _, _, c in peer.requests[-12:]) == 50
    assert not [r for r in caplog.records if r.name.startswith("edgeos.protocols.modbus")]
    assert h["request_limits"] == {"hr": 50} and h["splits"] >= 1 and h["refused_tags"] == {}


async def test_exception_4_on_a_merged_read_makes_only_the_failing_address_bad(tcp_peer, modbus_config):
    peer = await tcp_peer()
    peer.refuse[(1, "hr", 15)] = 4  # server device failure, for this address only
    peer.set_registers(1, "hr", 0, [1000 + a for a in range(30)])
    dev = modbus_config(peers.device(peer.port, registers(range(30)), retries=0)).devices[0]
    adapter = modbus().create(dev)
    await adapter.connect()
    try:
        for _ in range(3):
            got, _ = await poll(adapter, peer)
            bad = {k: q for k, (_, q) in got.items() if q != Quality.GOOD}
            assert bad == {"r15": Quality.BAD_DEVICE_FAILURE}
            assert all(v == 1000.0 + int(k[1:]) for k, (v, q) in got.items() if q == Quality.GOOD)
        assert adapter.health()["refused_tags"] == {"r15": "exception 4 (server device failure)"}
    finally:
        await adapter.close()


async def test_refused_addresses_are_held_back_and_reprobed_and_survive_a_reconnect(tcp_peer, modbus_config):
    peer = await tcp_peer()
    refused = range(10, 20)
    for a in refused:
        peer.refuse[(1, "hr", a)] = 2  # illegal data address
    peer.set_registers(1, "hr", 0, [1000 + a for a in range(40)])
    dev = modbus_config(peers.device(peer.port, registers(range(40)), 'retry_refused = "400ms"', retries=0)).devices[0]
    expected_bad = {f"r{a}": Quality.BAD_DEVICE_FAILURE for a in refused}

    def check(got) -> None:
        assert {k: q for k, (_, q) in got.items() if q != Quality.GOOD} == expected_bad  # Bad at every poll
        assert all(v == 1000.0 + int(k[1:]) for k, (v, q) in got.items() if q == Quality.GOOD)

    adapter = modbus().create(dev)
    await adapter.connect()
    try:
        got, _ = await poll(adapter, peer)  # the first poll isolates the refused addresses
        check(got)
        h = adapter.health()
        for _ in range(4):
            got, n = await poll(adapter, peer)
            check(got)
            assert n == 2  # hr0..9 and hr20..39: the refused addresses are neither read nor bridged
        assert adapter.health()["exceptions"] == h["exceptions"]
    finally:
        await adapter.close()

    # The runtime makes a new adapter at every reconnect: what was learned, and the counters, stay.
    adapter = modbus().create(dev)
    await adapter.connect()
    try:
        got, n = await poll(adapter, peer)
        check(got)
        assert n == 2
        h2 = adapter.health()
        assert h2["splits"] == h["splits"] >= 1 and h2["exceptions"] == h["exceptions"] >= 10
        assert h2["requests"] > h["requests"] and set(h2["refused_tags"]) == set(expected_bad)

        # After the backoff each refused address is asked again, alone; one that answers is Good again.
        for a in range(10, 15):
            del peer.refuse[(1, "hr", a)]
        expected_bad = {f"r{a}": Quality.BAD_DEVICE_FAILURE for a in range(15, 20)}
        deadline = time.monotonic() + 5
        while True:
            await asyncio.sleep(0.05)
            got, n = await poll(adapter, peer)
            if all(got[f"r{a}"][1] == Quality.GOOD for a in range(10, 15)):
                break
            assert time.monotonic() < deadline, "refused addresses never re-probed"
        check(got)
        probes = [(a, c) for _, t, a, c in peer.requests[-n:] if 10 <= a < 20]
        assert sorted(probes) == [(a, 1) for a in refused]
        got, n = await poll(adapter, peer)  # the answered ones rejoin their neighbours' request
        check(got)
        assert n == 2 and ("hr", 0, 15) in peer.reads(1)[-2:]
    finally:
        await adapter.close()


async def test_a_device_failing_as_a_whole_is_not_held_back(tcp_peer, modbus_config):
    # Exception 4 for every address (a device failing for a moment): both halves of the first
    # split fail too, so it is the device, not an address: no search down to every tag, nothing
    # held back, and the tags are Good again at the first poll after it recovers.
    peer = await tcp_peer()
    peer.set_registers(1, "hr", 0, [1000 + a for a in range(64)])
    dev = modbus_config(peers.device(peer.port, registers(range(64)), retries=0)).devices[0]
    adapter = modbus().create(dev)
    await adapter.connect()
    try:
        for a in range(64):
            peer.refuse[(1, "hr", a)] = 4
        got, n = await poll(adapter, peer)
        assert {q for _, q in got.values()} == {Quality.BAD_DEVICE_FAILURE}
        assert n <= 2 * 6 + 1 and adapter.health()["refused_tags"] == {}  # log2(64) levels at most
        peer.refuse.clear()
        got, n = await poll(adapter, peer)
        assert got == {f"r{a}": (1000.0 + a, Quality.GOOD) for a in range(64)} and n == 1
    finally:
        await adapter.close()


async def test_what_was_learned_survives_the_runtimes_reconnect(tcp_peer, modbus_config, run_runtime):
    peer = await tcp_peer()
    for a in range(10, 20):
        peer.refuse[(1, "hr", a)] = 2
    body = peers.device(peer.port, registers(range(40)), "reconnect_after = 1", timeout="100ms", retries=0)
    cfg = modbus_config(body)
    sink = peers.Collect(cfg)
    seen: dict[str, object] = {}

    def until(rt) -> bool:
        st = rt.devices["plc"]
        if "first" not in seen:
            if st.adapter is not None and len(st.adapter.health()["refused_tags"]) == 10:
                seen["first"], seen["health"] = st.adapter, dict(st.adapter.health())
                peer.silent.add(1)  # no answer: the runtime drops the adapter and reconnects
            return False
        if "after" not in seen:
            if st.failures >= 1 and st.adapter is not seen["first"]:
                peer.silent.discard(1)
                seen["after"] = len(peer.requests)
            return False
        return len(peer.requests) - seen["after"] >= 6 and sink.recovered("plc/r0")

    rt = await run_runtime(cfg, sinks=[sink], timeout=10, until=until)
    h0, h1 = seen["health"], rt.devices["plc"].adapter.health()
    assert rt.devices["plc"].adapter is not seen["first"]
    assert h1["splits"] == h0["splits"] >= 1 and h1["exceptions"] == h0["exceptions"] >= 10
    assert h1["timeouts"] >= 1 and h1["requests"] > h0["requests"]
    # No search again after the reconnect: only the two requests around the held addresses.
    assert {(t, a, c) for _, t, a, c in peer.requests[seen["after"] :]} == {("hr", 0, 10), ("hr", 20, 20)}
    assert all(q != 0 for _, _, q in sink.rows["plc/r15"])  # Bad throughout, never missing
    assert len(sink.rows["plc/r15"]) == len(sink.rows["plc/r0"])
