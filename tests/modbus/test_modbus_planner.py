"""Coalescing without a wire: limits, optimality, and never worse than Telegraf's strategies."""

from __future__ import annotations

import itertools

from edgeos.protocols.modbus.config import TagSpec
from edgeos.protocols.modbus.planner import TCP_REQUEST_COST, Limits, Request, plan, serial_request_cost, split
from hypothesis import example, given, settings
from hypothesis import strategies as st


def regs(*spans: tuple[int, int]) -> list[TagSpec]:
    return [TagSpec("hr", s, n, "uint16" if n == 1 else "uint32") for s, n in spans]


def covers(reqs: list[Request], specs: list[TagSpec], limits: Limits) -> None:
    seen = sorted(m for r in reqs for m in r.members)
    assert seen == list(range(len(specs)))
    for r in reqs:
        assert r.count <= (limits.max_bits if r.is_bits else limits.max_registers)
        for m in r.members:
            s = specs[m]
            assert s.table == r.table and r.start <= s.start and s.start + s.count <= r.start + r.count


def test_neighbours_share_a_request_up_to_the_protocol_limit() -> None:
    specs = regs(*[(i, 1) for i in range(300)])
    reqs = plan(specs, Limits())
    assert [r.count for r in reqs] == [125, 125, 50]
    covers(reqs, specs, Limits())


def test_device_limits_and_gaps_are_respected() -> None:
    specs = regs((0, 2), (2, 1), (10, 1), (100, 2))
    assert [(r.start, r.count) for r in plan(specs, Limits())] == [(0, 102)]
    assert [(r.start, r.count) for r in plan(specs, Limits(max_gap=10))] == [(0, 11), (100, 2)]
    assert [(r.start, r.count) for r in plan(specs, Limits(max_gap=0))] == [(0, 3), (10, 1), (100, 2)]
    assert [(r.start, r.count) for r in plan(specs, Limits(max_registers=10))] == [(0, 3), (10, 1), (100, 2)]
    assert len(plan(specs, Limits(coalesce=False))) == 4


def test_tables_are_never_mixed_and_bits_merge_up_to_2000() -> None:
    specs = [TagSpec("coil", i * 3, 1, "bool") for i in range(1000)] + [TagSpec("di", 5, 1, "bool")]
    specs += [TagSpec("ir", 0, 1, "uint16"), TagSpec("hr", 0, 1, "uint16")]
    reqs = plan(specs, Limits())
    assert [(r.table, r.count) for r in reqs] == [("coil", 1999), ("coil", 997), ("di", 1), ("hr", 1), ("ir", 1)]


def test_a_slow_serial_line_reads_large_gaps_separately() -> None:
    specs = regs((0, 1), (60, 1), (61, 1))
    slow = Limits(request_cost=serial_request_cost(9600))
    assert [(r.start, r.count) for r in plan(specs, slow)] == [(0, 1), (60, 2)]
    assert [(r.start, r.count) for r in plan(specs, Limits())] == [(0, 62)]


def test_overlapping_tags_are_read_together() -> None:
    specs = regs((10, 2), (11, 1)) + [TagSpec("hr", 10, 1, "bool", bit=3)]
    reqs = plan(specs, Limits())
    assert len(reqs) == 1 and reqs[0].count == 2 and sorted(reqs[0].members) == [0, 1, 2]


def test_split_cuts_at_gaps_then_halves() -> None:
    specs = regs((0, 1), (1, 1), (2, 1), (3, 1), (50, 2))
    (req,) = plan(specs, Limits())
    parts = split(req, specs)
    assert [(r.start, r.count) for r in parts] == [(0, 4), (50, 2)]
    halves = split(parts[0], specs)
    assert [(r.start, r.count) for r in halves] == [(0, 2), (2, 2)]
    assert split(Request("hr", 50, 2, (4,)), specs) == []


# -- against Telegraf's strategies ---------------------------------------------------------------


def greedy(specs: list[TagSpec], size: int, max_gap: int | None, sort: bool = True) -> int:
    """Telegraf-style merging (rearrange / aggressive / max_insert): requests it issues."""
    order = sorted(specs, key=lambda s: s.start) if sort else list(specs)
    n = 0
    start = end = None
    for s in order:
        fits = start is not None and s.start + s.count - start <= size and s.start >= start
        if fits and max_gap is not None:
            fits = s.start - end <= max_gap
        if fits:
            end = max(end, s.start + s.count)
        else:
            n += 1
            start, end = s.start, s.start + s.count
    return n


layouts = st.lists(st.tuples(st.integers(0, 400), st.sampled_from([1, 1, 2, 4])), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(layouts, st.integers(4, 125), st.sampled_from([None, 0, 3, 20]))
def test_never_more_requests_than_any_telegraf_strategy(spans, size, gap) -> None:
    specs = regs(*spans)
    limits = Limits(max_registers=size, max_gap=gap)
    ours = plan(specs, limits)
    covers(ours, specs, limits)
    for strategy_gap in [gap] if gap is not None else [None, 0, 3, 20]:
        assert len(ours) <= greedy(specs, size, strategy_gap)


def brute_force(specs: list[TagSpec], limits: Limits) -> float:
    """Cheapest cost over every way to cut the sorted tags into contiguous requests."""
    order = sorted(specs, key=lambda s: (s.start, s.start + s.count))
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        groups, cur = [], [order[0]]
        for s, cut in zip(order[1:], cuts, strict=True):
            if cut:
                groups.append(cur)
                cur = [s]
            else:
                cur.append(s)
        groups.append(cur)
        cost = 0.0
        for g in groups:
            lo, hi = g[0].start, max(s.start + s.count for s in g)
            ends = sorted((s.start, s.start + s.count) for s in g)
            reach, gap_ok = ends[0][1], True
            for a, b in ends[1:]:
                if limits.max_gap is not None and a - reach > limits.max_gap:
                    gap_ok = False
                reach = max(reach, b)
            if hi - lo > limits.max_registers or not gap_ok:
                cost = float("inf")
                break
            cost += limits.request_cost + hi - lo
        best = min(best, cost)
    return best


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 60), st.sampled_from([1, 2])), min_size=1, max_size=9),
    st.sampled_from([TCP_REQUEST_COST, 12.0, 3.0]),
    st.sampled_from([None, 2]),
)
# Found by this test: two overlapping tags merged before the cut cost a third request where
# reading their shared register twice needed two.
@example(spans=[(3, 1), (17, 2), (18, 2), (32, 2)], request_cost=TCP_REQUEST_COST, gap=None)
def test_plan_is_optimal_for_its_cost(spans, request_cost, gap) -> None:
    specs = regs(*spans)
    limits = Limits(max_registers=16, max_gap=gap, request_cost=request_cost)
    reqs = plan(specs, limits)
    covers(reqs, specs, limits)
    cost = sum(limits.request_cost + r.count for r in reqs)
    assert cost <= brute_force(specs, limits) + 1e-6


def test_learned_sizes_barriers_and_held_tags_shape_the_plan() -> None:
    specs = regs(*[(i, 1) for i in range(40)])
    spans = lambda reqs: [(r.start, r.count) for r in reqs]  # noqa: E731
    assert spans(plan(specs, Limits(), sizes={"hr": 15})) == [(0, 15), (15, 15), (30, 10)]
    assert spans(plan(specs, Limits(max_registers=10), sizes={"hr": 15})) == [(0, 10), (10, 10), (20, 10), (30, 10)]
    # A held tag is left out, and its address is not bridged by its neighbours' request.
    reqs = plan(specs, Limits(), skip={10}, barriers={"hr": [(10, 11)]})
    assert spans(reqs) == [(0, 10), (11, 29)] and 10 not in {m for r in reqs for m in r.members}
    # A cut between two addresses (start == end).
    assert spans(plan(specs, Limits(), barriers={"hr": [(20, 20)]})) == [(0, 20), (20, 20)]
    assert spans(plan(specs, Limits(), barriers={"ir": [(20, 20)]})) == [(0, 40)]
    # A learned size below a tag's own: the tag is still read, alone.
    assert spans(plan(regs((0, 2), (2, 2)), Limits(), sizes={"hr": 1})) == [(0, 2), (2, 2)]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 300), min_size=1, max_size=60, unique=True),
    st.lists(st.tuples(st.integers(0, 300), st.integers(0, 3)), max_size=5),
    st.integers(1, 125),
)
def test_no_request_spans_a_barrier(starts, barriers, size) -> None:
    specs = regs(*[(s, 1) for s in sorted(starts)])
    bars = [(b, b + n) for b, n in barriers]
    reqs = plan(specs, Limits(), sizes={"hr": size}, barriers={"hr": bars})
    covers(reqs, specs, Limits())
    for r in reqs:
        assert r.count <= size
        if len(r.members) > 1:
            assert not any(r.start < be and bs < r.start + r.count for bs, be in bars), (r, bars)


def _cut_step_at_a_time(spans, size, max_gap, request_cost, barriers=()):
    """The planner's DP as it was written first, a step per (run start, run end): the
    specification its column form (planner._cut) must cut exactly alike."""
    n = len(spans)
    inf = float("inf")
    best = [0.0] + [inf] * n
    nreq = [0] * (n + 1)
    back = [0] * (n + 1)
    for i in range(n):
        lo, reach = spans[i]
        for j in range(i, n):
            if j > i:
                s, e = spans[j]
                if max_gap is not None and s - reach > max_gap:
                    break
                reach = max(reach, e)
                if reach - lo > size or any(lo < be and bs < reach for bs, be in barriers):
                    break
            c = best[i] + request_cost + (reach - lo)
            if c < best[j + 1] - 1e-9 or (abs(c - best[j + 1]) <= 1e-9 and nreq[i] + 1 <= nreq[j + 1]):
                best[j + 1], nreq[j + 1], back[j + 1] = c, nreq[i] + 1, i
    cuts = []
    j = n
    while j > 0:
        i = back[j]
        cuts.append((i, j - 1))
        j = i
    return cuts[::-1]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 300), st.sampled_from([1, 1, 2, 4, 16])), min_size=1, max_size=80),
    st.integers(1, 130),
    st.sampled_from([None, 0, 3, 20]),
    st.sampled_from([TCP_REQUEST_COST, 16 * TCP_REQUEST_COST, 12.0, 3.0, 0.0]),
    st.lists(st.tuples(st.integers(0, 300), st.integers(0, 3)), max_size=6),
)
def test_the_column_dp_cuts_as_the_step_at_a_time_one(layout, size, gap, cost, barriers) -> None:
    from edgeos.protocols.modbus.planner import _cut

    spans = sorted((s, s + n) for s, n in layout)
    bars = [(b, b + n) for b, n in barriers]
    assert _cut(spans, size, gap, cost, bars) == _cut_step_at_a_time(spans, size, gap, cost, bars)


def test_a_large_bit_table_is_planned_without_stalling_the_loop() -> None:
    """2,500 coils with refused tags as barriers: the same cut as step at a time (which took
    seconds of the event loop, every device's polls stalled behind it)."""
    from edgeos.protocols.modbus.planner import _cut

    spans = [(i, i + 1) for i in range(2500)]
    bars = [(30, 31), (100, 101), (700, 701), (1500, 1501), (2000, 2001), (2400, 2401)]
    for b in ([], bars):
        cuts = _cut(spans, 2000, None, 16 * TCP_REQUEST_COST, b)
        assert cuts == _cut_step_at_a_time(spans, 2000, None, 16 * TCP_REQUEST_COST, b)
    assert cuts[:3] == [(0, 29), (30, 30), (31, 99)]
