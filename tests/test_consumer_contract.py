"""`edgeos.wire.Consumer` against its contract (docs/payload.md: "Data message", "Continuation",
"Replay on request", "Consumer helper: `edgeos.wire.Consumer`", and the class docstrings).

Written from the document and the public signatures only: every expectation below quotes the
sentence it comes from. Time is driven through the documented `clock=` argument (and the
`now=` argument of `feed`/`requests`); nothing sleeps.
"""

from __future__ import annotations

import heapq
import math
import random
import tracemalloc
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from edgeos import wire

SPAN = 10_000_000  # "at most 10,000,000 seqs wide"
TD = 1


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_unit(device: str, seq: int, n: int = 3, *, big: bool = False) -> bytes:
    """A unit whose content is unique per (device, seq)."""
    if big:
        n = 60
    rng = np.random.default_rng(seq * 7919 + len(device))
    tags = (np.arange(n, dtype=np.int64) + seq) % 9 + 1
    ts = np.arange(n, dtype=np.int64) * 1_000_000 + seq * 10**9
    values = rng.random(n)
    quality = np.zeros(n, dtype=np.uint32)
    return wire.encode_unit(device, tags, ts, values, quality, compress=not big)


def same_unit(got: wire.Unit, blob: bytes) -> bool:
    want = wire.decode_unit(blob)
    return (
        got.device == want.device
        and np.array_equal(np.asarray(got.tags), np.asarray(want.tags))
        and np.array_equal(np.asarray(got.ts), np.asarray(want.ts))
        and np.array_equal(np.asarray(got.values), np.asarray(want.values))
        and np.array_equal(np.asarray(got.quality), np.asarray(want.quality))
    )


def msg(gw, dev, seqs, blobs, prev, *, replay=False) -> bytes:
    return wire.encode_message(gw, dev, list(seqs), list(blobs), TD, prev=prev, replay=replay)


def parts(gw, dev, seq, blob, prev, slice_size, *, replay=False) -> list[bytes]:
    """The continuation of one unit: `count` messages, each `pt` = [index, count]."""
    count = math.ceil(len(blob) / slice_size)
    return [
        wire.encode_message(
            gw,
            dev,
            [seq],
            [blob[i * slice_size : (i + 1) * slice_size]],
            TD,
            prev=prev,
            replay=replay,
            part=(i, count),
        )
        for i in range(count)
    ]


def requests(c: wire.Consumer, now: float | None = None) -> list[wire.ReplayRequest]:
    """`requests()` decoded, each checked against the request format of "Replay on request"."""
    out = []
    got = c.requests() if now is None else c.requests(now)
    for topic, payload in got:
        r = wire.decode_replay_request(payload)
        # "to `edgeos/{gateway}/replay`" (default `replay_topic`)
        assert topic == f"edgeos/{r.gateway}/replay", (topic, r)
        # "1 <= first <= last <= 2^62, at most 10,000,000 seqs wide"
        assert 1 <= r.first <= r.last <= 2**62, r
        assert r.last - r.first + 1 <= SPAN, r
        assert len(payload) <= 1024
        out.append(r)
    return out


def covers(reqs, device, seqs) -> bool:
    return all(any(r.device == device and r.first <= s <= r.last for r in reqs) for s in seqs)


def delivered_seqs(ds) -> list[int]:
    return [d.seq for d in ds]


# --------------------------------------------------------------------------------------------
# Plain delivery, repeats


def test_in_order_stream_is_delivered_once_and_asks_nothing():
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, retry_after=3.0, clock=clock)
    prev = {"a": 0, "b": 0, "c": 0}
    got = []
    for seq in range(1, 61):
        dev = "abc"[seq % 3]
        blob = make_unit(dev, seq)
        out = c.feed(msg("gw", dev, [seq], [blob], prev[dev]))
        # "it returns each unit the first time it arrives (`Delivered`: gateway, device, seq,
        # unit, replay)"
        assert len(out) == 1
        d = out[0]
        assert (d.gateway, d.device, d.seq, d.replay) == ("gw", dev, seq, False)
        assert same_unit(d.unit, blob)
        got.append(seq)
        prev[dev] = seq
        clock.t += 0.5
    assert got == list(range(1, 61))
    for _ in range(5):
        clock.t += 30
        assert requests(c) == []
    assert c.gaps("gw") == []
    assert c.seen("gw") == [(1, 60)]


def test_repeats_are_dropped_including_inside_a_multi_unit_message():
    c = wire.Consumer(clock=Clock())
    b = {s: make_unit("d", s) for s in range(1, 6)}
    assert delivered_seqs(c.feed(msg("gw", "d", [1, 2], [b[1], b[2]], 0))) == [1, 2]
    assert c.feed(msg("gw", "d", [1, 2], [b[1], b[2]], 0)) == []
    # "drops repeats": a message holding old and new units returns only the new ones
    assert delivered_seqs(c.feed(msg("gw", "d", [2, 3], [b[2], b[3]], 1))) == [3]
    # a replay of what arrived is a repeat as well
    assert c.feed(msg("gw", "d", [3], [b[3]], 2, replay=True)) == []


def test_gateways_are_separate_even_with_the_same_seqs_and_device_names():
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, retry_after=3.0, clock=clock)
    for gw in ("A", "B"):
        out = c.feed(msg(gw, "press1", [1], [make_unit("press1", 1)], 0))
        assert [(d.gateway, d.seq) for d in out] == [(gw, 1)]
    # A loses seq 2; B does not.
    c.feed(msg("A", "press1", [3], [make_unit("press1", 3)], 2))
    out = c.feed(msg("B", "press1", [2], [make_unit("press1", 2)], 1))
    assert [(d.gateway, d.seq) for d in out] == [("B", 2)]
    out = c.feed(msg("B", "press1", [3], [make_unit("press1", 3)], 2))
    assert [(d.gateway, d.seq) for d in out] == [("B", 3)]
    clock.t += 1.5
    reqs = requests(c)
    assert [(r.gateway, r.device) for r in reqs] == [("A", "press1")]
    assert covers(reqs, "press1", [2]) and reqs[0].last == 2
    assert c.gaps("B") == []


# --------------------------------------------------------------------------------------------
# Gaps: reorder wait, retry, arrival, gone


def test_gap_is_asked_after_reorder_wait_again_every_retry_after_until_it_arrives():
    clock = Clock()
    c = wire.Consumer(reorder_wait=5.0, retry_after=30.0, clock=clock)
    c.feed(msg("gw", "d", [10], [make_unit("d", 10)], 0))
    c.feed(msg("gw", "x", [11], [make_unit("x", 11)], 0))
    # 12 (d) lost; 13 is d's next, naming 12 as its predecessor
    c.feed(msg("gw", "d", [13], [make_unit("d", 13)], 12))
    # "gaps(gateway): (device, low, high): units known missing and not yet answered"
    gaps = c.gaps("gw")
    assert any(dev == "d" and lo <= 12 <= hi for dev, lo, hi in gaps), gaps
    assert all(dev == "d" for dev, _, _ in gaps), gaps
    # "It waits `reorder_wait` seconds ... then `requests()` returns"
    clock.t += 4.9
    assert requests(c) == []
    clock.t += 0.2
    reqs = requests(c)
    # "replay requests for that device and range": d's units after 10, up to pv = 12
    assert len(reqs) == 1
    (r,) = reqs
    assert (r.gateway, r.device) == ("gw", "d")
    assert 10 <= r.first <= 12 and r.last == 12, r
    # "again every `retry_after` seconds (default 30)"
    clock.t += 29.8
    assert requests(c) == []
    clock.t += 0.4
    again = requests(c)
    assert [(q.gateway, q.device) for q in again] == [("gw", "d")] and covers(again, "d", [12])
    clock.t += 10
    assert requests(c) == []
    # "... until the units arrive"
    out = c.feed(msg("gw", "d", [12], [make_unit("d", 12)], 10, replay=True))
    assert [(d.seq, d.replay) for d in out] == [(12, True)]
    for _ in range(4):
        clock.t += 31
        assert requests(c) == []
    assert c.gaps("gw") == []
    assert c.take_gone() == []


def test_explicit_now_arguments_drive_the_wait():
    # feed(payload, now=...) / requests(now=...): the time is the caller's
    c = wire.Consumer(reorder_wait=5.0, retry_after=30.0)
    c.feed(msg("gw", "d", [1], [make_unit("d", 1)], 0), now=50_000.0)
    c.feed(msg("gw", "d", [3], [make_unit("d", 3)], 2), now=50_000.0)
    assert c.requests(now=50_004.0) == []
    reqs = [wire.decode_replay_request(p) for _, p in c.requests(now=50_005.5)]
    assert covers(reqs, "d", [2])
    assert c.requests(now=50_020.0) == []
    assert covers([wire.decode_replay_request(p) for _, p in c.requests(now=50_036.0)], "d", [2])


def test_a_unit_arriving_within_the_reorder_wait_is_never_asked_for():
    clock = Clock()
    c = wire.Consumer(reorder_wait=5.0, retry_after=30.0, clock=clock)
    c.feed(msg("gw", "d", [1], [make_unit("d", 1)], 0))
    c.feed(msg("gw", "d", [4], [make_unit("d", 4)], 3))  # 3 late (the backlog lane)
    clock.t += 2
    c.feed(msg("gw", "d", [3], [make_unit("d", 3)], 1))  # 2 is another device's
    assert c.gaps("gw") == []
    for _ in range(4):
        clock.t += 20
        assert requests(c) == []
    assert c.seen("gw") == [(1, 4)]


def test_gone_answer_is_reported_and_ends_the_asking():
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, retry_after=3.0, clock=clock)
    c.feed(msg("gw", "d", [5], [make_unit("d", 5)], 0))
    c.feed(msg("gw", "d", [9], [make_unit("d", 9)], 8))
    clock.t += 1.5
    (r,) = requests(c)
    assert r.device == "d" and r.last == 8
    # the gateway no longer holds 6..8 (any device's)
    gone = wire.encode_gone("gw", r.first, r.last, "d", [(6, 8)])
    assert c.feed(gone) == []
    # "`take_gone()` returns those answers"
    (g,) = c.take_gone()
    assert (g.gateway, g.first, g.last, g.device) == ("gw", r.first, r.last, "d")
    assert [tuple(x) for x in g.ranges] == [(6, 8)]
    # "What gateways answered they no longer hold, since the last call."
    assert c.take_gone() == []
    # "again every `retry_after` seconds ... until ... the gateway says they are gone"
    for _ in range(4):
        clock.t += 4
        assert requests(c) == []
    assert c.gaps("gw") == []


def test_a_partial_gone_keeps_asking_for_what_is_still_held():
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, retry_after=3.0, clock=clock)
    c.feed(msg("gw", "d", [1], [make_unit("d", 1)], 0))
    # d's 2, 3 and 4 lost; 5 names 4
    c.feed(msg("gw", "d", [5], [make_unit("d", 5)], 4))
    clock.t += 1.5
    reqs = requests(c)
    assert covers(reqs, "d", [2, 3, 4])
    # the gateway no longer holds 2..3, still holds 4, and its replay of 4 is lost on the way
    c.feed(wire.encode_gone("gw", reqs[0].first, reqs[0].last, "d", [(2, 3)]))
    assert len(c.take_gone()) == 1
    clock.t += 3.5
    again = requests(c)
    assert covers(again, "d", [4]), again
    # the replay: "their `pv` is the device's previous unit held now"
    out = c.feed(msg("gw", "d", [4], [make_unit("d", 4)], 1, replay=True))
    assert [(d.seq, d.replay) for d in out] == [(4, True)]
    for _ in range(4):
        clock.t += 4
        assert requests(c) == []
    assert c.gaps("gw") == []


def test_a_gone_top_of_the_gap_does_not_end_asking_for_the_rest_of_it():
    # "again every `retry_after` seconds (default 30) until the units arrive or the gateway
    # says they are gone": the gateway says 5 is gone, not 2..4 (a unit set aside as bad, say)
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, retry_after=3.0, clock=clock)
    c.feed(msg("gw", "d", [1], [make_unit("d", 1)], 0))
    c.feed(msg("gw", "d", [6], [make_unit("d", 6)], 5))
    clock.t += 1.5
    (r,) = requests(c)
    assert covers([r], "d", [2, 3, 4, 5])
    c.feed(wire.encode_gone("gw", r.first, r.last, "d", [(5, 5)]))
    assert len(c.take_gone()) == 1
    # the gateway's replay of d's 4 (pv 1) is lost on the way: 4 must be asked for again
    clock.t += 3.5
    assert covers(requests(c), "d", [4])


@pytest.mark.parametrize("replay", [True, False])
def test_a_message_whose_pv_skips_a_known_missing_unit_gets_that_unit_reported_gone(replay):
    # d's 2 is lost on the way (3 names it); the gateway then drops 2 (the budget drops
    # forwarded copies first) and another consumer's request makes it send 3 again, whose `pv`
    # is "the device's previous unit held now": 1. (Or, replay=False: a new session's first
    # message of d names the unit held now.) This consumer knows 2 was d's, so it must end
    # with 2 delivered or reported gone, never skip it silently.
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, retry_after=3.0, clock=clock)
    c.feed(msg("gw", "d", [1], [make_unit("d", 1)], 0))
    c.feed(msg("gw", "d", [3], [make_unit("d", 3)], 2))
    assert c.gaps("gw") == [("d", 2, 2)]
    if replay:
        assert c.feed(msg("gw", "d", [3], [make_unit("d", 3)], 1, replay=True)) == []
    else:
        out = c.feed(msg("gw", "d", [4], [make_unit("d", 4)], 1))
        assert delivered_seqs(out) == [4]
    # asked at once (the message says the gateway no longer holds it), not after reorder_wait
    (r,) = requests(c)
    assert r.device == "d" and r.first <= 2 <= r.last
    c.feed(wire.encode_gone("gw", r.first, r.last, "d", [(2, 2)]))
    (g,) = c.take_gone()
    assert [tuple(x) for x in g.ranges] == [(2, 2)]
    for _ in range(4):
        clock.t += 4
        assert requests(c) == []
    assert c.gaps("gw") == []


def test_a_gone_answer_to_another_devices_request_does_not_end_this_devices_gap():
    # gone runs are "of any device (it cannot know whose a deleted seq was)"; d's 3 and 4 are
    # held, neither arrived nor said gone: "again every `retry_after` seconds ... until the
    # units arrive or the gateway says they are gone"
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, retry_after=3.0, clock=clock)
    c.feed(msg("gw", "d", [1], [make_unit("d", 1)], 0))
    c.feed(msg("gw", "e", [2], [make_unit("e", 2)], 0))
    c.feed(msg("gw", "e", [8], [make_unit("e", 8)], 7))  # e's 7 lost
    clock.t += 1.5
    (r,) = requests(c)
    assert (r.device, r.last) == ("e", 7)
    # d's 3, 4, 5 lost by the broker; 5 since dropped by retention
    c.feed(msg("gw", "d", [6], [make_unit("d", 6)], 5))
    clock.t += 0.1
    # the answer to e's request: 5 is no longer held (whoever's it was), then e's 7
    c.feed(wire.encode_gone("gw", r.first, r.last, "e", [(5, 5)]))
    c.feed(msg("gw", "e", [7], [make_unit("e", 7)], 2, replay=True))
    assert len(c.take_gone()) == 1
    clock.t += 1.5
    assert covers(requests(c), "d", [3, 4])


def test_from_start_keeps_asking_for_what_the_gone_answer_did_not_name():
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, retry_after=3.0, from_start=True, clock=clock)
    c.feed(msg("gw", "d", [6], [make_unit("d", 6)], 5))
    clock.t += 1.5
    (r,) = requests(c)
    assert (r.first, r.last) == (1, 5)
    c.feed(wire.encode_gone("gw", 1, 5, "d", [(1, 3), (5, 5)]))
    # 4 is held; its replay is lost: neither arrived nor gone
    clock.t += 3.5
    assert covers(requests(c), "d", [4])


def test_a_gap_wider_than_a_request_goes_in_several_requests():
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, retry_after=3.0, clock=clock)
    c.feed(msg("gw", "d", [1], [make_unit("d", 1)], 0))
    top = 25_000_001
    c.feed(msg("gw", "d", [top + 1], [make_unit("d", top + 1)], top))
    clock.t += 1.5
    reqs = requests(c)
    # "(a gap wider than the 10,000,000 seqs a request may span, in several)"
    assert len(reqs) >= 3, reqs
    assert all(r.device == "d" and r.gateway == "gw" for r in reqs)
    spans = sorted((r.first, r.last) for r in reqs)
    assert spans[0][0] <= 2 and spans[-1][1] == top
    for (_, b), (a, _) in zip(spans, spans[1:], strict=False):
        assert a <= b + 1, spans  # no hole between them
    clock.t += 3.5
    again = sorted((r.first, r.last) for r in requests(c))
    assert again == spans  # asked again, all of it
    # the gateway answers: everything gone but the top
    for first, last in spans:
        runs = [(first, min(last, top - 1))] if first <= top - 1 else []
        c.feed(wire.encode_gone("gw", first, last, "d", runs))
    c.feed(msg("gw", "d", [top], [make_unit("d", top)], 1, replay=True))
    assert len(c.take_gone()) == len(spans)
    for _ in range(3):
        clock.t += 4
        assert requests(c) == []
    assert c.gaps("gw") == []


# --------------------------------------------------------------------------------------------
# Which devices, where the chain starts


def test_seqs_of_other_devices_are_never_taken_for_gaps():
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, retry_after=3.0, clock=clock)
    # subscribed to d only: d's units are 1, 5, 9, 200; the rest are other devices'
    chain = [(1, 0), (5, 1), (9, 5), (200, 9)]
    for seq, pv in chain:
        assert delivered_seqs(c.feed(msg("gw", "d", [seq], [make_unit("d", seq)], pv))) == [seq]
        clock.t += 2
        assert requests(c) == []
    clock.t += 100
    assert requests(c) == []
    assert c.gaps("gw") == []
    # "seen: ... delivered, or known from a device's chain to be another device's"
    assert c.seen("gw") == [(1, 200)]


def test_a_consumer_starting_mid_stream_asks_nothing_before_the_first_unit():
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, retry_after=3.0, clock=clock)
    c.feed(msg("gw", "d", [100], [make_unit("d", 100)], 50))
    for _ in range(4):
        clock.t += 5
        assert requests(c) == []
    assert c.gaps("gw") == []
    # a late unit from before the start is delivered, and what it names is not asked for
    assert delivered_seqs(c.feed(msg("gw", "d", [50], [make_unit("d", 50)], 40))) == [50]
    clock.t += 5
    assert requests(c) == []
    # after the start the chain counts
    c.feed(msg("gw", "d", [120], [make_unit("d", 120)], 110))
    clock.t += 1.5
    reqs = requests(c)
    assert covers(reqs, "d", [110]) and all(r.first >= 100 and r.last == 110 for r in reqs), reqs


def test_from_start_asks_for_everything_the_gateway_still_holds():
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, retry_after=3.0, from_start=True, clock=clock)
    c.feed(msg("gw", "d", [100], [make_unit("d", 100)], 50))
    clock.t += 1.5
    reqs = requests(c)
    assert reqs and all(r.device == "d" for r in reqs)
    assert min(r.first for r in reqs) == 1 and max(r.last for r in reqs) == 50, reqs
    # the gateway holds 40 and 50 of d; 1..30 are gone
    c.feed(wire.encode_gone("gw", 1, 50, "d", [(1, 30)]))
    out = c.feed(msg("gw", "d", [40, 50], [make_unit("d", 40), make_unit("d", 50)], 0, replay=True))
    assert [(d.seq, d.replay) for d in out] == [(40, True), (50, True)]
    assert len(c.take_gone()) == 1
    for _ in range(3):
        clock.t += 4
        assert requests(c) == []
    assert c.gaps("gw") == []


def test_from_start_with_a_first_unit_asks_nothing():
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, from_start=True, clock=clock)
    c.feed(msg("gw", "d", [7], [make_unit("d", 7)], 0))  # pv 0: no earlier unit held
    clock.t += 100
    assert requests(c) == []


def test_resume_makes_what_was_lost_while_down_a_gap():
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, retry_after=3.0, clock=clock)
    c.resume("gw", "d", 100)
    c.feed(msg("gw", "d", [150], [make_unit("d", 150)], 130))
    clock.t += 1.5
    reqs = requests(c)
    assert reqs and all(r.device == "d" for r in reqs)
    assert covers(reqs, "d", [130]) and min(r.first for r in reqs) >= 100, reqs
    assert max(r.last for r in reqs) == 130


def test_resume_at_the_right_place_asks_nothing_and_older_units_are_delivered_again():
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, clock=clock)
    c.resume("gw", "d", 100)
    assert delivered_seqs(c.feed(msg("gw", "d", [150], [make_unit("d", 150)], 100))) == [150]
    clock.t += 100
    assert requests(c) == []
    # resume(): "units below `seq` sent again are delivered again ..., `seq` itself is taken
    # as kept and is not" (its database holds it: the chain goes on from it without a gap)
    assert delivered_seqs(c.feed(msg("gw", "d", [99], [make_unit("d", 99)], 90))) == [99]
    assert delivered_seqs(c.feed(msg("gw", "d", [100], [make_unit("d", 100)], 99))) == []
    clock.t += 100
    assert requests(c) == []


def test_a_lost_tail_is_found_when_the_next_unit_arrives():
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, clock=clock)
    c.feed(msg("gw", "d", [1], [make_unit("d", 1)], 0))
    # 2 and 3 (d) lost: nothing can know yet
    clock.t += 60
    assert requests(c) == []
    c.feed(msg("gw", "d", [4], [make_unit("d", 4)], 3))
    clock.t += 1.5
    assert covers(requests(c), "d", [2, 3])


# --------------------------------------------------------------------------------------------
# Continuation


BIG = make_unit("d", 7, big=True)  # 1114 bytes: 256-byte slices -> 5 parts, 128 -> 9


def test_parts_in_any_order_with_duplicates_join_to_the_unit_once():
    c = wire.Consumer(clock=Clock())
    ps = parts("gw", "d", 7, BIG, 0, 256)
    assert len(ps) == 5
    order = [3, 0, 3, 4, 1, 0]
    outs = [c.feed(ps[i]) for i in order]
    # "a consumer MUST NOT count seq s as received before it holds every part"
    assert all(o == [] for o in outs)
    assert all(7 not in range(a, b + 1) for a, b in c.seen("gw"))
    outs.append(c.feed(ps[2]))
    (d,) = outs[-1]
    assert (d.gateway, d.device, d.seq, d.replay) == ("gw", "d", 7, False)
    assert same_unit(d.unit, BIG)
    # later parts (and the whole unit) are repeats
    assert all(c.feed(p) == [] for p in ps)
    assert c.feed(msg("gw", "d", [7], [BIG], 0)) == []
    assert c.undecodable == 0


def test_an_incomplete_unit_is_a_gap_of_its_device():
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, retry_after=3.0, clock=clock)
    c.feed(msg("gw", "d", [6], [make_unit("d", 6)], 0))
    ps = parts("gw", "d", 7, BIG, 6, 256)
    for p in ps[:-1]:
        assert c.feed(p) == []
    c.feed(msg("gw", "d", [8], [make_unit("d", 8)], 7))
    assert any(dev == "d" and lo <= 7 <= hi for dev, lo, hi in c.gaps("gw"))
    clock.t += 1.5
    assert covers(requests(c), "d", [7])
    # the replay is split another way (another cap): joined all the same
    out = []
    for p in parts("gw", "d", 7, BIG, 6, 128, replay=True):
        out += c.feed(p)
    assert [(d.seq, d.replay) for d in out] == [(7, True)] and same_unit(out[0].unit, BIG)
    for _ in range(3):
        clock.t += 4
        assert requests(c) == []


def test_a_part_of_another_count_drops_the_parts_held():
    # "`edgeos.wire.Consumer` drops the parts it holds when a part of another count ... arrives"
    refused = []
    c = wire.Consumer(clock=Clock(), on_refused=lambda *a: refused.append(a))
    four = parts("gw", "d", 7, BIG, 0, 256)  # 5 parts
    nine = parts("gw", "d", 7, BIG, 0, 128)  # 9 parts
    for p in four[:4]:
        assert c.feed(p) == []
    assert c.feed(nine[0]) == []  # drops four[0..3]
    # so four's last part does not complete anything
    assert c.feed(four[4]) == []
    assert refused == [] and c.undecodable == 0
    # a whole split, after that, joins
    out = []
    for p in four:
        out += c.feed(p)
    assert len(out) == 1 and same_unit(out[0].unit, BIG)
    assert refused == [] and c.undecodable == 0


def test_two_splits_interleaved_never_join_into_other_bytes():
    refused = []
    c = wire.Consumer(clock=Clock(), on_refused=lambda *a: refused.append(a))
    a = parts("gw", "d", 7, BIG, 0, 256)
    b = parts("gw", "d", 7, BIG, 0, 128)
    stream = [a[0], a[1], b[0], b[1], b[2], a[2], a[3], b[3], b[4], b[5], b[6], b[7], a[4], b[8]]
    out = []
    for p in stream:
        out += c.feed(p)
    # whatever joined must be the unit ("Joining slices of two splits gives bytes that do not
    # decode"): never another unit, never an undecodable one
    assert all(same_unit(d.unit, BIG) for d in out) and len(out) <= 1
    assert refused == [] and c.undecodable == 0
    for p in a:
        out += c.feed(p)
    assert len(out) == 1 and same_unit(out[0].unit, BIG)
    assert refused == [] and c.undecodable == 0


def test_a_part_of_another_slice_size_drops_the_parts_held():
    # "(or, but for the last, of another slice size)": a garbled split of the same count
    refused = []
    c = wire.Consumer(clock=Clock(), on_refused=lambda *a: refused.append(a))
    good = parts("gw", "d", 7, BIG, 0, 256)  # 256 * 4 + 90
    odd = parts("gw", "d", 7, BIG, 0, 240)  # 240 * 4 + 154: also 5 parts
    assert len(odd) == len(good) == 5
    out = []
    for p in [good[0], good[1], odd[2], good[2], good[3], good[4], good[0], good[1]]:
        # odd[2] drops good[0..1]; good[2] (another slice size than the odd[2] held) drops it
        out += c.feed(p)
    assert len(out) == 1 and same_unit(out[0].unit, BIG), out
    assert refused == [] and c.undecodable == 0


def test_the_whole_unit_arriving_drops_its_parts():
    c = wire.Consumer(clock=Clock())
    ps = parts("gw", "d", 7, BIG, 0, 256)
    for p in ps[:3]:
        assert c.feed(p) == []
    (d,) = c.feed(msg("gw", "d", [7], [BIG], 0))
    assert same_unit(d.unit, BIG)
    for p in ps:
        assert c.feed(p) == []


def test_max_partial_drops_the_oldest_incomplete_unit_which_its_gap_asks_for():
    clock = Clock()
    # "at most `max_partial` bytes of incomplete units held; the oldest incomplete unit is
    # dropped beyond, and asked for again by its gap"
    c = wire.Consumer(reorder_wait=1.0, retry_after=3.0, max_partial=1200, clock=clock)
    a_blob = make_unit("d", 2, big=True)
    b_blob = make_unit("d", 3, big=True)
    c.feed(msg("gw", "d", [1], [make_unit("d", 1)], 0))
    pa = parts("gw", "d", 2, a_blob, 1, 256)  # 5 parts
    pb = parts("gw", "d", 3, b_blob, 2, 256)
    for p in pa[:4]:  # 1024 bytes held
        assert c.feed(p) == []
    assert c.feed(pb[0]) == []  # 1280 > 1200: a's parts dropped
    out = []
    for p in pb[1:]:
        out += c.feed(p)
    assert delivered_seqs(out) == [3] and same_unit(out[0].unit, b_blob)
    assert c.feed(pa[4]) == []  # a is not complete: its first parts were dropped
    clock.t += 1.5
    assert covers(requests(c), "d", [2])
    (d,) = c.feed(msg("gw", "d", [2], [a_blob], 1, replay=True))
    assert same_unit(d.unit, a_blob)
    clock.t += 10
    assert requests(c) == []


def test_max_partial_also_holds_when_the_oldest_incomplete_unit_grows():
    # a's first part, then b's, then the rest of a: at a's fourth part 1,280 bytes would be
    # held (> 1,200): "beyond it, the other incomplete units are dropped, oldest first" - b,
    # and a, the unit being joined, completes; b's other parts no longer complete it
    c = wire.Consumer(max_partial=1200, clock=Clock())
    a_blob = make_unit("d", 2, big=True)
    b_blob = make_unit("d", 3, big=True)
    pa = parts("gw", "d", 2, a_blob, 1, 256)
    pb = parts("gw", "d", 3, b_blob, 2, 256)
    out = c.feed(pa[0]) + c.feed(pb[0])
    for p in pa[1:]:
        out += c.feed(p)
    assert delivered_seqs(out) == [2] and same_unit(out[0].unit, a_blob)
    for p in pb[1:]:
        assert c.feed(p) == []


def test_a_unit_larger_than_max_partial_is_not_joined():
    c = wire.Consumer(max_partial=600, clock=Clock())
    out = []
    for p in parts("gw", "d", 7, BIG, 0, 256):
        out += c.feed(p)
    # joining it would hold 1024 bytes of it at once
    assert out == []


# --------------------------------------------------------------------------------------------
# What it refuses


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_value_error_and_changes_nothing(junk):
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, clock=clock)
    c.feed(msg("gw", "d", [1], [make_unit("d", 1)], 0))
    c.feed(msg("gw", "d", [3], [make_unit("d", 3)], 2))
    before = (c.gaps("gw"), c.seen("gw"))
    try:
        out = c.feed(junk)
    except ValueError:
        # "A payload that is neither raises ValueError (and changes nothing)."
        assert (c.gaps("gw"), c.seen("gw")) == before
        clock.t += 1.5
        assert covers(requests(c), "d", [2])
        assert c.take_gone() == []
    else:
        assert isinstance(out, list)  # well formed by chance


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_mutated_messages_raise_only_value_error(data):
    payload = bytearray(
        data.draw(
            st.sampled_from(
                [
                    msg("gw", "d", [4, 5], [make_unit("d", 4), make_unit("d", 5)], 3),
                    parts("gw", "d", 7, BIG, 0, 256)[1],
                    wire.encode_gone("gw", 1, 9, "d", [(2, 3), (5, 9)]),
                ]
            )
        )
    )
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    c = wire.Consumer(clock=Clock())
    try:
        c.feed(bytes(payload))
    except ValueError:
        pass
    c.requests()
    c.take_gone()


@pytest.mark.parametrize(
    "doc",
    [
        {"v": 1, "gw": "gw", "first": 5, "last": 8, "dev": "d", "gone": [[3, 6]]},  # outside
        {"v": 1, "gw": "gw", "first": 5, "last": 8, "dev": "d", "gone": [[6, 9]]},  # outside
        {"v": 1, "gw": "gw", "first": 5, "last": 8, "dev": "d", "gone": [[7, 6]]},  # reversed
        {"v": 1, "gw": 7, "first": 5, "last": 8, "dev": "d", "gone": [[6, 6]]},
        {"v": 1, "gw": "gw", "first": 5, "last": 8, "dev": 3, "gone": [[6, 6]]},
        {"v": 1, "gw": "gw", "first": 5, "last": 8, "dev": "d", "gone": [[6]]},
        {"v": 1, "gw": "gw", "first": 5, "last": 8, "dev": "d", "gone": [["6", 6]]},
        {"v": 2, "gw": "gw", "first": 5, "last": 8, "dev": "d", "gone": [[6, 6]]},
        {"v": 1, "gw": "gw", "first": 5, "last": 8, "dev": "d"},
    ],
)
def test_a_gone_message_that_is_not_well_formed_raises_value_error(doc):
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, retry_after=3.0, clock=clock)
    c.feed(msg("gw", "d", [4], [make_unit("d", 4)], 0))
    c.feed(msg("gw", "d", [9], [make_unit("d", 9)], 8))
    clock.t += 1.5
    assert covers(requests(c), "d", [5, 6, 7, 8])
    # "a gone message that is not well formed, e.g. a run outside its `first`..`last`, raises
    # ValueError like any other payload it cannot take"
    with pytest.raises(ValueError):
        c.feed(msgpack.packb(doc))
    assert c.take_gone() == []
    clock.t += 3.5
    assert covers(requests(c), "d", [5, 6, 7, 8])


def test_a_data_message_of_another_payload_version_or_a_request_raises_value_error():
    c = wire.Consumer(clock=Clock())
    good = msgpack.unpackb(msg("gw", "d", [1], [make_unit("d", 1)], 0))
    good["v"] = 2
    with pytest.raises(ValueError):
        c.feed(msgpack.packb(good))
    with pytest.raises(ValueError):
        c.feed(wire.encode_replay_request("gw", 1, 5, "d"))
    assert c.seen("gw") == []


def test_a_unit_of_another_device_is_refused_and_delivered_under_its_own():
    refused = []
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, clock=clock, on_refused=lambda *a: refused.append(a))
    c.feed(msg("gw", "d", [1], [make_unit("d", 1)], 0))
    c.feed(msg("gw", "e", [2], [make_unit("e", 2)], 0))
    stray = make_unit("e", 3)
    # a garbled message: dev "d" but the unit's own device is "e"
    assert c.feed(msg("gw", "d", [3], [stray], 1)) == []
    # "counted in `undecodable`, as a unit that does not decode"
    assert c.undecodable == 1
    # "`Consumer(on_refused=f)` calls `f(gateway, device, seq, unit_bytes, why)`"
    assert len(refused) == 1
    gw, dev, seq, blob, why = refused[0]
    assert (gw, seq, bytes(blob)) == ("gw", 3, stray) and dev in ("d", "e") and why
    # "its seq is delivered when it arrives under its own device"
    out = c.feed(msg("gw", "e", [3], [stray], 2))
    assert [(d.device, d.seq) for d in out] == [("e", 3)] and same_unit(out[0].unit, stray)


def test_an_undecodable_unit_is_refused_and_its_gap_asks_for_it():
    refused = []
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, retry_after=3.0, clock=clock, on_refused=lambda *a: refused.append(a))
    c.feed(msg("gw", "d", [1], [make_unit("d", 1)], 0))
    bad = b"\x93\x01\x02"  # msgpack, not a unit
    assert c.feed(msg("gw", "d", [2], [bad], 1)) == []
    assert c.undecodable == 1
    assert [(a[0], a[1], a[2], bytes(a[3])) for a in refused] == [("gw", "d", 2, bad)]
    c.feed(msg("gw", "d", [3], [make_unit("d", 3)], 2))
    clock.t += 1.5
    # "not delivered (its gap asks for it again)"
    assert covers(requests(c), "d", [2])
    out = c.feed(msg("gw", "d", [2], [make_unit("d", 2)], 1, replay=True))
    assert delivered_seqs(out) == [2]
    clock.t += 10
    assert requests(c) == []


def test_a_joined_unit_that_does_not_decode_goes_to_on_refused_whole():
    refused = []
    c = wire.Consumer(clock=Clock(), on_refused=lambda *a: refused.append(a))
    junk = bytes(range(256)) * 3
    for p in parts("gw", "d", 7, junk, 0, 256):
        assert c.feed(p) == []
    # "a unit joined from parts exists nowhere else": f gets the joined bytes
    assert [(a[0], a[1], a[2], bytes(a[3])) for a in refused] == [("gw", "d", 7, junk)]
    assert c.undecodable == 1


# --------------------------------------------------------------------------------------------
# Memory


def test_memory_does_not_grow_with_the_number_of_units():
    # "Memory follows the number of gaps and devices."
    clock = Clock()
    c = wire.Consumer(reorder_wait=1.0, clock=clock)
    blobs = {d: make_unit(d, 1) for d in ("a", "b", "c")}
    prev = {"a": 0, "b": 0, "c": 0}
    mine = {"a", "b"}  # subscribed to two of three devices

    def run(lo, hi):
        for seq in range(lo, hi):
            dev = "abc"[(seq * 7 // 3) % 3]
            if dev in mine:
                c.feed(msg("gw", dev, [seq], [blobs[dev]], prev[dev]))
            prev[dev] = seq
            clock.t += 0.001

    run(1, 3_001)
    c.requests()
    tracemalloc.start()
    try:
        run(3_001, 4_001)
        base = tracemalloc.get_traced_memory()[0]
        run(4_001, 16_001)
        c.requests()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert c.gaps("gw") == [] and c.requests() == []
    assert len(c.seen("gw")) <= 2, c.seen("gw")[:5]
    assert grown < 150_000, grown  # 12,000 more units: a set of their seqs alone is ~0.5 MB


# --------------------------------------------------------------------------------------------
# The whole story: a gateway, a lossy broker, replays


@dataclass
class Live:
    gw: str
    dev: str
    seqs: list[int]
    prev: int
    history: bool
    split: int | None = None  # slice size when sent as a continuation


class Sim:
    def __init__(self, rng: random.Random, p) -> None:
        self.rng = rng
        self.p = p
        self.blob: dict[tuple[str, int], bytes] = {}
        self.dev_of: dict[tuple[str, int], str] = {}
        self.chain: dict[tuple[str, str], list[int]] = {}  # every unit of (gw, dev), ascending
        self.dropped: dict[str, set[int]] = {}  # kept copies dropped by retention since sent
        self.top: dict[str, int] = {}
        self.messages: list[Live] = []

    def build(self, gw: str, devices: list[str], n_units: int, history: int) -> None:
        rng, p = self.rng, self.p
        seq = rng.randint(0, 3)
        last = {d: 0 for d in devices}
        run: list[int] = []
        run_dev = None
        run_hist = False
        self.dropped[gw] = set()
        units = []
        dev = rng.choice(devices)
        for i in range(n_units):
            # seqs: shared by the devices, strictly increasing, sometimes jumping (quarantine,
            # bad units: gaps that stay gaps)
            seq += 1 if rng.random() < 0.9 else rng.randint(2, 40)
            if rng.random() < 0.5:
                dev = rng.choice(devices)
            big = rng.random() < p["p_big"]
            self.blob[(gw, seq)] = make_unit(dev, seq, n=rng.randint(1, 6), big=big)
            self.dev_of[(gw, seq)] = dev
            self.chain.setdefault((gw, dev), []).append(seq)
            units.append((seq, dev, i < history))
            if rng.random() < p["p_gone"]:
                self.dropped[gw].add(seq)
        # Retention and the budget drop the oldest first: a device's newest unit is the last to
        # go (it is what a gap whose top is gone asks up to, docs/payload.md).
        for d in devices:
            if (gw, d) in self.chain:
                self.dropped[gw].discard(self.chain[(gw, d)][-1])
        self.top[gw] = seq
        # messages: consecutive units of one device, in seq order
        for seq, dev, hist in units:
            if run and (dev != run_dev or len(run) >= 3 or rng.random() < 0.5 or hist != run_hist):
                self._emit(gw, run_dev, run, last, run_hist)
                run = []
            run_dev, run_hist = dev, hist
            run.append(seq)
        if run:
            self._emit(gw, run_dev, run, last, run_hist)

    def _emit(self, gw, dev, run, last, hist) -> None:
        rng = self.rng
        # a long unit goes alone; some are split for the size cap
        for seqs in [run] if all(len(self.blob[(gw, s)]) < 600 for s in run) else [[s] for s in run]:
            m = Live(gw, dev, seqs, last[dev], hist)
            blob = self.blob[(gw, seqs[0])]
            if len(seqs) == 1 and len(blob) > 600 and rng.random() < self.p["p_split"]:
                m.split = rng.choice([128, 256, 512])
            last[dev] = seqs[-1]
            self.messages.append(m)

    def held(self, gw: str, dev: str) -> list[int]:
        return [s for s in self.chain.get((gw, dev), []) if s not in self.dropped[gw]]

    def payloads(self, gw, dev, seqs, prev, *, replay, split) -> list[bytes]:
        if split:
            return parts(gw, dev, seqs[0], self.blob[(gw, seqs[0])], prev, split, replay=replay)
        return [msg(gw, dev, seqs, [self.blob[(gw, s)] for s in seqs], prev, replay=replay)]

    def answer(self, r: wire.ReplayRequest, given: int) -> tuple[list[bytes], list[list[bytes]]]:
        """The gateway's answer: gone messages, then the held units of `dev` re-sent."""
        gw = r.gateway
        last = min(r.last, given)
        gone_msgs: list[bytes] = []
        if r.first <= last:
            held_any = {s for (g, s) in self.dev_of if g == gw and s not in self.dropped[gw]}
            runs: list[list[int]] = []
            for s in range(r.first, last + 1):
                if s not in held_any:
                    if runs and runs[-1][1] == s - 1:
                        runs[-1][1] = s
                    else:
                        runs.append([s, s])
            for i in range(0, len(runs), 1000):
                gone_msgs.append(wire.encode_gone(gw, r.first, last, r.device, [tuple(x) for x in runs[i : i + 1000]]))
        held = self.held(gw, r.device)
        sends: list[list[bytes]] = []
        todo = [s for s in held if r.first <= s <= last]
        i = 0
        while i < len(todo):
            s = todo[i]
            k = held.index(s)
            prev = held[k - 1] if k else 0  # "the device's previous unit held now"
            blob = self.blob[(gw, s)]
            if len(blob) > 600:
                split = self.rng.choice([None, 128, 256, 512])
                sends.append(self.payloads(gw, r.device, [s], prev, replay=True, split=split))
                i += 1
            else:
                group = [s]
                if i + 1 < len(todo) and len(self.blob[(gw, todo[i + 1])]) <= 600 and self.rng.random() < 0.5:
                    group.append(todo[i + 1])
                sends.append(self.payloads(gw, r.device, group, prev, replay=True, split=None))
                i += len(group)
        return gone_msgs, sends


SIM = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**32 - 1),
        "gateways": st.integers(1, 2),
        "devices": st.integers(1, 3),
        "units": st.integers(10, 60),
        "history": st.integers(0, 8),
        "p_loss": st.sampled_from([0.1, 0.3, 0.6, 0.0]),
        "p_dup": st.sampled_from([0.1, 0.3, 0.0]),
        "window": st.sampled_from([4.0, 1.0, 12.0, 0.0]),
        "p_big": st.sampled_from([0.3, 0.6, 0.0]),
        "p_split": st.sampled_from([0.5, 1.0, 0.0]),
        "p_gone": st.sampled_from([0.0, 0.1, 0.4]),
        "p_resend": st.sampled_from([0.3, 0.0]),
        "spurious": st.integers(0, 6),
        "p_replay_loss": st.sampled_from([0.0, 0.3]),
        "subscribe_all": st.booleans(),
        "from_start": st.booleans(),
    }
)


# The same 60 examples each run (CI stays reproducible); sweeps of 3,000 random examples pass
# too. A gone unit that a held-now `pv` passes over is reported when the consumer knew it as a
# gap's top (test above); one it never heard of is passed over (docs/payload.md), and the
# simulated replays asked by other consumers carry the live `pv`, so this test does not make it.
@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SIM)
def test_a_lossy_broker_and_replays_end_with_every_unit_once(p):
    rng = random.Random(p["seed"])
    sim = Sim(rng, p)
    gws = ["gw-a", "gw-b"][: p["gateways"]]
    all_devs = ["press1", "press2", "oven"][: p["devices"]]
    for gw in gws:
        sim.build(gw, all_devs, p["units"], p["history"])
    subscribed = {
        (gw, d) for gw in gws for d in all_devs if p["subscribe_all"] or d != all_devs[-1] or len(all_devs) == 1
    }
    clock = Clock()
    reorder_wait, retry_after = 1.0, 3.0
    refused = []
    c = wire.Consumer(
        reorder_wait=reorder_wait,
        retry_after=retry_after,
        from_start=p["from_start"],
        clock=clock,
        on_refused=lambda *a: refused.append(a),
    )

    delivered: dict[tuple[str, int], int] = {}
    gone_seen: dict[str, list[tuple[int, int]]] = {gw: [] for gw in gws}
    given_top = {gw: 0 for gw in gws}
    first_seen: dict[tuple[str, str], int] = {}
    events: list[str] = []

    def feed(payload: bytes, what: str) -> None:
        env = None
        try:
            env = wire.decode_envelope(payload)
        except ValueError:
            pass
        out = c.feed(payload)
        events.append(f"t={clock.t:.2f} {what} -> {[d.seq for d in out]}")
        if env is None:
            assert out == []
        for d in out:
            key = (d.gateway, d.seq)
            assert key not in delivered, f"delivered twice: {key}\n" + "\n".join(events[-40:])
            delivered[key] = 1
            assert d.gateway == env.gateway and d.device == env.device and d.seq in env.seqs
            assert d.replay == env.replay
            assert sim.dev_of[key] == d.device
            assert same_unit(d.unit, sim.blob[key])
        for g in c.take_gone():
            assert g.gateway in gws
            for a, b in g.ranges:
                assert g.first <= a <= b <= g.last
                gone_seen[g.gateway].append((a, b))

    def is_gone(gw, s):
        return any(a <= s <= b for a, b in gone_seen[gw])

    # the broker: a priority queue of (arrival key, tiebreak, payload, label)
    heap: list = []
    tick = [0]

    def put(key: float, payload: bytes, label: str) -> None:
        tick[0] += 1
        heapq.heappush(heap, (key, tick[0], payload, label))

    # the consumer starts after the history: it gets none of it, then each device's first live
    # message in order, whole
    live = [m for m in sim.messages if (m.gw, m.dev) in subscribed and not m.history]
    # interleave the gateways (each keeps its order)
    lead: list[Live] = []
    rest: list[Live] = []
    for m in live:
        if (m.gw, m.dev) not in first_seen:
            first_seen[(m.gw, m.dev)] = m.seqs[0]
            lead.append(m)
        else:
            rest.append(m)
    final = {}
    for m in rest:
        final[(m.gw, m.dev)] = m
    for m in lead:
        given_top[m.gw] = max(given_top[m.gw], max(m.seqs))
        for pl in sim.payloads(m.gw, m.dev, m.seqs, m.prev, replay=False, split=None):
            feed(pl, f"lead {m.gw}/{m.dev} {m.seqs} pv={m.prev}")
        clock.t += 0.05

    pos = 0.0
    for m in rest:
        pos += 1.0
        keep = m is final[(m.gw, m.dev)]
        split = None if keep else m.split
        pls = sim.payloads(m.gw, m.dev, m.seqs, m.prev, replay=False, split=split)
        for i, pl in enumerate(pls):
            label = f"live {m.gw}/{m.dev} {m.seqs} pv={m.prev} part={i}/{len(pls) if split else '-'}"
            if not keep and rng.random() < p["p_loss"]:
                continue
            put(pos + rng.uniform(0, p["window"]), pl, label)
            if rng.random() < p["p_dup"]:
                put(pos + rng.uniform(0, p["window"] * 2 + 2), pl, "dup " + label)
        # the gateway sends it again after a reconnect, perhaps under another cap
        if rng.random() < p["p_resend"]:
            s2 = rng.choice([None, 128, 256, 512]) if len(m.seqs) == 1 else None
            for pl in sim.payloads(m.gw, m.dev, m.seqs, m.prev, replay=False, split=s2):
                if rng.random() >= p["p_loss"]:
                    put(pos + rng.uniform(1, 1 + p["window"] * 2), pl, f"resend {m.gw}/{m.dev} {m.seqs}")
    # replays asked by other consumers (sent before retention dropped anything: the live pv)
    pool = [m for m in sim.messages if (m.gw, m.dev) in first_seen]
    for _ in range(p["spurious"] if pool else 0):
        m = rng.choice(pool)
        split = rng.choice([None, 256]) if len(m.seqs) == 1 else None
        for pl in sim.payloads(m.gw, m.dev, m.seqs, m.prev, replay=True, split=split):
            put(rng.uniform(0, pos + 1), pl, f"spurious {m.gw}/{m.dev} {m.seqs}")

    rounds = [0]

    def ask() -> None:
        rounds[0] += 1
        reqs = requests(c)
        for r in reqs:
            events.append(f"t={clock.t:.2f} request {r}")
            assert r.gateway in gws and (r.gateway, r.device) in subscribed, r
            if not p["from_start"]:
                # "asks nothing before the first unit it sees of each device"
                assert r.first >= first_seen[(r.gateway, r.device)], r
            # asked only while something of it is missing: "until the units arrive or the
            # gateway says they are gone"
            missing = [
                s
                for s in sim.chain[(r.gateway, r.device)]
                if r.first <= s <= r.last and (r.gateway, s) not in delivered and not is_gone(r.gateway, s)
            ]
            if not missing:
                # A gap whose top (the `pv` that opened it) is gone asks up to a unit of the
                # device above it (the one that named it, or if that is gone too the newest
                # seen, or while none is known, up to the top): only such a unit's replay, whose
                # `pv` is the device's previous unit held now, tells which seqs below were the
                # device's (docs/payload.md).
                chain = sim.chain[(r.gateway, r.device)]
                assert (
                    r.last in chain
                    and ((r.gateway, r.last) in delivered or is_gone(r.gateway, r.last))
                    and any(is_gone(r.gateway, x) for x in chain if r.first <= x <= r.last)
                ), f"asked for nothing missing: {r}\n" + "\n".join(events[-40:])
        for r in reqs:
            gone_msgs, sends = sim.answer(r, given_top[r.gateway])
            for g in gone_msgs:  # before the units, never lost here
                feed(g, f"gone {r}")
            lossy = rounds[0] < 8 and p["p_replay_loss"]
            base = heap[0][0] if heap else pos
            for pls in sends:
                for pl in pls:
                    if lossy and rng.random() < p["p_replay_loss"]:
                        continue
                    put(base + rng.uniform(0, max(p["window"], 0.5)), pl, f"replay for {r}")
                    if rng.random() < p["p_dup"]:
                        put(base + rng.uniform(0, p["window"] + 1), pl, f"dup replay for {r}")

    next_ask = clock.t + 1.0
    for _ in range(200_000):  # bounded: a consumer that never stops asking fails below
        if not heap:
            break
        _, _, pl, label = heapq.heappop(heap)
        env = None
        try:
            env = wire.decode_envelope(pl)
        except ValueError:
            pass
        if env is not None:  # a replay too: only a unit given can be sent again
            given_top[env.gateway] = max(given_top[env.gateway], max(env.seqs))
        feed(pl, label)
        clock.t += 0.05
        if clock.t >= next_ask:
            ask()
            next_ask = clock.t + 1.0
    # the tail: ask and answer until quiet
    quiet = 0.0
    for _ in range(400):
        clock.t += 1.0
        before = len(events)
        ask()
        while heap:
            _, _, pl, label = heapq.heappop(heap)
            feed(pl, label)
            clock.t += 0.01
        quiet = quiet + 1.0 if len(events) == before else 0.0
        if quiet > 3 * retry_after + reorder_wait:
            break
    trace = "\n".join(events[-60:])
    note(trace)

    assert refused == [] and c.undecodable == 0
    for gw in gws:
        # "no outstanding gaps"
        assert c.gaps(gw) == [], (gw, c.gaps(gw))
    for (gw, dev), seqs in sim.chain.items():
        if (gw, dev) not in subscribed:
            continue
        for s in seqs:
            key = (gw, s)
            before_start = s < first_seen.get((gw, dev), 10**18)
            if (gw, dev) not in first_seen:
                continue  # the consumer never saw this device
            if before_start and not p["from_start"]:
                continue  # "asks nothing before the first unit it sees of each device"
            if s in sim.dropped[gw]:
                # held no longer: delivered (it got through), or reported gone
                assert key in delivered or is_gone(gw, s), (key, "neither delivered nor gone")
            else:
                assert key in delivered, (key, "never delivered", dev)
    for gw, s in delivered:
        assert (gw, sim.dev_of[(gw, s)]) in subscribed
    for _ in range(3):
        clock.t += retry_after + 1
        assert requests(c) == []
