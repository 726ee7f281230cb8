"""Reload (SIGHUP, `edgeos reload`): devices added, removed and changed while another polls on
without a gap; nothing read is lost; a broken config changes nothing; tag ids stay stable."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeos.config import load_config
from edgeos.runtime import Runtime
from edgeos.service.metrics import Metrics
from edgeos.store import StoreReader

HEAD = """
[gateway]
id = "gw"
data_dir = "data"
shutdown_timeout = "5s"

[http]
port = 0  # any free port
metrics_per_tag = true

[[devices]]
name = "steady"
protocol = "simulated"
poll_interval = "100ms"
tags = [{ name = "a", signal = "ramp" }]
"""

GONE = """
[[devices]]
name = "gone"
protocol = "simulated"
poll_interval = "20ms"
tags = [
  { name = "g", signal = "ramp" },
  { name = "h", signal = "sine", filters = [{ type = "swinging_door", deviation = 0.5 }] },
]
"""

FRESH = """
[[devices]]
name = "fresh"
protocol = "simulated"
poll_interval = "20ms"
tags = [{ name = "f1", signal = "ramp" }, { name = "f2", signal = "ramp", unit = "bar" }]
"""

FRESH_CHANGED = FRESH.replace('unit = "bar"', 'unit = "kPa"')  # a new meaning: a new id


async def _until(cond, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


async def _cli(*args: str) -> tuple[int, str]:
    """The real command, in its own process as an operator runs it (a CLI in a thread of the
    daemon's process would compete with it for the GIL)."""
    exe = Path(sys.executable).parent / "edgeos"
    proc = await asyncio.create_subprocess_exec(
        str(exe), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


def _counter(rt: Runtime, name: str) -> float:
    for line in Metrics(rt).render().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the exposition")


@pytest.fixture
def frozen_heap():
    """As `edgeos run` does (gc.freeze): the test process's heap (every module the suite imported)
    kept out of full collections, which would otherwise stall the loop for 100+ ms."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


async def test_reload_adds_removes_and_changes_devices_without_gap_or_loss(write_config, frozen_heap):
    path = write_config(HEAD + GONE)
    rt = Runtime(load_config(path))
    windows: list[tuple[int, int]] = []  # (start, end) of each reload, wall clock ns
    reload = rt._reload

    async def timed_reload():
        t0 = time.time_ns()
        try:
            return await reload()
        finally:
            windows.append((t0, time.time_ns()))

    rt._reload = timed_reload  # type: ignore[method-assign]
    # The filtered counter read just before and just after each release of held points: later
    # filtering cannot hide a dip there.
    around_release: list[tuple[float, float]] = []
    released = rt._released

    def watched_release(held):
        before = _counter(rt, "edgeos_samples_filtered_total")
        released(held)
        around_release.append((before, _counter(rt, "edgeos_samples_filtered_total")))

    rt._released = watched_release  # type: ignore[method-assign]
    task = asyncio.create_task(rt.run(handle_signals=True))
    try:
        await rt.running.wait()
        await _until(lambda: rt.devices["gone"].samples > 20 and rt.devices["steady"].samples > 3)
        gone = rt.devices["gone"]
        id_a = rt.config.device("steady").tags[0].id
        top = max(t.id for t in rt.config.tags)

        # 1. SIGHUP: "gone" removed, "fresh" added.
        filtered_before = _counter(rt, "edgeos_samples_filtered_total")
        path.write_text(HEAD + FRESH)
        os.kill(os.getpid(), signal.SIGHUP)
        await _until(lambda: "fresh" in rt.devices and rt.devices["fresh"].samples > 10)
        # The swinging door's held point was flushed and stored: a Prometheus counter still
        # never goes down; the release is counted on its own.
        assert rt.counters.filter_released >= 1 and around_release
        assert all(after >= before for before, after in around_release), around_release
        assert _counter(rt, "edgeos_samples_filtered_total") >= filtered_before
        assert _counter(rt, "edgeos_samples_filter_released_total") == rt.counters.filter_released
        assert "gone" not in rt.devices and gone.state == "stopped"
        assert rt.config.device("steady").tags[0].id == id_a
        fresh_ids = [t.id for t in rt.config.device("fresh").tags]
        assert min(fresh_ids) > top  # new ids above every id given before, never reused

        # 2. A broken config, through `edgeos reload`: refused with its problems, nothing changes.
        path.write_text(HEAD + FRESH.replace('poll_interval = "20ms"', 'poll_intervall = "20ms"'))
        before = rt.config
        code, out = await _cli("reload", "-c", str(path))
        assert code == 1, out
        assert "poll_intervall" in out and "keeps running" in out
        assert rt.config is before and rt.devices["fresh"].state == "running"

        # 3. A changed tag (unit bar -> kPa): only "fresh" restarts; f2 gets a new id.
        path.write_text(HEAD + FRESH_CHANGED)
        code, out = await _cli("reload", "-c", str(path))
        assert code == 0, out
        assert "changed fresh" in out and "1 unchanged" in out, out
        f1, f2 = rt.config.device("fresh").tags
        assert f1.id == fresh_ids[0] and f2.id > max(fresh_ids)
        await _until(lambda: rt.devices["fresh"].state == "running" and rt.devices["steady"].samples >= 20)
        # Per-tag metrics follow the reloaded tags (ids stable, not dense).
        scrape = Metrics(rt, per_tag=True).render().decode()
        assert 'device="fresh",tag="f2"' in scrape and 'tag="g"' not in scrape
    finally:
        rt.stop()
        await asyncio.wait_for(task, 15)

    c = rt.counters
    assert c.read == c.stored + c.filtered_out and c.dropped_at_stop == 0
    with StoreReader(rt.config.gateway.data_dir) as store:
        keys = {t.key for t in store.tags()}
        # The store's tag table only grows: the removed device's tags and the old f2 stay.
        assert {"steady/a", "gone/g", "gone/h", "fresh/f1", "fresh/f2"} <= keys
        steady = store.history("steady/a")
        g = store.history("gone/g")
        total = sum(len(store.history(k).ts) for k in keys)
    # Everything the removed device read was stored (g has no filter).
    assert len(g.ts) * 2 == gone.samples
    assert total == c.stored  # every stored sample is found under its tag
    # Across each reload (from the sample before it to the one after it), the untouched device
    # polled on: no gap of two poll intervals. (Gaps elsewhere are the machine's, not a reload's.)
    assert len(windows) == 3 and len(steady.ts) >= 20
    for t0, t1 in windows:
        lo = max(0, int(np.searchsorted(steady.ts, t0)) - 1)
        hi = int(np.searchsorted(steady.ts, t1)) + 1
        gaps_ms = np.diff(steady.ts[lo:hi]) / 1e6
        assert hi - lo >= 2 and gaps_ms.max() < 200, (gaps_ms.max(), (t1 - t0) / 1e6)


STUCK = """
[[devices]]
name = "stuck"
protocol = "misbehaving"
mode = "swallows_cancel"
raise_every = 4
period = "20ms"
tags = [{ name = "s" }]
"""


async def test_a_stop_during_a_reload_also_stops_the_devices_the_reload_is_stopping(write_config):
    """A reload takes the devices it replaces out of the running set before it waits for them
    to end; a stop meanwhile must stop them too (a review found the stop never cancelled such a
    device, and run() waited on it for good)."""
    stuck = STUCK.replace("raise_every = 4", "raise_every = 6")  # more than the reload's 3 rounds
    path = write_config(HEAD + stuck)
    rt = Runtime(load_config(path))
    task = asyncio.create_task(rt.run())
    try:
        await rt.running.wait()
        await _until(lambda: rt.devices["stuck"].samples > 5)
        path.write_text(HEAD + stuck.replace('period = "20ms"', 'period = "30ms"'))
        reload = asyncio.create_task(rt.reload())
        await asyncio.sleep(0.5)  # the reload has cancelled it once and waits (rounds of 6 s)
        assert not reload.done()
        rt.stop()
        await asyncio.wait_for(task, 30)  # shutdown_timeout 5 s, then the stop's own cancels
        result = await asyncio.wait_for(reload, 30)
        assert result["ok"] is False, result
    finally:
        rt.stop()
        if not task.done():
            task.cancel()
    assert task.exception() is None
    # Every sample it read is accounted for: stored, or counted lost at the stop.
    c = rt.counters
    assert c.read == c.stored + c.filtered_out + c.dropped_store_unavailable + c.dropped_at_stop, c
    assert rt.devices["stuck"].samples <= c.read


async def test_a_device_that_does_not_stop_gets_no_second_poller(write_config):
    """A device whose task drops four cancellations in a row (what Python 3.11's wait_for can do
    to one, and edgeos.aio guards against) outlives the reload's bound of 18 s. Its change is
    not applied: a second poller beside it would be two masters on one line. The reload says
    so, the device keeps polling with its old config, and the stop (a fifth cancellation)
    still ends it."""
    from edgeos_fixture import MisbehavingAdapter

    MisbehavingAdapter.instances.clear()  # the adapters of earlier tests
    path = write_config(HEAD + STUCK)
    rt = Runtime(load_config(path))
    task = asyncio.create_task(rt.run())
    try:
        await rt.running.wait()
        await _until(lambda: rt.devices["stuck"].samples > 5)
        path.write_text(HEAD + STUCK.replace('period = "20ms"', 'period = "30ms"'))
        result = await asyncio.wait_for(rt.reload(), 40)
        assert result["ok"] is False and "stuck did not stop" in result["errors"][0], result
        stuck = [a for a in MisbehavingAdapter.instances if a.device.name == "stuck"]
        assert len(stuck) == 1 and stuck[0].swallowed == 4  # no second adapter was made
        before = rt.devices["stuck"].samples
        await _until(lambda: rt.devices["stuck"].samples > before + 5)  # it polls on
        assert rt.devices["steady"].state == "running"
        # Polling on, it is no longer being stopped: its next failure is a failure (a review
        # found it left marked, so that its next error ended it for good, unlogged).
        assert not rt._retiring
    finally:
        rt.stop()
        await asyncio.wait_for(task, 30)
    assert task.done() and task.exception() is None
