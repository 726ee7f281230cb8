"""The OPC UA adapter: subscribed tags through monitored items, polled tags through Read calls
on the shared scheduler, one session per device.

Every (re)connect resolves `nsu=` node ids through the server's NamespaceArray and reads each
node's DataType and ValueRank. A node the server does not know (or that is an array, or of a
type the tag cannot carry) is Bad on its own and re-tried every `retry_unknown`; the other tags
keep flowing. The session's health is watched: asyncua's own tasks failing raises DeviceError,
and the runtime marks the tags Bad once and reconnects with backoff. A subscription with no
publish answer (data or keep-alive) for 1.5 keep-alive intervals has its tags marked Bad by the
adapter (read again when answers return); one silent for one request timeout more is rebuilt.
Counters live in a state per configured device and survive the reconnects.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from edgeos.protocols.opcua import client as uac
from edgeos.protocols.opcua.config import device_options, parse_nodeid, tag_mode

from edgeos.adapter import (
    Answer,
    DeviceConfig,
    Emit,
    PollGroup,
    PollingAdapter,
    PollStats,
    TagConfig,
    first_error,
    group_by_interval,
)
from edgeos.errors import DeviceError
from edgeos.logs import RateLimited
from edgeos.model import Batch, Quality

log = logging.getLogger("edgeos.protocols.opcua")

BAD_STALLED = Quality.BAD_COMM_FAILURE
"""The quality of the samples that mark a stalled subscription (as the runtime's own mark)."""
SUBSCRIPTION = "subscription"
"""The source (adapter.Emit) of what the subscription brings: its last answer, or its stall."""

WATCH_EVERY_S = 0.5
"""How often asyncua's own tasks (channel renewal, server watchdog) are checked for failure."""

QUEUE_PUBLISHES = 64
"""Publish responses waiting to be turned into batches. When full, the session's publish loop
waits, so the server keeps the notifications in its own queues (nothing is dropped here)."""


@dataclass
class Counters:
    connects: int = 0
    publishes: int = 0
    keepalives: int = 0
    notifications: int = 0
    reads: int = 0
    writes: int = 0
    silent_rebuilds: int = 0
    stalls: int = 0
    unknown_nodes: int = 0


class Memory:
    """Per tag, the last sample the device produced (its time as the server stamped it, value
    bits, quality, text), and the time of a Bad mark since (0: none). Kept in the device's state,
    so it outlives the adapters the runtime makes at each reconnect.

    Two things follow from it. A sample read again unchanged (the same time, value, quality and
    text: with source timestamps an unchanged value keeps its time, in a poll, in a re-created
    subscription's first notification, in the read after a stall) is the same sample, stored
    once. And a tag's first sample after a Bad mark (the runtime's at a lost session, the
    adapter's at a stall, a held node's, a Bad value) stamped before that mark is stored once
    more at the time it arrived: the server says the value is still the one from before the
    outage, and stamped with its old time it would sort before the mark, so every query would
    show the tag Bad until the value next changed."""

    def __init__(self, n: int) -> None:
        self.ts = np.full(n, np.iinfo(np.int64).min, np.int64)
        self.bits = np.zeros(n, np.int64)
        self.q = np.zeros(n, np.uint32)
        self.text: dict[int, str | None] = {}
        self.gap = np.zeros(n, np.int64)

    def mark(self, positions: Sequence[int] | np.ndarray, at_ns: int) -> None:
        """Bad samples stamped `at_ns` were stored for these tags (by the runtime or the adapter)."""
        p = np.asarray(positions, np.intp)
        self.gap[p] = np.maximum(self.gap[p], at_ns)

    def settle(
        self,
        lp: np.ndarray,
        ts: np.ndarray,
        values: np.ndarray,
        quality: np.ndarray,
        text: np.ndarray | None,
        now_ns: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """The samples (tag positions `lp`, in arrival order) to emit: repeats of a tag's last
        sample dropped, and a tag's last sample here that is stamped before its Bad mark emitted
        again stamped `now_ns` (the original kept too when it is news: a change before the mark
        that was never seen). Remembers the last sample of each tag."""
        bits = np.ascontiguousarray(values, np.float64).view(np.int64)
        same = (self.ts[lp] == ts) & (self.bits[lp] == bits) & (self.q[lp] == quality)
        if text is not None:
            for i in np.flatnonzero(same).tolist():
                same[i] = self.text.get(int(lp[i])) == text[i]
        # Each tag's last sample in this answer (a subscription's queue may bring several).
        last = len(lp) - 1 - np.unique(lp[::-1], return_index=True)[1]
        tags = lp[last]
        gap = self.gap[tags]
        is_stale = (gap != 0) & (ts[last] < gap)
        stale = last[is_stale]
        self.ts[lp], self.bits[lp], self.q[lp] = ts, bits, quality  # in order: the last one stays
        if text is not None:
            self.text.update(zip(lp.tolist(), text.tolist(), strict=True))
        out_ts = ts[last].copy()
        out_ts[is_stale] = now_ns
        bad = (quality[last] & 0x80000000) != 0
        self.gap[tags] = np.where(bad, out_ts, 0)  # a Bad sample is a mark of its own
        if not len(stale) and not same.any():
            return lp, ts, values, quality, text
        order = np.concatenate([np.flatnonzero(~same), stale])
        ts_out = ts[order]
        ts_out[len(order) - len(stale) :] = now_ns
        return lp[order], ts_out, values[order], quality[order], None if text is None else text[order]


@dataclass
class DeviceState:
    counters: Counters = field(default_factory=Counters)
    errors: RateLimited = field(default_factory=lambda: RateLimited(log))
    limits: dict[str, int] = field(default_factory=dict)
    memory: Memory | None = None


_STATES: dict[int, DeviceState] = {}


def state_of(device: DeviceConfig) -> DeviceState:
    """Counters that outlive the adapters the runtime makes at each reconnect."""
    st = _STATES.get(id(device))
    if st is None:
        st = _STATES[id(device)] = DeviceState()
        st.errors.device = device.name  # its log lines carry the device field
        weakref.finalize(device, _STATES.pop, id(device), None)
    return st


def read_password(o: Mapping[str, Any]) -> str | None:
    if o.get("password_env"):
        return os.environ.get(o["password_env"])
    if o.get("password_file"):
        return Path(o["password_file"]).read_text().rstrip("\r\n")
    return None


def keepalive_s(o: Mapping[str, Any], publishing_ns: int) -> float:
    """The keep-alive interval the config asks for: publishing_interval x keepalive_count."""
    return publishing_ns / 1e9 * o["keepalive_count"]


def requested_keepalive_count(o: Mapping[str, Any]) -> int:
    """The keep-alive count asked of the server: half the configured one, so that a healthy
    idle subscription answers at least twice per configured keep-alive interval and a silence
    of 1.5 intervals is three missed keep-alives, not jitter. (asyncua's server sends its
    keep-alives two publishing intervals late: every (count + 2) intervals.)"""
    return max(1, o["keepalive_count"] // 2)


# Silence (in keep-alive intervals) after which a subscription's tags are marked Bad: below the
# promised 1.5 (issue 28), by what the check's wake-up and the path to the store take on a
# loaded machine (measured 1-25 ms at a 0.5 s keep-alive).
STALL_MARK = 1.4


def stall_bound_s(o: Mapping[str, Any], publishing_ns: int, revised: tuple[float, int] | None = None) -> float:
    """How long a subscription may stay without any publish answer (data or keep-alive), from
    the arrival of the last one, before its tags are marked Bad: STALL_MARK configured keep-alive
    intervals (or of the interval the server revised the request to, when longer), so that the
    mark is stored within 1.5; never more than `rebuild_bound_s`."""
    ka = keepalive_s(o, publishing_ns)
    if revised is not None:
        ka = max(ka, revised[0] * revised[1])
    return min(STALL_MARK * ka, rebuild_bound_s(o, publishing_ns, revised))


def rebuild_bound_s(o: Mapping[str, Any], publishing_ns: int, revised: tuple[float, int] | None = None) -> float:
    """Silence after which the subscription is given up and the session rebuilt: `silence_timeout`,
    by default 1.5 keep-alive intervals plus one request timeout."""
    if o.get("silence_timeout"):
        return o["silence_timeout"] / 1e9
    ka = keepalive_s(o, publishing_ns)
    if revised is not None:
        ka = max(ka, revised[0] * revised[1])
    return 1.5 * ka + o["timeout"] / 1e9


class OpcUaAdapter(PollingAdapter):
    def __init__(self, device: DeviceConfig) -> None:
        super().__init__(device)
        self.o = device_options(device.options)
        self.state = state_of(device)
        self.counters = self.state.counters
        self.session: uac.Session | None = None
        n = len(device.tags)
        self.ids = np.array([t.id for t in device.tags], np.int32)
        self.kinds = np.array([uac.KINDS[t.options.get("type", "number")] for t in device.tags], np.int8)
        self.refs = [parse_nodeid(t.options["node"]) for t in device.tags]
        self.modes = [tag_mode(self.o, t.options) for t in device.tags]
        self.pos = {t.id: i for i, t in enumerate(device.tags)}
        self.nodes: list[Any] = [None] * n  # resolved NodeIds, None when not usable now
        self.builtin = [""] * n
        self.enums: list[dict[int, str] | None] = [None] * n  # an enumeration node's values
        self.held: dict[int, int] = {}  # tag position -> the Bad status it is held with
        self.publishing_ns = self.o.get("publishing_interval") or device.poll_interval_ns
        self._since = 0.0  # monotonic: the subscription's items were created (silence counts from then on)
        self._publishes: asyncio.Queue[Any] | None = None
        self._sub_id: int | None = None
        self._revised: tuple[float, int] | None = None  # the server's publishing interval (s), keep-alive count
        self._stalled = False  # subscribed tags marked Bad for silence; answers coming back end it
        self._answer: dict[int, Answer] = {}  # per poll group: read something, or nothing to read
        if self.state.memory is None:
            self.state.memory = Memory(n)
        self.memory = self.state.memory
        self._up = False  # this adapter's session was established (its loss is a Bad mark)

    # -- connect

    async def connect(self) -> None:
        name = self.device.name
        try:
            password = read_password(self.o)
        except OSError as e:
            raise DeviceError(name, f"password_file: {e}", code="config", stage="connect") from None
        self.session = uac.Session(self.o["endpoint"], self.o, password)
        try:
            await self.session.connect()
            await self._resolve(list(range(len(self.refs))))
        except uac.OpcUaError as e:
            raise DeviceError(name, str(e), code=e.code, stage="connect") from None
        self.counters.connects += 1
        self._up = True
        lim = self.session.limits
        self.state.limits = {k: getattr(lim, k) for k in vars(lim)}

    async def _resolve(self, positions: list[int]) -> None:
        """Resolve and check the tags at `positions` under this session's NamespaceArray."""
        s = self.session
        assert s is not None
        todo: list[int] = []
        for i in positions:
            nid = s.resolve(self.refs[i])
            self.nodes[i] = nid
            if nid is None:
                self.held[i] = uac.BAD_NODE_ID_UNKNOWN
            else:
                todo.append(i)
        if not todo:
            return
        info = await s.node_info([self.nodes[i] for i in todo])
        for i, (status, dtype, rank, builtin) in zip(todo, info, strict=True):
            tag = self.device.tags[i]
            if status:
                self.held[i] = status
                self.nodes[i] = None
            elif rank != -1:
                self.held[i] = uac.BAD_TYPE_MISMATCH
                self.nodes[i] = None
                self.state.errors.log(
                    logging.WARNING,
                    f"array:{tag.name}",
                    "%s: %s is an array (ValueRank %d): arrays are not read; "
                    "configure one tag per element on a server that exposes them as scalars",
                    self.device.name,
                    tag.name,
                    rank,
                )
            elif not _fits(builtin, int(self.kinds[i])):
                self.held[i] = uac.BAD_TYPE_MISMATCH
                self.nodes[i] = None
                self.state.errors.log(
                    logging.WARNING,
                    f"type:{tag.name}",
                    "%s: %s is a %s node, which a %s tag cannot carry",
                    self.device.name,
                    tag.name,
                    builtin or "non-scalar",
                    tag.options.get("type", "number"),
                )
            else:
                self.held.pop(i, None)
                self.builtin[i] = builtin
                self.enums[i] = await s.enum_values(dtype) if builtin == "Int32" else None
        unknown = [
            f"{self.device.tags[i].name} ({self.device.tags[i].options['node']})"
            for i in positions
            if self.held.get(i) == uac.BAD_NODE_ID_UNKNOWN
        ]
        if unknown:
            self.counters.unknown_nodes += len(unknown)
            self.state.errors.log(
                logging.WARNING,
                "unknown",
                "%s: the server does not know %s: Bad, tried again every %gs",
                self.device.name,
                ", ".join(unknown[:10]),
                self.o["retry_unknown"] / 1e9,
            )

    # -- run

    def poll_groups(self) -> list[PollGroup]:
        return group_by_interval([t for t, m in zip(self.device.tags, self.modes, strict=True) if m == "poll"])

    async def run(self, emit: Emit) -> None:
        if self.session is None or self.session.client is None:
            raise DeviceError(self.device.name, "not connected", code="not_connected", stage="run")
        try:
            async with asyncio.TaskGroup() as tg:
                if self.held:  # Bad as before
                    # Every tag held: nothing else will ever say the server answers, and it
                    # answered this session's connect. Otherwise the live tags say it (or not:
                    # a server that never publishes stays down however often it is rebuilt).
                    every = all(n is None for n in self.nodes)
                    answer = Answer.YES if every else Answer.UNASKED
                    await emit(self._held_batch(list(self.held)), answer=answer, source=SUBSCRIPTION)
                sub = [i for i, m in enumerate(self.modes) if m == "subscribe"]
                if sub:
                    self._publishes = asyncio.Queue(QUEUE_PUBLISHES)
                    self._sub_id, interval_s, count = await self._call(
                        self.session.subscribe(self.publishing_ns, requested_keepalive_count(self.o))
                    )
                    self._revised = (interval_s, count)
                    await self._monitor(emit, [i for i in sub if self.nodes[i] is not None])
                    self._since = time.monotonic()  # creating many items may take a while
                    tg.create_task(
                        self._call(self.session.publish_loop(self._sub_id, self._on_publish)),
                        name=f"opcua:{self.device.name}:publish",
                    )
                    tg.create_task(self._drain(emit), name=f"opcua:{self.device.name}:drain")
                for k, g in enumerate(self.poll_groups()):
                    self.stats[k] = PollStats()
                    tg.create_task(self._poll_loop(g, self.stats[k], emit), name=f"poll:{self.device.name}:{k}")
                tg.create_task(self._watch(emit, bool(sub)), name=f"opcua:{self.device.name}:watch")
                tg.create_task(self._retry_held(emit), name=f"opcua:{self.device.name}:retry")
        except BaseExceptionGroup as eg:
            # One failed task means the session is gone: report that error, not a group.
            raise first_error(eg) from eg

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except uac.OpcUaError as e:
            raise DeviceError(self.device.name, str(e), code=e.code, stage="run") from None

    async def _monitor(self, emit: Emit, positions: list[int]) -> None:
        o = self.o
        items = []
        for i in positions:
            t = self.device.tags[i].options
            items.append(
                (
                    i,
                    self.nodes[i],
                    {
                        "sampling_interval": t.get("sampling_interval")
                        if t.get("sampling_interval") is not None
                        else (
                            o["sampling_interval"]
                            if o["sampling_interval"] is not None
                            else self.device.tags[i].poll_interval_ns
                        ),
                        "queue_size": t.get("queue_size") or o["queue_size"],
                        "discard_oldest": o["discard_oldest"],
                        "trigger": o["trigger"],
                        # The device's deadband applies to number tags (a server refuses it on others).
                        "deadband": t.get("deadband")
                        or (o["deadband"] if self.kinds[i] == uac.KIND_NUMBER else "none"),
                        "deadband_value": t.get("deadband_value")
                        if t.get("deadband_value") is not None
                        else o["deadband_value"],
                    },
                )
            )
        if not items:
            return
        codes = await self._call(self.session.monitor(self._sub_id, items))
        refused = []
        for (i, _n, _s), code in zip(items, codes, strict=True):
            if code & 0x80000000:
                self.held[i] = code
                self.nodes[i] = None
                refused.append(i)
        if refused:
            self.counters.unknown_nodes += len(refused)
            self.state.errors.log(
                logging.WARNING,
                "monitor",
                "%s: the server refused to monitor %s: Bad, tried again every %gs",
                self.device.name,
                ", ".join(f"{self.device.tags[i].name} (0x{self.held[i]:08X})" for i in refused[:10]),
                self.o["retry_unknown"] / 1e9,
            )
            await emit(self._held_batch(refused), answer=Answer.YES, source=SUBSCRIPTION)

    async def _on_publish(self, pub: uac.Publish) -> None:
        """The session's publish loop hands over every answer, keep-alives included."""
        q = self._publishes
        if q is not None:
            await q.put(pub)

    async def _drain(self, emit: Emit) -> None:
        q = self._publishes
        assert q is not None
        while True:
            pub = await q.get()
            self.counters.publishes += 1
            if pub.status is not None and pub.status & 0x80000000:
                raise DeviceError(
                    self.device.name,
                    f"the server ended the subscription (status 0x{pub.status:08X})",
                    code="subscription",
                    stage="run",
                )
            await self._changes(emit, pub)
            if self._stalled:
                await self._resume(emit)

    async def _changes(self, emit: Emit, pub: uac.Publish) -> None:
        c = self.counters
        handles = pub.handles
        if not len(handles):
            c.keepalives += 1
            return
        now = time.time_ns()
        known = handles < len(self.ids)  # ClientHandles are tag positions (unsigned)
        if not known.all():  # a handle edgeos never gave: not a sample of any tag
            self.state.errors.log(logging.WARNING, "handle", "%s: data for unknown handles", self.device.name)
            pub = pub.select(known)
            handles = pub.handles
            if not len(handles):
                return
        c.notifications += len(handles)
        kinds = self.kinds[handles]
        ts_mode = self.o["timestamp"]
        if pub.values is not None:
            values, quality, ts, text = uac.publish_columns(pub, kinds, ts_mode, now)
        else:
            values, quality, ts, text = await uac.columns_apart(pub.dvs, kinds, ts_mode, now)
        lp, ts, values, quality, text = self.memory.settle(handles.astype(np.intp), ts, values, quality, text, now)
        # The server answered, whatever the items' own status (a gateway server's
        # BadNoCommunication for a PLC behind it): only this adapter's stall mark is no answer.
        await emit(
            Batch(self.device.name, self.ids[lp], ts, values, quality, text),
            answer=Answer.YES,
            source=SUBSCRIPTION,
        )

    def answer_of(self, group: PollGroup) -> Answer | None:
        return self._answer.get(group.interval_ns)

    async def read(self, group: PollGroup, now_ns: int) -> Batch:
        pos = np.array([self.pos[t.id] for t in group.tags], np.intp)
        live = [p for p in pos.tolist() if self.nodes[p] is not None]
        s = self.session
        if s is None:
            raise DeviceError(self.device.name, "not connected", code="not_connected")
        parts = []
        self._answer[group.interval_ns] = Answer.YES if live else Answer.UNASKED
        if live:
            lp = np.array(live, np.intp)
            try:
                values, quality, ts, text = await s.read_columns(
                    [self.nodes[p] for p in live], self.kinds[lp], self.o["timestamp"], now_ns
                )
            except uac.OpcUaError as e:
                raise DeviceError(self.device.name, str(e), code=e.code) from None
            self.counters.reads += 1
            unknown = [p for p, q in zip(live, quality.tolist(), strict=True) if q == uac.BAD_NODE_ID_UNKNOWN]
            for p in unknown:  # deleted since connect: held and re-tried like any unknown node
                self.held[p] = uac.BAD_NODE_ID_UNKNOWN
                self.nodes[p] = None
            lp, ts, values, quality, text = self.memory.settle(lp, ts, values, quality, text, now_ns)
            parts.append(Batch(self.device.name, self.ids[lp], ts, values, quality, text))
        # Tags held Bad (unknown node, refused type) are not read: their one Bad sample went out
        # when they were held (at the run's start, or in the read that found them gone), and
        # `_retry_held` brings them back; a Bad sample on every poll would only repeat it.
        return Batch.concat(self.device.name, parts)

    def _held_batch(self, positions: list[int], now_ns: int | None = None) -> Batch:
        p = np.array(positions, np.intp)
        n = len(p)
        q = np.array([self.held.get(i, uac.BAD_NODE_ID_UNKNOWN) for i in positions], np.uint32)
        text = None
        if (self.kinds[p] == uac.KIND_STRING).any():
            text = np.full(n, None, object)  # no value, as the runtime's own Bad marks
        at = now_ns or time.time_ns()
        self.memory.mark(p, at)
        ts = np.full(n, at, np.int64)
        return Batch(self.device.name, self.ids[p], ts, np.full(n, np.nan), q, text)

    async def _watch(self, emit: Emit, subscribed: bool) -> None:
        """Raise when asyncua's tasks failed. A subscription with no publish answer (data or
        keep-alive) for `stall_bound_s` since the last one arrived has its tags marked Bad
        (BadCommunicationError) and goes on; after `rebuild_bound_s`, it raises to rebuild the
        session. The check wakes at those deadlines, not on a coarse tick.

        Two steps, because a busy server (a large round of changes on a loaded machine) can be
        late by more than half a keep-alive: marking Bad is cheap and undone by the next answer,
        a rebuild re-creates every monitored item."""
        stall = stall_bound_s(self.o, self.publishing_ns, self._revised)
        rebuild = rebuild_bound_s(self.o, self.publishing_ns, self._revised)
        while True:
            wait = WATCH_EVERY_S
            if subscribed:
                wait = min(wait, self._last_answer() + (rebuild if self._stalled else stall) - time.monotonic())
            await asyncio.sleep(max(wait, 0.001))
            s = self.session
            if s is None:
                raise DeviceError(self.device.name, "not connected", code="not_connected", stage="run")
            try:
                s.check()
            except uac.OpcUaError as e:
                raise DeviceError(self.device.name, str(e), code=e.code, stage="run") from None
            if not subscribed:
                continue
            silent = time.monotonic() - self._last_answer()
            if silent >= rebuild:
                self.counters.silent_rebuilds += 1
                raise DeviceError(
                    self.device.name,
                    f"subscription silent for {silent:.2f}s (no data nor keep-alive; bound {rebuild:.2f}s): rebuilding",
                    code="silent",
                    stage="run",
                )
            if silent >= stall and not self._stalled:
                self._stalled = True
                self.counters.stalls += 1
                self.state.errors.log(
                    logging.WARNING,
                    "stall",
                    "%s: no publish answer for %.2fs (bound %.2fs): subscribed tags Bad until one comes",
                    self.device.name,
                    silent,
                    stall,
                )
                live = [i for i, m in enumerate(self.modes) if m == "subscribe" and self.nodes[i] is not None]
                if live:
                    at = time.time_ns()
                    self.memory.mark(live, at)
                    await emit(
                        Batch.filled(self.device.name, self.ids[live], at, np.nan, BAD_STALLED),
                        answer=Answer.NO,
                        source=SUBSCRIPTION,
                    )

    async def _resume(self, emit: Emit) -> None:
        """Answers again after a stall: read the subscribed tags, whose values the server will not
        send again unless they change, so each is Good again (or the error is raised)."""
        self._stalled = False
        log.info("%s: publish answers again", self.device.name)
        live = [i for i, m in enumerate(self.modes) if m == "subscribe" and self.nodes[i] is not None]
        if not live or self.session is None:
            return
        p = np.array(live, np.intp)
        now = time.time_ns()
        try:
            values, quality, ts, text = await self.session.read_columns(
                [self.nodes[i] for i in live], self.kinds[p], self.o["timestamp"], now
            )
        except uac.OpcUaError as e:
            raise DeviceError(self.device.name, str(e), code=e.code, stage="run") from None
        p, ts, values, quality, text = self.memory.settle(p, ts, values, quality, text, now)
        await emit(
            Batch(self.device.name, self.ids[p], ts, values, quality, text), answer=Answer.YES, source=SUBSCRIPTION
        )

    def _last_answer(self) -> float:
        """When the last publish answer arrived (or the subscription began, if none yet)."""
        s = self.session
        return max(self._since, s.last_publish if s is not None else 0.0)

    async def _retry_held(self, emit: Emit) -> None:
        """Nodes held Bad (unknown, refused) are tried again every retry_unknown."""
        while True:
            await asyncio.sleep(self.o["retry_unknown"] / 1e9)
            held = sorted(self.held)
            if not held:
                continue
            await self._call(self._resolve(held))
            back = [i for i in held if i not in self.held]
            if not back:
                continue
            log.info("%s: %s known again", self.device.name, ", ".join(self.device.tags[i].name for i in back))
            sub = [i for i in back if self.modes[i] == "subscribe"]
            if sub and self._sub_id is not None:
                await self._monitor(emit, sub)

    # -- writes

    async def write(self, tag: TagConfig, value: float | bool | str) -> float | bool | str:
        name = self.device.name
        i = self.pos.get(tag.id)
        if i is None:
            raise DeviceError(name, f"tag {tag.name!r} is not a tag of this device", code="config", stage="write")
        s = self.session
        if s is None or s.client is None:
            raise DeviceError(name, "not connected", code="not_connected", stage="write")
        if self.nodes[i] is None:
            raise DeviceError(name, f"{tag.name}: the node is not usable now (held Bad)", code="node", stage="write")
        builtin = self.builtin[i]
        try:
            v = uac.convert(value, builtin)
        except ValueError as e:
            raise DeviceError(name, f"{tag.name}: {e}", code="value", stage="write") from None
        enum = self.enums[i]
        if enum is not None and v not in enum:
            listed = ", ".join(f"{k} {n}" for k, n in sorted(enum.items()))
            raise DeviceError(
                name, f"{tag.name}: {v} is not a value of its enumeration ({listed})", code="value", stage="write"
            )
        try:
            await s.write(self.nodes[i], v, builtin)
        except uac.OpcUaError as e:
            raise DeviceError(name, f"{tag.name}: {e}", code=e.code, stage="write") from None
        self.counters.writes += 1
        return uac.written(v, builtin)

    async def close(self) -> None:
        if self._up:
            # The runtime has just stored its Bad mark for the lost session (or this is a stop):
            # a value the next session reads unchanged is stored again, after it (Memory).
            self._up = False
            self.memory.mark(np.arange(len(self.ids)), time.time_ns())
        s, self.session = self.session, None
        self._publishes = None
        if s is not None:
            await s.close()

    def health(self) -> Mapping[str, Any]:
        c = self.counters
        return {
            **super().health(),
            "endpoint": self.o["endpoint"],
            "connected": bool(self.session and self.session.client),
            "connects": c.connects,
            "publishes": c.publishes,
            "keepalives": c.keepalives,
            "notifications": c.notifications,
            "reads": c.reads,
            "writes": c.writes,
            "silent_rebuilds": c.silent_rebuilds,
            "stalls": c.stalls,
            "operation_limits": dict(self.state.limits),
            "held_tags": {self.device.tags[i].name: f"0x{q:08X}" for i, q in list(self.held.items())[:64]},
        }


_NUMERIC = {"SByte", "Byte", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Float", "Double", "Boolean"}


def _fits(builtin: str, kind: int) -> bool:
    if kind == uac.KIND_STRING:
        return builtin in ("String", "Variant", "")
    if kind == uac.KIND_DATETIME:
        return builtin in ("DateTime", "Variant", "")
    if kind == uac.KIND_BOOL:
        return builtin in ("Boolean", "Variant", "")
    return builtin in _NUMERIC or builtin in ("Variant", "")
