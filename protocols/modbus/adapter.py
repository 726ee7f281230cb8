"""The Modbus adapter: one unit id on one (shared) endpoint, polled by the runtime's scheduler.

Each poll group (the tags of one interval) carries a request plan (planner.py). A read sends
the plan's requests in order, lays the answers side by side in one register buffer and one bit
buffer, and decodes the whole group at once (codec.py). Partial failures become Bad samples
for exactly the tags concerned; only a lost connection, or `reconnect_after` polls in a row
without any answer, raises (the supervisor then backs off and reconnects).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from edgeos.protocols.modbus import transport
from edgeos.protocols.modbus.codec import Decoder, encode_registers, merge_into_register, to_bool
from edgeos.protocols.modbus.config import TagSpec, tag_spec
from edgeos.protocols.modbus.planner import (
    TCP_REQUEST_COST,
    Limits,
    Request,
    plan,
    serial_request_cost,
    split,
)

from edgeos.adapter import DeviceConfig, PollGroup, PollingAdapter, TagConfig, group_by_interval
from edgeos.errors import DeviceError
from edgeos.logs import RateLimited
from edgeos.model import QUALITY_DTYPE, Batch, Quality, ValueKind

log = logging.getLogger("edgeos.protocols.modbus")
_errors = RateLimited(log)

# Refined plans (after illegal-address splits) outlive an adapter: a reconnect must not
# relearn them. Keyed by device name, interval and the group's tag ids.
_LEARNED: dict[tuple[str, int, tuple[int, ...]], list[Request]] = {}


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
    out = {}
    for t in device.tags:
        spec, problems = tag_spec(dict(t.options), device.options["address_base"])
        if spec is None:  # validate() refused the config already; guard for configs built in code
            raise DeviceError(device.name, f"tag {t.name}: {problems[0][1]}", code="config", stage="connect")
        out[t.id] = spec
    return out


class GroupPlan:
    """A poll group's requests, where each answer goes in the buffers, and the decoder."""

    def __init__(self, tags: Sequence[TagConfig], specs: Sequence[TagSpec], requests: list[Request]) -> None:
        self.tags = tuple(tags)
        self.specs = list(specs)
        self.requests = requests
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
        return sum(r.count for r in self.requests if not r.is_bits)


@dataclass
class PlanSlot:
    """Mutable holder on a (frozen) PollGroup: the plan is refined when a request is refused."""

    current: GroupPlan
    key: tuple[str, int, tuple[int, ...]]


def build_groups(device: DeviceConfig, *, learned: bool = True) -> list[PollGroup]:
    specs = specs_of(device)
    limits = limits_of(device.options)
    out = []
    for g in group_by_interval(device.tags):
        gspecs = [specs[t.id] for t in g.tags]
        key = (device.name, g.interval_ns, tuple(t.id for t in g.tags))
        reqs = _LEARNED.get(key) if learned else None
        if reqs is None:
            reqs = plan(gspecs, limits)
        out.append(PollGroup(g.interval_ns, g.tags, PlanSlot(GroupPlan(g.tags, gspecs, reqs), key)))
    return out


@dataclass
class Counters:
    requests: int = 0
    timeouts: int = 0
    exceptions: int = 0
    bad_responses: int = 0
    splits: int = 0
    writes: int = 0
    refused: dict[str, str] = field(default_factory=dict)  # tag -> last exception, while it lasts


class ModbusAdapter(PollingAdapter):
    def __init__(self, device: DeviceConfig) -> None:
        super().__init__(device)
        o = device.options
        self.unit = o["unit"]
        self.timeout_s = o["timeout"] / 1e9
        self.retries = o["retries"]
        self.reconnect_after = o["reconnect_after"]
        self.endpoint = transport.endpoint_of(dict(o))
        self.link: transport.Link | None = None
        self.counters = Counters()
        # Polls in a row without any answer, per poll group (interval): with several intervals,
        # `reconnect_after` counts the polls of each, not their sum. Any answer resets them all.
        self._silent_polls: dict[int, int] = {}
        self._silent_since = 0.0  # monotonic time the first unanswered poll of the streak began
        self._groups: list[PollGroup] | None = None
        self._specs: dict[int, TagSpec] | None = None
        self._limits = limits_of(o)

    def poll_groups(self) -> list[PollGroup]:
        if self._groups is None:
            self._groups = build_groups(self.device)
        return self._groups

    async def connect(self) -> None:
        self._specs = specs_of(self.device)
        if self.link is None:
            self.link = transport.acquire(self.device.name, self.endpoint)
        await self.link.connect(self.device.name, self.timeout_s)

    async def read(self, group: PollGroup, now_ns: int) -> Batch:
        slot: PlanSlot = group.plan
        gp = slot.current
        link = self.link
        if link is None:
            raise DeviceError(self.device.name, "not connected", code="not_connected")
        name, unit, c = self.device.name, self.unit, self.counters
        results: list[tuple[Request, Any]] = []
        queue = list(gp.requests)
        refined = answered = timed_out = False
        began = time.monotonic()
        i = 0
        while i < len(queue):
            r = queue[i]
            i += 1
            if timed_out:  # the unit is silent: don't spend a timeout per request of this poll
                results.append((r, Quality.BAD_TIMEOUT))
                continue
            c.requests += 1
            try:
                data = await link.read(name, unit, r.table, r.start, r.count, self.timeout_s, self.retries)
            except transport.ExceptionResponse as e:
                answered = True
                # Illegal data address, and illegal data value (which some PLCs answer for a range
                # reaching unimplemented registers): split, isolate the refused tags, keep the rest.
                if e.exception_code in transport.SPLIT_CODES:
                    parts = split(r, gp.specs)
                    if parts:
                        c.splits += 1
                        queue[i:i] = parts
                        refined = True
                        continue
                c.exceptions += 1
                self._refused(gp, r, e.reason)
                _errors.log(logging.WARNING, f"{name}:exception:{r.table}{r.start}", "%s", e)
                results.append((r, Quality.BAD_DEVICE_FAILURE))
            except transport.ResponseTimeout as e:
                c.timeouts += 1
                timed_out = True
                _errors.log(logging.WARNING, f"{name}:timeout", "%s", e)
                results.append((r, Quality.BAD_TIMEOUT))
            except transport.BadResponse as e:
                answered = True
                c.bad_responses += 1
                _errors.log(logging.WARNING, f"{name}:bad_response", "%s", e)
                results.append((r, Quality.BAD_DECODING_ERROR))
            else:
                answered = True
                results.append((r, data))
        if refined:
            results = _rejoin(results, self._limits)
            gp = slot.current = GroupPlan(gp.tags, gp.specs, [r for r, _ in results])
            _LEARNED[slot.key] = gp.requests
            log.info(
                "%s: refused addresses isolated; every %gms now %d requests",
                name,
                group.interval_ns / 1e6,
                len(gp.requests),
            )
        if answered:
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
        elif self.counters.refused:
            self._clear_refused(gp)
        return Batch(self.device.name, gp.ids, np.full(n, now_ns, np.int64), values, quality, text)

    def _refused(self, gp: GroupPlan, r: Request, reason: str) -> None:
        refused = self.counters.refused
        for m in r.members:
            if len(refused) < 64 or gp.names[m] in refused:
                refused[gp.names[m]] = reason

    def _clear_refused(self, gp: GroupPlan) -> None:
        for name in gp.names:
            self.counters.refused.pop(name, None)

    # -- writes ------------------------------------------------------------------------------

    async def write(self, tag: TagConfig, value: float | int | bool | str) -> None:
        """Write one tag with type conversion and range checks (only `writable` tags reach here)."""
        name = self.device.name
        specs = self._specs or specs_of(self.device)
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
        except ValueError as e:
            raise DeviceError(name, f"{tag.name}: {e}", code="value", stage="write") from None
        self.counters.writes += 1

    async def close(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            transport.release(link)

    def health(self) -> Mapping[str, Any]:
        c = self.counters
        groups = self._groups or []
        per_s = sum(len(g.plan.current.requests) * 1e9 / g.interval_ns for g in groups)
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
            "splits": c.splits,
            "writes": c.writes,
            # of the (possibly shared) connection: rebuilt after going silent; RTU late-answer drains
            "connection_rebuilds": self.link.rebuilds if self.link else 0,
            "late_answer_drains": self.link.drained if self.link else 0,
            "refused_tags": dict(c.refused),
        }


def _rejoin(results: list[tuple[Request, Any]], limits: Limits) -> list[tuple[Request, Any]]:
    """After a split, join neighbours that were both answered and touch (no unknown address
    between them), so the refined plan keeps only the cuts the device forced."""
    out: list[tuple[Request, Any]] = []
    for r, res in results:
        if out and isinstance(res, list) and isinstance(out[-1][1], list):
            p, pres = out[-1]
            size = limits.max_bits if r.is_bits else limits.max_registers
            if p.table == r.table and p.start + p.count == r.start and p.count + r.count <= size:
                out[-1] = (Request(r.table, p.start, p.count + r.count, p.members + r.members), pres + res)
                continue
        out.append((r, res))
    return out


def tag_kind(spec_type: str) -> ValueKind:
    return {"bool": ValueKind.BOOL, "string": ValueKind.STRING}.get(spec_type, ValueKind.NUMBER)
