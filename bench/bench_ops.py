"""Running it as a service: the metrics endpoint's cost, the daemon's idle footprint, reload.

Each daemon is a real `python -m edgeos run` process, scraped over HTTP from this one, so the
figures are what Prometheus and `ps` would see.
Figures:
- metrics_scrape_ms: one /metrics scrape of a daemon with 10,000 tags configured (10 simulated
  devices x 1,000 tags at 1 s), median of the scrapes; target < 50 ms. Also the slowest scrape,
  the body size and series count, and the same with per-tag series switched on (opt-in).
- idle_rss_mb: a daemon with one simulated tag and the metrics endpoint on, after a scrape;
  target <= 45 MB. Beside it the same daemon with [http] enabled = false, and the difference.
- reload figures: bench/ops_reload.py's `run(quick)`, when that file exists.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
DEVICES, TAGS = 10, 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(tmp: Path, devices: str, http: str) -> Path:
    p = tmp / "edgeos.toml"
    p.write_text(f'[gateway]\nid = "bench"\ndata_dir = "data"\n\n[http]\n{http}\n\n{devices}')
    return p


class Daemon:
    def __init__(self, config: Path) -> None:
        self.log = config.parent / "daemon.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeos", "run", "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=config.parent,  # not the checkout, whose edgeos/ would shadow the install
            )

    def get(self, port: int, path: str, timeout: float = 10.0) -> bytes:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            c.request("GET", path)
            r = c.getresponse()
            body = r.read()
            if r.status != 200:
                raise RuntimeError(f"{path}: HTTP {r.status}")
            return body
        finally:
            c.close()

    def wait_http(self, port: int, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while True:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n{tail}")
            try:
                self.get(port, "/healthz")
                return
            except (OSError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _scrapes(per_tag: bool, n: int) -> tuple[list[float], int, int]:
    """Scrape times (ms), body bytes and series count of a 10,000-tag daemon."""
    with tempfile.TemporaryDirectory(prefix="edgeos-bench-ops-") as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "tags.csv").write_text(
            "name,signal,resolution\n" + "".join(f"t{i},{('sine', 'ramp')[i % 2]},0.01\n" for i in range(TAGS))
        )
        devices = "".join(
            f'[[devices]]\nname = "d{d}"\nprotocol = "simulated"\npoll_interval = "1s"\nseed = {d}\n'
            f'tags_csv = "tags.csv"\n\n'
            for d in range(DEVICES)
        )
        port = _free_port()
        d = Daemon(_write(tmp, devices, f"port = {port}\nmetrics_per_tag = {'true' if per_tag else 'false'}"))
        try:
            d.wait_http(port)
            time.sleep(2.5)  # a few poll cycles, so every figure is there
            d.get(port, "/metrics")  # warm-up (first store stats)
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                body = d.get(port, "/metrics")
                times.append((time.perf_counter() - t0) * 1000)
                time.sleep(0.05)
            series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
            return times, len(body), series
        finally:
            d.stop()


def _idle_rss(http_on: bool, settle: float) -> float:
    with tempfile.TemporaryDirectory(prefix="edgeos-bench-ops-") as tmp_s:
        tmp = Path(tmp_s)
        devices = '[[devices]]\nname = "sim"\nprotocol = "simulated"\ntags = [{ name = "t" }]\n'
        port = _free_port()
        http = f"port = {port}" if http_on else "enabled = false"
        d = Daemon(_write(tmp, devices, http))
        try:
            if http_on:
                d.wait_http(port)
            time.sleep(settle)
            if http_on:
                d.get(port, "/metrics")
                d.get(port, "/healthz")
            time.sleep(0.5)
            return d.rss_mb()
        finally:
            d.stop()


def run(quick: bool):
    n = 10 if quick else 30
    times, size, series = _scrapes(False, n)
    yield "metrics_scrape_ms", statistics.median(times), f"ms (median of {n}; 10,000 tags; target < 50)"
    yield "metrics_scrape_max_ms", max(times), "ms"
    yield "metrics_series", series, "series (per-tag off)"
    yield "metrics_body_kb", size / 1024, "KB"
    times, size, series = _scrapes(True, max(3, n // 3))
    yield "metrics_scrape_per_tag_ms", statistics.median(times), "ms (metrics_per_tag = true, 10,000 tags)"
    yield "metrics_series_per_tag", series, "series"
    settle = 3.0 if quick else 10.0
    on = _idle_rss(True, settle)
    off = _idle_rss(False, settle)
    yield "idle_rss_mb", on, "MB (one simulated tag, metrics on; target <= 45)"
    yield "idle_rss_http_off_mb", off, "MB"
    yield "http_rss_delta_mb", on - off, "MB (the HTTP server with /metrics and /healthz)"

    reload_bench = HERE / "ops_reload.py"
    if reload_bench.exists():
        spec = importlib.util.spec_from_file_location("ops_reload", reload_bench)
        mod = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        spec.loader.exec_module(mod)
        yield from mod.run(quick)
    else:
        print(f"# ops: {reload_bench.relative_to(HERE.parent)} is missing: no reload figures", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    for fig, value, unit in run("--quick" in sys.argv):
        print(f"ops.{fig}: {value:.4g} {unit}")
