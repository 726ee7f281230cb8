"""The Modbus adapter: one unit id on one (shared) endpoint, polled by the runtime's scheduler.

Each poll group (the tags of one interval) carries a request plan (planner.py). A read sends
the plan's requests in order, lays the answers side by side in one register buffer and one bit
buffer, and decodes the whole group at once (codec.py). Partial failures become Bad samples
for exactly the tags concerned; only a lost connection, or `reconnect_after` polls in a row
without any answer, raises (the supervisor then backs off and reconnects).

What the device's refusals teach (a request size it cannot serve, spans it refuses, addresses
it refuses) and the health counters live in a `DeviceState` per configured device, not in the
adapter: the runtime makes a new adapter at every reconnect, and nothing is relearned.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from edgeos.protocols.modbus import transport
from edgeos.protocols.modbus.codec import Decoder, encode_registers, merge_into_register, to_bool, written_value
from edgeos.protocols.modbus.config import TagSpec, tag_spec, unit_id
from edgeos.protocols.modbus.planner import (
    TCP_REQUEST_COST,
    Limits,
    Request,
    plan,
    serial_request_cost,
    split,
)

from edgeos.adapter import Answer, DeviceConfig, PollGroup, PollingAdapter, TagConfig, group_by_interval
from edgeos.errors import DeviceError
from edgeos.logs import RateLimited
from edgeos.model import QUALITY_DTYPE, Batch, Quality, ValueKind

log = logging.getLogger("edgeos.protocols.modbus")

REFUSED_RETRY_MAX_S = 3600.0  # a refused address is re-probed at least once an hour
ALIVE_PROBE_MIN_S = 5.0
"""A poll group whose every tag is held refused asks one of them early (`_alive_probe`) after
`reconnect_after` of its polls, and never sooner than this after the device last answered:
`reconnect_after = 1` must not turn it into a request per poll to a refused address."""
LEARN_CODES = (transport.ILLEGAL_ADDRESS, transport.ILLEGAL_DATA_VALUE)
"""Refusals of a merged read that teach a limit or a barrier when all its tags are answered
apart; exception 4 (server device failure) splits too, but may pass: it teaches nothing."""


def limits_of(options: Mapping[str, Any]) -> Limits:
    if options["transport"] == "rtu":
        cost = serial_request_cost(options["baudrate"])
    else:
        cost = TCP_REQUEST_COST
    return Limits(
        max_registers=options["max_registers"],
        max_bits=options["max_bits"],
        max_gap=options["max_gap"],
        request_cost=cost,
        coalesce=options["coalesce"],
    )


def specs_of(device: DeviceConfig) -> dict[int, TagSpec]:
    """The device's tag layouts by tag id, built once per configured device (its state keeps
    them: the adapters of each reconnect, the plans and writes all share one set)."""
    st = state_of(device)
    if st.specs is None:
        st.specs = _build_specs(device)
    return st.specs


def _build_specs(device: DeviceConfig) -> dict[int, TagSpec]:
    out = {}
    for t in device.tags:
        spec, problems = tag_spec(dict(t.options), device.options["address_base"])
        if spec is None:  # validate() refused the config already; guard for configs built in code
            raise DeviceError(device.name, f"tag {t.name}: {problems[0][1]}", code="config", stage="connect")
        out[t.id] = spec
    return out


@dataclass
class Counters:
    requests: int = 0
    timeouts: int = 0
    exceptions: int = 0
    bad_responses: int = 0
    tid_mismatches: int = 0
    splits: int = 0
    writes: int = 0


@dataclass
class TableLimit:
    """Request sizes of one table: the largest the device answered, the smallest it refused
    for its size alone (exception 3 while its parts were answered). In between, the plan
    probes by halves until the two meet; then requests are as large as answered."""

    answered: int = 0
    refused: int | None = None

    def size(self, configured: int) -> int:
        if self.refused is None:
            return configured
        if self.answered + 1 >= self.refused:
            return min(configured, max(1, self.answered))
        return min(configured, (self.answered + self.refused) // 2)


@dataclass
class Refusal:
    """A tag the device refused on its own: Bad at every poll, re-probed alone when due."""

    reason: str
    delay_s: float
    due: float  # monotonic time of the next probe


class DeviceState:
    """What one configured device taught, and its counters; outlives its adapters."""

    def __init__(self) -> None:
        self.counters = Counters()
        self.limits: dict[str, TableLimit] = {}
        self.barriers: dict[str, set[tuple[int, int]]] = {}
        self.refused: dict[int, Refusal] = {}  # tag id ->
        self.version = 0  # bumped at every learned change: plans are rebuilt
        self.specs: dict[int, TagSpec] | None = None  # specs_of(); the config does not change under it
        self.errors = RateLimited(log)


_STATES: dict[int, DeviceState] = {}


def state_of(device: DeviceConfig) -> DeviceState:
    """The device's state, kept as long as its DeviceConfig lives (the runtime keeps one per
    device for its whole run, and makes a new adapter from it at each reconnect)."""
    st = _STATES.get(id(device))
    if st is None:
        st = _STATES[id(device)] = DeviceState()
        st.errors.device = device.name  # its log lines carry the device field
        weakref.finalize(device, _STATES.pop, id(device), None)
    return st


class GroupPlan:
    """A poll group's requests, where each answer goes in the buffers, and the decoder.
    `held` maps the single-tag request of each refused tag to that tag's id."""

    def __init__(
        self,
        tags: Sequence[TagConfig],
        specs: Sequence[TagSpec],
        requests: list[Request],
        held: Mapping[Request, int] | None = None,
    ) -> None:
        self.tags = tuple(tags)
        self.specs = list(specs)
        self.requests = requests
        self.held = dict(held or {})
        self.noted = False  # answered sizes recorded (TableLimit.answered)
        self.ids = np.array([t.id for t in tags], np.int32)
        self.names = [t.name for t in tags]
        placements = [0] * len(specs)
        self.offsets: list[int] = []
        nregs = nbits = 0
        for r in requests:
            if r.is_bits:
                off, nbits = nbits, nbits + r.count
            else:
                off, nregs = nregs, nregs + r.count
            self.offsets.append(off)
            for m in r.members:
                placements[m] = off + specs[m].start - r.start
        self.nregs, self.nbits = nregs, nbits
        self.members = [np.array(r.members, np.intp) for r in requests]
        self.decoder = Decoder(specs, placements)
        self.string_pos = np.array([i for i, s in enumerate(specs) if s.type == "string"], np.intp)

    @property
    def registers_read(self) -> int:
        return sum(r.count for r in self.requests if not r.is_bits and r not in self.held)


def group_plan(tags: Sequence[TagConfig], specs: Sequence[TagSpec], limits: Limits, st: DeviceState) -> GroupPlan:
    """The plan under what the device taught: learned sizes and barriers, refused tags left
    out of the merged reads (and their addresses never bridged), each held in its own request."""
    skip = [i for i, t in enumerate(tags) if t.id in st.refused]
    barriers: dict[str, list[tuple[int, int]]] = {k: list(v) for k, v in st.barriers.items()}
    for i in skip:
        barriers.setdefault(specs[i].table, []).append((specs[i].start, specs[i].start + specs[i].count))
    sizes = {
        table: lim.size(limits.max_bits if table in ("coil", "di") else limits.max_registers)
        for table, lim in st.limits.items()
    }
    reqs = plan(specs, limits, skip=set(skip), sizes=sizes, barriers=barriers)
    held = {Request(specs[i].table, specs[i].start, specs[i].count, (i,)): tags[i].id for i in skip}
    return GroupPlan(tags, specs, reqs + list(held), held)


@dataclass
class PlanSlot:
    """Mutable holder on a (frozen) PollGroup: rebuilt when the device state has changed."""

    current: GroupPlan
    version: int


def build_groups(device: DeviceConfig, *, learned: bool = True) -> list[PollGroup]:
    specs = specs_of(device)
    limits = limits_of(device.options)
    st = state_of(device) if learned else DeviceState()
    out = []
    for g in group_by_interval(device.tags):
        gspecs = [specs[t.id] for t in g.tags]
        out.append(PollGroup(g.interval_ns, g.tags, PlanSlot(group_plan(g.tags, gspecs, limits, st), st.version)))
    return out


class ModbusAdapter(PollingAdapter):
    def __init__(self, device: DeviceConfig) -> None:
        super().__init__(device)
        o = device.options
        self.unit = unit_id(o)
        self.timeout_s = o["timeout"] / 1e9
        self.retries = o["retries"]
        self.reconnect_after = o["reconnect_after"]
        self.retry_refused_s = o.get("retry_refused", 60_000_000_000) / 1e9
        self.zero_tid = bool(o.get("zero_transaction_id", False))
        self.endpoint = transport.endpoint_of(dict(o))
        self.link: transport.Link | None = None
        self.state = state_of(device)
        self.counters = self.state.counters
        # Polls in a row without any answer, per poll group (interval): with several intervals,
        # `reconnect_after` counts the polls of each, not their sum. Any answer resets them all.
        self._silent_polls: dict[int, int] = {}
        self._silent_since = 0.0  # monotonic time the first unanswered poll of the streak began
        # Per poll group: whether its last read was answered (the runtime's up/down). And when
        # any poll of this device last got an answer (0: not on this connection), for the early
        # ask of a group whose every tag is held refused (`_alive_probe`).
        self._answer: dict[int, Answer] = {}
        self._answered_at = 0.0
        self._groups: list[PollGroup] | None = None
        self._limits = limits_of(o)

    def poll_groups(self) -> list[PollGroup]:
        if self._groups is None:
            self._groups = build_groups(self.device)
        return self._groups

    async def connect(self) -> None:
        if self.link is None:
            self.link = transport.acquire(self.device.name, self.endpoint, zero_transaction_id=self.zero_tid)
        await self.link.connect(self.device.name, self.timeout_s)

    def answer_of(self, group: PollGroup) -> Answer | None:
        return self._answer.get(group.interval_ns)

    async def read(self, group: PollGroup, now_ns: int) -> Batch:
        slot: PlanSlot = group.plan
        st = self.state
        if slot.version != st.version:
            slot.current = group_plan(group.tags, slot.current.specs, self._limits, st)
            slot.version = st.version
        gp = slot.current
        link = self.link
        if link is None:
            raise DeviceError(self.device.name, "not connected", code="not_connected")
        name, unit, c = self.device.name, self.unit, self.counters
        results: list[tuple[Request, Any]] = []
        queue = list(gp.requests)
        split_up: list[tuple[Request, int, list[Request]]] = []  # refused merged reads and their parts
        probes: list[Request] = []
        newly_refused: list[int] = []  # group positions of tags refused alone for the first time
        parent: dict[Request, Request] = {}  # split part -> the refused request it came from
        failures: dict[Request, int] = {}  # refused request -> its parts refused with exception 4
        held4: list[tuple[int, Request]] = []  # (position, parent) of tags refused alone with exception 4
        answered = timed_out = False
        sent_before = c.requests
        began = time.monotonic()
        alive = self._alive_probe(gp, group.interval_ns, began)
        i = 0
        while i < len(queue):
            r = queue[i]
            i += 1
            if gp.held and r in gp.held:
                ref = st.refused.get(gp.held[r])
                if ref is not None and began < ref.due and r is not alive:  # refused: Bad until its next probe
                    results.append((r, Quality.BAD_DEVICE_FAILURE))
                    continue
                probes.append(r)
            if timed_out:  # the unit is silent: don't spend a timeout per request of this poll
                results.append((r, Quality.BAD_TIMEOUT))
                continue
            c.requests += 1
            try:
                data = await link.read(name, unit, r.table, r.start, r.count, self.timeout_s, self.retries)
            except transport.ExceptionResponse as e:
                code = e.exception_code
                if code in transport.GATEWAY_CODES:
                    # The gateway answered, its unit did not (or cannot be reached): no answer
                    # from this device, as a timeout (re-sent `retries` times by the transport).
                    # Unless the unit answered earlier in this poll, the rest is not asked.
                    c.exceptions += 1
                    timed_out = timed_out or not answered
                    st.errors.log(logging.WARNING, "gateway", "%s", e)
                    results.append((r, Quality.BAD_COMM_FAILURE))
                    continue
                answered = True
                if r is alive:  # refused as before: the device answers; the tag's probe stays due when it was
                    c.exceptions += 1
                    results.append((r, Quality.BAD_DEVICE_FAILURE))
                    continue
                # Illegal data address; illegal data value (a size the device cannot serve, or a
                # range reaching unimplemented registers on some PLCs); server device failure for
                # one address: split, isolate the refused tags, keep the rest. Exception 4 in both
                # parts of a split is the device failing, not one address: no further split.
                up = parent.get(r)
                whole = False
                if code == transport.SERVER_DEVICE_FAILURE and up is not None:
                    whole = failures.get(up, 0) > 0
                    failures[up] = failures.get(up, 0) + 1
                if code in transport.SPLIT_CODES and not whole:
                    parts = split(r, gp.specs)
                    if parts:
                        c.splits += 1
                        queue[i:i] = parts
                        parent.update(dict.fromkeys(parts, r))
                        split_up.append((r, code, parts))
                        continue
                # Held back: a tag refused alone. With exception 4 only once a split isolated it
                # (or it is being re-probed): a single-tag request failing so may pass.
                if (
                    code in transport.SPLIT_CODES
                    and not whole
                    and (code != transport.SERVER_DEVICE_FAILURE or up is not None or r in gp.held)
                ):
                    newly = self._refuse(gp, r, e, began)
                    newly_refused += newly
                    if code == transport.SERVER_DEVICE_FAILURE and up is not None:
                        held4 += [(m, up) for m in newly]
                else:
                    st.errors.log(logging.WARNING, f"exception:{r.table}{r.start}", "%s", e)
                c.exceptions += 1
                results.append((r, Quality.BAD_DEVICE_FAILURE))
            except transport.ResponseTimeout as e:
                c.timeouts += 1
                timed_out = True
                st.errors.log(logging.WARNING, "timeout", "%s", e)
                results.append((r, Quality.BAD_TIMEOUT))
            except transport.BadResponse as e:
                answered = True
                if isinstance(e, transport.StaleAnswer):
                    c.tid_mismatches += 1
                else:
                    c.bad_responses += 1
                st.errors.log(logging.WARNING, e.code, "%s", e)
                results.append((r, Quality.BAD_DECODING_ERROR))
            else:
                answered = True
                results.append((r, data))
        if c.requests == sent_before and not link.connected:
            # Every tag held refused: this poll asked nothing, so it says nothing of the device.
            # A closed connection must not pass for a device that answers (until the next
            # probe, up to an hour away): connect again, or fail as any poll would.
            await link.connect(name, self.timeout_s)
        for m, up in held4:  # its sibling failed too: not one address, don't hold it
            if failures[up] > 1:
                del st.refused[gp.tags[m].id]
                newly_refused.remove(m)
        if newly_refused:
            log.warning(
                "%s: %s refused alone (%s): Bad until asked again in %gs",
                name,
                ", ".join(f"{gp.names[m]} ({gp.specs[m].table} {gp.specs[m].start})" for m in newly_refused),
                ", ".join(sorted({st.refused[gp.tags[m].id].reason for m in newly_refused})),
                self.retry_refused_s,
                extra={"device": name, "code": "refused"},
            )
        if split_up or probes or not gp.noted:
            self._learn(gp, results, split_up, probes)
        if split_up:  # decode this poll as it was read; the next one is planned anew
            gp = GroupPlan(gp.tags, gp.specs, [r for r, _ in results])
        self._answer[group.interval_ns] = Answer.YES if answered else Answer.NO if timed_out else Answer.UNASKED
        if answered:
            self._answered_at = began
            self._silent_polls.clear()
        elif timed_out:
            if not self._silent_polls:
                self._silent_since = began
            silent = self._silent_polls[group.interval_ns] = self._silent_polls.get(group.interval_ns, 0) + 1
            if silent >= self.reconnect_after:
                self._silent_polls.clear()
                # If no device on this endpoint got an answer either, the connection itself is
                # suspect (hung gateway, half-open socket): have it rebuilt for all of them.
                suspect = link.mark_stale(name, self._silent_since)
                raise DeviceError(
                    name,
                    f"no answer from unit {unit} for {silent} polls in a row"
                    + ("; no device on this connection answered either: reconnecting it" if suspect else ""),
                    code="timeout",
                )
        return self._decode(gp, results, now_ns)

    def _alive_probe(self, gp: GroupPlan, interval_ns: int, now: float) -> Request | None:
        """A poll of a group whose every tag is held refused asks nothing until a probe is due
        (up to an hour): its device could be gone unnoticed, on a serial line or a half-open
        connection. Once the device has not answered any poll for `reconnect_after` of this
        group's intervals (at least ALIVE_PROBE_MIN_S; at once on a new connection), the soonest
        due probe is asked early: an answer (refused again) keeps the device up, none counts as
        a poll without answer. Another group answering meanwhile says the device is there."""
        st = self.state
        if not gp.requests:
            return None
        for r in gp.requests:
            ref = st.refused.get(gp.held[r]) if r in gp.held else None
            if ref is None or now >= ref.due:
                return None  # this poll asks something anyway
        wait = max(self.reconnect_after * interval_ns / 1e9, ALIVE_PROBE_MIN_S)
        if self._answered_at and now - self._answered_at < wait:
            return None
        return min(gp.requests, key=lambda r: st.refused[gp.held[r]].due)

    def _refuse(self, gp: GroupPlan, r: Request, e: transport.ExceptionResponse, now: float) -> list[int]:
        """A tag refused on its own: held Bad, re-probed after `retry_refused`, then doubling.
        Returns the group positions of tags refused for the first time."""
        st, new = self.state, []
        for m in r.members:
            tid = gp.tags[m].id
            ref = st.refused.get(tid)
            if ref is None:
                st.refused[tid] = Refusal(e.reason, self.retry_refused_s, now + self.retry_refused_s)
                st.version += 1
                new.append(m)
            else:
                ref.reason = e.reason
                ref.delay_s = min(2 * ref.delay_s, max(REFUSED_RETRY_MAX_S, self.retry_refused_s))
                ref.due = now + ref.delay_s
        return new

    def _learn(
        self,
        gp: GroupPlan,
        results: list[tuple[Request, Any]],
        split_up: list[tuple[Request, int, list[Request]]],
        probes: list[Request],
    ) -> None:
        """Record what this poll taught: sizes answered, a size refused, spans refused, refused
        tags that answer again. Each change is logged once and makes the plans be rebuilt."""
        st, name = self.state, self.device.name
        changed: list[str] = []
        sized: set[str] = set()  # tables whose refused size went down
        got = {r: res for r, res in results if isinstance(res, list)}
        for r in got:
            lim = st.limits.setdefault(r.table, TableLimit())
            if r.count > lim.answered:
                lim.answered = r.count
                if lim.refused is not None:
                    st.version += 1  # probing: a larger size may now be planned
        if len(got) + sum(1 for r, _ in results if r in gp.held and r not in probes) == len(results):
            gp.noted = True  # every request of this plan answered once: its sizes are recorded
        done = {m for r in got for m in r.members}
        for r, code, parts in split_up:
            if code not in LEARN_CODES or not all(m in done for m in r.members):
                continue  # explained by a refused tag (held), or a timeout: nothing more to learn
            lim = st.limits[r.table]
            if code == transport.ILLEGAL_DATA_VALUE and r.count > lim.answered:
                if lim.refused is None or r.count < lim.refused:
                    lim.refused = r.count
                    sized.add(r.table)
            else:
                pairs = zip(parts, parts[1:], strict=False)
                cuts = {(p.start + p.count, q.start) for p, q in pairs if p.start + p.count <= q.start}
                new = cuts - st.barriers.setdefault(r.table, set())
                if new:
                    st.barriers[r.table] |= new
                    spans = ", ".join(f"{a}..{b - 1}" if b > a else f"{a - 1}|{a}" for a, b in sorted(new))
                    changed.append(
                        f"{r.table} {r.start}..{r.start + r.count - 1} refused (exception {code}) while its parts "
                        f"were answered: no request spans {spans} from now"
                    )
        back = [gp.names[r.members[0]] for r in probes if r in got and st.refused.pop(gp.held[r], None)]
        if back:
            changed.append(f"{', '.join(back)} answered again")
        for t in sorted(sized):
            lim = st.limits[t]
            size = lim.size(self._limits.max_bits if t in ("coil", "di") else self._limits.max_registers)
            probing = (
                f": at most {size} per request"
                if lim.answered + 1 >= lim.refused
                else f", {lim.answered} answered: trying {size}"
            )
            changed.append(f"{t} reads of {lim.refused} refused (exception 3) while their parts were answered{probing}")
        if changed:
            st.version += 1
            log.info("%s: %s", name, "; ".join(changed))

    def _decode(self, gp: GroupPlan, results: list[tuple[Request, Any]], now_ns: int) -> Batch:
        regs = np.zeros(gp.nregs, ">u2")
        bits = np.zeros(gp.nbits, np.bool_)
        bad: list[tuple[int, int]] = []
        for k, (r, res) in enumerate(results):
            off = gp.offsets[k]
            if isinstance(res, list):
                if r.is_bits:
                    bits[off : off + r.count] = res
                else:
                    regs[off : off + r.count] = res
            else:
                bad.append((k, int(res)))
        values, text = gp.decoder.decode(regs, bits)
        n = len(gp.ids)
        quality = np.zeros(n, QUALITY_DTYPE)
        if bad:
            for k, code in bad:
                quality[gp.members[k]] = code
            failed = quality != 0
            values[failed] = np.nan
            if text is not None:
                for pos in gp.string_pos[failed[gp.string_pos]]:
                    text[pos] = ""
        return Batch(self.device.name, gp.ids, np.full(n, now_ns, np.int64), values, quality, text)

    # -- writes ------------------------------------------------------------------------------

    async def write(self, tag: TagConfig, value: float | int | bool | str) -> float | int | bool | str:
        """Write one tag with type conversion and range checks (only `writable` tags reach here);
        returns the value as the device now holds it (rounded to the register's steps)."""
        name = self.device.name
        specs = specs_of(self.device)
        spec = specs.get(tag.id)
        if spec is None:
            raise DeviceError(name, f"tag {tag.name!r} is not a tag of this device", code="config", stage="write")
        if spec.table in ("di", "ir"):
            kind = "a discrete input" if spec.table == "di" else "an input register"
            raise DeviceError(name, f"{tag.name} is {kind}, which Modbus cannot write", code="read_only", stage="write")
        link = self.link
        if link is None or not link.connected:
            raise DeviceError(name, "not connected", code="not_connected", stage="write")
        t, retries = self.timeout_s, self.retries
        try:
            if spec.table == "coil":
                await link.write_coil(name, self.unit, spec.start, to_bool(value), t, retries)
            elif spec.type == "bool" or spec.type in ("int8", "uint8"):
                async with link.write_lock:  # read-modify-write: one writer per register at a time
                    current = (await link.read(name, self.unit, "hr", spec.start, 1, t, retries, "write"))[0]
                    new = merge_into_register(spec, int(current), value)
                    await link.write_registers(name, self.unit, spec.start, [new], t, retries)
            else:
                await link.write_registers(name, self.unit, spec.start, encode_registers(spec, value), t, retries)
            written = written_value(spec, value)
        except ValueError as e:
            raise DeviceError(name, f"{tag.name}: {e}", code="value", stage="write") from None
        self.counters.writes += 1
        return written

    async def close(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            transport.release(link, self.device.name)

    def health(self) -> Mapping[str, Any]:
        """Counters since the daemon started (they survive reconnects), and what was learned."""
        c, st = self.counters, self.state
        groups = self._groups or []
        per_s = sum((len(g.plan.current.requests) - len(g.plan.current.held)) * 1e9 / g.interval_ns for g in groups)
        # Names only of refused tags: the status asks once a second, a device has 1,000s of tags.
        refused = dict(list(st.refused.items())[:64])
        names = {t.id: t.name for t in self.device.tags if t.id in refused} if refused else {}
        return {
            **super().health(),
            "endpoint": str(self.endpoint),
            "unit": self.unit,
            "connected": bool(self.link and self.link.connected),
            "requests": c.requests,
            "requests_per_s_planned": round(per_s, 1),
            "timeouts": c.timeouts,
            "exceptions": c.exceptions,
            "bad_responses": c.bad_responses,
            "tid_mismatches": c.tid_mismatches,
            "splits": c.splits,
            "writes": c.writes,
            # of the (possibly shared) connection: rebuilt after going silent; RTU late-answer drains;
            # Modbus TCP answers that came after their request timed out
            "connection_rebuilds": self.link.rebuilds if self.link else 0,
            "late_answer_drains": self.link.drained if self.link else 0,
            "connection_resets": self.link.resets if self.link else 0,
            "late_answers": self.link.late_answers if self.link else 0,
            # learned from refusals: request sizes below the configured ones, tags held Bad
            "request_limits": {
                t: lim.size(self._limits.max_bits if t in ("coil", "di") else self._limits.max_registers)
                for t, lim in st.limits.items()
                if lim.refused is not None
            },
            "refused_tags": {names[tid]: ref.reason for tid, ref in refused.items()},
        }


def tag_kind(spec_type: str) -> ValueKind:
    return {"bool": ValueKind.BOOL, "string": ValueKind.STRING}.get(spec_type, ValueKind.NUMBER)
