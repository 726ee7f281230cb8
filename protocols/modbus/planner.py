"""Read coalescing: the fewest, cheapest requests that cover a poll group's tags.

Tags of one table (coils, discrete inputs, holding or input registers), sorted by address (a
float and a bit of the same register overlap), are cut into requests by dynamic programming
over every cut position, minimising

    cost = requests * request_cost + registers read

under the hard limits: a request spans at most `max_registers` registers (`max_bits` bits) and
bridges no run of unused addresses longer than `max_gap`. Because every partition of the
sorted tags into contiguous requests is considered, the plan is optimal for this cost; each
of Telegraf's strategies (none, shrink, rearrange, aggressive, max_insert) produces one such
partition, so none of them is cheaper under the same limits. `request_cost` (in registers)
comes from the transport: on Modbus TCP a round trip costs more than any payload, so the plan
has the fewest requests possible (gaps are bridged up to the limit, as Telegraf's "aggressive"
does) and, among those, reads the fewest registers; on a slow serial line each register costs
real time on the wire, so large gaps are read separately. Bits are costed at 1/16 register.

Bridging a gap can hit an address the device does not implement; `split` then cuts the failed
request at its gaps (or in halves when it has none), so one bad tag costs a few requests once
and never blanks its neighbours. What the adapter learns from such refusals comes back as
planning input: a smaller request size per table, *barriers* (address ranges, or a cut between
two addresses, that no request may span) and tags to leave out.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from edgeos.protocols.modbus.config import BIT_TABLES, MAX_BITS, MAX_REGISTERS, TagSpec

# On TCP a round trip outweighs any payload a request can carry (125 registers are 250 bytes):
# the cost is then lexicographic, fewest requests first, then fewest registers.
TCP_REQUEST_COST = 1e6


def serial_request_cost(baudrate: int, turnaround_s: float = 0.005) -> float:
    """Fixed cost of one RTU request in registers (2 bytes) on a line of this speed.

    ~8 request bytes, ~5 response header/CRC bytes, two 3.5-character silences, plus the
    device's turnaround (a few ms on typical PLCs) expressed in characters at this speed.
    """
    chars_per_s = baudrate / 11.0
    return (8 + 5 + 7 + turnaround_s * chars_per_s) / 2.0


@dataclass(frozen=True)
class Limits:
    max_registers: int = MAX_REGISTERS
    max_bits: int = MAX_BITS
    max_gap: int | None = None  # None: no limit beyond the request size (the cost decides)
    request_cost: float = TCP_REQUEST_COST
    coalesce: bool = True


@dataclass(frozen=True, slots=True)
class Request:
    """One read: table, first address, count, and the group positions of the tags it serves."""

    table: str
    start: int
    count: int
    members: tuple[int, ...]

    @property
    def is_bits(self) -> bool:
        return self.table in BIT_TABLES

    def describe(self) -> str:
        unit = "bit" if self.is_bits else "register"
        n, t = self.count, len(self.members)
        return (
            f"{self.table} {self.start}..{self.start + n - 1} "
            f"({n} {unit}{'s' if n != 1 else ''}, {t} tag{'s' if t != 1 else ''})"
        )


@dataclass(frozen=True, slots=True)
class _Atom:
    start: int
    end: int  # exclusive
    members: tuple[int, ...]


def _by_address(specs: Sequence[TagSpec], positions: Sequence[int]) -> list[int]:
    return sorted(positions, key=lambda i: (specs[i].start, specs[i].start + specs[i].count))


def _atoms(specs: Sequence[TagSpec], positions: Sequence[int]) -> list[_Atom]:
    """Overlapping tags merged into one atom: `split` never parts them."""
    out: list[_Atom] = []
    for i in _by_address(specs, positions):
        s, e = specs[i].start, specs[i].start + specs[i].count
        if out and s < out[-1].end:
            last = out[-1]
            out[-1] = _Atom(last.start, max(last.end, e), (*last.members, i))
        else:
            out.append(_Atom(s, e, (i,)))
    return out


def _cut(
    spans: Sequence[tuple[int, int]],
    size: int,
    max_gap: int | None,
    request_cost: float,
    barriers: Sequence[tuple[int, int]] = (),
) -> list[tuple[int, int]]:
    """Optimal cut of tags sorted by (start, end) into contiguous runs, one request each:
    [(first, last)], by DP. A run's request spans its first start to its furthest end, bridges
    no uncovered run longer than `max_gap`, and reaches into no barrier (start, end): an address
    range, or with start == end the cut between addresses start - 1 and start (a tag alone is
    always read). Overlapping tags may go to different requests: merged first into one span,
    two overlapping tags near the size limit cost a request more than reading the shared
    register twice (a property test found it).

    The runs from one tag are weighed as columns (numpy), not a step each: 2,500 coils offer
    up to 2,000 runs from every tag, and a step each took a second of the event loop (with
    refused tags as barriers, seconds, stalling every device's polls: an independent tester's
    finding). tests/modbus/test_modbus_planner.py holds the step-at-a-time version and checks
    that both cut alike."""
    n = len(spans)
    if not n:
        return []
    starts = np.fromiter((a for a, _ in spans), np.int64, n)
    ends = np.fromiter((b for _, b in spans), np.int64, n)
    # A run from tag i may not reach past `cap[i]`: the lowest start of the barriers that end
    # after the run's start (a barrier (bs, be) blocks it when lo < be and bs < reach).
    cap = np.full(n, np.iinfo(np.int64).max, np.int64)
    for bs, be in barriers:
        np.minimum(cap, np.where(starts < be, bs, cap), out=cap)
    # Past `last[i]` a tag starts beyond the size limit: no run from i reaches it.
    last = np.searchsorted(starts, starts + size, side="right")
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    nreq = np.zeros(n + 1, np.int64)
    back = np.zeros(n + 1, np.int64)
    for i in range(n):
        lo = starts[i]
        reach = np.maximum.accumulate(ends[i : last[i]])  # the request's end with tags i..j
        fail = (reach - lo > size) | (reach > cap[i])
        if max_gap is not None:
            fail[1:] |= starts[i + 1 : last[i]] - reach[:-1] > max_gap
        fail[0] = False  # a tag alone is always read
        stop = int(np.argmax(fail)) if fail.any() else len(fail)
        c = best[i] + request_cost + (reach[:stop] - lo)
        tb, tn = best[i + 1 : i + 1 + stop], nreq[i + 1 : i + 1 + stop]
        # On a tie the later cut wins (i grows): full requests first, the short one last.
        better = (c < tb - 1e-9) | ((np.abs(c - tb) <= 1e-9) & (nreq[i] + 1 <= tn))
        tb[better] = c[better]
        tn[better] = nreq[i] + 1
        back[i + 1 : i + 1 + stop][better] = i
    cuts = []
    j = n
    while j > 0:
        i = int(back[j])
        cuts.append((i, j - 1))
        j = i
    return cuts[::-1]


def plan(
    specs: Sequence[TagSpec],
    limits: Limits,
    *,
    skip: Collection[int] = (),
    sizes: Mapping[str, int] | None = None,
    barriers: Mapping[str, Sequence[tuple[int, int]]] | None = None,
) -> list[Request]:
    """Requests covering every tag of a poll group (positions index `specs`), except the
    positions in `skip`; `sizes` lowers the request size of a table, `barriers` are spans no
    request of that table may reach into (see `_blocked`)."""
    by_table: dict[str, list[int]] = {}
    for i, s in enumerate(specs):
        if i not in skip:
            by_table.setdefault(s.table, []).append(i)
    out: list[Request] = []
    for table in ("coil", "di", "hr", "ir"):
        positions = by_table.get(table)
        if not positions:
            continue
        bits = table in BIT_TABLES
        if not limits.coalesce:
            for i in sorted(positions, key=lambda i: specs[i].start):
                out.append(Request(table, specs[i].start, specs[i].count, (i,)))
            continue
        size = limits.max_bits if bits else limits.max_registers
        if sizes and table in sizes:
            # A learned size below a tag's own: that tag is still read, alone.
            size = max(min(size, sizes[table]), max(specs[i].count for i in positions))
        order = _by_address(specs, positions)
        spans = [(specs[i].start, specs[i].start + specs[i].count) for i in order]
        # Bits cost 1/16 of a register on the wire: scale the fixed cost so gaps compare fairly.
        cost = limits.request_cost * (16 if bits else 1)
        for a, b in _cut(spans, size, limits.max_gap, cost, (barriers or {}).get(table) or ()):
            start, end = spans[a][0], max(e for _, e in spans[a : b + 1])
            out.append(Request(table, start, end - start, tuple(order[a : b + 1])))
    return out


def split(req: Request, specs: Sequence[TagSpec]) -> list[Request]:
    """Smaller requests covering `req`'s tags, after the device refused it (illegal address).

    First cut at every bridged gap (the unused addresses are the likely culprit); a request
    without gaps is halved, so a bad tag among n is isolated in about log2(n) more requests.
    A single tag cannot be split: [] is returned.
    """
    atoms = _atoms(specs, req.members)
    if len(atoms) == 1:
        if len(req.members) == 1:
            return []
        return [Request(req.table, specs[m].start, specs[m].count, (m,)) for m in req.members]
    runs: list[list[_Atom]] = [[atoms[0]]]
    for a in atoms[1:]:
        if a.start > runs[-1][-1].end:
            runs.append([a])
        else:
            runs[-1].append(a)
    if len(runs) == 1:
        half = len(atoms) // 2
        runs = [atoms[:half], atoms[half:]]
    out = []
    for run in runs:
        start, end = run[0].start, max(a.end for a in run)
        out.append(Request(req.table, start, end - start, tuple(m for a in run for m in a.members)))
    return out
