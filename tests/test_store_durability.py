"""Group commit and the fsync interval (docs/store.md I2, I3, I14): commits follow poll cycles,
a sample counts as stored once fsynced, a failed fsync stops the daemon, and a machine that
went down never gets a unit id given twice."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeos.config import load_config
from edgeos.runtime import Runtime
from edgeos.store import StoreWriter
from edgeos.store.writer import SEQ_NAME, StoreSettings

CHILD = Path(__file__).parent / "faults" / "ingest_child.py"


def _config(write_config, fsync: str, poll: str = "50ms", tags: int = 8):
    names = ", ".join(f'{{ name = "t{i}" }}' for i in range(tags))
    return load_config(
        write_config(
            f"""
            [gateway]
            id = "gw"
            data_dir = "data"
            shutdown_timeout = "5s"
            [store]
            fsync_interval = "{fsync}"
            [[devices]]
            name = "dev"
            protocol = "simulated"
            poll_interval = "{poll}"
            tags = [{names}]
            """
        )
    )


def _identity(rt: Runtime) -> None:
    c = rt.counters
    assert c.read == c.stored + c.filtered_out + c.dropped_store_unavailable + c.dropped_at_stop, vars(c)


async def test_commits_follow_poll_cycles_and_count_as_stored_once_fsynced(write_config):
    cfg = _config(write_config, "3s", poll="50ms")
    rt = Runtime(cfg)
    task = asyncio.create_task(rt.run())
    try:
        async with asyncio.timeout(20):
            await rt.running.wait()
            while rt.store is None or rt.store.counters.committed_samples == 0:
                await asyncio.sleep(0.01)
            # Committed (a kill cannot lose it) but not yet fsynced: not reported stored.
            assert rt.counters.stored == 0
            assert rt.store.undurable > 0
            while rt.counters.stored == 0:
                await asyncio.sleep(0.05)
            assert rt.store.counters.fsyncs >= 1
            assert rt.store.durable_id > 0
    finally:
        rt.stop()
        await asyncio.wait_for(task, 20)
    _identity(rt)
    s = rt.store.counters
    assert rt.counters.stored == s.committed_samples == s.durable_samples > 0
    # Group commit: one commit (one unit, one device) per poll cycle, not one per timer tick.
    cycles = rt.devices["dev"].batches
    assert cycles >= 10
    assert cycles // 2 <= s.committed_units <= cycles + 1, (cycles, s.committed_units)
    # Far fewer fsyncs than commits: every 3 s, plus the one at the stop.
    assert s.fsyncs <= s.committed_units // 5


async def test_fsync_every_commit_counts_as_stored_at_once(write_config, run_runtime):
    cfg = _config(write_config, "0s")
    rt = await run_runtime(cfg, until=lambda rt: rt.counters.stored > 0)
    assert rt.store.counters.fsyncs == 0  # SQLite fsyncs each commit itself (synchronous=FULL)
    assert rt.counters.stored == rt.store.counters.committed_samples
    _identity(rt)


async def test_a_failed_fsync_stops_the_daemon_and_counts_what_it_could_not_keep(write_config, monkeypatch):
    real = os.fsync

    def failing(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("edgeos.db-wal"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    cfg = _config(write_config, "200ms", poll="20ms")
    rt = Runtime(cfg)
    await asyncio.wait_for(rt.run(), 20)  # it stops by itself
    assert rt.failed and "fsync failed" in rt.failed and "Input/output error" in rt.failed
    assert rt.counters.read > 0
    assert rt.counters.stored == 0  # nothing was ever fsynced
    assert rt.counters.dropped_at_stop > 0
    _identity(rt)


def _kill_child(data_dir: Path, fsync_ns: int) -> int:
    """Run the ingest child until it reported a few commits, SIGKILL it; the last unit id it reported."""
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(data_dir), "0", str(fsync_ns)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        for _ in range(12):
            last = int(proc.stdout.readline())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    return last


def _next_id(data_dir: Path) -> tuple[int, int]:
    """(the highest unit id before, the id of the next unit written) by a fresh writer."""
    import numpy as np

    from edgeos.model import Batch, TagMeta

    tags = [TagMeta(i, "dev", f"t{i}") for i in range(10)]
    w = StoreWriter(data_dir, tags, StoreSettings(time_resolution_ns=1, fsync_interval_ns=2_000_000_000))
    try:
        before = w.db.execute("SELECT max(id) FROM units").fetchone()[0] or 0
        i = np.arange(10)
        w.write([Batch("dev", i.astype(np.int32), 10**12 + i, i.astype(float), np.zeros(10, np.uint32))])
        return before, w.db.execute("SELECT max(id) FROM units").fetchone()[0]
    finally:
        w.close()


def test_a_killed_process_continues_its_ids(tmp_path):
    _kill_child(tmp_path, 2_000_000_000)
    before, new = _next_id(tmp_path)
    assert new == before + 1  # same boot: the page cache kept every commit; no id can be lost


def test_a_machine_that_went_down_never_gives_an_id_twice(tmp_path):
    # Commits not yet fsynced die with the machine: upstream may have received units this store
    # no longer holds. A changed boot id after an unclean stop says so; new ids continue above
    # the fsynced bound in edgeos.seq, above every id ever given.
    _kill_child(tmp_path, 2_000_000_000)
    db = sqlite3.connect(tmp_path / "edgeos.db")
    db.execute("UPDATE meta SET value='an-earlier-boot' WHERE key='boot_id'")
    db.commit()
    db.close()
    bound = int((tmp_path / SEQ_NAME).read_text())
    before, new = _next_id(tmp_path)
    assert new == bound + 1 and new > before + 1


def test_fsync_every_commit_needs_no_jump(tmp_path):
    # With synchronous=FULL nothing committed can be lost with the machine: no boot id kept.
    _kill_child(tmp_path, 0)
    db = sqlite3.connect(tmp_path / "edgeos.db")
    assert db.execute("SELECT count(*) FROM meta WHERE key='boot_id'").fetchone()[0] == 0
    db.close()
    before, new = _next_id(tmp_path)
    assert new == before + 1


@pytest.mark.parametrize("interval", ["0s", "2s"])
def test_flush_writes_nothing_when_nothing_changed(tmp_path, interval):
    import numpy as np

    from edgeos.model import Batch, TagMeta

    ns = int(float(interval[:-1]) * 1e9)
    w = StoreWriter(tmp_path, [TagMeta(0, "dev", "t")], StoreSettings(fsync_interval_ns=ns))
    try:
        w.write([Batch("dev", np.zeros(1, np.int32), np.array([time.time_ns()]), np.ones(1), np.zeros(1, np.uint32))])
        w.flush()
        fsyncs = w.counters.fsyncs
        assert w.flush() == 0 and w.counters.fsyncs == fsyncs  # no second fsync for nothing
        assert w.undurable == 0 and w.durable_id == w.db.execute("SELECT max(id) FROM units").fetchone()[0]
    finally:
        w.close()


def test_a_wal_damaged_in_its_middle_is_said_kept_and_its_ids_never_given_again(tmp_path, caplog):
    """SQLite stops replaying a WAL at its first bad frame, silently: a stray write in the middle
    hid the committed transactions after it (and a fresh writer gave their ids again). A valid
    commit frame after a bad one is not a crash's torn end: the store says what is lost, keeps
    the WAL's bytes and continues above the fsynced bound (I9, I14)."""
    from edgeos.store.wal import check

    last = _kill_child(tmp_path, 2_000_000_000)
    wal = tmp_path / "edgeos.db-wal"
    assert check(wal) is None  # a killed process leaves no damage: nothing is said
    frames = (wal.stat().st_size - 32) // (24 + 1024)
    assert frames > 20, frames
    data = bytearray(wal.read_bytes())
    at = 32 + (frames // 3) * (24 + 1024) + 24 + 100  # inside one frame's page
    data[at : at + 200] = bytes(b ^ 0xFF for b in data[at : at + 200])  # every bit flipped
    wal.write_bytes(data)
    damage = check(wal)
    assert damage is not None and damage.hidden > 0 and damage.bad == frames // 3
    bound = int((tmp_path / SEQ_NAME).read_text())
    with caplog.at_level("CRITICAL", logger="edgeos.store"):
        before, new = _next_id(tmp_path)
    assert before < last  # what the damage hid is gone from the store ...
    assert new == bound + 1  # ... and its ids are never given again
    said = [r.getMessage() for r in caplog.records if r.levelname == "CRITICAL"]
    assert len(said) == 1 and f"damaged at frame {frames // 3} of {frames}" in said[0], said
    (kept,) = tmp_path.glob("edgeos.db-wal.bad-*")
    assert kept.read_bytes() == bytes(data)
