"""The daemon's status as a small JSON file, rewritten every second.

A file, not a socket: `edgeos status` works as any user who can read it and needs nothing
running to answer "is it running?" (the store's lock says). The live file goes to a run
directory on tmpfs when there is one (`/run/edgeos`, which the systemd unit creates), so a
status rewritten every second never wears the data disk; the status at an orderly stop also
goes to the data directory, where it outlives the run directory. A status is not data: a
failure to write it is logged, rate-limited, and never stops ingest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from edgeos.logs import RateLimited

STATUS_NAME = "status.json"
RUN_DIR = Path("/run/edgeos")

log = logging.getLogger("edgeos.status")
_errors = RateLimited(log)


def live_path(data_dir: Path, run_dir: Path | None = None) -> Path:
    """Where the running daemon of `data_dir` writes its status: in `run_dir` (or /run/edgeos
    when that is a writable directory) under a name derived from the data directory, so that
    several daemons can share it; else in the data directory."""
    if run_dir is None:
        run_dir = RUN_DIR if os.access(RUN_DIR, os.W_OK | os.X_OK) else None
    if run_dir is None:
        return Path(data_dir) / STATUS_NAME
    key = hashlib.sha1(os.path.abspath(data_dir).encode()).hexdigest()[:12]
    return Path(run_dir) / f"status-{key}.json"


LINK_NAME = "status.live"  # in the data directory: where the live status of its daemon is


def link_live(data_dir: Path, live: Path) -> None:
    """Point `data_dir/status.live` at the live status file, once at start (one small write),
    so that `edgeos status --data-dir` finds it in whatever run directory the daemon uses.
    A configured `run_dir` that does not exist yet is created, as `data_dir` is."""
    try:
        Path(live).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _errors.log(logging.WARNING, "run-dir", "cannot create the run directory %s (%s)", Path(live).parent, e)
    link = Path(data_dir) / LINK_NAME
    if live == Path(data_dir) / STATUS_NAME:
        with contextlib.suppress(OSError):
            link.unlink()
        return
    tmp = link.with_suffix(".tmp-link")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(os.path.abspath(live), tmp)
        os.replace(tmp, link)
    except OSError as e:
        _errors.log(logging.WARNING, "status-link", "cannot link %s to the live status (%s)", link, e)


def _candidates(data_dir: Path, run_dir: Path | None) -> list[Path]:
    """Every place a status of `data_dir` may be: the live file in the given run directory, or
    else in /run/edgeos whether or not the reader may write there (a member of the service's
    group may only read it); where the data directory's link points; the status of the last
    orderly stop."""
    key = hashlib.sha1(os.path.abspath(data_dir).encode()).hexdigest()[:12]
    live = Path(run_dir if run_dir is not None else RUN_DIR) / f"status-{key}.json"
    # Once per file: the link usually points at the live file (read, or warned of, once).
    by_file = {os.path.realpath(p): p for p in (Path(data_dir) / STATUS_NAME, Path(data_dir) / LINK_NAME, live)}
    return list(reversed(by_file.values()))


def daemon_pid(data_dir: Path) -> int | None:
    """The pid of the daemon running on `data_dir`, asked of the store's lock (flock), which
    the kernel releases when the process dies however it dies; None when none runs there.
    Raises PermissionError when the lock file cannot be opened."""
    from edgeos.store.writer import LOCK_NAME

    try:
        fd = os.open(Path(data_dir) / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def write_status(path: Path, status: dict[str, Any]) -> bool:
    """Replace the status file atomically; False (logged, rate-limited) when that failed."""
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps({**status, "pid": os.getpid()}, default=str), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        _errors.log(logging.WARNING, "status", "cannot write the status file %s (%s); ingest goes on", path, e)
        return False
    _errors.clear("status")
    return True


def read_status(
    data_dir: Path, run_dir: Path | None = None, unread: list[Path] | None = None
) -> tuple[dict[str, Any] | None, float]:
    """(status, age in seconds) of the freshest status file of `data_dir`; (None, inf) when the
    daemon never ran here. Raises PermissionError when a status exists but none can be read;
    when some can, the ones that could not are appended to `unread` (the freshest may be one
    of them: the caller says so)."""
    best: dict[str, Any] | None = None
    denied: PermissionError | None = None
    for path in _candidates(data_dir, run_dir):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except PermissionError as e:
            denied = e
            if unread is not None:
                unread.append(path)
            continue
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and (best is None or float(doc.get("time", 0)) > float(best.get("time", 0))):
            best = doc
    if best is None:
        if denied is not None:
            raise denied
        return None, float("inf")
    return best, time.time() - float(best.get("time", 0))
