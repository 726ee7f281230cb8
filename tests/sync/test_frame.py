"""The sync's message framing: the compiled assembly (ext/_frame.pyx) and its plain-Python twin
(edgeos/sync/_reference.py) give wire.encode_message's bytes; a run's units are grouped into
messages as the per-unit rule says (per device, in id order, within the cap)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeos import filters, wire
from edgeos.store.outbox import UnitRun
from edgeos.sync import _reference, engine

try:
    from edgeos.sync import _frame as _compiled
except ImportError:  # a pure build: the compiled half fails below
    _compiled = None


@pytest.fixture(params=["compiled", "reference"])
def assemble(request: pytest.FixtureRequest):
    """Both implementations; the compiled half fails (never skips) in a build with extensions."""
    if request.param == "compiled":
        assert _compiled is not None or not filters.COMPILED, "edgeos.sync._frame is missing from a compiled build"
        if _compiled is None:
            pytest.fail("edgeos.sync._frame is not built (pure install)")
        return _compiled.assemble
    return _reference.assemble


def _run(units: list[bytes], devices: list[str], first: int = 1) -> UnitRun:
    offsets = np.zeros(len(units) + 1, np.int64)
    np.cumsum([len(u) for u in units], out=offsets[1:])
    ids = list(range(first, first + len(units)))
    return UnitRun(ids, devices, [len(u) // 2 for u in units], b"".join(units), offsets, ids[-1] if ids else 0)


@given(
    units=st.lists(st.binary(max_size=300), max_size=40),
    data=st.data(),
    replay=st.booleans(),
    prev=st.integers(0, 2**40),
)
def test_assembled_bytes_are_encode_messages(units, data, replay, prev):
    picks = data.draw(st.lists(st.integers(0, len(units) - 1), max_size=20)) if units else []
    offsets = np.zeros(len(units) + 1, np.int64)
    np.cumsum([len(u) for u in units], out=offsets[1:])
    blob = b"".join(units)
    seqs = [1000 + i for i in picks]
    want = wire.encode_message("gw", "dev", seqs, [units[i] for i in picks], 7, prev=prev, replay=replay)
    head = wire._message_head("gw", "dev", seqs, 7, prev, replay, None, len(seqs))
    idx = np.array(picks, np.int64)
    for impl in ([_compiled.assemble] if _compiled else []) + [_reference.assemble]:
        got = impl(head, blob, offsets, idx)
        assert got == want
    env = wire.decode_envelope(want)
    assert env.seqs == seqs and env.units == [units[i] for i in picks] and env.prev == prev and env.replay == replay


def test_a_unit_outside_the_run_is_refused(assemble):
    offsets = np.array([0, 3, 5], np.int64)
    with pytest.raises(IndexError, match="unit 2 is not in a run of 2"):
        assemble(b"h", b"abcde", offsets, np.array([0, 2], np.int64))
    with pytest.raises(IndexError):
        assemble(b"h", b"abcde", offsets, np.array([-1], np.int64))
    with pytest.raises(ValueError, match=r"spans \[3, 9\)"):
        assemble(b"h", b"abcde", np.array([0, 3, 9], np.int64), np.array([1], np.int64))
    with pytest.raises(ValueError):
        assemble(b"h", b"abcde", np.array([0, 4, 2], np.int64), np.array([1], np.int64))
    # Both refuse the same calls (a review found the compiled one took None and the twin did
    # not, and the twin took int32 or strided indexes the compiled one refused).
    ok = np.array([0], np.int64)
    for bad in (
        (None, b"abcde", offsets, ok),
        (b"h", None, offsets, ok),
        (b"h", b"abcde", None, ok),
        (b"h", b"abcde", offsets, None),
        (b"h", b"abcde", offsets, np.array([0], np.int32)),
        (b"h", b"abcde", offsets, np.array([0, 1, 0], np.int64)[::2]),
        (b"h", b"abcde", offsets.astype(np.int32), ok),
    ):
        with pytest.raises((TypeError, ValueError)):
            assemble(*bad)
    want = b"h\xc6\x00\x00\x00\x02de\xc6\x00\x00\x00\x03abc"
    assert assemble(b"h", b"abcde", offsets, np.array([1, 0], np.int64)) == want


def _greedy(sizes: list[int], devices: list[str], gateway: str, cap: int) -> list[tuple[str, list[int]]]:
    """The rule, a unit at a time: a device's units in id order join its open message while it
    stays within the cap (a message holds at least one unit); messages by their first unit."""
    out, open_ = [], {}
    for i, (size, device) in enumerate(zip(sizes, devices, strict=True)):
        base = wire.message_overhead(gateway, device, 0)
        per = wire.message_overhead(gateway, device, 1) - base
        m = open_.get(device)
        if m is not None and m[1] + per + size > cap:
            m = None
        if m is None:
            m = open_[device] = [[], base]
            out.append((device, m[0]))
        m[0].append(i)
        m[1] += per + size
    return sorted(out, key=lambda m: m[1][0])


@given(
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=60),
    data=st.data(),
    cap=st.integers(200, 20000),
)
def test_runs_are_cut_into_messages_by_the_rule(sizes, data, cap):
    devices = data.draw(st.lists(st.sampled_from(["a", "bb", "line\n1"]), min_size=len(sizes), max_size=len(sizes)))
    run = _run([bytes(s) for s in sizes], devices)
    got = [(d, idx.tolist()) for d, idx in engine._pack(run, "gw", cap)]
    assert got == _greedy(sizes, devices, "gw", cap)


def test_a_framed_run_decodes_to_its_units_once_each(tmp_path):
    rng = np.random.default_rng(3)
    units = [rng.bytes(int(n)) for n in rng.integers(1, 3000, 200)]
    devices = [["p1", "p2", "p3"][int(k)] for k in rng.integers(0, 3, 200)]
    sync = engine.Sync("gw", tmp_path, {"max_message": 16 << 10, "max_inflight": 4}, transport=None)
    try:
        messages, last = sync._frame(_run(units, devices, first=101), {"p1": 50, "p2": 7, "p3": 8}, replay=False)
    finally:
        sync.close()
    seen = {}
    prev_of = {"p1": 50, "p2": 7, "p3": 8}
    for device, seqs, payload, samples in messages:
        assert len(payload) <= 16 << 10
        env = wire.decode_envelope(payload)
        assert (env.device, env.seqs) == (device, seqs)
        # Each message names the device's previous unit: the last of its earlier message.
        assert env.prev == prev_of[device]
        prev_of[device] = seqs[-1]
        assert samples == sum(len(units[s - 101]) // 2 for s in seqs)
        for s, u in zip(env.seqs, env.units, strict=True):
            assert s not in seen
            seen[s] = (device, u)
    assert seen == {101 + i: (devices[i], units[i]) for i in range(200)}
    assert last == {d: max(101 + i for i in range(200) if devices[i] == d) for d in set(devices)}
    assert msgpack.unpackb(messages[0][2])["seq"] == messages[0][1]


def test_a_unit_over_the_cap_goes_as_parts_the_rest_as_messages(tmp_path):
    units = [b"x" * 100, b"y" * 40_000, b"z" * 100]
    sync = engine.Sync("gw", tmp_path, {"max_message": 16 << 10, "max_inflight": 4}, transport=None)
    try:
        messages, _ = sync._frame(_run(units, ["d"] * 3), {"d": 0}, replay=True)
    finally:
        sync.close()
    envs = [wire.decode_envelope(m[2]) for m in messages]
    k = len(envs) - 2  # a power-of-two slice of the room left by the envelope (8 KiB here)
    assert k == 5 and [e.seqs for e in envs] == [[1]] + [[2]] * k + [[3]]
    assert [e.part for e in envs] == [None] + [(i, k) for i in range(k)] + [None]
    assert b"".join(e.units[0] for e in envs[1:-1]) == units[1]
    assert all(e.replay for e in envs) and all(len(m[2]) <= 16 << 10 for m in messages)
    assert [m[3] for m in messages] == [50] + [0] * (k - 1) + [20_000, 50]  # samples count with the last part
