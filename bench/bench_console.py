"""The web console, end to end over HTTP against `edgeos run` (its own process).

trend_7d_ms: one tag, 7 days at 1 Hz (604,800 samples, compacted as the daemon leaves them), the
trend data for a 1,000-pixel chart (/api/trend?width=1000): median of the requests.
tags_page_ms: /api/tags (a page of 100) with 10,000 tags configured and polled every second,
the worst of no filter, a text filter and a device filter (medians).
rss_delta_mb: the daemon's RSS with the console on (every page and API fetched once, the 7-day
trend included; read 3 s after the last request) minus the same daemon with the console off
(the HTTP server, with /metrics, on in both).
page_kb: bytes (headers included) the overview page transfers: HTML, script, style, icon, data.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from edgeos.config import load_config
from edgeos.model import Batch
from edgeos.runtime import store_settings
from edgeos.store import StoreWriter

S = 1_000_000_000
WEEK = 7 * 86400

SMALL = """\
[gateway]
id = "bench"
data_dir = "data"

[[devices]]
name = "plant"
protocol = "simulated"
enabled = false
tags = [{ name = "flow", signal = "sine", unit = "m3/h" }]

[[devices]]
name = "press"
protocol = "simulated"
poll_interval = "500ms"
tags = [
  { name = "temperature", signal = "sine", amplitude = 20.0, offset = 60.0, period = "30s", unit = "degC" },
  { name = "pressure", signal = "random_walk", amplitude = 5.0, offset = 120.0, unit = "bar" },
]

[http]
port = 0

[console]
enabled = @ENABLED@
"""


def _prefill_week(config: Path) -> tuple[int, int]:
    """plant/flow every second for 7 days, compacted; returns the range (ns)."""
    cfg = load_config(config)
    end = (time.time_ns() // S - 120) * S
    start = end - WEEK * S
    w = StoreWriter(cfg.gateway.data_dir, cfg.tags, store_settings(cfg))
    try:
        for h in range(0, WEEK, 3600):
            ts = start + (h + np.arange(3600, dtype=np.int64)) * S
            values = np.round(100 + 20 * np.sin(ts / 3.6e12) + np.random.default_rng(h).normal(0, 1, 3600), 2)
            w.write([Batch("plant", np.zeros(3600, np.int32), ts, values, np.zeros(3600, np.uint32))])
        w.maintain(end, compact_all=True)
    finally:
        w.close()
    return start, end - S


def _start(config: Path, console: bool = True) -> tuple[subprocess.Popen, str]:
    """`edgeos run`; returns once it logs its console URL (or, without a console, its start)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeos", "run", str(config), "--log-level", "info"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=config.parent,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        for line in list(lines):
            m = re.search(r"console: (https?://\S+)", line)
            if m:
                return proc, m.group(1)
            if not console and "http: listening" in line:
                return proc, ""
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("daemon did not start:\n" + "".join(lines))


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _get(url: str) -> tuple[bytes, int]:
    """Body and bytes on the wire (status line and headers included)."""
    with urllib.request.urlopen(url, timeout=30) as r:
        body = r.read()
        head = len(f"HTTP/1.1 {r.status} {r.reason}\r\n") + sum(len(f"{k}: {v}\r\n") for k, v in r.headers.items()) + 2
    return body, head + len(body)


def _median_ms(url: str, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        _get(url)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _config(d: Path, enabled: bool) -> Path:
    p = d / ("on.toml" if enabled else "off.toml")
    p.write_text(SMALL.replace("@ENABLED@", "true" if enabled else "false"))
    return p


def run(quick: bool):
    reps = 5 if quick else 20
    with tempfile.TemporaryDirectory(prefix="edgeos-bench-console-") as tmp:
        d = Path(tmp)
        on, off = _config(d, True), _config(d, False)
        lo, hi = _prefill_week(on)

        # Console off first: the baseline RSS, after the same settling time.
        proc, _ = _start(off, console=False)
        try:
            time.sleep(3.0)
            rss_off = _rss_mb(proc.pid)
        finally:
            _stop(proc)

        proc, url = _start(on)
        try:
            trend = f"{url}api/trend?tag=plant/flow&since=@{lo / S:.3f}&until=@{hi / S:.3f}&width=1000"
            body, _ = _get(trend)
            assert b'"samples":604800' in body, body[:200]
            total = 0
            for path in ("", "static/console.js", "static/console.css", "static/favicon.svg", "api/overview"):
                total += _get(url + path)[1]
            for path in ("tags", "trend", "config", "api/tags", "api/config"):
                _get(url + path)
            time.sleep(3.0)
            rss_on = _rss_mb(proc.pid)
            yield "trend_7d_ms", _median_ms(trend, reps), "ms"
            yield "rss_delta_mb", rss_on - rss_off, "MB"
            yield "page_kb", total / 1024, "KB"
        finally:
            _stop(proc)

        # 10,000 tags, polled every second.
        rows = "\n".join(f"t{i:04d},sine" for i in range(1000))
        (d / "tags.csv").write_text("name,signal\n" + rows + "\n")
        devices = "\n".join(
            f'[[devices]]\nname = "line{k}"\nprotocol = "simulated"\npoll_interval = "1s"\ntags_csv = "tags.csv"\n'
            for k in range(10)
        )
        big = d / "big.toml"
        big.write_text(f'[gateway]\nid = "bench"\ndata_dir = "big-data"\n{devices}\n[http]\nport = 0\n')
        proc, url = _start(big)
        try:
            time.sleep(2.0)
            worst = 0.0
            for q in ("api/tags?limit=100", "api/tags?q=t05&limit=100", "api/tags?device=line7&offset=900&limit=100"):
                body, _ = _get(url + q)
                assert b'"total":10000' in body
                worst = max(worst, _median_ms(url + q, reps))
            yield "tags_page_ms", worst, "ms"
        finally:
            _stop(proc)
