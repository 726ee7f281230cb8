"""/metrics of a running daemon, scraped over real HTTP and parsed with prometheus_client's
text parser: names follow the conventions, figures match the runtime, per-tag series opt-in."""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

from prometheus_client.parser import text_string_to_metric_families

from edgeos.config import load_config
from edgeos.runtime import Runtime

CONFIG = """
[gateway]
id = "gw"
data_dir = "data"
shutdown_timeout = "5s"

[http]
port = 0
{http}

[[devices]]
name = "good"
protocol = "simulated"
poll_interval = "50ms"
tags = [{{ name = "a", signal = "ramp" }}, {{ name = "b", signal = "sine" }}, {{ name = "s", signal = "text" }}]

[[devices]]
name = "refused"
protocol = "simulated"
fail_connect = true
reconnect_min = "20ms"
reconnect_max = "50ms"
tags = [{{ name = "x" }}]
"""


@contextlib.asynccontextmanager
async def daemon(write_config, http: str = "") -> AsyncIterator[Runtime]:
    rt = Runtime(load_config(write_config(CONFIG.format(http=http))))
    task = asyncio.create_task(rt.run())
    try:
        async with asyncio.timeout(15):
            await rt.running.wait()
            while rt.http is None or not rt.http.started.is_set():
                await asyncio.sleep(0.02)
        yield rt
    finally:
        rt.stop()
        await asyncio.wait_for(task, 15)


async def fetch(rt: Runtime, path: str) -> tuple[int, dict[str, str], str]:
    def get() -> tuple[int, dict[str, str], str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{rt.http.port}{path}", timeout=5) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()

    return await asyncio.to_thread(get)


def parse(text: str) -> dict[str, list]:
    """{sample name: [(labels, value), ...]} of every sample in the exposition."""
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def one(samples: dict[str, list], name: str, **labels: str) -> float:
    got = [v for lab, v in samples[name] if all(lab.get(k) == x for k, x in labels.items())]
    assert len(got) == 1, (name, labels, samples.get(name))
    return got[0]


async def test_metrics_scraped_over_http_and_parsed(write_config) -> None:
    async with daemon(write_config) as rt:
        async with asyncio.timeout(15):
            while rt.counters.stored < 30 or rt.devices["refused"].failures < 2:
                await asyncio.sleep(0.05)
        status, headers, text = await fetch(rt, "/metrics")
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        assert headers["x-content-type-options"] == "nosniff"
        m = parse(text)
        c = rt.counters
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # Conventions: one prefix, counters named _total, base units.
    assert all(name.startswith("edgeos_") for name in m), [n for n in m if not n.startswith("edgeos_")]
    for fam in families.values():
        if fam.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples), fam.name
    assert not any(n.endswith(("_ms", "_milliseconds", "_kb", "_mb")) for n in m)

    # Devices: up/down, polls, errors by code, reconnects, last success, lateness histogram.
    assert one(m, "edgeos_device_up", device="good") == 1
    assert one(m, "edgeos_device_up", device="refused") == 0
    assert one(m, "edgeos_device_down_seconds", device="refused") > 0
    assert one(m, "edgeos_device_errors_total", device="refused", code="connect") >= 2
    assert one(m, "edgeos_device_reconnects_total", device="refused") >= 2
    assert one(m, "edgeos_device_last_success_timestamp_seconds", device="refused") == 0
    assert one(m, "edgeos_device_last_success_timestamp_seconds", device="good") > 1.7e9
    polls = one(m, "edgeos_device_polls_total", device="good")
    assert polls >= 10
    assert one(m, "edgeos_device_poll_lateness_seconds_count", device="good") == polls
    assert one(m, "edgeos_device_poll_lateness_seconds_bucket", device="good", le="+Inf") == polls
    buckets = [v for lab, v in m["edgeos_device_poll_lateness_seconds_bucket"] if lab["device"] == "good"]
    assert buckets == sorted(buckets)  # cumulative

    # Pipeline and store.
    read, stored = one(m, "edgeos_samples_read_total"), one(m, "edgeos_samples_stored_total")
    assert 0 < stored <= read <= c.read
    assert one(m, "edgeos_store_writable") == 1
    assert one(m, "edgeos_store_size_bytes") > 0
    assert one(m, "edgeos_store_budget_bytes") > 0
    assert one(m, "edgeos_store_dropped_samples_total", cause="budget") == 0
    assert one(m, "edgeos_store_commit_duration_seconds_count") > 0
    assert "edgeos_store_chunks" in m and "edgeos_store_oldest_sample_timestamp_seconds" in m
    assert {lab["kind"] for lab, _ in m["edgeos_store_units"]} == {"hot", "copy"}
    # The process: CPU, RSS, open fds.
    assert one(m, "edgeos_process_resident_memory_bytes") > 10e6
    assert one(m, "edgeos_process_open_fds") > 3
    assert one(m, "edgeos_process_cpu_seconds_total") > 0
    # No sync configured: no sync series. No per-tag series unless asked.
    assert not any(n.startswith("edgeos_sync_") for n in m)
    assert not any(n.startswith("edgeos_tag_") for n in m)
    assert one(m, "edgeos_tags") == 4


async def test_per_tag_series_are_opt_in(write_config) -> None:
    async with daemon(write_config, "metrics_per_tag = true") as rt:
        async with asyncio.timeout(15):
            while rt.counters.stored < 10:
                await asyncio.sleep(0.05)
        m = parse((await fetch(rt, "/metrics"))[2])
    tags = {(lab["device"], lab["tag"]) for lab, _ in m["edgeos_tag_last_timestamp_seconds"]}
    assert tags == {("good", "a"), ("good", "b"), ("good", "s"), ("refused", "x")}
    values = {(lab["device"], lab["tag"]) for lab, _ in m["edgeos_tag_value"]}
    assert ("good", "s") not in values  # a text tag has no numeric value
    assert one(m, "edgeos_tag_quality", device="good", tag="a") == 0  # Good


async def test_http_off_with_one_key(write_config) -> None:
    rt = Runtime(load_config(write_config(CONFIG.format(http="enabled = false"))))
    task = asyncio.create_task(rt.run())
    async with asyncio.timeout(15):
        await rt.running.wait()
        await asyncio.sleep(0.2)
        assert rt.http is None
        assert rt.status()["http"] is None
        rt.stop()
        await task


async def test_a_busy_port_is_logged_and_the_daemon_runs_on(write_config, caplog) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = load_config(write_config(CONFIG.format(http="").replace("port = 0", f"port = {port}")))
        rt = Runtime(cfg)
        task = asyncio.create_task(rt.run())
        async with asyncio.timeout(15):
            while rt.counters.stored < 5:
                await asyncio.sleep(0.05)
            rt.stop()
            await task
    assert any("cannot listen" in r.getMessage() for r in caplog.records)


def test_exposition_escaping_and_special_values_parse_back() -> None:
    """Our text writer against prometheus_client's parser: escaped label values, NaN, +Inf."""
    from edgeos.service.metrics import Exposition, labels

    out = Exposition()
    out.family("edgeos_x", "gauge", "help with \\ and\nnewline")
    odd = 'a"b\\c\nd'
    out.sample("edgeos_x", float("nan"), labels(device=odd))
    out.sample("edgeos_x", float("inf"), labels(device="inf"))
    out.sample("edgeos_x", 1.5e-7, labels(device="small"))
    out.family("edgeos_h", "histogram", "h")
    out.histogram("edgeos_h", {"device": "d"}, (0.1, 1.0), [1, 2, 3], 4.5)
    m = parse(out.text().decode())
    got = {lab["device"]: v for lab, v in m["edgeos_x"]}
    assert got.keys() == {odd, "inf", "small"}
    assert got[odd] != got[odd] and got["inf"] == float("inf") and got["small"] == 1.5e-7
    assert [v for _, v in m["edgeos_h_bucket"]] == [1, 3, 6]
    assert one(m, "edgeos_h_count") == 6 and one(m, "edgeos_h_sum") == 4.5


async def test_status_table_and_json_of_a_daemon(write_config) -> None:
    """`edgeos status` (here of the status the daemon left at its stop): devices up or down with
    the last error, age of the last values, store usage; --format json and --json give the document."""
    import json

    from typer.testing import CliRunner

    from edgeos.cli import app

    async with daemon(write_config) as rt:
        async with asyncio.timeout(15):
            while rt.counters.stored < 10 or rt.devices["refused"].failures < 1:
                await asyncio.sleep(0.05)
            await rt.refresh_store_stats(max_age=0)
        data_dir = rt.config.gateway.data_dir
    runner = CliRunner()
    table = runner.invoke(app, ["status", "--data-dir", str(data_dir)])
    assert table.exit_code == 1  # stopped
    lines = table.output.splitlines()
    head = next(ln for ln in lines if ln.startswith("DEVICE"))
    assert "UP" in head and "LAST VALUES" in head and "LAST ERROR" in head
    good = next(ln for ln in lines if ln.startswith("good "))
    refused = next(ln for ln in lines if ln.startswith("refused "))
    assert " ago " in good and " never " in refused and "connection refused" in refused
    # The last error says how old it is: a device up again must not look failing.
    assert re.search(r"[0-9.]+[smhd] ago: .*connection refused", refused), refused
    assert any(ln.startswith("usage ") and " MB of " in ln for ln in lines), table.output
    docs = [
        runner.invoke(app, ["status", "--data-dir", str(data_dir), *opt]).output
        for opt in (["--json"], ["--format", "json"])
    ]
    assert json.loads(docs[0])["devices"] == json.loads(docs[1])["devices"]
    # The daemon's own last status: every device stopped (the refused one was in its backoff).
    final = json.loads((data_dir / "status.json").read_text())
    assert final["stopped"] and {d["state"] for d in final["devices"].values()} == {"stopped"}, final["devices"]
    assert json.loads(docs[1])["store_stats"]["used_bytes"] > 0
    assert runner.invoke(app, ["status", "--data-dir", str(data_dir), "--format", "yaml"]).exit_code == 2
