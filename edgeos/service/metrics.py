"""Prometheus exposition of the running daemon at /metrics (docs/metrics.md lists every series).

The text is built at scrape time from the runtime's own counters: no metric object is created
or updated per sample, so the data path pays nothing for metrics. Per-tag series are opt-in
(`[http] metrics_per_tag`), since 10,000 tags must not become 10,000 series by default.

Written here, in the classic text format (version 0.0.4), rather than with prometheus_client,
by measurement (docs/metrics.md): importing prometheus_client costs the daemon 2.1 MB of RSS
against a 45 MB budget, and its generic path took 500 ms for the 30,000 per-tag series of
10,000 tags. The format is a few lines of escaping; the tests parse every scrape with
prometheus_client's own parser, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import math
import os
import resource
from typing import TYPE_CHECKING

from edgeos.adapter import LATENESS_BOUNDS_NS
from edgeos.service.http import HttpServer, Request, Response

if TYPE_CHECKING:
    from edgeos.runtime import Runtime

NS = "edgeos"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _num(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (math.inf, -math.inf):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


def _label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def labels(**kv: str) -> str:
    """`{k="v",...}` with the format's escaping."""
    return "{" + ",".join(f'{k}="{_label_value(str(v))}"' for k, v in kv.items()) + "}"


class Exposition:
    """Text format writer: a family's HELP and TYPE lines, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help: str) -> None:
        text = help.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines.append(f"# HELP {name} {text}\n# TYPE {name} {kind}\n")

    def sample(self, name: str, value: float, lab: str = "") -> None:
        self.lines.append(f"{name}{lab} {_num(value)}\n")

    def one(self, name: str, kind: str, help: str, value: float) -> None:
        self.family(name, kind, help)
        self.sample(name, value)

    def histogram(self, name: str, lab: dict[str, str], bounds_s: tuple[float, ...], counts: list[int], total: float):
        """Samples of one histogram series (its family line written by the caller)."""
        cum = 0
        for bound, n in zip((*bounds_s, math.inf), counts, strict=True):
            cum += n
            self.sample(f"{name}_bucket", cum, labels(**lab, le=_num(float(bound))))
        self.sample(f"{name}_sum", total, labels(**lab) if lab else "")
        self.sample(f"{name}_count", cum, labels(**lab) if lab else "")

    def text(self) -> bytes:
        return "".join(self.lines).encode()


class Metrics:
    """Builds the exposition of a runtime; per-tag label strings are made once, not per scrape."""

    def __init__(self, rt: Runtime, *, per_tag: bool = False) -> None:
        self.rt = rt
        self.per_tag = per_tag
        self._tag_labels: list[tuple[int, str]] = []
        self._labels_of: object = None  # the LatestValues they were made for (a reload replaces it)
        self._version = _version()

    def render(self) -> bytes:
        out = Exposition()
        self._info(out)
        self._devices(out)
        self._pipeline(out)
        self._store(out)
        if self.rt.sync is not None:
            self._sync(out)
        self._process(out)
        if self.per_tag:
            self._tags(out)
        return out.text()

    def _info(self, out: Exposition) -> None:
        from edgeos import filters

        rt = self.rt
        out.family(f"{NS}_build_info", "gauge", "edgeos version and filter kernels")
        out.sample(f"{NS}_build_info", 1, labels(version=self._version, kernels=filters.implementation()))
        out.one(f"{NS}_tags", "gauge", "configured tags", len(rt.latest.meta))
        out.one(
            f"{NS}_start_time_seconds", "gauge", "when the runtime started (Unix time)", rt.counters.started_ns / 1e9
        )

    def _devices(self, out: Exposition) -> None:
        rt = self.rt
        rows = []
        for name, st in rt.devices.items():
            rows.append((name, labels(device=name), st, st.poll_stats()))

        def each(metric: str, kind: str, help: str, value) -> None:
            out.family(metric, kind, help)
            for _, lab, st, ps in rows:
                out.sample(metric, value(st, ps), lab)

        d = f"{NS}_device"
        each(f"{d}_up", "gauge", "1 while the device is connected and answering", lambda st, ps: int(st.up))
        each(
            f"{d}_down_seconds",
            "gauge",
            "how long the device has been down (0 while up)",
            lambda st, ps: st.down_seconds(),
        )
        each(f"{d}_polls_total", "counter", "poll cycles run", lambda st, ps: ps.cycles)
        each(
            f"{d}_poll_overruns_total",
            "counter",
            "poll ticks skipped: a read took too long",
            lambda st, ps: ps.overruns,
        )
        each(f"{d}_batches_total", "counter", "batches the adapter produced", lambda st, ps: st.batches)
        each(f"{d}_samples_total", "counter", "samples read from the device", lambda st, ps: st.samples)
        each(f"{d}_connects_total", "counter", "successful connections", lambda st, ps: st.connects)
        each(
            f"{d}_reconnects_total",
            "counter",
            "connections lost or refused, each followed by a reconnect",
            lambda st, ps: st.failures,
        )
        out.family(f"{d}_errors_total", "counter", "device failures by error code")
        for name, _, st, _ in rows:
            for code, n in sorted(st.errors_by_code.items()):
                out.sample(f"{d}_errors_total", n, labels(device=name, code=code))
        each(
            f"{d}_last_success_timestamp_seconds",
            "gauge",
            "time of the last good read (Unix time; 0: never)",
            lambda st, ps: st.last_ok_ns / 1e9,
        )
        late = f"{d}_poll_lateness_seconds"
        out.family(late, "histogram", "how late each poll cycle started against its schedule")
        bounds = tuple(b / 1e9 for b in LATENESS_BOUNDS_NS)
        for name, _, _, ps in rows:
            out.histogram(late, {"device": name}, bounds, ps.buckets, ps.late_sum_ns / 1e9)

    def _pipeline(self, out: Exposition) -> None:
        c = self.rt.counters
        out.one(f"{NS}_samples_read_total", "counter", "samples read from all devices", c.read)
        out.one(
            f"{NS}_samples_filtered_total",
            "counter",
            "samples held back or dropped by filters (deadband, ...)",
            c.filtered_out + c.filter_released,
        )
        out.one(
            f"{NS}_samples_filter_released_total",
            "counter",
            "samples held back by filters, stored at a reload or stop",
            c.filter_released,
        )
        out.one(f"{NS}_samples_stored_total", "counter", "samples stored: committed and fsynced", c.stored)
        out.one(f"{NS}_filter_errors_total", "counter", "filter chains that failed on a batch", c.filter_errors)

    def _store(self, out: Exposition) -> None:
        rt = self.rt
        c = rt.counters
        s = f"{NS}_store"
        out.one(f"{s}_writable", "gauge", "0 while the store refuses writes", 0 if rt.store_failing else 1)
        out.one(f"{s}_errors_total", "counter", "commits that failed", c.store_errors)
        out.one(f"{s}_recoveries_total", "counter", "damaged store files set aside while running", c.store_recoveries)
        sc = rt.store.counters if rt.store is not None else None
        out.family(f"{s}_dropped_samples_total", "counter", "samples dropped, by cause")
        drops = [("memory_buffer", c.dropped_store_unavailable), ("stop", c.dropped_at_stop)]
        if sc is not None:
            drops += [("retention", sc.dropped_retention), ("budget", sc.dropped_budget)]
        for cause, n in drops:
            out.sample(f"{s}_dropped_samples_total", n, labels(cause=cause))
        if sc is not None:
            out.one(
                f"{s}_unsent_dropped_samples_total",
                "counter",
                "samples dropped before upstream got them (counted in the causes too)",
                sc.dropped_unsent,
            )
            out.one(f"{s}_committed_units_total", "counter", "units committed", sc.committed_units)
            out.one(f"{s}_compacted_samples_total", "counter", "samples compacted into chunks", sc.compacted_samples)
            out.one(f"{s}_quarantined_units_total", "counter", "undecodable units set aside", sc.quarantined_units)
            out.one(f"{s}_written_bytes_total", "counter", "bytes the store wrote to the disk", sc.written_bytes)
        st = rt.store_stats
        if st:
            out.one(f"{s}_size_bytes", "gauge", "bytes the store uses (pages in use + WAL)", st["used_bytes"])
            out.one(f"{s}_budget_bytes", "gauge", "the store's size budget", st["max_size"])
            out.family(f"{s}_units", "gauge", "stored units: hot (not yet compacted) and raw copies kept for upstream")
            out.sample(f"{s}_units", st["hot_units"], labels(kind="hot"))
            out.sample(f"{s}_units", st["copied_units"], labels(kind="copy"))
            out.one(f"{s}_chunks", "gauge", "compacted chunks", st["chunks"])
            out.one(
                f"{s}_oldest_sample_timestamp_seconds",
                "gauge",
                "the retention horizon: start of the oldest stored data (Unix time; 0: empty)",
                st["oldest_ns"] / 1e9,
            )
            out.one(
                f"{s}_stats_age_seconds", "gauge", "age of the size, units and chunks figures", rt.store_stats_age()
            )
        if rt.config.store.retention_ns:
            out.one(f"{s}_retention_seconds", "gauge", "configured retention", rt.config.store.retention_ns / 1e9)
        h = rt.commit_latency
        out.family(f"{s}_commit_duration_seconds", "histogram", "time to commit one batch of samples")
        out.histogram(f"{s}_commit_duration_seconds", {}, h.bounds, h.counts, h.sum)

    def _sync(self, out: Exposition) -> None:
        assert self.rt.sync is not None
        st = self.rt.sync.status
        y = f"{NS}_sync"
        out.one(f"{y}_connected", "gauge", "1 while connected to the broker", int(st.state == "connected"))
        out.one(f"{y}_lag_seconds", "gauge", "age of the oldest sample not yet acknowledged", st.lag_seconds)
        out.family(f"{y}_backlog", "gauge", "stored but not yet acknowledged upstream")
        out.sample(f"{y}_backlog", st.backlog_units, labels(what="units"))
        out.sample(f"{y}_backlog", st.backlog_samples, labels(what="samples"))
        out.one(f"{y}_messages_total", "counter", "messages acknowledged by the broker", st.published_messages)
        out.one(f"{y}_samples_total", "counter", "samples acknowledged by the broker", st.published_samples)
        out.one(f"{y}_bytes_total", "counter", "payload bytes acknowledged by the broker", st.published_bytes)
        out.one(f"{y}_connects_total", "counter", "successful broker connections", st.connects)
        out.one(f"{y}_reconnects_total", "counter", "broker connections lost or refused", st.failures)
        out.one(f"{y}_replay_listening", "gauge", "1 while subscribed to the replay topic", int(st.replay_listening))
        out.family(f"{y}_replay_requests_total", "counter", "replay requests received, by what became of them")
        out.sample(f"{y}_replay_requests_total", st.replay_requests, labels(outcome="taken"))
        out.sample(f"{y}_replay_requests_total", st.replay_malformed, labels(outcome="malformed"))
        out.sample(f"{y}_replay_requests_total", st.replay_dropped, labels(outcome="dropped"))
        out.one(f"{y}_replay_units_total", "counter", "units sent again on request", st.replay_units)
        out.one(f"{y}_replay_gone_total", "counter", "seqs answered as no longer held", st.replay_gone)
        out.one(
            f"{y}_last_puback_timestamp_seconds",
            "gauge",
            "time of the last PUBACK (Unix time; 0: never)",
            st.last_publish_ns / 1e9,
        )

    def _process(self, out: Exposition) -> None:
        """CPU, memory and file descriptors of this process, from /proc (the names
        prometheus_client's process collector uses, with the edgeos_ prefix)."""
        p = f"{NS}_process"
        try:
            with open("/proc/self/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / _TICKS
            vsize, rss = int(fields[20]), int(fields[21]) * _PAGE
            out.one(f"{p}_cpu_seconds_total", "counter", "user and system CPU time spent", cpu)
            out.one(f"{p}_resident_memory_bytes", "gauge", "resident memory size", rss)
            out.one(f"{p}_virtual_memory_bytes", "gauge", "virtual memory size", vsize)
        except (OSError, IndexError, ValueError):
            pass
        try:
            out.one(f"{p}_open_fds", "gauge", "open file descriptors", len(os.listdir("/proc/self/fd")))
        except OSError:
            pass
        out.one(f"{p}_max_fds", "gauge", "maximum open file descriptors", resource.getrlimit(resource.RLIMIT_NOFILE)[0])

    def _tags(self, out: Exposition) -> None:
        lv = self.rt.latest
        if lv is not self._labels_of:  # at start and after a reload (tag ids stable, not dense)
            self._labels_of = lv
            self._tag_labels = [(m.id, labels(device=m.device, tag=m.name)) for m in lv.meta]
        labs = self._tag_labels
        values, times, quals = lv.values.tolist(), lv.ts.tolist(), lv.quality.tolist()
        text = lv.text
        name = f"{NS}_tag_value"
        out.family(name, "gauge", "last value of a numeric tag")
        out.lines.extend(f"{name}{lab} {_num(values[i])}\n" for i, lab in labs if i not in text)
        name = f"{NS}_tag_last_timestamp_seconds"
        out.family(name, "gauge", "time of the tag's last sample (Unix time; 0: none yet)")
        out.lines.extend(f"{name}{lab} {times[i] / 1e9!r}\n" for i, lab in labs)
        name = f"{NS}_tag_quality"
        out.family(name, "gauge", "OPC UA status code of the tag's last sample (0: Good)")
        out.lines.extend(f"{name}{lab} {quals[i]}\n" for i, lab in labs)


def _version() -> str:
    """The package's own version string (importlib.metadata would cost 0.7 MB of RSS for it)."""
    import edgeos

    return edgeos.__version__


def register(server: HttpServer, rt: Runtime) -> None:
    """Serve /metrics from `rt` on `server`."""
    m = Metrics(rt, per_tag=rt.config.http.metrics_per_tag)

    async def metrics(req: Request) -> Response:
        await rt.refresh_store_stats(max_age=1.0)
        return Response(200, m.render(), CONTENT_TYPE, {"cache-control": "no-store"})

    server.route("/metrics", metrics)
