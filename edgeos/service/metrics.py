"""Prometheus exposition of the running daemon at /metrics (docs/metrics.md lists every series).

One custom collector reads the runtime's own counters at scrape time: no metric object is
created or updated per sample, so the data path pays nothing for metrics. Per-tag series are
opt-in (`[http] metrics_per_tag`), since 10,000 tags must not become 10,000 series by default.
prometheus_client (its exposition format and process collector; about 1.5 MB in the daemon) is
imported only when the HTTP server is on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from edgeos.adapter import LATENESS_BOUNDS_NS
from edgeos.service.http import HttpServer, Request, Response

if TYPE_CHECKING:
    from edgeos.runtime import Runtime

NS = "edgeos"
# The classic text format every Prometheus reads (prometheus_client >= 0.22 names 1.0.0 "latest",
# which Prometheus 2 does not negotiate); our names are all legacy-valid, so the body is the same.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    out, total = [], 0
    for bound, n in zip((*bounds, math.inf), counts, strict=True):
        total += n
        out.append(("+Inf" if bound == math.inf else repr(float(bound)), float(total)))
    return out


class RuntimeCollector:
    """Builds every edgeos_ family from the runtime at each scrape."""

    def __init__(self, rt: Runtime, *, per_tag: bool = False) -> None:
        self.rt = rt
        self.per_tag = per_tag

    def collect(self) -> Iterator[Metric]:
        rt = self.rt
        yield from self._info()
        yield from self._devices()
        yield from self._pipeline()
        yield from self._store()
        if rt.sync is not None:
            yield from self._sync()
        if self.per_tag:
            yield from self._tags()

    def _info(self) -> Iterator[Metric]:
        from edgeos import filters

        rt = self.rt
        g = GaugeMetricFamily(f"{NS}_build_info", "edgeos version and filter kernels", labels=["version", "kernels"])
        g.add_metric([_version(), filters.implementation()], 1)
        yield g
        yield GaugeMetricFamily(f"{NS}_tags", "configured tags", value=len(rt.latest.meta))
        yield GaugeMetricFamily(
            f"{NS}_start_time_seconds", "when the runtime started (Unix time)", value=rt.counters.started_ns / 1e9
        )

    def _devices(self) -> Iterator[Metric]:
        rt = self.rt
        now = time.time_ns()
        lab = ["device"]
        up = GaugeMetricFamily(f"{NS}_device_up", "1 while the device is connected and polling", labels=lab)
        down = GaugeMetricFamily(
            f"{NS}_device_down_seconds", "how long the device has been down (0 when up)", labels=lab
        )
        polls = CounterMetricFamily(f"{NS}_device_polls", "poll cycles run", labels=lab)
        overruns = CounterMetricFamily(
            f"{NS}_device_poll_overruns", "poll ticks skipped: a read took too long", labels=lab
        )
        batches = CounterMetricFamily(f"{NS}_device_batches", "batches the adapter produced", labels=lab)
        samples = CounterMetricFamily(f"{NS}_device_samples", "samples read from the device", labels=lab)
        connects = CounterMetricFamily(f"{NS}_device_connects", "successful connections", labels=lab)
        reconnects = CounterMetricFamily(
            f"{NS}_device_reconnects", "connections lost or refused, each followed by a reconnect", labels=lab
        )
        errors = CounterMetricFamily(f"{NS}_device_errors", "device failures by error code", labels=["device", "code"])
        last_ok = GaugeMetricFamily(
            f"{NS}_device_last_success_timestamp_seconds",
            "time of the last good read (Unix time; 0: never)",
            labels=lab,
        )
        late = HistogramMetricFamily(
            f"{NS}_device_poll_lateness_seconds", "how late each poll cycle started against its schedule", labels=lab
        )
        bounds = tuple(b / 1e9 for b in LATENESS_BOUNDS_NS)
        for name, st in rt.devices.items():
            v = [name]
            up.add_metric(v, 1 if st.state == "running" else 0)
            down.add_metric(v, (now - st.down_since_ns) / 1e9 if st.down_since_ns else 0.0)
            ps = st.poll_stats()
            polls.add_metric(v, ps.cycles)
            overruns.add_metric(v, ps.overruns)
            batches.add_metric(v, st.batches)
            samples.add_metric(v, st.samples)
            connects.add_metric(v, st.connects)
            reconnects.add_metric(v, st.failures)
            for code, n in sorted(st.errors_by_code.items()):
                errors.add_metric([name, code], n)
            last_ok.add_metric(v, st.last_ok_ns / 1e9)
            late.add_metric(v, buckets=_buckets(bounds, ps.buckets), sum_value=ps.late_sum_ns / 1e9)
        yield from (up, down, polls, overruns, batches, samples, connects, reconnects, errors, last_ok, late)

    def _pipeline(self) -> Iterator[Metric]:
        c = self.rt.counters
        yield CounterMetricFamily(f"{NS}_samples_read", "samples read from all devices", value=c.read)
        yield CounterMetricFamily(
            f"{NS}_samples_filtered", "samples dropped by filters (deadband, ...)", value=max(0, c.filtered_out)
        )
        yield CounterMetricFamily(f"{NS}_samples_stored", "samples committed to the store", value=c.stored)
        yield CounterMetricFamily(f"{NS}_filter_errors", "filter chains that failed on a batch", value=c.filter_errors)

    def _store(self) -> Iterator[Metric]:
        rt = self.rt
        c = rt.counters
        yield GaugeMetricFamily(
            f"{NS}_store_writable", "0 while the store refuses writes", value=0 if rt.store_failing else 1
        )
        yield CounterMetricFamily(f"{NS}_store_errors", "commits that failed", value=c.store_errors)
        yield CounterMetricFamily(
            f"{NS}_store_recoveries", "damaged store files set aside while running", value=c.store_recoveries
        )
        drops = CounterMetricFamily(f"{NS}_store_dropped_samples", "samples dropped, by cause", labels=["cause"])
        drops.add_metric(["memory_buffer"], c.dropped_store_unavailable)
        drops.add_metric(["stop"], c.dropped_at_stop)
        sc = rt.store.counters if rt.store is not None else None
        if sc is not None:
            drops.add_metric(["retention"], sc.dropped_retention)
            drops.add_metric(["budget"], sc.dropped_budget)
        yield drops
        if sc is not None:
            yield CounterMetricFamily(
                f"{NS}_store_unsent_dropped_samples",
                "samples dropped before upstream got them (counted in the causes too)",
                value=sc.dropped_unsent,
            )
            yield CounterMetricFamily(f"{NS}_store_committed_units", "units committed", value=sc.committed_units)
            yield CounterMetricFamily(f"{NS}_store_compacted_samples", "samples compacted", value=sc.compacted_samples)
            yield CounterMetricFamily(
                f"{NS}_store_quarantined_units", "undecodable units set aside", value=sc.quarantined_units
            )
            yield CounterMetricFamily(
                f"{NS}_store_written_bytes", "bytes the store wrote to disk", value=sc.written_bytes
            )
        s = rt.store_stats
        if s:
            yield GaugeMetricFamily(
                f"{NS}_store_size_bytes", "bytes the store uses (pages in use + WAL)", value=s["used_bytes"]
            )
            yield GaugeMetricFamily(f"{NS}_store_budget_bytes", "the store's size budget", value=s["max_size"])
            units = GaugeMetricFamily(
                f"{NS}_store_units", "stored units: hot (not yet compacted) and raw copies", labels=["kind"]
            )
            units.add_metric(["hot"], s["hot_units"])
            units.add_metric(["copy"], s["copied_units"])
            yield units
            yield GaugeMetricFamily(f"{NS}_store_chunks", "compacted chunks", value=s["chunks"])
            yield GaugeMetricFamily(
                f"{NS}_store_oldest_sample_timestamp_seconds",
                "the retention horizon: the oldest stored sample (Unix time; 0: empty)",
                value=s["oldest_ns"] / 1e9,
            )
            yield GaugeMetricFamily(
                f"{NS}_store_stats_age_seconds", "age of the size/units/chunks figures", value=rt.store_stats_age()
            )
        if rt.config.store.retention_ns:
            yield GaugeMetricFamily(
                f"{NS}_store_retention_seconds", "configured retention", value=rt.config.store.retention_ns / 1e9
            )
        h = rt.commit_latency
        commit = HistogramMetricFamily(f"{NS}_store_commit_duration_seconds", "time to commit one batch of samples")
        commit.add_metric([], buckets=_buckets(h.bounds, h.counts), sum_value=h.sum)
        yield commit

    def _sync(self) -> Iterator[Metric]:
        assert self.rt.sync is not None
        st = self.rt.sync.status
        yield GaugeMetricFamily(
            f"{NS}_sync_connected", "1 while connected to the broker", value=1 if st.state == "connected" else 0
        )
        yield GaugeMetricFamily(
            f"{NS}_sync_lag_seconds", "age of the oldest sample not yet acknowledged", value=st.lag_seconds
        )
        backlog = GaugeMetricFamily(f"{NS}_sync_backlog", "stored but not yet acknowledged upstream", labels=["what"])
        backlog.add_metric(["units"], st.backlog_units)
        backlog.add_metric(["samples"], st.backlog_samples)
        yield backlog
        yield CounterMetricFamily(
            f"{NS}_sync_messages", "messages acknowledged by the broker", value=st.published_messages
        )
        yield CounterMetricFamily(
            f"{NS}_sync_samples", "samples acknowledged by the broker", value=st.published_samples
        )
        yield CounterMetricFamily(
            f"{NS}_sync_bytes", "payload bytes acknowledged by the broker", value=st.published_bytes
        )
        yield CounterMetricFamily(f"{NS}_sync_connects", "successful broker connections", value=st.connects)
        yield CounterMetricFamily(f"{NS}_sync_reconnects", "broker connections lost or refused", value=st.failures)
        yield GaugeMetricFamily(
            f"{NS}_sync_last_puback_timestamp_seconds",
            "time of the last PUBACK (Unix time; 0: never)",
            value=st.last_publish_ns / 1e9,
        )

    def _tags(self) -> Iterator[Metric]:
        lv = self.rt.latest
        lab = ["device", "tag"]
        value = GaugeMetricFamily(f"{NS}_tag_value", "last value of a numeric tag", labels=lab)
        ts = GaugeMetricFamily(f"{NS}_tag_last_timestamp_seconds", "time of the tag's last sample", labels=lab)
        quality = GaugeMetricFamily(f"{NS}_tag_quality", "OPC UA status code of the last sample", labels=lab)
        values, times, quals = lv.values.tolist(), lv.ts.tolist(), lv.quality.tolist()
        for m in lv.meta:
            v = [m.device, m.name]
            if m.id not in lv.text:
                value.add_metric(v, values[m.id])
            ts.add_metric(v, times[m.id] / 1e9)
            quality.add_metric(v, quals[m.id])
        yield from (value, ts, quality)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("edgeos")
    except Exception:
        return "unknown"


def registry(rt: Runtime, *, per_tag: bool = False) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(RuntimeCollector(rt, per_tag=per_tag))
    ProcessCollector(namespace=NS, registry=reg)  # cpu seconds, resident memory, open fds
    return reg


def register(server: HttpServer, rt: Runtime) -> None:
    """Serve /metrics from `rt` on `server`."""
    reg = registry(rt, per_tag=rt.config.http.metrics_per_tag)

    async def metrics(req: Request) -> Response:
        await rt.refresh_store_stats(max_age=1.0)
        return Response(200, generate_latest(reg), CONTENT_TYPE, {"cache-control": "no-store"})

    server.route("/metrics", metrics)
