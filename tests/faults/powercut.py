"""Power cut, harder than kill -9: run a writer under powercut_shim.c (LD_PRELOAD), kill -9 it,
then undo every file write that no fsync/fdatasync of its file followed. Shared by
tests/faults/test_power_cut.py and bench/bench_faults.py."""

from __future__ import annotations

import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
CHILD = HERE / "powercut_child.py"
HEAD = struct.Struct("<IIqqq")


def build_shim(directory: Path) -> Path:
    """Compile the shim with gcc (a test dependency: scripts/setup installs gcc)."""
    out = directory / "powercut_shim.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), str(HERE / "powercut_shim.c"), "-ldl", "-lpthread"],
        check=True,
        capture_output=True,
    )
    return out


def undo_unsynced(log: Path, keep_prefix: float = 0.0, rng: random.Random | None = None) -> dict[str, int]:
    """Apply the cut: per file, undo (newest first) the writes after its last sync. With
    `keep_prefix`, a random share of each file's unsynced writes, oldest first, is kept (the
    page cache wrote some back in order before the cut). Returns counts for the report."""
    data = log.read_bytes() if log.exists() else b""
    pending: dict[str, list[tuple[int, int, bytes]]] = defaultdict(list)
    pos = syncs = writes = 0
    while pos + HEAD.size <= len(data):
        kind, plen, off, oldsize, oldlen = HEAD.unpack_from(data, pos)
        pos += HEAD.size
        path = data[pos : pos + plen].decode()
        pos += plen
        old = data[pos : pos + oldlen]
        pos += oldlen
        if kind == 1:
            pending[path].append((off, oldsize, old))
            writes += 1
        else:
            pending[path].clear()
            syncs += 1
    undone = 0
    for path, recs in pending.items():
        keep = int(len(recs) * keep_prefix * (rng.random() if rng else 1.0))
        if not os.path.exists(path):
            continue
        with open(path, "r+b") as f:
            for off, oldsize, old in reversed(recs[keep:]):
                if old:
                    f.seek(off)
                    f.write(old)
                f.truncate(oldsize)
                undone += 1
    return {"writes": writes, "syncs": syncs, "undone": undone}


def cut_once(
    shim: Path,
    data_dir: Path,
    start: int,
    run_s: float,
    *,
    sync_off: bool = False,
    keep_prefix=0.0,
    rng=None,
    extra: tuple[str, ...] = (),
):
    """Run the writer for `run_s`, cut the power; returns (reported ks, undo counts)."""
    log = data_dir.parent / "shim.log"
    log.unlink(missing_ok=True)
    env = dict(os.environ, LD_PRELOAD=str(shim), EDGEOS_SHIM_DIR=str(data_dir) + "/", EDGEOS_SHIM_LOG=str(log))
    cmd = [sys.executable, str(CHILD), str(data_dir), str(start)] + (["--sync-off"] if sync_off else []) + list(extra)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    reported: list[int] = []
    try:
        line = proc.stdout.readline().strip()
        assert line == "ready", line + proc.stderr.read()
        deadline = time.monotonic() + run_s
        while time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 0.01)[0]:
                line = proc.stdout.readline()
                if line.strip():
                    reported.append(int(line))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    reported += [int(x) for x in proc.stdout.read().split()]
    proc.stdout.close()
    proc.stderr.close()
    counts = undo_unsynced(log, keep_prefix, rng)
    return reported, counts
