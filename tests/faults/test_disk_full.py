"""A real full disk (a 12 MiB tmpfs in a private mount namespace): survive, buffer, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = Path(__file__).with_name("diskfull_child.py")


def test_disk_full_is_survived_and_writing_resumes(tmp_path):
    mount = tmp_path / "fs"
    mount.mkdir()
    # Root gets its own mount namespace; anyone else a user namespace mapped to root. Either
    # way the tmpfs is real (ENOSPC comes from the kernel) and vanishes with the process.
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    script = f'mount -t tmpfs -o size=12m tmpfs "{mount}" && exec "{sys.executable}" "{CHILD}" "{mount}"'
    out = subprocess.run([*unshare, "sh", "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["errors_when_full"] > 0 and r["running_while_full"]
    assert "disk full" in out.stderr or "full" in out.stderr
    # Memory stayed bounded: the oldest samples over memory_buffer were dropped and counted.
    assert r["dropped_when_full"] > 0
    assert "dropped the" in out.stderr and "oldest samples" in out.stderr
    # Space came back: writing resumed, and every sample is either stored or counted dropped.
    assert r["stored"] + r["dropped"] == r["read"]
    assert r["count"] == r["stored"]
    assert r["errors_after_recovery"] == 0 and r["integrity"] == "ok"
