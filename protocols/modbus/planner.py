"""Read coalescing: the fewest, cheapest requests that cover a poll group's tags.

Tags of one table (coils, discrete inputs, holding or input registers) are first merged into
*atoms* where they overlap (a float and a bit of the same register). The atoms, sorted by
address, are then cut into requests by dynamic programming over every cut position, minimising

    cost = requests * request_cost + registers read

under the hard limits: a request spans at most `max_registers` registers (`max_bits` bits) and
bridges no run of unused addresses longer than `max_gap`. Because every partition of the
sorted atoms into contiguous requests is considered, the plan is optimal for this cost; each
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


def _atoms(specs: Sequence[TagSpec], positions: Sequence[int], size: int | None = None) -> list[_Atom]:
    """Overlapping tags merge into one atom, unless the union would pass the request limit:
    then the overlapping tag starts an atom of its own (and registers are read twice)."""
    order = sorted(positions, key=lambda i: (specs[i].start, specs[i].start + specs[i].count))
    out: list[_Atom] = []
    for i in order:
        s, e = specs[i].start, specs[i].start + specs[i].count
        if out and s < out[-1].end and (size is None or max(out[-1].end, e) - out[-1].start <= size):
            last = out[-1]
            out[-1] = _Atom(last.start, max(last.end, e), (*last.members, i))
        else:
            out.append(_Atom(s, e, (i,)))
    return out


def _blocked(atoms: list[_Atom], barriers: Sequence[tuple[int, int]]) -> list[bool]:
    """Per pair of neighbouring atoms: whether a barrier forbids one request to hold both. A
    barrier (start, end) blocks a span [s, e) when s < end and start < e: an address range, or
    with start == end the cut between addresses start - 1 and start."""
    out = []
    for a, b in zip(atoms, atoms[1:], strict=False):
        s, e = a.start, max(a.end, b.end)
        out.append(any(s < be and bs < e for bs, be in barriers))
    return out


def _cut(
    atoms: list[_Atom], size: int, max_gap: int | None, request_cost: float, blocked: Sequence[bool] = ()
) -> list[tuple[int, int]]:
    """Optimal contiguous cut of atoms into requests: [(first atom, last atom)], by DP."""
    n = len(atoms)
    inf = float("inf")
    best = [0.0] + [inf] * n  # best[j]: cost of covering atoms[:j]
    nreq = [0] + [0] * n
    back = [0] * (n + 1)
    for j in range(1, n + 1):
        end = atoms[j - 1].end
        # Extend the last request leftwards from atom j-1 while it fits the limits.
        i = j - 1
        while i >= 0:
            span = end - atoms[i].start
            if span > size:
                break
            if i < j - 1 and (
                (max_gap is not None and atoms[i + 1].start - atoms[i].end > max_gap) or (blocked and blocked[i])
            ):
                break
            c = best[i] + request_cost + span
            if c < best[j] - 1e-9 or (abs(c - best[j]) <= 1e-9 and nreq[i] + 1 < nreq[j]):
                best[j], nreq[j], back[j] = c, nreq[i] + 1, i
            i -= 1
    cuts = []
    j = n
    while j > 0:
        i = back[j]
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
        atoms = _atoms(specs, positions, size)
        blocked = _blocked(atoms, barriers[table]) if barriers and barriers.get(table) else ()
        # Bits cost 1/16 of a register on the wire: scale the fixed cost so gaps compare fairly.
        cost = limits.request_cost * (16 if bits else 1)
        for a, b in _cut(atoms, size, limits.max_gap, cost, blocked):
            start, end = atoms[a].start, max(x.end for x in atoms[a : b + 1])
            members = tuple(m for x in atoms[a : b + 1] for m in x.members)
            out.append(Request(table, start, end - start, members))
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
