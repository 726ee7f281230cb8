"""The console in a real browser (headless Debian chromium) against `edgeos run` with
simulated devices: pages load clean, values go live, trends draw gaps, the CSV is the export."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

PAGES = {
    "overview": ("", "#devices tbody tr"),
    "tags": ("tags", "#tags tbody tr"),
    "trend": ("trend?tag=press/temperature&since=24h", "#chart[data-ready='1']"),
    "config": ("config", "#config:not(:empty)"),
}


def _errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def _open(driver, url: str, ready: str, timeout: float = 10.0) -> None:
    driver.get(url)
    WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, ready))


@pytest.mark.parametrize("page", list(PAGES))
def test_page_loads_without_console_errors(daemon, browser, artifacts, page):
    path, ready = PAGES[page]
    browser.get_log("browser")  # drop what earlier pages left
    _open(browser, daemon.url + path, ready)
    time.sleep(0.3)  # let late requests (SSE, refreshes) report
    browser.save_screenshot(str(artifacts / f"console-{page}.png"))
    assert _errors(browser) == []
    assert "edgeos" in browser.title


def test_overview_shows_gateway_devices_store_upstream(daemon, browser):
    _open(browser, daemon.url, "#devices tbody tr")
    text = browser.find_element(By.TAG_NAME, "main").text
    for expected in ("console-test", "0.1.0", "compiled", "press", "oven", "running", "Size / budget", "Enabled"):
        assert expected in text
    assert "every sample stays on this gateway" in text


def test_live_value_changes_on_screen_within_2s(daemon, browser):
    _open(browser, daemon.url + "tags?q=temperature", "#tags tbody tr")
    cell = browser.find_element(By.CSS_SELECTOR, "#tags tbody tr td.value")
    first = cell.text
    WebDriverWait(browser, 2.0, poll_frequency=0.05).until(lambda d: cell.text not in (first, "", "–"))
    quality = browser.find_element(By.CSS_SELECTOR, "#tags tbody tr td:nth-child(5)")
    assert quality.text == "GOOD" and quality.get_attribute("class") == "good"


def test_tags_filter_by_device(daemon, browser):
    _open(browser, daemon.url + "tags?device=oven", "#tags tbody tr")
    rows = browser.find_elements(By.CSS_SELECTOR, "#tags tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows] == ["oven"]


def _points(d: str) -> list[list[float]]:
    """Subpaths of an SVG path of M/L commands, as lists of x coordinates."""
    return [[float(x) for x in re.findall(r"[ML](-?[\d.]+),", "M" + part)] for part in d.split("M")[1:]]


def test_24h_trend_draws_a_path_with_a_gap_at_the_bad_period(daemon, browser):
    _open(browser, daemon.url + PAGES["trend"][0], "#chart[data-ready='1']")
    path = browser.find_element(By.ID, "mean-0")
    segments = _points(path.get_attribute("d"))
    assert sum(len(s) for s in segments) > 500, "a day of 30 s samples on a ~1000 px chart"
    assert len(segments) >= 2, "the Bad period must break the line"
    zones = browser.find_elements(By.CSS_SELECTOR, "#chart rect.badzone")
    assert len(zones) == 1
    x0 = float(zones[0].get_attribute("x"))
    x1 = x0 + float(zones[0].get_attribute("width"))
    assert x1 - x0 > 40, "two hours of a day on a ~1000 px chart"
    for seg in segments:  # no drawn line crosses into the shaded Bad period
        for a, b in zip(seg, seg[1:], strict=False):
            assert not (a < x1 and b > x0), f"line from x={a} to x={b} crosses the Bad period {x0}..{x1}"
    legend = browser.find_element(By.ID, "legend").text
    assert "1 Bad period" in legend


def test_zoom_by_selecting_a_range(daemon, browser):
    from selenium.webdriver.common.action_chains import ActionChains

    _open(browser, daemon.url + PAGES["trend"][0], "#chart[data-ready='1']")
    before = browser.execute_script("return document.querySelector('#csv').getAttribute('href')")
    chart = browser.find_element(By.ID, "chart")
    browser.execute_script("document.querySelector('#chart').removeAttribute('data-ready')")
    ActionChains(browser).move_to_element_with_offset(chart, -200, 0).click_and_hold().move_by_offset(
        300, 0
    ).release().perform()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chart[data-ready='1']"))
    after = browser.execute_script("return document.querySelector('#csv').getAttribute('href')")
    assert after != before
    since = float(re.search(r"since=%40([\d.]+)", after).group(1))
    until = float(re.search(r"until=%40([\d.]+)", after).group(1))
    assert 3600 < until - since < 12 * 3600, "300 px of a 24 h chart is a few hours"


def test_csv_download_equals_edgeos_export(daemon, browser, tmp_path):
    _open(browser, daemon.url + PAGES["trend"][0], "#chart[data-ready='1']")
    time.sleep(1.0)  # everything up to the range's end is committed (commit_interval 100 ms)
    href = browser.find_element(By.ID, "csv").get_attribute("href")
    since = re.search(r"since=%40([\d.]+)", href).group(1)
    until = re.search(r"until=%40([\d.]+)", href).group(1)
    target = browser.downloads / "edgeos-export.csv"
    target.unlink(missing_ok=True)
    browser.find_element(By.ID, "csv").click()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (target.exists() and not list(browser.downloads.glob("*.crdownload"))):
        time.sleep(0.05)
    got = target.read_bytes()
    out = tmp_path / "export.csv"
    done = subprocess.run(
        [sys.executable, "-m", "edgeos", "export", "-o", str(out), "--since", f"@{since}", "--until", f"@{until}",
         "-c", str(daemon.config), "press/temperature"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,  # not the checkout: it would shadow the install
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert got == out.read_bytes()
    assert got.count(b"\n") > 2000 and b"BAD_COMM_FAILURE" in got


def test_config_page_masks_secrets(daemon, browser):
    _open(browser, daemon.url + "config", "#config:not(:empty)")
    text = browser.find_element(By.ID, "config").text
    assert 'id = "console-test"' in text
    assert 'username = "line-7"' in text
    assert "canary-pw-7f3a91" not in text and "canary-pw-7f3a91" not in browser.page_source
    assert 'password_file = "********"' in text


def _api(url: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_trend_of_more_than_8_tags_is_refused_and_a_repeated_tag_drawn_once(daemon):
    import json

    nine = "&".join(f"tag=press/t{k}" for k in range(8)) + "&tag=press/temperature"
    code, body = _api(f"{daemon.url}api/trend?since=1h&width=100&{nine}")
    assert code == 400 and b"at most 8" in body  # not a chart silently cut to 8
    twice = "tag=press/temperature&tag=oven/zone1&tag=press/temperature"
    code, body = _api(f"{daemon.url}api/trend?since=1h&width=100&{twice}")
    assert code == 200
    assert [s["tag"] for s in json.loads(body)["series"]] == ["press/temperature", "oven/zone1"]
    # An unknown tag is a 400 naming it, and no path on the gateway (the CLI names the file).
    for api in ("trend?since=1h&", "export.csv?"):
        code, body = _api(f"{daemon.url}api/{api}tag=press/nope")
        assert code == 400 and b"no tag 'press/nope' is stored on this gateway" in body, body
        assert b"edgeos.db" not in body and b"/" + b"tmp" not in body, body


def test_csv_from_1970_is_the_stored_history(daemon):
    # The windows cover the stored span only (an export from @0 read every hour since 1970,
    # holding the console's store thread, and the overview with it, for the whole download).
    code, body = _api(f"{daemon.url}api/export.csv?tag=press/temperature&since=@0&until=now")
    assert code == 200 and body.startswith(b"time,tag,value,quality\n")
    assert body.count(b"\n") > 1000, body[:300]  # the day of prefilled history and the live samples
    code, body = _api(f"{daemon.url}api/overview")
    assert code == 200 and b"console-test" in body
    # A range with nothing stored is the header alone, once (it came twice), as `edgeos export` writes.
    code, body = _api(f"{daemon.url}api/export.csv?tag=oven/zone1&since=@0&until=@86400")
    assert code == 200 and body == b"time,tag,value,quality\n"


def _documented_fields() -> dict[str, str]:
    """docs/console.md's JSON endpoints table: endpoint -> its answer cell."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "console.md").read_text()
    rows = re.findall(r"^\| `(/api/[a-z.]+)` \| (.*?) \| (.*?) \|$", doc, re.M)
    return {path: answer for path, _, answer in rows}


def test_json_endpoints_answer_the_documented_fields(daemon):
    import json

    doc = _documented_fields()
    assert set(doc) == {"/api/overview", "/api/tags", "/api/stream", "/api/trend", "/api/export.csv", "/api/config"}

    def has(obj: dict, cell: str, *names: str) -> None:
        for name in names:
            assert f"`{name}`" in cell or f"`{name}[]`" in cell, f"{name} is not in the documented answer"
            assert name in obj, f"{name} is documented but not answered: {sorted(obj)}"

    code, body = _api(daemon.url + "api/overview")
    o = json.loads(body)
    has(o, doc["/api/overview"], "gateway", "devices", "store", "upstream")
    has(o["gateway"], doc["/api/overview"], "id", "version", "uptime_s", "kernels", "tags", "read", "stored")
    has(o["devices"][0], doc["/api/overview"], "name", "protocol", "state", "up", "last_ok_ns", "errors")
    has(o["devices"][0], doc["/api/overview"], "last_error", "last_error_code", "lateness_ms")
    has(o["store"], doc["/api/overview"], "used_bytes", "max_size", "horizon_ns", "committed_samples")
    has(o["upstream"], doc["/api/overview"], "enabled", "state", "connected", "lag_s", "backlog_samples")
    code, body = _api(daemon.url + "api/tags?q=PRESS&limit=1")
    t = json.loads(body)
    has(t, doc["/api/tags"], "total", "matched", "offset", "limit", "devices", "rows")
    assert (t["matched"], t["limit"], len(t["rows"])) == (2, 1, 1)  # any case; one page of 1
    has(t["rows"][0], doc["/api/tags"], "id", "device", "name", "kind", "unit", "value", "quality", "severity", "ts")
    code, body = _api(daemon.url + "api/trend?tag=press/temperature&since=24h&width=3")
    tr = json.loads(body)
    has(tr, doc["/api/trend"], "since_ns", "until_ns", "step_ns", "buckets", "series")
    has(tr["series"][0], doc["/api/trend"], "tag", "unit", "kind", "samples", "interval_ns")
    has(tr["series"][0], doc["/api/trend"], "mean", "min", "max", "bad")
    assert tr["buckets"] == 10 and len(tr["series"][0]["mean"]) == 10  # width 10 to 4,000
    assert tr["series"][0]["bad"] and all(len(p) == 2 for p in tr["series"][0]["bad"])  # the prefilled Bad period
    code, body = _api(daemon.url + "api/config")
    has(json.loads(body), doc["/api/config"], "file", "config")
    code, body = _api(daemon.url + "api/tags?limit=x")
    assert code == 400 and json.loads(body) == {"error": "found 'x', expected a whole number"}
