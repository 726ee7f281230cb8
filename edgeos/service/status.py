"""The daemon's status as a small JSON file in the data directory, rewritten every second.

A file, not a socket: `edgeos status` works as any user who can read the data directory,
needs nothing running to answer "is it running?" (a stale file says no), and costs nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STATUS_NAME = "status.json"


def write_status(data_dir: Path, status: dict[str, Any]) -> None:
    path = Path(data_dir) / STATUS_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**status, "pid": os.getpid()}, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_status(data_dir: Path) -> tuple[dict[str, Any] | None, float]:
    """(status, age in seconds); (None, inf) when the daemon never ran here."""
    try:
        doc = json.loads((Path(data_dir) / STATUS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, float("inf")
    return doc, time.time() - float(doc.get("time", 0))
