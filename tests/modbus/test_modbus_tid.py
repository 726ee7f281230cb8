"""Modbus TCP transaction ids, against a hand-written peer (tests/peers/modbus.py
`RawModbusPeer`), since pymodbus's server always echoes the id: an answer whose id is not the
request's, id 0 included, never becomes values; devices that always answer with id 0 are read
behind an explicit option that resets the connection after any timeout."""

from __future__ import annotations

import time

import edgeos_test_peers_modbus as peers  # tests/peers/modbus.py, loaded by conftest.py
import pytest
from edgeos.protocols.modbus import transport

from edgeos import Quality, plugins

TAGS = '{ name = "a", address = "hr0" },\n{ name = "b", address = "hr500" }'
VALUE = {"a": 1000.0, "b": 1500.0}  # RawModbusPeer: hr[n] holds 1000 + n


def modbus() -> plugins.ProtocolPlugin:
    return plugins.load(plugins.PROTOCOLS, "modbus")


async def polls(adapter, n: int) -> list[tuple[str, float, int]]:
    (group,) = adapter.poll_groups()
    names = {t.id: t.name for t in adapter.device.tags}
    out = []
    for _ in range(n):
        b = await adapter.read(group, time.time_ns())
        out += [
            (names[t], v, q) for t, v, q in zip(b.tags.tolist(), b.values.tolist(), b.quality.tolist(), strict=True)
        ]
    return out


async def polls_of(dev, n: int) -> tuple[list[tuple[str, float, int]], dict]:
    """`n` polls of a fresh adapter of `dev`, and its health after them."""
    adapter = modbus().create(dev)
    await adapter.connect()
    try:
        return await polls(adapter, n), dict(adapter.health())
    finally:
        await adapter.close()


async def test_an_answer_with_transaction_id_0_is_never_taken_for_another_request(raw_peer, modbus_config):
    peer = await raw_peer()
    # Request 2 (hr500, the second of the first poll) is answered late, with id 0: it arrives
    # while request 3 (hr0, next poll) is outstanding. Other answers echo the id.
    peer.late[2] = 0.3
    peer.tid_zero = {2}
    dev = modbus_config(peers.device(peer.port, TAGS, timeout="200ms", retries=0)).devices[0]
    got, h = await polls_of(dev, 6)
    wrong = [(k, v) for k, v, q in got if q == Quality.GOOD and v != VALUE[k]]
    assert wrong == []
    assert h["tid_mismatches"] == 1
    assert [q for k, _, q in got[2:4]] == [Quality.BAD_DECODING_ERROR, Quality.GOOD]  # hr0 rejected, hr500 fine
    assert all(q == Quality.GOOD for _, _, q in got[4:])  # a fresh connection: nothing stale left
    assert 0 not in peer.tids and peer.connections == 2


async def test_a_late_answer_is_skipped_and_the_request_in_flight_gets_its_own(raw_peer, modbus_config):
    """Request 2 times out; its answer (id 2) comes while request 3 awaits: it is that
    request's late answer, told apart by its id, skipped and counted; request 3's own answer is
    taken, and the connection is kept."""
    peer = await raw_peer()
    peer.late[2] = 0.3
    dev = modbus_config(peers.device(peer.port, TAGS, timeout="200ms", retries=0)).devices[0]
    got, h = await polls_of(dev, 4)
    assert [q for _, _, q in got] == [Quality.GOOD, Quality.BAD_TIMEOUT] + [Quality.GOOD] * 6
    assert all(v == VALUE[k] for k, v, q in got if q == Quality.GOOD)
    assert h["late_answers"] == 1 and h["tid_mismatches"] == 0 and h["timeouts"] == 1
    assert peer.connections == 1


async def test_an_answer_with_an_id_never_sent_fails_its_request_at_once(raw_peer, modbus_config):
    """pymodbus skips an answer with another id and would wait out the timeout, as if the device
    were silent: it is a decoding error at once, counted, and the connection is reset."""
    peer = await raw_peer()
    peer.tid_shift = {1}
    dev = modbus_config(peers.device(peer.port, TAGS, timeout="30s", retries=0)).devices[0]
    got, h = await polls_of(dev, 3)
    assert [q for _, _, q in got[:2]] == [Quality.BAD_DECODING_ERROR, Quality.GOOD]
    assert all(q == Quality.GOOD and v == VALUE[k] for k, v, q in got[2:])
    assert h["tid_mismatches"] == 1 and h["timeouts"] == 0 and h["late_answers"] == 0
    assert peer.connections == 2 and h["connection_resets"] == 1


async def test_a_stray_frame_after_the_answer_does_not_fail_the_request(raw_peer, modbus_config):
    """Answer 1 and a frame with an id never sent arrive in one segment: request 1 takes its
    own answer (the bytes are judged up to it); the stray frame is dropped with pymodbus's
    buffer when the next request goes out, and never becomes a value."""
    peer = await raw_peer()
    peer.stray_after = {1}
    dev = modbus_config(peers.device(peer.port, TAGS, timeout="30s", retries=0)).devices[0]
    got, h = await polls_of(dev, 2)
    assert [q for _, _, q in got] == [Quality.GOOD] * 4
    assert all(v == VALUE[k] for k, v, _ in got)
    assert h["tid_mismatches"] == 0 and h["timeouts"] == 0 and peer.connections == 1


async def test_a_device_answering_always_with_id_0_is_read_with_the_option(raw_peer, modbus_config):
    peer = await raw_peer()
    peer.tid_zero = True
    peer.late[2] = 0.3  # the answer to hr500 comes after its request timed out
    body = peers.device(peer.port, TAGS, "zero_transaction_id = true", timeout="200ms", retries=0)
    adapter = modbus().create(modbus_config(body).devices[0])
    await adapter.connect()
    try:
        got = await polls(adapter, 6)
        h = adapter.health()
    finally:
        await adapter.close()
    assert [q for _, _, q in got[:2]] == [Quality.GOOD, Quality.BAD_TIMEOUT]
    assert all(q == Quality.GOOD and v == VALUE[k] for k, v, q in got[2:])  # the late answer never matched
    assert h["tid_mismatches"] == 0 and peer.connections == 2  # reset after the timeout
    assert 0 not in peer.tids


async def test_without_the_option_a_device_answering_with_id_0_gives_no_values(raw_peer, modbus_config, caplog):
    peer = await raw_peer()
    peer.tid_zero = True
    adapter = modbus().create(modbus_config(peers.device(peer.port, TAGS, retries=0)).devices[0])
    await adapter.connect()
    try:
        got = await polls(adapter, 3)
        h = adapter.health()
    finally:
        await adapter.close()
    assert {q for _, _, q in got} == {Quality.BAD_DECODING_ERROR}
    assert h["tid_mismatches"] == 6
    lines = [r.getMessage() for r in caplog.records if "transaction id 0" in r.getMessage()]
    assert len(lines) == 1 and "zero_transaction_id = true" in lines[0]  # logged once, and says what to do


@pytest.mark.parametrize("option", [False, True])
async def test_a_late_answer_with_id_0_is_never_taken_at_the_link(option, raw_peer):
    peer = await raw_peer()
    peer.tid_zero = True if option else {1}
    peer.late[1] = 0.3
    link = transport.acquire("d", transport.Endpoint("tcp", "127.0.0.1", peer.port), zero_transaction_id=option)
    try:
        await link.connect("d", 0.2)
        with pytest.raises(transport.ResponseTimeout):
            await link.read("d", 1, "hr", 0, 2, 0.2, 0)
        for _ in range(2):
            try:
                got = await link.read("d", 1, "hr", 100, 2, 0.2, 0)
            except (transport.ResponseTimeout, transport.BadResponse):
                got = None
            assert got in ([1100, 1101], None)
        assert await link.read("d", 1, "hr", 200, 2, 0.5, 0) == [1200, 1201]
    finally:
        transport.release(link, "d")
