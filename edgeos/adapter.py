"""The plugin contracts: protocol adapters, filters, sinks.

One adapter contract serves every kind of device. `run(emit)` produces batches until it is
cancelled: a subscription client (OPC UA) emits from its data-change callbacks, a line device
(serial) emits per line, and polled devices (Modbus) subclass `PollingAdapter`, which runs the
shared drift-free scheduler and only asks them to `read(group)`. Any exception out of `connect`
or `run` means "connection lost": the runtime closes the adapter, records the tags Bad, and
restarts it with backoff. See docs/adapters.md.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import logging
import time
from collections.abc import Awaitable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from edgeos.errors import DeviceError
from edgeos.logs import RateLimited
from edgeos.model import Batch, TagMeta, ValueKind


class Answer(enum.Enum):
    """What a batch says of whether its device answers: the runtime's up/down (health, metrics,
    status) goes by it, not by the samples' quality, which a server may set on its own (an OPC UA
    gateway's BadNoCommunication for a PLC behind it is that server answering)."""

    YES = "yes"  # the device (or its server) answered, Bad answers and refusals included
    NO = "no"  # asked, and no answer came: a timeout, a stalled subscription
    UNASKED = "unasked"  # nothing was asked (every tag held refused): says nothing of the device


class Emit(Protocol):
    """Hands a batch to the runtime; awaits while the pipeline queue is full (backpressure).

    `answer` says whether the device answered (None: inferred from the samples, NO when there
    are some and every one is Bad for want of an answer, else YES). `source` names the request
    or poll group the batch answers: a source that never answered on this connection (an
    unsupported request) does not take the device down while another answers, one that worked
    and stops does (docs/adapters.md, Answers)."""

    def __call__(
        self, batch: Batch, /, *, answer: Answer | None = None, source: Hashable = None
    ) -> Awaitable[None]: ...


# slots: a 10,000-tag gateway keeps 10,000 TagConfigs and up to as many FilterSpecs for its life.
@dataclass(frozen=True, slots=True)
class FilterSpec:
    """One step of a tag's filter chain as configured: the filter's name and its checked params."""

    name: str
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class TagConfig:
    """A configured tag: its metadata, poll interval, filter chain and the adapter's own options."""

    meta: TagMeta
    poll_interval_ns: int
    filters: tuple[FilterSpec, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> int:
        return self.meta.id

    @property
    def name(self) -> str:
        return self.meta.name


@dataclass(frozen=True)
class DeviceConfig:
    """A configured device: protocol, the adapter's own options, and its tags."""

    name: str
    protocol: str
    options: Mapping[str, Any]
    tags: tuple[TagConfig, ...]
    poll_interval_ns: int
    reconnect_min_ns: int
    reconnect_max_ns: int
    enabled: bool = True


@runtime_checkable
class Adapter(Protocol):
    """A connection to one device. Built by a `ProtocolPlugin`, owned by one runtime task."""

    async def connect(self) -> None:
        """Open the connection; raise (ideally DeviceError) if the device cannot be reached."""

    async def run(self, emit: Emit) -> None:
        """Produce batches through `emit` until cancelled; raise on a lost connection."""

    async def write(self, tag: TagConfig, value: float | bool | str) -> float | bool | str | None:
        """Write one tag's value to the device (only called for writable tags). Returns the
        value as written (after rounding to what the device holds), or None when unknown."""

    async def close(self) -> None:
        """Release the connection. Idempotent; must not raise."""

    def health(self) -> Mapping[str, Any]:
        """Adapter-specific counters for `edgeos status` (requests, errors, ...)."""


@runtime_checkable
class ProtocolPlugin(Protocol):
    """What the `edgeos.protocols` entry point names: describes options, builds adapters."""

    name: str
    device_fields: Mapping[str, Field]
    tag_fields: Mapping[str, Field]

    def tag_kind(self, options: Mapping[str, Any]) -> ValueKind:
        """The value kind a tag with these options produces (number, bool, string)."""

    def validate(self, device: DeviceConfig, path: str, problems: Problems) -> None:
        """Cross-field checks that need the whole device (address overlaps, limits)."""

    def create(self, device: DeviceConfig) -> Adapter:
        """A new, unconnected adapter for the device."""


@runtime_checkable
class Filter(Protocol):
    """A stateful per-tag filter over batches; state persists across calls.

    A filter that holds samples back (a held point, an open window) may also have
    `flush() -> Batch`: the daemon calls it at a stop and stores what it returns (device names
    are filled in by the pipeline), so a restart loses nothing the filter had seen.
    """

    def apply(self, batch: Batch) -> Batch: ...


@runtime_checkable
class FilterPlugin(Protocol):
    """What the `edgeos.filters` entry point names."""

    name: str
    fields: Mapping[str, Field]

    def create(self, n_tags: int, params: Mapping[int, Mapping[str, Any]]) -> Filter:
        """A filter holding state for tag ids 0..n_tags-1, configured for the tags in `params`
        (the pipeline numbers the tags of one chain so, and maps them back)."""


@runtime_checkable
class Sink(Protocol):
    """Where filtered batches go (the store; OEM sinks). `put` must not block for long."""

    async def put(self, batch: Batch) -> None: ...

    async def flush(self) -> None: ...


# --------------------------------------------------------------------------------------------
# Polling helper


@dataclass(frozen=True)
class PollGroup:
    """Tags read together at one interval. Adapters may attach a plan (e.g. Modbus requests)."""

    interval_ns: int
    tags: tuple[TagConfig, ...]
    plan: Any = None

    @property
    def tag_ids(self) -> list[int]:
        return [t.id for t in self.tags]


# Upper bounds of the poll-lateness histogram (/metrics), in ns; the last bucket is +Inf.
LATENESS_BOUNDS_NS = tuple(
    int(s * 1e9) for s in (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
)


@dataclass
class PollStats:
    """Poll-cycle lateness and overruns, for health, metrics and the benchmarks."""

    cycles: int = 0
    overruns: int = 0
    lateness_ns: list[int] = field(default_factory=list)
    max_samples: int = 4096
    # Cumulative histogram of lateness: counts per LATENESS_BOUNDS_NS bucket (+Inf last), and the sum.
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENESS_BOUNDS_NS) + 1))
    late_sum_ns: int = 0

    def record(self, late_ns: int) -> None:
        self.cycles += 1
        self.buckets[bisect.bisect_left(LATENESS_BOUNDS_NS, late_ns)] += 1
        self.late_sum_ns += late_ns
        if len(self.lateness_ns) >= self.max_samples:
            self.lateness_ns[self.cycles % self.max_samples] = late_ns
        else:
            self.lateness_ns.append(late_ns)


def first_error(e: BaseException) -> BaseException:
    """The first leaf of an exception group (the error a log line should name)."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


# Skipped polls are counted (poll_overruns) and said in the log, at most once a minute per
# device and interval: a query shows no sample for them, the log says why.
_overruns = RateLimited(logging.getLogger("edgeos.adapter"))


def group_by_interval(tags: Sequence[TagConfig]) -> list[PollGroup]:
    by: dict[int, list[TagConfig]] = {}
    for t in tags:
        by.setdefault(t.poll_interval_ns, []).append(t)
    return [PollGroup(iv, tuple(ts)) for iv, ts in sorted(by.items())]


# A polled read that has not returned after this many intervals, and at least this long, hangs.
HUNG_READ_INTERVALS = 10
HUNG_READ_MIN_S = 30.0


class PollingAdapter:
    """Base for polled devices: the runtime's scheduler calls `read(group)` at each tick.

    Ticks are on an absolute grid (start + k * interval), so the rate does not drift with read
    time; a read that overruns skips the missed ticks and counts them rather than bursting.
    Groups share one connection; `self.io_lock` serialises requests where the transport needs it.
    """

    def __init__(self, device: DeviceConfig) -> None:
        self.device = device
        self.io_lock = asyncio.Lock()
        self.stats: dict[int, PollStats] = {}

    def poll_groups(self) -> list[PollGroup]:
        return group_by_interval(self.device.tags)

    async def read(self, group: PollGroup, now_ns: int) -> Batch:
        """Read one group; return Bad-quality samples for tags the device refused."""
        raise NotImplementedError

    def answer_of(self, group: PollGroup) -> Answer | None:
        """Whether the device answered the group's last read (None: inferred from its samples).
        Adapters that know (a timeout, nothing sent) say so here; `read` returns only samples."""
        return None

    async def run(self, emit: Emit) -> None:
        groups = self.poll_groups()
        try:
            async with asyncio.TaskGroup() as tg:
                for i, g in enumerate(groups):
                    self.stats[i] = PollStats()
                    tg.create_task(self._poll_loop(g, self.stats[i], emit), name=f"poll:{self.device.name}:{i}")
        except BaseExceptionGroup as eg:
            # One failed group means the connection is gone: report that error, not a group.
            raise first_error(eg) from eg

    async def _poll_loop(self, group: PollGroup, stats: PollStats, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        interval = group.interval_ns / 1e9
        # Align the grid to wall-clock multiples of the interval so sample times are tidy.
        wall = time.time()
        first_wall = (wall // interval + 1) * interval
        start = loop.time() + (first_wall - wall)
        k = 0
        while True:
            due = start + k * interval
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            late = loop.time() - due
            stats.record(int(late * 1e9))
            began = loop.time()
            # A read that never returns (a driver blocked on a lost answer) would leave the
            # device "running" and silent for good: bounded, it is a failure, and the device is
            # restarted like after a lost connection.
            bound = max(HUNG_READ_MIN_S, HUNG_READ_INTERVALS * interval)
            try:
                async with asyncio.timeout(bound) as cm:
                    batch = await self.read(group, time.time_ns())
            except TimeoutError:
                if not cm.expired():
                    raise  # the read's own timeout
                raise DeviceError(
                    self.device.name,
                    f"a read of its {interval:g}s polls has not returned in {bound:g}s (the driver hangs); restarting",
                    code="hung",
                    stage="run",
                ) from None
            await emit(batch, answer=self.answer_of(group), source=("poll", group.interval_ns))
            # Next tick strictly in the future: skip (and count) ticks lost to a slow read.
            k_next = int((loop.time() - start) / interval) + 1
            if k_next > k + 1:
                stats.overruns += k_next - k - 1
                name = self.device.name
                _overruns.log(
                    logging.WARNING,
                    f"{name}:{group.interval_ns}",
                    "%s: a read of its %gs polls took %.2fs: %d poll(s) skipped (a slow device, its "
                    "timeouts, or those of a neighbour on a shared line; counted in poll_overruns)",
                    name,
                    interval,
                    loop.time() - began,
                    k_next - k - 1,
                    device=name,
                    code="poll_overrun",
                )
            k = max(k + 1, k_next)

    async def connect(self) -> None:
        return None

    async def write(self, tag: TagConfig, value: float | bool | str) -> float | bool | str | None:
        raise NotImplementedError(f"{self.device.protocol} does not support writes")

    async def close(self) -> None:
        return None

    def health(self) -> Mapping[str, Any]:
        cycles = sum(s.cycles for s in self.stats.values())
        overruns = sum(s.overruns for s in self.stats.values())
        return {"poll_cycles": cycles, "poll_overruns": overruns}


# Last, not at the top: edgeos.config imports this module, which is complete by now whichever
# of the two is imported first. Imported at all (not only for type checkers) so that
# typing.get_type_hints() resolves the plugin Protocols' annotations for OEM tooling.
from edgeos.config.schema import Field, Problems  # noqa: E402
