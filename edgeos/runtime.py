"""The supervisor: one TaskGroup owning device tasks, the filter pipeline and the store writer.

Data path: device tasks --raw queue--> pipeline --store queue--> writer (--> sync, later).
Queues are bounded: a producer awaits while one is full (backpressure), and the writer never
waits on disk for long, so backpressure is brief. A producer cancelled while waiting still
enqueues its batch (one batch over the bound at most), so no sample already read is lost.

Shutdown is cancellation, in order: device tasks are cancelled and their adapters closed, a
sentinel then flows through the pipeline and the writer, which commits everything before it
and stops. The whole sequence is bounded by gateway.shutdown_timeout.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import math
import signal
import sys
import time
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeos import filters, plugins
from edgeos.adapter import Adapter, Answer, DeviceConfig, PollStats, Sink, first_error
from edgeos.aio import cancel_and_wait
from edgeos.config.model import Config
from edgeos.errors import DeviceError, StoreError
from edgeos.logs import RateLimited, redact
from edgeos.model import Batch, Quality, TagMeta, is_unanswered
from edgeos.pipeline import Pipeline
from edgeos.retry import backoff_delay
from edgeos.service import control
from edgeos.service import reload as reloading
from edgeos.service.notify import CursorProbe, ExecutorProbe, Notifier, Watchdog, status_line
from edgeos.service.stats import Histogram
from edgeos.service.status import STATUS_NAME, link_live, live_path, write_status
from edgeos.store import StoreCorrupt, StoreFsyncFailed, StoreFull, StoreSettings, StoreWriter, default_max_size
from edgeos.sync import Sync
from edgeos.trace import TRACE

log = logging.getLogger("edgeos.runtime")

# A sample stamped further ahead of the gateway's clock than this is said (once a minute per
# device): a device or server clock that is wrong, not the jitter between two synced clocks.
CLOCK_AHEAD_NS = 60 * 10**9

_STOP: Any = object()


@dataclass
class _Swap:
    """Through the raw queue at a reload: the pipeline (and tags) for the batches after it."""

    pipeline: Pipeline
    tags: tuple[TagMeta, ...]

    def __len__(self) -> int:  # counted as no samples where a stop drains the queue
        return 0


class Channel:
    """A bounded FIFO whose `put` enqueues anyway if cancelled mid-wait (see module docstring)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: collections.deque[Any] = collections.deque()
        self._not_empty = asyncio.Event()
        self._not_full = asyncio.Event()
        self._not_full.set()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: Any) -> None:
        try:
            while len(self._items) >= self.maxsize:
                self._not_full.clear()
                await self._not_full.wait()
        finally:
            self.put_nowait(item)

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        self._not_empty.set()

    def drain(self) -> list[Any]:
        """Everything queued, emptied out (after a stop, to count what never got through)."""
        items = list(self._items)
        self._items.clear()
        self._not_full.set()
        return items

    def get_nowait(self) -> Any:
        item = self._items.popleft()
        if len(self._items) < self.maxsize:
            self._not_full.set()
        return item

    async def get(self) -> Any:
        while not self._items:
            self._not_empty.clear()
            await self._not_empty.wait()
        item = self._items.popleft()
        if len(self._items) < self.maxsize:
            self._not_full.set()
        return item


class ClockSteps:
    """Says in the log when the wall clock steps (NTP, an RTC set by hand, a boot in 1970 then
    corrected): samples carry the wall clock, so a step shows in the history, and the line says
    why (docs/reliability.md, Clock jumps; an independent tester found steps unlogged)."""

    SMALLEST_S = 1.0  # drift corrections slew the clock; a step of a second or more is said

    def __init__(self) -> None:
        self._offset = time.time_ns() - time.monotonic_ns()

    def check(self) -> float:
        """The step since the last check, in seconds (0 below SMALLEST_S); logged when not 0."""
        offset = time.time_ns() - time.monotonic_ns()
        step = (offset - self._offset) / 1e9
        if abs(step) < self.SMALLEST_S:
            return 0.0
        self._offset = offset
        log.warning(
            "the wall clock stepped %s%.3f s (now %s UTC): samples carry it, so the history shows "
            "the step; retention and the replay window ignore a step forward until a restart, "
            "and follow a step back",
            "+" if step > 0 else "",
            step,
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            extra={"code": "clock_step"},
        )
        return step


@dataclass
class DeviceState:
    """What the supervisor knows of one device, for status and tests."""

    name: str
    state: str = "starting"  # starting | connecting | running | backoff | stopped
    connects: int = 0
    failures: int = 0
    batches: int = 0
    samples: int = 0
    last_error: str = ""
    last_error_code: str = ""
    last_error_ns: int = 0  # when: status shows how old the last error is once the device is up
    last_ok_ns: int = 0  # the last batch the device answered (a sample not Bad for want of an answer)
    # Connected, but every sample of the last batch was Bad for want of an answer (a server
    # that accepts and never answers): the device is down, whatever its connection says.
    silent: bool = False
    adapter: Adapter | None = None
    # For /metrics and /healthz (edgeos/service/metrics.py): failures by error code, when the
    # device last stopped running (0 while it runs), and poll lateness of closed adapters.
    errors_by_code: collections.Counter[str] = field(default_factory=collections.Counter)
    down_since_ns: int = field(default_factory=time.time_ns)
    # The same moment on the monotonic clock: how long a device has been down is measured on it
    # (/healthz, `edgeos_device_down_seconds`), so a wall-clock step (NTP) neither hides an
    # outage nor makes a new one look an hour old (an independent tester's finding).
    down_since_mono_ns: int = field(default_factory=time.monotonic_ns)
    retired: PollStats = field(default_factory=PollStats)
    _retired_adapter: Adapter | None = None

    def __setattr__(self, key: str, value: Any) -> None:
        object.__setattr__(self, key, value)
        if key in ("state", "silent"):
            if self.up:
                object.__setattr__(self, "down_since_ns", 0)
            elif not getattr(self, "down_since_ns", 1):
                object.__setattr__(self, "down_since_ns", time.time_ns())
                object.__setattr__(self, "down_since_mono_ns", time.monotonic_ns())

    def down_seconds(self) -> float:
        """How long the device has been down (0 while up), on the monotonic clock."""
        return (time.monotonic_ns() - self.down_since_mono_ns) / 1e9 if self.down_since_ns else 0.0

    @property
    def up(self) -> bool:
        """Connected and answering (for /healthz, device_up, status and systemd)."""
        return self.state == "running" and not getattr(self, "silent", False)

    def retire(self, adapter: Adapter) -> None:
        """Fold a closed adapter's poll statistics into the device's running totals."""
        if adapter is self._retired_adapter:
            return
        for ps in getattr(adapter, "stats", {}).values():
            if isinstance(ps, PollStats):
                r = self.retired
                r.cycles += ps.cycles
                r.overruns += ps.overruns
                r.late_sum_ns += ps.late_sum_ns
                r.buckets = [a + b for a, b in zip(r.buckets, ps.buckets, strict=True)]
        self._retired_adapter = adapter

    def poll_stats(self) -> PollStats:
        """Poll cycles, overruns and the lateness histogram since the daemon started."""
        out = PollStats(self.retired.cycles, self.retired.overruns, [], 0, list(self.retired.buckets))
        out.late_sum_ns = self.retired.late_sum_ns
        if self.adapter is not None and self.adapter is not self._retired_adapter:
            for ps in list(getattr(self.adapter, "stats", {}).values()):
                if isinstance(ps, PollStats):
                    out.cycles += ps.cycles
                    out.overruns += ps.overruns
                    out.late_sum_ns += ps.late_sum_ns
                    out.buckets = [a + b for a, b in zip(out.buckets, ps.buckets, strict=True)]
        return out


@dataclass
class Counters:
    read: int = 0
    filtered_out: int = 0  # net: held back or dropped by filters, less what they released later
    filter_released: int = 0  # held back earlier, stored at a reload's or stop's flush
    stored: int = 0
    store_errors: int = 0
    filter_errors: int = 0
    dropped_store_unavailable: int = 0  # oldest samples over memory_buffer while the disk refused writes
    dropped_at_stop: int = 0  # read but not committed when a stop ran out of shutdown_timeout
    store_recoveries: int = 0  # damaged store files set aside while running (docs/store.md I9)
    started_ns: int = field(default_factory=time.time_ns)


class LatestValues:
    """Last value, time and quality of every tag, as columns indexed by tag id."""

    def __init__(self, tags: Iterable[TagMeta]) -> None:
        self.meta = list(tags)
        n = max((t.id for t in self.meta), default=-1) + 1  # ids are stable across reloads, not dense
        self.ts = np.zeros(n, np.int64)
        self.values = np.full(n, np.nan)
        self.quality = np.full(n, Quality.BAD_WAITING_FOR_INITIAL_DATA, np.uint32)
        self.text: dict[int, str] = {}

    def update(self, b: Batch) -> None:
        # With repeated tags in one batch, numpy assignment keeps the last occurrence.
        self.ts[b.tags] = b.ts
        self.values[b.tags] = b.values
        self.quality[b.tags] = b.quality
        if b.text is not None:
            for t, s in zip(b.tags.tolist(), b.text.tolist(), strict=True):
                if s is not None:
                    self.text[t] = s

    def resized(self, tags: Iterable[TagMeta]) -> LatestValues:
        """For the tags of a reloaded config: an id keeps its meaning, so its values carry over.
        The columns never shrink (a reader holding an id of a removed tag reads its last value)."""
        new = LatestValues(tags)
        k = len(self.ts)
        if len(new.ts) < k:
            new.ts, new.values, new.quality = self.ts.copy(), self.values.copy(), self.quality.copy()
        else:
            new.ts[:k], new.values[:k], new.quality[:k] = self.ts, self.values, self.quality
        new.text = dict(self.text)
        return new

    def rows(self) -> list[tuple[TagMeta, int, float | str, int]]:
        return [
            (m, int(self.ts[m.id]), self.text.get(m.id, float(self.values[m.id])), int(self.quality[m.id]))
            for m in self.meta
        ]


# A reload's stopping devices are cancelled again every 6 s (after their closes' own bound),
# 3 times: past that, one that still runs is left running (Runtime.reload).
_RELOAD_ROUNDS, _RELOAD_EVERY_S = 3, 6.0


class Runtime:
    """Runs a config until `stop()` (or cancellation, or SIGTERM/SIGINT with handle_signals)."""

    def __init__(
        self,
        config: Config,
        *,
        kernel_impl: str = "auto",
        sinks: Iterable[Sink] = (),
        store: bool = True,
    ) -> None:
        self.config = config
        self.kernel_impl = kernel_impl
        self.sinks = list(sinks)
        self.use_store = store
        self.store: StoreWriter | None = None
        self.devices = {d.name: DeviceState(d.name, "starting" if d.enabled else "disabled") for d in config.devices}
        self.latest = LatestValues(config.tags)
        self.counters = Counters()
        self.errors = RateLimited(logging.getLogger("edgeos.device"))
        self.running = asyncio.Event()  # set once the runtime's tasks run; devices may still be connecting
        self._connected = {d.name: asyncio.Event() for d in config.devices if d.enabled}
        self._stop = asyncio.Event()  # stop() works before run() too: run() then returns at once
        self._retiring: set[asyncio.Task] = set()  # device tasks a reload is stopping
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._producing = {f"device:{d.name}": asyncio.Event() for d in config.devices}
        self._store_failing = False
        self._pending: collections.deque[tuple[Batch, int]] = collections.deque()  # the writer's, with sizes
        self._pending_bytes = 0
        self._committing: tuple[asyncio.Future, int] | None = None  # a commit in the store thread
        self._undurable = 0  # (I3) samples committed, not yet fsynced: stored at the next flush
        self.failed: str | None = None  # why the daemon stopped itself (a failed fsync): exit status 1
        self._status_path = live_path(config.gateway.data_dir, config.gateway.run_dir)
        self._tag_ids = reloading.TagIds.of(config)  # stable across reloads (service/reload.py)
        self._ran = False  # run() is called once
        self._reload_lock = asyncio.Lock()
        self._reload_asked = asyncio.Event()  # SIGHUP
        self._device_tasks: dict[str, asyncio.Task] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._raw: Channel | None = None
        self.notifier = Notifier()  # sd_notify: READY, STATUS, WATCHDOG, STOPPING (no-op outside systemd)
        # /metrics and /healthz (edgeos/service/metrics.py, health.py): the server, commit
        # latency, and the store's size figures, cached (counting walks an index).
        self.http: Any = None  # an edgeos.service.http.HttpServer while [http] enabled
        self.commit_latency = Histogram()
        self.store_stats: dict[str, int] = {}
        self._store_stats_at = 0.0
        self._store_stats_fut: asyncio.Future | None = None
        self.sync: Sync | None = None
        self.console_url: str | None = None  # set while the console listens
        if config.upstream.enabled and store:
            from edgeos.sync.mqtt import MqttTransport

            transport = MqttTransport(config.gateway.id, config.upstream.options, config.source.parent)
            self.sync = Sync(config.gateway.id, config.gateway.data_dir, config.upstream.options, transport)
            if TRACE is not None:
                self.sync._prepare = TRACE.wrap_read(self.sync._prepare)  # type: ignore[method-assign]

    # -- control ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Begin an orderly shutdown; safe to call from a signal handler, another task, or before run()."""
        self._stop.set()

    async def wait_connected(self, *devices: str) -> None:
        """Return once the named devices (default: every enabled one) are connected. Bound it
        with asyncio.timeout: a device that cannot be reached never connects."""
        for name in devices or tuple(self._connected):
            await self._connected[name].wait()

    async def write(
        self, device: str, tag: str, value: float | bool | str, *, by: str = "api"
    ) -> float | bool | str | None:
        """Write a tag through the running adapter; only tags configured `writable`. Every
        attempt is logged with who asked (`by`): an audit trail of what was sent to machines."""
        dev = self.config.device(device)
        tc = next((t for t in dev.tags if t.name == tag), None)
        if tc is None:
            raise KeyError(f"{device}/{tag}: no such tag; its tags: {', '.join(t.name for t in dev.tags)}")
        if not tc.meta.writable:
            raise PermissionError(f"{device}/{tag} is not writable (set writable = true in its config)")
        adapter = self.devices[device].adapter
        if adapter is None or self.devices[device].state != "running":
            log.warning(
                "write %s/%s = %r by %s refused: device not connected",
                device,
                tag,
                value,
                by,
                extra={"device": device, "code": "write_refused"},
            )
            raise DeviceError(device, "not connected", code="not_connected", stage="write")
        try:
            written = await adapter.write(tc, value)
        except Exception as e:
            log.warning(
                "write %s/%s = %r by %s failed: %s",
                device,
                tag,
                value,
                by,
                e,
                extra={"device": device, "code": "write_failed"},
            )
            raise
        if written is None or written == value:
            log.info("write %s/%s = %r by %s", device, tag, value, by, extra={"device": device, "code": "write"})
        else:
            log.info(
                "write %s/%s = %r (asked %r) by %s",
                device,
                tag,
                written,
                value,
                by,
                extra={"device": device, "code": "write"},
            )
        return written

    async def _control(self, req: dict[str, Any]) -> dict[str, Any]:
        """Requests on the control socket (edgeos write, edgeos status --live)."""
        op = req.get("op")
        if op == "write":
            written = await self.write(str(req["device"]), str(req["tag"]), req["value"], by=str(req.get("_peer", "?")))
            return {"ok": True, "written": written}
        if op == "status":
            return {"ok": True, "status": self.status()}
        if op == "reload":
            return await self.reload()
        return {"ok": False, "error": f"unknown op {op!r}; expected write, status or reload"}

    @property
    def store_failing(self) -> bool:
        """True while the store refuses writes (samples wait in memory_buffer)."""
        return self._store_failing

    def store_stats_age(self) -> float:
        return time.monotonic() - self._store_stats_at if self._store_stats_at else math.inf

    async def refresh_store_stats(self, max_age: float = 5.0, wait: float = 1.0) -> dict[str, int]:
        """The store's size figures (StoreWriter.stats), asked of the store's thread when older
        than `max_age`; waits at most `wait` seconds (0: not at all), so a hung disk leaves the last
        figures rather than a hung caller."""
        if self.store is None or self._executor is None or self.store_stats_age() < max_age:
            return self.store_stats
        if self._store_stats_fut is None or self._store_stats_fut.done():
            store = self.store
            try:
                fut = asyncio.get_running_loop().run_in_executor(self._executor, store.stats)
            except RuntimeError:  # the executor is shut down: stopping
                return self.store_stats

            def done(f: asyncio.Future) -> None:
                if not f.cancelled() and f.exception() is None:
                    self.store_stats, self._store_stats_at = f.result(), time.monotonic()

            fut.add_done_callback(done)
            self._store_stats_fut = fut
        if wait > 0:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._store_stats_fut), wait)
        return self.store_stats

    def status(self) -> dict[str, Any]:
        return {
            "gateway": self.config.gateway.id,
            "kernels": filters.implementation(),
            "counters": vars(self.counters).copy(),
            "store": vars(self.store.counters).copy() if self.store else {},
            "sync": _redacted(vars(self.sync.status)) if self.sync else None,
            "store_stats": dict(self.store_stats),
            "store_failing": self._store_failing,
            "http": {"address": self.config.http.address, "port": self.http.port} if self.http is not None else None,
            "time": time.time(),
            "devices": {
                n: {
                    "state": s.state,
                    "up": s.up,
                    "connects": s.connects,
                    "failures": s.failures,
                    "samples": s.samples,
                    "last_error": s.last_error,
                    "last_error_code": s.last_error_code,
                    "last_error_ns": s.last_error_ns,
                    "last_ok_ns": s.last_ok_ns,
                    "down_since_ns": s.down_since_ns,
                    "health": _health(s.adapter),
                }
                for n, s in self.devices.items()
            },
        }

    # -- reload ----------------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply its devices and tags (SIGHUP, `edgeos reload`).

        Devices whose configuration is unchanged keep running (no gap); removed and changed ones
        are stopped, their last batches still flowing to the store; added and changed ones are
        started. Tag ids stay stable (service/reload.py). An invalid config changes nothing:
        the reply lists its problems. Gateway, store and upstream settings apply at the next
        restart (named in the reply)."""
        async with self._reload_lock:
            if not self.running.is_set() or self._stop.is_set() or self._tg is None:
                return {"ok": False, "errors": ["the daemon is not running (or is stopping)"]}
            self.notifier.reloading()
            try:
                return await self._reload()
            finally:
                self.notifier.ready(status_line(self.status(), None))

    async def _reload(self) -> dict[str, Any]:
        from edgeos.config import load_config
        from edgeos.errors import ConfigError
        from edgeos.logs import redact

        loop = asyncio.get_running_loop()
        source = self.config.source
        log.info("re-reading the config %s", source, extra={"code": "reload"})
        try:
            # Parsed in a thread; meanwhile the GIL is handed back to the loop every 1 ms, not
            # 5: polls of untouched devices stay on time while a large config is parsed.
            switch = sys.getswitchinterval()
            sys.setswitchinterval(min(switch, 0.001))
            try:
                loaded = await loop.run_in_executor(None, load_config, source)
            finally:
                sys.setswitchinterval(switch)
            new, new_tags = self._tag_ids.renumber(loaded)
            plan = reloading.plan(self.config, new)
            pipeline = Pipeline(new.tag_configs(), impl=self.kernel_impl)
            if new_tags and self.store is not None:  # known to the store before any batch carries them
                await asyncio.shield(loop.run_in_executor(self._executor, self.store.add_tags, new_tags))
        except ConfigError as e:
            errors = [redact(str(p)) for p in e.problems]
        except Exception as e:  # a plugin or the store refusing: the running config stays too
            errors = [redact(f"{type(e).__name__}: {e}")]
        else:
            errors = []
        if errors:
            log.error(
                "config reload refused, the running config stays: %s",
                "; ".join(errors),
                extra={"code": "reload_refused"},
            )
            return {"ok": False, "config": str(source), "errors": errors}
        stopping = [n for n in plan.removed] + [d.name for d in plan.changed]
        tasks = [self._device_tasks.pop(n) for n in stopping if n in self._device_tasks]
        self._retire(tasks)
        # Cancelled again only after their closes' bound (5 s at most) would have ended them.
        left = await cancel_and_wait(tasks, "the reloaded devices", log, rounds=_RELOAD_ROUNDS, every_s=_RELOAD_EVERY_S)
        stuck = {t.get_name().removeprefix("device:"): t for t in left}
        self._device_tasks.update(stuck)  # still polling: no second poller beside one (two masters on a line)
        self._retiring.difference_update(left)  # it polls on: its next failure is a failure again
        if self._stop.is_set():
            return {"ok": False, "errors": ["the daemon began stopping during the reload"]}
        # From here to the end, no await: a stop cannot begin half-way through.
        assert self._raw is not None and self._tg is not None
        self._tag_ids.commit(new)
        self._raw.put_nowait(_Swap(pipeline, new.tags))
        self.config = dataclasses.replace(self.config, devices=new.devices)
        for name in plan.removed:
            if name in self._device_tasks:  # stuck above: tracked until it ends
                continue
            self.devices.pop(name, None)
            self._connected.pop(name, None)
            self._producing.pop(f"device:{name}", None)
        for d in (*plan.added, *plan.changed):
            if d.name in self._device_tasks:  # stuck above: it keeps its old config until a restart
                continue
            st = self.devices.setdefault(d.name, DeviceState(d.name))
            st.state = "starting" if d.enabled else "disabled"
            st.adapter = None
            self._producing[f"device:{d.name}"] = asyncio.Event()
            if d.enabled:
                self._connected.setdefault(d.name, asyncio.Event()).clear()
                self._device_tasks[d.name] = self._tg.create_task(
                    self._supervise(d, self._raw), name=f"device:{d.name}"
                )
            else:
                self._connected.pop(d.name, None)
        summary = {"ok": True, "config": str(source), **plan.summary(), "tags_added": len(new_tags)}
        if stuck:
            summary["ok"] = False
            summary["errors"] = [
                f"device {n} did not stop within {_RELOAD_ROUNDS * _RELOAD_EVERY_S:g} s of its cancellation: "
                "it keeps polling with its old config, and the new one applies at the next restart"
                for n in sorted(stuck)
            ]
            log.error("config reload: %s", "; ".join(summary["errors"]), extra={"code": "reload_stuck"})
        log.info(
            "config reloaded: %d devices added, %d removed, %d changed, %d unchanged, %d new tag ids%s",
            len(plan.added),
            len(plan.removed),
            len(plan.changed),
            len(plan.unchanged),
            len(new_tags),
            f"; {', '.join(plan.restart_needed)} settings apply at the next restart" if plan.restart_needed else "",
            extra={"code": "reload"},
        )
        return summary

    async def _hup_loop(self) -> None:
        while True:
            await self._reload_asked.wait()
            self._reload_asked.clear()
            await self.reload()

    # -- main ------------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = False) -> None:
        """Run until stop(). Once: a Runtime is not started again (its stop, store and counters
        are spent); make a new one."""
        if self._ran:
            raise RuntimeError("this Runtime has already run; make a new Runtime to run again")
        self._ran = True
        cfg = self.config
        loop = asyncio.get_running_loop()
        if not filters.COMPILED:
            log.warning(
                "compiled filter kernels are missing: running the plain-Python reference "
                "kernels (much slower); reinstall with a C compiler"
            )
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self._reload_asked.set)
        pipeline = Pipeline(cfg.tag_configs(), impl=self.kernel_impl)
        raw = Channel(cfg.gateway.queue_batches)
        filtered = Channel(cfg.gateway.queue_batches)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgeos-store")
        try:
            if self.use_store:
                self.store = await loop.run_in_executor(
                    self._executor, StoreWriter, cfg.gateway.data_dir, cfg.tags, store_settings(cfg)
                )
            off = [d for d in cfg.devices if not d.enabled]
            log.info(
                "gateway %s: %d devices, %d tags%s, kernels %s, store %s",
                cfg.gateway.id,
                len(cfg.devices) - len(off),
                len(cfg.tags) - sum(len(d.tags) for d in off),
                f" ({len(off)} disabled devices, {sum(len(d.tags) for d in off)} tags not read)" if off else "",
                filters.implementation(),
                self.store.path if self.store else "off",
            )
            async with asyncio.TaskGroup() as tg:
                t_pipe = tg.create_task(self._pipeline(pipeline, raw, filtered), name="pipeline")
                t_write = tg.create_task(self._writer(filtered), name="store-writer")
                t_sync = tg.create_task(self.sync.run(), name="sync") if self.sync else None
                t_trace = tg.create_task(TRACE.watch_loop(), name="trace") if TRACE is not None else None
                t_ctl = t_status = t_http = None
                if self.use_store:
                    t_ctl = tg.create_task(control.serve(cfg.gateway.data_dir, self._control), name="control")
                    t_status = tg.create_task(self._status_loop(), name="status")
                if cfg.http.enabled:
                    t_http = tg.create_task(self._serve_http(), name="http")
                t_console = None
                if self.use_store and cfg.http.enabled and cfg.console.enabled:
                    from edgeos.console.service import serve as serve_console

                    # After the http task: its first step creates self.http, where this mounts.
                    t_console = tg.create_task(serve_console(self), name="console")
                self._tg, self._raw = tg, raw
                self._device_tasks = {
                    d.name: tg.create_task(self._supervise(d, raw), name=f"device:{d.name}")
                    for d in cfg.devices
                    if d.enabled
                }
                t_hup = tg.create_task(self._hup_loop(), name="reload") if handle_signals else None
                self.running.set()
                self.notifier.ready(status_line(self.status(), None))
                t_notify = tg.create_task(self._notify_loop(), name="notify") if self.notifier.enabled else None
                try:
                    await self._stop.wait()
                finally:
                    # Also when run() itself is cancelled (or a core task failed): the devices
                    # then see a stop, as after stop() (a reconnect would poll on past it).
                    self._stop.set()
                    self.notifier.stopping()
                    for t in (t_ctl, t_status, t_http, t_console, t_notify, t_hup, t_trace):
                        if t is not None:
                            t.cancel()
                    # As reloads left them, and those a reload in progress is still stopping.
                    t_devs = [*self._device_tasks.values(), *(t for t in self._retiring if not t.done())]
                    await asyncio.shield(self._shutdown(t_devs, raw, filtered, t_pipe, t_write))
                    if t_sync is not None and self.sync is not None:
                        # Everything is committed; forward the last of it if that is quick,
                        # else the next start resumes from the cursor.
                        await self.sync.flush(min(2.0, cfg.gateway.shutdown_timeout_ns / 4e9))
                        await cancel_and_wait([t_sync], "the upstream sync", log)
        finally:
            self.running.clear()
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            if self.store is not None:
                if self.sync is not None:
                    cursor = self.sync.cursor  # on the loop thread, where the sync changes it
                    try:
                        await loop.run_in_executor(self._executor, self.store.save_cursor, cursor)
                    except Exception as e:  # the next start resumes from the last cursor saved
                        log.warning("could not save the sync cursor at stop: %s", e)
                    await self.sync.final_status()
                    self.sync.close()
                await loop.run_in_executor(self._executor, self.store.close)
                if self._undurable:
                    # Committed after the last flush (a commit the stop's deadline overtook): the
                    # closing checkpoint fsyncs it, unless an fsync failed (then it may be lost).
                    if self.store.undurable:
                        self.counters.dropped_at_stop += self._undurable
                        log.error(
                            "stop: %d committed samples were never fsynced (lost on a power cut)", self._undurable
                        )
                    else:
                        self.counters.stored += self._undurable
                    self._undurable = 0
                for st in self.devices.values():  # a device cancelled in its backoff: stopped too
                    if st.state not in ("stopped", "disabled"):
                        st.state = "stopped"
                final = {**self.status(), "stopped": True}
                # The live file (tmpfs) and the data directory's, which outlives /run.
                for path in dict.fromkeys((self._status_path, cfg.gateway.data_dir / STATUS_NAME)):
                    write_status(path, final)
            self._executor.shutdown(wait=True)
            self.notifier.close()
            if TRACE is not None:
                TRACE.dump()
            c = self.counters
            if self.store is not None or not self.use_store:  # else it never started: its error says why
                log.info(
                    "stopped: %d samples read, %d stored, %d dropped by filters, %d lost (store unavailable or stop)",
                    c.read,
                    c.stored,
                    c.filtered_out,
                    c.dropped_store_unavailable + c.dropped_at_stop,
                )

    async def _shutdown(
        self, devices: list[asyncio.Task], raw: Channel, filtered: Channel, *core: asyncio.Task
    ) -> None:
        timeout = self.config.gateway.shutdown_timeout_ns / 1e9
        log.info("stopping: polling ends, then everything read is flushed to the store")
        for t in devices:
            t.cancel()
        try:
            async with asyncio.timeout(timeout):
                # Producers are done once each reaches its close: nothing more can be read, so
                # the flush can start while slow closes finish in parallel.
                await asyncio.gather(*(self._producing[t.get_name()].wait() for t in devices))
                raw.put_nowait(_STOP)
                # asyncio.wait, not gather: at the deadline it returns without cancelling the core
                # tasks, so what they did not finish is known (and counted) below.
                await asyncio.wait(core)
                await asyncio.gather(*core, *devices, return_exceptions=True)
        except TimeoutError:
            if not all(t.done() for t in core):
                log.error("shutdown took longer than %.1fs; samples not yet committed are lost", timeout)
            else:
                log.warning("shutdown: device connections did not close within %.1fs", timeout)
            await cancel_and_wait([*devices, *core], "the devices and the store writer", log)
        await self._settle_commit()
        self._count_lost(raw, filtered)

    async def _settle_commit(self) -> None:
        """A commit cancelled by the stop's deadline still runs in the store thread (it is
        shielded); wait for it, so what it stored counts as stored, not lost."""
        if self._committing is None:
            return
        fut, k = self._committing
        self._committing = None
        try:
            n = await fut
        except Exception:
            return  # it failed: its batches are still pending, and counted as lost below
        self._committed(n)
        for _ in range(min(k, len(self._pending))):
            self._pending.popleft()

    def _count_lost(self, raw: Channel, filtered: Channel) -> None:
        """After a stop that ran out of time: whatever was read and not committed is counted,
        so that read == stored + filtered_out + dropped_store_unavailable + dropped_at_stop."""
        unread = sum(len(b) for b in raw.drain() if b is not _STOP)
        self.counters.read += unread  # read from a device, it never reached the pipeline
        lost = unread + sum(len(b) for b in filtered.drain() if b is not _STOP)
        lost += sum(len(b) for b, _ in self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        if lost:
            self.counters.dropped_at_stop += lost
            log.error("stop: %d samples read but not committed are lost (counted in dropped_at_stop)", lost)

    # -- devices ---------------------------------------------------------------------------

    async def _supervise(self, dev: DeviceConfig, raw: Channel) -> None:
        """Connect, run, and on any failure record Bad samples, close, back off and retry."""
        st = self.devices[dev.name]
        plugin = plugins.load(plugins.PROTOCOLS, dev.protocol)
        tag_ids = np.array([t.id for t in dev.tags], np.int32)
        producing = self._producing[f"device:{dev.name}"]
        attempt = 0
        degraded = False  # Bad samples already recorded for this outage
        # (docs/adapters.md, Batches) What a plugin emits is checked before anything reads it:
        # a batch of another device, or of tag ids not its own, was stored under the wrong device
        # or crashed the pipeline (and with it every device).
        allowed = np.zeros(int(tag_ids.max()) + 1 if len(tag_ids) else 0, bool)
        allowed[tag_ids] = True

        def breach(batch: object) -> str | None:
            if not isinstance(batch, Batch):
                return f"emitted a {type(batch).__name__}, not a Batch"
            if batch.device != dev.name:
                return f"emitted a batch of device {batch.device!r}"
            t = batch.tags
            if len(t) and (t.min() < 0 or t.max() >= len(allowed) or not allowed[t].all()):
                return "emitted tag ids that are not this device's"
            return None

        # Per source (poll group, request), on this connection: the event number of its last
        # YES (0: none yet) and of the first NO of its running streak (0: its last answer was
        # YES). See silent_now() and docs/adapters.md, Answers.
        answers: dict[Hashable, list[int]] = {}
        events = 0

        def silent_now() -> bool:
            """Down unless some source's last answer is a YES that is still current: given after
            every NO streak of a source that had answered before (a request that worked and
            stopped says the device stopped, however recently a slower one answered), but not
            undone by a source that never answered on this connection (an unsupported request
            says nothing of the rest)."""
            broke = max((no for yes, no in answers.values() if yes and no), default=0)
            return not any(yes > broke for yes, no in answers.values() if not no)

        async def emit(batch: Batch, *, answer: Answer | None = None, source: Hashable = None) -> None:
            nonlocal attempt, degraded, events
            if (why := breach(batch)) is not None:
                n = len(batch) if isinstance(batch, Batch) else 0
                raise DeviceError(
                    dev.name,
                    f"the {dev.protocol} adapter {why} (docs/adapters.md, Batches); its {n} samples are dropped",
                    code="contract",
                    stage="run",
                )
            st.batches += 1
            st.samples += len(batch)
            now = time.time_ns()
            if answer is None:  # not told: inferred from the samples (an empty batch: YES, as ever)
                answer = Answer.NO if len(batch) and is_unanswered(batch.quality).all() else Answer.YES
            if answer is not Answer.YES:
                # No answer (timeouts, a stalled subscription): stored as read, but no success,
                # no recovery, and the backoff keeps growing if the adapter gives up again. A
                # Bad answer (a refused address, a sensor failure) is the device answering.
                # Nothing asked says nothing either way.
                if answer is Answer.NO:
                    events += 1
                    seen = answers.setdefault(source, [0, 0])
                    if not seen[1]:
                        seen[1] = events
                    st.silent = silent_now()
                if TRACE is not None:
                    TRACE.emitted(batch)
                await raw.put(batch)
                return
            events += 1
            answers[source] = [events, 0]
            st.last_ok_ns = now
            st.silent = False
            if len(batch) and (ahead := int(batch.ts.max()) - now) > CLOCK_AHEAD_NS:
                self.errors.log(
                    logging.WARNING,
                    f"{dev.name}:clock-ahead",
                    "%s: samples stamped up to %.0f s ahead of this gateway's clock are stored as "
                    "stamped: the device's (or its server's) clock is wrong, or this gateway's; "
                    "queries of recent data and retention go by these stamps",
                    dev.name,
                    ahead / 1e9,
                    device=dev.name,
                    code="clock_ahead",
                )
            if degraded:
                log.info("%s: device is producing again", dev.name, extra={"device": dev.name, "code": "recovered"})
                self.errors.clear(dev.name + ":")
            attempt = 0
            degraded = False
            if TRACE is not None:
                TRACE.emitted(batch)
            await raw.put(batch)

        try:
            while True:
                adapter: Adapter | None = None
                try:
                    # A plugin's create() that raises is this device's failure, not the daemon's.
                    adapter = plugin.create(dev)
                    answers.clear()
                    st.adapter = adapter
                    st.state = "connecting"
                    await adapter.connect()
                    st.connects += 1
                    st.state = "running"
                    self._connected[dev.name].set()
                    await adapter.run(emit)
                    raise DeviceError(dev.name, "adapter's run() returned; restarting", code="ended", stage="run")
                except Exception as exc:
                    self._connected[dev.name].clear()
                    if self._stop.is_set() or asyncio.current_task() in self._retiring:
                        # The stop (or a reload retiring the device) cancelled this task and the
                        # adapter raised an error instead (its cleanup failed, or on Python 3.11
                        # a TaskGroup's failing child outranks the cancellation; the task's own
                        # cancelling() count cannot tell: 3.11's TaskGroup leaves it raised after
                        # any child's failure). Not the device's failure; reconnecting would poll
                        # on past the stop, until its deadline cut the flush short.
                        raise asyncio.CancelledError from exc
                    if not any(yes for yes, _ in answers.values()):
                        # No YES on this connection (a server that accepts and drops every
                        # connection, or never answers): the next one is down until its first YES.
                        st.silent = True
                    e = first_error(exc)
                    st.failures += 1
                    st.last_error = redact(str(e))  # shown by status and metrics: no secret
                    st.last_error_ns = time.time_ns()
                    st.last_error_code = e.code if isinstance(e, DeviceError) else type(e).__name__
                    st.errors_by_code[st.last_error_code] += 1
                    text = str(e) if isinstance(e, DeviceError) else f"{dev.name}: {type(e).__name__}: {e}"
                    key = f"{dev.name}:{st.last_error_code}"
                    self.errors.log(logging.WARNING, key, "%s", text, device=dev.name, code=st.last_error_code)
                    if not degraded:
                        degraded = True
                        quality = Quality.BAD_COMM_FAILURE if st.connects else Quality.BAD_NOT_CONNECTED
                        # Stored like any sample, so counted like one: in the device's samples too.
                        st.samples += len(tag_ids)
                        await raw.put(Batch.filled(dev.name, tag_ids, time.time_ns(), np.nan, quality))
                finally:
                    if self._stop is not None and self._stop.is_set():
                        producing.set()  # nothing more can be emitted: let the flush begin
                    if adapter is not None:
                        await self._close(dev, adapter)
                st.state = "backoff"
                await asyncio.sleep(backoff_delay(attempt, dev.reconnect_min_ns, dev.reconnect_max_ns))
                attempt += 1
        finally:
            producing.set()

    def _retire(self, tasks: list[asyncio.Task]) -> None:
        """Mark device tasks about to be cancelled for good (until each ends): an error their
        adapter raises then ends them instead of a reconnect."""
        for t in tasks:
            self._retiring.add(t)
            t.add_done_callback(self._retiring.discard)

    async def _close(self, dev: DeviceConfig, adapter: Adapter) -> None:
        """Close with a bound; a close that hangs or raises must not stall the supervisor."""
        try:
            bound = min(5.0, self.config.gateway.shutdown_timeout_ns / 2e9)
            await asyncio.shield(asyncio.wait_for(adapter.close(), bound))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # A TimeoutError's text is empty: say what happened.
            why = f"did not return in {bound:g}s" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
            log.warning("%s: close failed: %s", dev.name, why, extra={"device": dev.name, "code": "close_failed"})
        finally:
            self.devices[dev.name].state = "stopped"
            self.devices[dev.name].retire(adapter)

    # -- pipeline and writer ---------------------------------------------------------------

    def _flush_filters(self, pipeline: Pipeline) -> list[Batch]:
        """At a stop, what the filters hold back: held points, open windows."""

        def failed(name: str, e: Exception) -> None:
            self.counters.filter_errors += 1
            log.error(
                "filter %r failed at the stop's flush, that chain's held samples are lost: %s: %s",
                name,
                type(e).__name__,
                e,
            )

        try:
            return pipeline.flush(on_error=failed)
        except Exception as e:  # splitting by device failed: nothing to store
            failed("(pipeline)", e)
            return []

    def _filter_failed(self, device: str, name: str, e: Exception) -> None:
        """A broken filter must not cost data or the daemon: its chain's samples of the batch
        are stored unfiltered; the batch's other chains filter as usual."""
        self.counters.filter_errors += 1
        self.errors.log(
            logging.ERROR,
            f"filter:{device}:{name}:{type(e).__name__}",
            "%s: filter %r failed, its tags' samples stored unfiltered: %s: %s",
            device,
            name,
            type(e).__name__,
            e,
        )

    def _released(self, held: Batch) -> None:
        """Held back earlier (counted as filtered), stored now: the net count goes down, the
        released count up, so their sum (the Prometheus counter) never decreases."""
        self.counters.filtered_out -= len(held)
        self.counters.filter_released += len(held)

    async def _pipeline(self, pipeline: Pipeline, raw: Channel, out: Channel) -> None:
        while True:
            batch = await raw.get()
            if isinstance(batch, _Swap):  # a reload: batches before it were read under the old config
                for held in self._flush_filters(pipeline):
                    self._released(held)
                    await out.put(held)
                pipeline = batch.pipeline
                self.latest = self.latest.resized(batch.tags)
                continue
            if batch is _STOP:
                for held in self._flush_filters(pipeline):
                    self._released(held)
                    await out.put(held)
                out.put_nowait(_STOP)
                return
            t_in = time.time_ns() if TRACE is not None else 0
            self.counters.read += len(batch)
            self.latest.update(batch)
            failed = functools.partial(self._filter_failed, batch.device)
            try:
                kept = pipeline.apply(batch, on_error=failed)
            except Exception as e:  # outside any one filter (splitting the batch by chain)
                kept = batch
                failed("(pipeline)", e)
            self.counters.filtered_out += len(batch) - len(kept)
            if TRACE is not None:
                TRACE.piped(batch, t_in, kept)
            if len(kept):
                await out.put(kept)

    async def _writer(self, inbox: Channel) -> None:
        """Group commit (docs/store.md I2): commit as soon as nothing more is queued (what
        arrives during a commit goes into the next one), at `commit_samples` samples, or, with
        `commit_interval` set, no sooner than that after the first pending batch. A commit is
        a write to the WAL that a kill cannot undo; every `fsync_interval` the WAL is fsynced,
        and only then do its samples count as stored (I3). A failed commit keeps its batches
        and is retried; while the disk refuses writes, pending batches are bounded by
        `memory_buffer`, counted in real bytes with a running total (oldest dropped and
        counted). At shutdown everything pending is committed and fsynced before it returns."""
        cfg = self.config.store
        loop = asyncio.get_running_loop()
        interval = cfg.commit_interval_ns / 1e9
        fsync_every = cfg.fsync_interval_ns / 1e9
        pending = self._pending
        n_pending = 0
        deadline = 0.0
        flush_at = 0.0  # set while commits wait for their fsync
        stopping = False
        retry_at = 0.0  # set while the store refuses writes
        next_maintenance = loop.time() + 1.0
        getter: asyncio.Future | None = None

        def take(item: Any) -> None:
            nonlocal stopping, deadline, n_pending
            if item is _STOP:
                stopping = True
                return
            if not pending:
                deadline = loop.time() + interval
            n_pending += len(item)
            if retry_at:  # memory is counted only while the store refuses writes
                size = item.memory_bytes()
                pending.append((item, size))
                self._pending_bytes += size
                n_pending -= self._bound()
            else:
                pending.append((item, 0))

        try:
            while not (stopping and not pending and not flush_at):
                now = loop.time()
                if self.failed:  # an fsync failed: nothing more is written (I3); the stop counts what waits
                    if stopping:
                        break
                elif (
                    pending
                    and now >= retry_at
                    and (stopping or n_pending >= cfg.commit_samples or (now >= deadline and not len(inbox)))
                ):
                    if await self._commit(loop, [b for b, _ in pending]):
                        pending.clear()
                        self._pending_bytes = 0
                        n_pending = 0
                        retry_at = 0.0
                        if self._undurable and not flush_at:
                            flush_at = loop.time() + fsync_every
                    else:
                        if not retry_at:  # the store just began refusing: size what waits, once
                            self._measure_pending()
                        retry_at = loop.time() + 0.5
                        n_pending -= self._bound()
                    continue
                elif flush_at and not retry_at and (now >= flush_at or (stopping and not pending)):
                    flush_at = 0.0
                    await self._flush(loop)
                    continue
                elif stopping:  # only a failed commit left to retry
                    await asyncio.sleep(max(0.0, retry_at - now))
                    continue
                if now >= next_maintenance and not retry_at and not self.failed:
                    next_maintenance = now + 1.0
                    if self.store is None:
                        continue
                    # The sync's cursor is read here, on the loop thread that changes it; the
                    # store thread gets a plain integer.
                    cursor = self.sync.cursor if self.sync is not None else None
                    t_m = time.time_ns()
                    try:
                        await asyncio.shield(loop.run_in_executor(self._executor, self._maintain, cursor))
                    except StoreCorrupt as e:
                        await self._recover(loop, e)
                    except StoreError as e:
                        self.errors.log(logging.ERROR, "store:maintain", "%s", e)
                    if TRACE is not None:
                        TRACE.event("maintain", t_m)
                    continue
                # Keep draining the inbox even while the store refuses writes: producers are never
                # stalled by the disk; memory stays bounded by memory_buffer instead.
                wakes = [next_maintenance]
                if pending and not self.failed:
                    wakes.append(max(deadline, retry_at))
                if flush_at:
                    wakes.append(flush_at)
                # One pending get, kept across wake-ups and never cancelled by a timeout, so no
                # batch can be popped and then dropped (asyncio.wait, unlike wait_for, does not
                # cancel what it waits on, nor swallow a cancellation of its own).
                if getter is None:
                    getter = asyncio.ensure_future(inbox.get())
                if not getter.done():
                    await asyncio.wait({getter}, timeout=max(0.001, min(wakes) - now))
                    if not getter.done():
                        continue
                item, getter = getter.result(), None
                take(item)
                # Whatever else is queued joins this commit (group commit), up to commit_samples.
                while len(inbox) and not stopping and n_pending < cfg.commit_samples:
                    take(inbox.get_nowait())
            for sink in self.sinks:  # at a clean stop, once every committed batch was put
                try:
                    await sink.flush()
                except Exception as e:
                    log.warning("sink %s: flush at stop failed: %s: %s", type(sink).__name__, type(e).__name__, e)
        finally:
            if getter is not None:
                if not getter.done():
                    getter.cancel()  # only on a forced stop: a clean one ends on the sentinel
                elif not getter.cancelled() and getter.exception() is None and getter.result() is not _STOP:
                    batch = getter.result()  # taken from the inbox, not yet pending: count it at stop
                    pending.append((batch, 0))

    async def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """(I3) fsync what was committed; it counts as stored from now on. A failed fsync stops
        the daemon (exit status 1, for systemd to restart it): the page cache can no longer be
        trusted to hold what reaches the disk, only a fresh start that reads the disk can."""
        assert self.store is not None
        t_f = time.time_ns()
        try:
            await asyncio.shield(loop.run_in_executor(self._executor, self.store.flush))
        except StoreFsyncFailed as e:
            self.failed = str(e)
            self.counters.store_errors += 1
            log.critical("%s", e)
            self.stop()
            return
        self.counters.stored += self._undurable
        self._undurable = 0
        if TRACE is not None:
            TRACE.event("fsync", t_f)

    async def _recover(self, loop: asyncio.AbstractEventLoop, e: StoreCorrupt) -> bool:
        """The store went corrupt while running (docs/store.md, I9): quarantine the file and go on
        in a fresh one whose sequence numbers continue above the old ones. False if that failed
        too (retried at the next commit)."""
        assert self.store is not None
        log.critical("STORE DAMAGED while running: %s; moving it aside and starting a fresh store", e)
        try:
            moved = await asyncio.shield(loop.run_in_executor(self._executor, self.store.recover))
        except StoreError as e2:
            self.errors.log(logging.CRITICAL, "store:recover", "could not start a fresh store: %s; retrying", e2)
            return False
        self.counters.store_recoveries += 1
        log.critical("damaged store kept as %s (never deleted); collecting into a fresh store", moved)
        if self.sync is not None:
            self.sync.wakeup.set()
        return True

    def _maintain(self, sync_cursor: int | None) -> None:
        """Once a second, in the store thread: housekeeping and the sync's cursor."""
        assert self.store is not None
        self.store.maintain(sync_cursor=sync_cursor)

    async def _serve_http(self) -> None:
        """The local HTTP server ([http]): /metrics, /healthz. Imported only when enabled; a port
        that cannot be bound is logged and the daemon runs on without it (it is not data)."""
        from edgeos.service import health, metrics
        from edgeos.service.http import HttpServer, HttpSettings

        self.http = HttpServer(HttpSettings.from_config(self.config.http))
        metrics.register(self.http, self)
        health.register(self.http, self)
        try:
            await self.http.serve()
        except OSError as e:
            a = self.config.http
            log.warning(
                "http: cannot listen on %s:%d (%s); /metrics, /healthz and the console are unavailable "
                "(another port: [http] port)",
                a.address,
                a.port,
                e,
            )

    async def _status_loop(self) -> None:
        """The status file, once a second, whatever the store does: it must say that the daemon
        runs (and drops) exactly when the store fails. Built on the loop, written in a thread."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, link_live, self.config.gateway.data_dir, self._status_path)
        steps = ClockSteps()
        while True:
            steps.check()
            try:
                await self.refresh_store_stats(max_age=10.0, wait=0)
                await loop.run_in_executor(None, write_status, self._status_path, self.status())
            except Exception as e:  # a status is not data: never let it stop the daemon
                self.errors.log(logging.ERROR, "status", "status not written: %s: %s", type(e).__name__, e)
            await asyncio.sleep(1.0)

    async def _notify_loop(self) -> None:
        """STATUS= for `systemctl status` every few seconds, and WATCHDOG=1 only while the loop
        (this task runs on it), the store's thread and the sync progress (service/notify.py)."""
        n = self.notifier
        wd = n.watchdog_s
        tick = min(wd / 5, 5.0) if wd else 5.0
        judge = Watchdog()
        if wd and self._executor is not None:
            judge.add("store writer", ExecutorProbe(self._executor, wd / 2))
        sync = self.sync
        if wd and sync is not None:
            st = sync.status
            judge.add("sync", CursorProbe(lambda: (st.state, sync.cursor, st.head, st.published_messages), wd / 2))
        last = (time.monotonic(), self.counters.read)
        next_status = last[0] + 5.0
        stalled_before: list[str] = []
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if wd:
                stalled = judge.stalled(now)
                if not stalled:
                    n.watchdog()
                    if stalled_before:
                        log.warning("watchdog: progress again; pinging systemd's watchdog", extra={"code": "watchdog"})
                elif stalled != stalled_before:
                    log.critical(
                        "watchdog: %s; not pinging systemd's watchdog (WatchdogSec=%gs restarts the service)",
                        "; ".join(stalled),
                        wd,
                        extra={"code": "watchdog"},
                    )
                stalled_before = stalled
            if now >= next_status:
                rate = (self.counters.read - last[1]) / max(1e-3, now - last[0])
                last = (now, self.counters.read)
                next_status = now + 5.0
                n.status(status_line(self.status(), rate, store_failing=self._store_failing))

    def _measure_pending(self) -> None:
        """Real bytes of what waits, when the store starts refusing writes; from then on each
        new batch is sized as it arrives (a healthy store commits within commit_interval, so
        the writer does not pay for sizing, text columns included, on every batch)."""
        sized = collections.deque((b, b.memory_bytes()) for b, _ in self._pending)
        self._pending.clear()
        self._pending.extend(sized)
        self._pending_bytes = sum(size for _, size in sized)

    def _bound(self) -> int:
        """Drop the oldest batches beyond memory_buffer; returns the samples dropped."""
        limit = self.config.store.memory_buffer
        pending = self._pending
        dropped = 0
        while len(pending) > 1 and self._pending_bytes > limit:
            b, size = pending.popleft()
            self._pending_bytes -= size
            dropped += len(b)
        if dropped:
            self.counters.dropped_store_unavailable += dropped
            self.errors.log(
                logging.ERROR,
                "store:dropped",
                "store unavailable and memory_buffer (%d bytes) full: dropped the %d oldest samples "
                "(%d in total so far)",
                limit,
                dropped,
                self.counters.dropped_store_unavailable,
            )
        return dropped

    def _committed(self, n: int) -> None:
        """(I3) Committed samples are stored at once when every commit is fsynced, else at the
        next flush."""
        if self.store is not None and self.config.store.fsync_interval_ns > 0:
            self._undurable += n
        else:
            self.counters.stored += n

    async def _commit(self, loop: asyncio.AbstractEventLoop, batches: list[Batch]) -> bool:
        if self.store is None:
            n = sum(len(b) for b in batches)
        else:
            # Kept while it runs: a stop that runs out of time must not count a commit that
            # finishes in the store thread afterwards as lost (see _settle_commit).
            t0 = time.perf_counter()
            t_c = time.time_ns()
            fut = loop.run_in_executor(self._executor, self.store.write, batches)
            self._committing = (fut, len(batches))
            try:
                n = await asyncio.shield(fut)
            except StoreCorrupt as e:
                self._committing = None
                # Damaged while running: set it aside and start a fresh file; these batches stay
                # pending and go into it at the next try (half a second), and collecting goes on.
                self.counters.store_errors += 1
                self._store_failing = True
                await self._recover(loop, e)
                return False
            except StoreFsyncFailed as e:
                # (issue 28) An fsync SQLite did itself (a commit under synchronous=FULL, a
                # checkpoint) failed: the same verdict as a failed flush(), never a retry.
                self._committing = None
                self.failed = str(e)
                self.counters.store_errors += 1
                log.critical("%s", e)
                self.stop()
                return False
            except StoreError as e:
                self._committing = None
                self.counters.store_errors += 1
                self._store_failing = True
                key = "store:full" if isinstance(e, StoreFull) else "store:write"
                self.errors.log(logging.ERROR, key, "%s; keeping samples in memory and retrying", e)
                return False
            finally:
                # The error's traceback holds this frame, which holds the future, which holds the
                # error: a cycle that kept every batch of a failed commit (those since dropped
                # over memory_buffer too) until the next collection, up to twice the buffer.
                fut = None
            self._committing = None
            self.commit_latency.observe(time.perf_counter() - t0)
            if TRACE is not None:
                TRACE.committed(batches, t_c, self.store._max_id)
            if self._store_failing:
                self._store_failing = False
                dropped = self.counters.dropped_store_unavailable
                log.warning("store writable again; %d samples dropped while it was not", dropped)
                self.errors.clear("store:")
        self._committed(n)
        if self.sync is not None:
            self.sync.wakeup.set()
        for s in self.sinks:
            for b in batches:
                await s.put(b)
        return True


def _redacted(doc: Any) -> Any:
    """A copy with its strings redacted (an error text, an endpoint, may hold a password)."""
    if isinstance(doc, str):
        return redact(doc)
    if isinstance(doc, dict):
        return {k: _redacted(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [_redacted(v) for v in doc]
    return doc


def _health(adapter: Adapter | None) -> dict[str, Any]:
    """An adapter's own counters; a plugin whose health() fails shows the error instead, and
    never takes the status (or the daemon) down with it."""
    if adapter is None:
        return {}
    try:
        return _redacted(dict(adapter.health()))
    except Exception as e:
        return {"error": f"health() failed: {type(e).__name__}: {e}"}


def store_settings(cfg: Config) -> StoreSettings:
    return StoreSettings(
        time_resolution_ns=cfg.store.time_resolution_ns,
        retention_ns=cfg.store.retention_ns,
        max_size=cfg.store.max_size or default_max_size(cfg.gateway.data_dir)[0],
        compact_after_ns=cfg.store.compact_after_ns,
        keep_until_synced=cfg.upstream.enabled,
        replay_window_ns=cfg.upstream.options.get("replay_window") or 0 if cfg.upstream.enabled else 0,
        compress_units=cfg.store.unit_version == 3,
        fsync_interval_ns=cfg.store.fsync_interval_ns,
    )


async def run_config(config: Config, **kw: Any) -> Runtime:
    """Convenience for OEMs: run until SIGTERM/SIGINT."""
    rt = Runtime(config, **kw)
    await rt.run(handle_signals=True)
    return rt


def device_summary(config: Config) -> list[Mapping[str, Any]]:
    return [
        {
            "name": d.name,
            "protocol": d.protocol,
            "tags": len(d.tags),
            "reads_per_s": config.polls_per_second(d),
            "enabled": d.enabled,
        }
        for d in config.devices
    ]
