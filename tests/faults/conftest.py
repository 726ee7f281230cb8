"""A real full disk for fault tests: a child process on a tmpfs in a private mount namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def on_tmpfs(tmp_path):
    """on_tmpfs(child, size, *args) -> (CompletedProcess, its last stdout line as JSON).

    Root gets its own mount namespace; anyone else a user namespace mapped to root. Either way
    the tmpfs is real (ENOSPC comes from the kernel) and vanishes with the process. The child
    gets the mount point first, then `args`."""

    def run(child: Path, size: str, *args: object, timeout: float = 150) -> tuple[subprocess.CompletedProcess, dict]:
        mount = tmp_path / "fs"
        mount.mkdir(exist_ok=True)
        unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
        extra = "".join(f' "{a}"' for a in args)
        script = f'mount -t tmpfs -o size={size} tmpfs "{mount}" && exec "{sys.executable}" "{child}" "{mount}"{extra}'
        out = subprocess.run(
            [*unshare, "sh", "-c", script], capture_output=True, text=True, timeout=timeout, cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return out, json.loads(out.stdout.strip().splitlines()[-1])

    return run
