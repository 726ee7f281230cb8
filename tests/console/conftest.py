"""Console fixtures: a real daemon (`edgeos run` in its own process, simulated devices, a day
of history written beforehand with a Bad period in it) and one headless Debian chromium per
module, driven by Selenium through /usr/bin/chromedriver (Selenium's driver manager, which
downloads, is never used)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

CONFIG = """\
[gateway]
id = "console-test"
data_dir = "data"

[[devices]]
name = "press"
protocol = "simulated"
poll_interval = "200ms"
tags = [
  { name = "temperature", signal = "sine", amplitude = 20.0, offset = 60.0, period = "30s", unit = "degC" },
  { name = "state", signal = "text", period = "15s", states = ["RUN", "IDLE"] },
]

[[devices]]
name = "oven"
protocol = "simulated"
poll_interval = "500ms"
tags = [{ name = "zone1", signal = "ramp", amplitude = 150.0, offset = 50.0, period = "40s", unit = "degC" }]

[upstream]
enabled = false
username = "line-7"
password_file = "canary-pw-7f3a91.secret"

[http]
port = 0
"""

HOUR = 3_600_000_000_000
BAD_FROM, BAD_TO = 10 * HOUR, 8 * HOUR  # ago: the Bad period written into the history


@dataclass
class Daemon:
    url: str
    config: Path
    data_dir: Path
    proc: subprocess.Popen
    now_ns: int  # when the history was written


def prefill(config: Path, now_ns: int) -> None:
    """A day of press/temperature every 30 s, Bad (comm failure, NaN) from 10 h to 8 h ago."""
    from edgeos.config import load_config
    from edgeos.model import Batch, Quality
    from edgeos.runtime import store_settings
    from edgeos.store import StoreWriter

    cfg = load_config(config)
    step = 30_000_000_000
    ts = np.arange(now_ns - 24 * HOUR + step, now_ns - 60_000_000_000, step, dtype=np.int64)
    ts -= ts % 1_000_000
    values = 60 + 20 * np.sin(ts / 3.6e12)
    quality = np.zeros(len(ts), np.uint32)
    bad = (ts >= now_ns - BAD_FROM) & (ts <= now_ns - BAD_TO)
    values[bad] = np.nan
    quality[bad] = int(Quality.BAD_COMM_FAILURE)
    tag = cfg.device("press").tags[0].meta.id
    w = StoreWriter(cfg.gateway.data_dir, cfg.tags, store_settings(cfg))
    try:
        w.write([Batch("press", np.full(len(ts), tag, np.int32), ts, values, quality)])
    finally:
        w.close()


def start_daemon(config: Path, timeout: float = 20.0) -> tuple[subprocess.Popen, str]:
    """`edgeos run` in its own process; returns it and the console URL it logs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeos", "run", str(config), "--log-level", "info"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=config.parent,
    )
    lines: list[str] = []
    # A thread drains the daemon's log for its whole life (a full pipe would block the daemon).
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for line in list(lines):
            found = re.search(r"console: (https?://\S+)", line)
            if found:
                return proc, found.group(1)
        time.sleep(0.05)
    proc.kill()
    proc.wait(5)
    raise AssertionError(f"daemon did not start its console within {timeout}s:\n{''.join(lines)}")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = tmp_path_factory.mktemp("console-daemon")
    cfg = d / "edgeos.toml"
    cfg.write_text(textwrap.dedent(CONFIG))
    now = time.time_ns()
    prefill(cfg, now)
    proc, url = start_daemon(cfg)
    try:
        yield Daemon(url, cfg, d / "data", proc, now)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: $EDGEOS_ARTIFACTS/console if set (CI keeps it), else a temp dir."""
    root = os.environ.get("EDGEOS_ARTIFACTS")
    p = Path(root) / "console" if root else tmp_path_factory.mktemp("console-artifacts")
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """One headless chromium for the module (starting one costs about a second)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} missing: run scripts/setup --test as root (Debian chromium)"
    assert os.access(CHROMEDRIVER, os.X_OK), f"{CHROMEDRIVER} missing: Debian package chromium-driver"
    profile = tmp_path_factory.mktemp("chromium-profile")
    downloads = tmp_path_factory.mktemp("downloads")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1200,760",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    opts.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(20)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads  # type: ignore[attr-defined]
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
