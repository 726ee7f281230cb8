"""I/O errors injected with libfiu (fiu-run -x; Debian fiu-utils): EIO and ENOSPC on pwrite and
fdatasync (what SQLite calls; it never calls write or fsync on the store) at several
probabilities, while units are committed.

Promises checked (docs/reliability.md, "I/O errors"): nothing acknowledged is lost; no unit is
partial; the writer keeps going after a failed write, and exits (code 3, for systemd) after a
failed fsync, never stuck; `PRAGMA integrity_check` is ok afterwards. Negative control: a
writer that acknowledges failed commits must be caught losing them. The daemon itself is run
under fiu too: it survives failing writes and exits non-zero on a failing fsync.
"""

from __future__ import annotations

import errno
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeos.store import StoreReader

CHILD = Path(__file__).with_name("fiu_child.py")
FIU_RUN = shutil.which("fiu-run") or "/usr/bin/fiu-run"
EDGEOS = str(Path(sys.executable).with_name("edgeos"))
PWRITE, FDATASYNC = "posix/io/rw/pwrite", "posix/io/sync/fdatasync"

SCENARIOS = [
    # (points, errno, probability)
    ((PWRITE,), errno.EIO, 0.01),
    ((PWRITE,), errno.EIO, 0.05),
    ((PWRITE,), errno.ENOSPC, 0.05),
    ((FDATASYNC,), errno.EIO, 0.01),
    ((FDATASYNC,), errno.EIO, 0.05),
    ((PWRITE, FDATASYNC), errno.EIO, 0.005),
]


def _present(data_dir: Path) -> dict[int, int]:
    with StoreReader(data_dir) as r:
        values = np.concatenate([r.history(f"dev/t{i}").values for i in range(10)])
    ks, counts = np.unique((values // 1000).astype(np.int64), return_counts=True)
    return dict(zip(ks.tolist(), counts.tolist(), strict=True))


def run_under_faults(data_dir: Path, points, err: int, prob: float, seconds: float, *, ack_failed: bool = False):
    """Run the child as systemd would (restarted after each exit) for `seconds`; returns figures."""
    acked: list[int] = []
    stats = {"acked": 0, "failures": 0, "fsync_exits": 0, "restarts": 0, "open_failures": 0}
    end = time.monotonic() + seconds
    k = 0
    while time.monotonic() < end and stats["restarts"] < 60:
        left = max(0.3, end - time.monotonic())
        cmd = [FIU_RUN, "-x", sys.executable, str(CHILD), str(data_dir), str(k), f"{left:.2f}", str(prob), str(err)]
        cmd.append(",".join(points))
        if ack_failed:
            cmd.append("--ack-failed")
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=left + 30)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(
                f"the writer got stuck under {points} p={prob}: no exit within {left + 30:.0f} s"
            ) from e
        lines = out.stdout.split("\n")
        for line in lines:
            if line.isdigit():
                acked.append(int(line))
            elif line.startswith("failures "):
                stats["failures"] += int(line.split()[1])
        if out.returncode == 3:
            stats["fsync_exits"] += 1
            assert "fsync-failed" in out.stdout
        elif out.returncode == 4:
            stats["open_failures"] += 1  # opening (the integrity check, migrations) hit a fault: retried
        else:
            assert out.returncode == 0, f"rc={out.returncode}\n{out.stderr[-3000:]}"
            assert "closed" in out.stdout
        stats["restarts"] += 1
        k = (max(acked) + 1) if acked else k
    stats["acked"] = len(acked)
    return acked, stats


def _check(data_dir: Path, acked: list[int]) -> dict[str, int]:
    db = sqlite3.connect(data_dir / "edgeos.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
    present = _present(data_dir)
    missing = sorted(set(acked) - present.keys())
    partial = {k: n for k, n in present.items() if n % 1000}
    return {"missing": len(missing), "partial": len(partial), "duplicated": sum(n > 1000 for n in present.values())}


@pytest.mark.parametrize(("points", "err", "prob"), SCENARIOS, ids=lambda v: str(v))
def test_acknowledged_commits_survive_io_errors(tmp_path, points, err, prob):
    acked, stats = run_under_faults(tmp_path, points, err, prob, seconds=1.5)
    found = _check(tmp_path, acked)
    name = "+".join(p.rsplit("/", 1)[1] for p in points)
    print(
        f"faults.io.{name}.{errno.errorcode[err]}.p{prob}: acked={stats['acked']} failed_commits={stats['failures']} "
        f"fsync_exits={stats['fsync_exits']} restarts={stats['restarts']} lost={found['missing']} "
        f"partial={found['partial']} duplicated_unacked={found['duplicated']}"
    )
    assert stats["acked"] > 0
    assert found["missing"] == 0, f"acknowledged units lost: {found}"
    assert found["partial"] == 0
    if FDATASYNC in points and prob >= 0.01:
        assert stats["fsync_exits"] > 0  # the fault was really injected, and ended the process
    if points == (PWRITE,):
        assert stats["failures"] > 0 and stats["fsync_exits"] == 0


def test_negative_control_acknowledging_a_failed_commit_is_caught(tmp_path):
    acked, stats = run_under_faults(tmp_path, (PWRITE,), errno.EIO, 0.05, seconds=1.0, ack_failed=True)
    found = _check(tmp_path, acked)
    assert stats["failures"] > 0
    assert found["missing"] > 0, "the check did not notice acknowledged-but-failed commits"


def _daemon(tmp_path: Path, spec: str, seconds: float) -> tuple[int | None, str]:
    cfg = tmp_path / "edgeos.toml"
    if not cfg.exists():
        subprocess.run([EDGEOS, "init", str(cfg), "--local"], check=True, capture_output=True)
    proc = subprocess.Popen(
        [FIU_RUN, "-x", *(["-c", spec] if spec else []), EDGEOS, "run", str(cfg)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
        return None, out  # still running after `seconds`
    return proc.returncode, proc.communicate()[0]


def test_the_daemon_rides_out_failing_writes_and_exits_on_a_failing_fsync(tmp_path):
    # Failing pwrite (5%): commits fail and are retried in memory. Opening may fail too (the
    # daemon then exits for systemd): restarted here as systemd would, it must end up running.
    rc, out = _daemon(tmp_path, "", 2.0)  # the store created on a healthy disk first
    assert rc is None, out[-2000:]
    # Random faults: a 4 s run may see none hit a commit (group commit and 1 KiB pages make few
    # pwrites), so runs repeat until one both kept running and rode out a failed commit.
    spec = f"enable_random name={PWRITE},probability=0.05,failinfo={errno.EIO}"
    restarts = runs = 0
    while runs < 40:
        runs += 1
        rc, out = _daemon(tmp_path, spec, 4.0)
        if rc is None and "keeping samples in memory and retrying" in out:
            break
        if rc is not None:
            assert "exits for its service manager" in out or "fsync" in out, out[-2000:]
            restarts += 1
    print(f"faults.io.daemon_failing_writes: {runs} runs, {restarts} restarts; stopped cleanly by SIGTERM")
    assert rc is None, f"the daemon never kept running under failing writes:\n{out[-2000:]}"
    assert "keeping samples in memory and retrying" in out, out[-2000:]  # the fault did hit commits
    db = sqlite3.connect(tmp_path / "data" / "edgeos.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COALESCE(SUM(n), 0) FROM units").fetchone()[0] > 0
    db.close()
    # Failing fdatasync: it exits non-zero (systemd restarts it) instead of retrying in-process.
    started = time.monotonic()
    # Both calls: SQLite's commits and checkpoints use fdatasync; the periodic WAL flush of
    # synchronous=NORMAL (store.fsync_interval) uses fsync.
    spec = f"enable_random name=posix/io/sync/*,probability=0.5,failinfo={errno.EIO}"
    rc, out = _daemon(tmp_path, spec, 30.0)
    took = time.monotonic() - started
    print(f"faults.io.daemon_fsync_exit: rc={rc} after {took:.1f} s")
    assert rc not in (None, 0), out[-2000:]
    assert "fsync" in out or "exits for its service manager" in out, out[-2000:]  # a commit or flush, or at open
    db = sqlite3.connect(tmp_path / "data" / "edgeos.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
