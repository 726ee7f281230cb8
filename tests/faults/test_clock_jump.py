"""Clock jumps: the daemon runs under libfaketime (Debian faketime) with only the wall clock
faked (FAKETIME_DONT_FAKE_MONOTONIC=1); the test steps it +1 h, back, then -1 h while a device
is polled every 100 ms and retention is 1 minute.

Promises (docs/reliability.md, "Clock jumps"): polling continues at its rate (it runs on the
monotonic clock); retention deletes nothing because of a jump (a +1 h step would otherwise age
every sample by an hour, past the 1-minute retention); timestamps say what happened (samples
carry the wall clock of their poll, so a step shows as a step). Negative control: the store
driven by the raw wall clock (maintain(now_ns=time.time_ns())) must be caught deleting.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgeos import Batch, TagMeta
from edgeos.store import StoreReader, StoreSettings, StoreWriter

EDGEOS = str(Path(sys.executable).with_name("edgeos"))
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"
PHASE_S = 3.0
HOUR = 3600 * 10**9

CONFIG = """
[gateway]
id = "gw1"
data_dir = "data"
[store]
retention = "1m"
[http]
port = {port}
[health]
device_down = "5s"
sync_lag = "5s"
[upstream]
enabled = true
host = "127.0.0.1"
port = {broker}
[[devices]]
name = "clk"
protocol = "simulated"
poll_interval = "100ms"
tags = [{{ name = "ramp", signal = "ramp", period = "1h", amplitude = 1000.0 }}]
[[devices]]
name = "gone"
protocol = "modbus"
host = "127.0.0.1"
port = {dead}
reconnect_min = "200ms"
reconnect_max = "1s"
tags = [{{ name = "x", address = "hr0" }}]
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _down_seconds(port: int) -> tuple[int, float, bool]:
    """/healthz's status code, how long it says the unreachable device has been down, and
    whether it names the upstream lag (the broker is unreachable too)."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            code, doc = r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        code, doc = e.code, json.loads(e.read())
    down = [p["down_seconds"] for p in doc["problems"] if p.get("device") == "gone"]
    return code, down[0] if down else 0.0, any(p["check"] == "sync_lag" for p in doc["problems"])


RAW_WALL_CLOCK = """
import sys, time
from edgeos.store import StoreWriter
w = StoreWriter(sys.argv[1])
w.settings.retention_ns = 60 * 10**9
w.maintain(now_ns=time.time_ns())  # the raw wall clock: what a jump-blind store would do
w.close()
"""


def _faketime_env(offset_file: Path) -> dict[str, str]:
    return dict(
        os.environ,
        LD_PRELOAD=LIBFAKETIME,
        FAKETIME_TIMESTAMP_FILE=str(offset_file),
        FAKETIME_DONT_FAKE_MONOTONIC="1",
        FAKETIME_CACHE_DURATION="1",
    )


def _old_history(data_dir: Path) -> tuple[int, int]:
    """100 samples 30..20 s old, compacted into a chunk: well inside the 1-minute retention,
    but an hour's step of the wall clock would put them past it. Returns their time range."""
    now = time.time_ns()
    ts = np.linspace(now - 30 * 10**9, now - 20 * 10**9, 100).astype(np.int64)
    w = StoreWriter(data_dir, [TagMeta(0, "clk", "ramp")], StoreSettings())
    w.write([Batch("clk", np.zeros(100, np.int32), ts, np.arange(100.0), np.zeros(100, np.uint32))])
    w.maintain(now, compact_all=True)
    w.close()
    return int(ts[0]) // 10**6 * 10**6 - 10**6, int(ts[-1]) // 10**6 * 10**6 + 2 * 10**6  # stored to the ms


def test_polling_and_retention_ride_out_wall_clock_jumps(tmp_path):
    cfg = tmp_path / "edgeos.toml"
    http = _free_port()
    # `gone` and the broker: nothing listens there.
    cfg.write_text(CONFIG.format(port=http, dead=_free_port(), broker=_free_port()))
    old_lo, old_hi = _old_history(tmp_path / "data")
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    proc = subprocess.Popen(
        [EDGEOS, "run", str(cfg)],
        cwd=tmp_path,
        env=_faketime_env(offset),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    phases = [("+0", 0), ("+3600", HOUR), ("+0", 0), ("-3600", -HOUR)]
    marks: list[tuple[int, float]] = []  # (offset ns, real time the phase began)
    try:
        time.sleep(1.5)  # started, first samples committed
        health: list[tuple[int, int, float, bool]] = []  # (offset ns, /healthz code, down s, sync lag said)
        for text, off in phases:
            offset.write_text(text + "\n")
            marks.append((off, time.time()))
            time.sleep(PHASE_S - 0.5)
            health.append((off, *_down_seconds(http)))
            time.sleep(0.5)
        time.sleep(1.0)  # the last step, too, gets its full phase past libfaketime's 1 s cache
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out[-3000:]
    # How long a device has been down is measured on the monotonic clock (an independent
    # tester's finding: from the wall clock, the -1 h step made /healthz say ok an hour long
    # while the device was down, and the +1 h step an outage of seconds an hour old).
    print(f"faults.clock.healthz: {health}")
    for off, code, down, _ in health:
        assert down < 60, (off, code, down)  # never an hour (or a negative one) because of a step
    off, code, down, lag = health[-1]  # the -1 h phase, the device down from the start (> 5 s)
    assert off == -HOUR and code == 503 and down > 5, health
    # The broker unreachable from the start with units waiting: the sync lag is over its 5 s
    # bound whatever the wall clock says (the step back set the samples' age to 0).
    assert lag, health
    # Each step is said in the log (it was not).
    assert re.search(r"the wall clock stepped \+3[56]\d\d\.\d+ s", out), out[-3000:]
    assert re.search(r"the wall clock stepped -3[56]\d\d\.\d+ s", out), out[-3000:]
    with StoreReader(tmp_path / "data") as r:
        h = r.history("clk/ramp")
    ts = h.ts
    start = marks[0][1] * 1e9 - 2e9
    is_old = (ts >= old_lo) & (ts <= old_hi)
    old = int(is_old.sum())
    ts = ts[~is_old]
    # Which phase each sample was polled in, told by its own (faked) timestamp.
    in_plus = (ts > start + HOUR - 60e9).sum()
    in_minus = (ts < start - HOUR + 60e9).sum()
    in_zero = len(ts) - in_plus - in_minus
    expected = PHASE_S * 10
    print(
        f"faults.clock.samples: +1h phase {in_plus}, -1h phase {in_minus}, unshifted {in_zero} "
        f"(about {expected:.0f} per {PHASE_S:g} s phase at 10 Hz)"
    )
    # Polling went on at its rate through each step: every clock (-1 h, unshifted, +1 h) has
    # samples, each run of them is spaced by the poll interval, and the total matches the real
    # time elapsed (half of it tolerates a loaded machine; libfaketime re-reads its file once a
    # second, so the phases' edges are blurred by up to a second).
    assert in_plus > 0 and in_minus > 0 and in_zero > 0
    runs = np.split(ts, np.flatnonzero(np.abs(np.diff(ts)) > 60 * 10**9) + 1)
    for run in runs:
        if len(run) > 3:
            assert abs(np.median(np.diff(run)) - 1e8) < 2e7, f"poll spacing {np.median(np.diff(run)) / 1e6} ms"
    elapsed = time.time() - marks[0][1] + 1.5
    print(f"faults.clock.poll_rate: {len(ts) / elapsed:.1f} samples/s through the steps (poll rate 10/s)")
    assert len(ts) >= elapsed * 10 / 2
    # Retention deleted nothing: the history 20-30 s old, and what was polled before the +1 h
    # step, are all still there.
    assert old == 100, f"retention deleted {100 - old} of 100 samples because of the jump"
    before_jump = ((ts >= start) & (ts < marks[1][1] * 1e9)).sum()
    assert before_jump > 0, "the samples polled before the +1 h step were deleted"
    assert "retention: dropped" not in out, out[-2000:]
    # Timestamps say what happened: each step shows as a step of about an hour in the series.
    steps = np.diff(ts)
    assert (steps > 0.9 * HOUR).sum() >= 1 and (steps < -0.9 * HOUR).sum() == 0  # history is sorted by time
    assert ts.max() - ts.min() > 1.9 * HOUR  # -1 h and +1 h samples both kept

    # Negative control: the same store maintained with the raw (jumped) wall clock deletes.
    offset.write_text("+3600\n")
    subprocess.run(
        [sys.executable, "-c", RAW_WALL_CLOCK, str(tmp_path / "data")], env=_faketime_env(offset), check=True
    )
    with StoreReader(tmp_path / "data") as r:
        h2 = r.history("clk/ramp")
    after = ((h2.ts >= old_lo) & (h2.ts <= old_hi)).sum()
    print(f"faults.clock.negative_control: {old} old samples, {after} after a jump-blind retention")
    assert after < old, "the check cannot tell a jump-blind retention"


REPLAY_COPIES = """
import sys, time
import numpy as np
from pathlib import Path
from edgeos import Batch, TagMeta
from edgeos.store import StoreSettings, StoreWriter

data, offset = sys.argv[1], Path(sys.argv[2])
w = StoreWriter(data, [TagMeta(0, "d", "t")], StoreSettings(keep_until_synced=True, replay_window_ns=24 * 3600 * 10**9))
t0 = time.time_ns()
for k in range(10):
    w.write([Batch("d", np.zeros(5, np.int32), t0 + k * 10**6 + np.arange(5), np.arange(5.0), np.zeros(5, np.uint32))])
w.maintain(compact_all=True, sync_cursor=5)
w.save_cursor(5)  # units 1-5 forwarded: kept raw for the replay window
offset.write_text("+90000\\n")  # the wall clock steps 25 h forward (a first NTP sync)
assert time.time_ns() - t0 > 24 * 3600 * 10**9  # stepped (FAKETIME_NO_CACHE: read at each call)
w.maintain(sync_cursor=10)  # units 6-10 forwarded too: the cursor is saved
w.save_cursor(10)
print(w.db.execute("SELECT COUNT(*) FROM units WHERE compacted=1").fetchone()[0])
w.close()
"""


def test_a_step_forward_keeps_the_replay_copies(tmp_path):
    """(I20) Forwarded units stay replayable for upstream.replay_window on the housekeeping
    clock, as retention does: a step forward deleted every kept copy at once when the cursor
    was next saved (an independent tester's finding: a boot in 1970 corrected by NTP)."""
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    done = subprocess.run(
        [sys.executable, "-c", REPLAY_COPIES, str(tmp_path / "data"), str(offset)],
        env={**_faketime_env(offset), "FAKETIME_NO_CACHE": "1"},
        cwd=tmp_path,  # the installed edgeos, not a checkout's source beside the tests
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "10", done.stdout  # all ten forwarded copies still held
