"""One line per event, a rate limit per key so a dead device cannot flood the log, and no secret.

A line carries the level, the logger, the device and a low-cardinality code (`extra={"device":
..., "code": ...}`; `-` when none), then the message:

    text     2026-12-04T07:45:22.123Z WARNING edgeos.device press1 timeout: press1: read: timed out
    journal  <4>edgeos.device press1 timeout: press1: read: timed out
    json     {"time": "...", "level": "warning", "logger": "edgeos.device", "device": "press1", ...}

Under journald (JOURNAL_STREAM names our stderr) the level goes as the syslog priority prefix
and the line has no timestamp of its own: journald adds one. Every line, whatever its format,
goes through `redact`: secrets registered at config load (fields marked secret: passwords read
from password_file or password_env) and the password of any URL's userinfo become `***`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import IO

FORMATS = ("auto", "text", "journal", "json")
MASK = "***"
MIN_SECRET = 3  # shorter values would mask every occurrence of common letters; documented

_secrets: set[str] = set()
_secret_re: re.Pattern[str] | None = None
# scheme://user:password@host -> scheme://user:***@host (opc.tcp, mqtt, http, ...)
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@:]*):(?P<pw>[^\s/@]+)@")


def register_secret(value: str | None) -> None:
    """Never show `value` again in a log line, a status or CLI output that goes through `redact`."""
    global _secret_re
    if not value or len(value) < MIN_SECRET or value in _secrets:
        return
    _secrets.add(value)
    _secret_re = re.compile("|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True)))


def register_secret_ref(how: str, ref: object, base: Path | None = None) -> None:
    """A config field marked secret: `value` holds the secret, `file` names a file holding it,
    `env` an environment variable. A missing file or variable is the config check's to report."""
    if not isinstance(ref, str) or not ref:
        return
    if how == "value":
        register_secret(ref)
    elif how == "env":
        register_secret(os.environ.get(ref))
    elif how == "file":
        path = Path(ref) if base is None else base / ref
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return
        register_secret(text.strip())
        register_secret(text.rstrip("\r\n"))


def redact(text: str) -> str:
    """`text` with registered secrets and URL passwords masked."""
    if "://" in text:
        text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    if _secret_re is not None:
        text = _secret_re.sub(MASK, text)
    return text


def under_journald(stream: IO[str] | None = None) -> bool:
    """Whether `stream` (stderr) is connected to the journal: JOURNAL_STREAM holds its dev:inode."""
    want = os.environ.get("JOURNAL_STREAM", "")
    if not want:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


# syslog(3) priorities by logging level
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def _priority(levelno: int) -> int:
    for level, prio in _PRIORITY.items():
        if levelno >= level:
            return prio
    return 7


class Formatter(logging.Formatter):
    """One event, one line (tracebacks and newlines folded), redacted, in one of FORMATS."""

    def __init__(self, style: str = "text") -> None:
        super().__init__()
        if style not in FORMATS[1:]:
            raise ValueError(f"log format {style!r}: expected one of {', '.join(FORMATS)}")
        self.style = style

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            msg += "\n" + record.exc_text
        msg = redact(msg)
        device = getattr(record, "device", None) or "-"
        code = getattr(record, "code", None) or "-"
        if self.style == "json":
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
            doc = {
                "time": ts,
                "level": record.levelname.lower(),
                "logger": record.name,
                "device": None if device == "-" else device,
                "code": None if code == "-" else code,
                "message": msg,
            }
            return json.dumps(doc, ensure_ascii=False)
        msg = msg.replace("\r", "").replace("\n", " | ")
        if self.style == "journal":
            return f"<{_priority(record.levelno)}>{record.name} {device} {code}: {msg}"
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        return f"{ts} {record.levelname} {record.name} {device} {code}: {msg}"


def setup(level: str = "info", fmt: str = "auto", stream: IO[str] | None = None) -> None:
    """Log edgeos's events (and other libraries' warnings) to stderr, one line each.
    Calling it again replaces the handler (another format or stream)."""
    stream = stream or sys.stderr
    style = ("journal" if under_journald(stream) else "text") if fmt == "auto" else fmt
    handler = logging.StreamHandler(stream)
    handler._edgeos = True  # type: ignore[attr-defined]
    handler.setFormatter(Formatter(style))
    root = logging.getLogger("edgeos")
    root.setLevel(level.upper())
    # Libraries (asyncua, aiomqtt...) log through the root logger: their warnings get the same
    # line format and the same redaction, and edgeos's own lines are not repeated there.
    libs = logging.getLogger()
    for lg in (root, libs):
        for h in [h for h in lg.handlers if getattr(h, "_edgeos", False)]:
            lg.removeHandler(h)
    root.addHandler(handler)
    root.propagate = False
    lib_handler = logging.StreamHandler(stream)
    lib_handler._edgeos = True  # type: ignore[attr-defined]
    lib_handler.setFormatter(Formatter(style))
    lib_handler.setLevel(logging.WARNING)
    lib_handler.addFilter(LibraryLimit())
    libs.addHandler(lib_handler)


class LibraryLimit(logging.Filter):
    """Other libraries' warnings, at most one line per `interval` s per (logger, message), the
    next with the count left out: edgeos limits its own device errors so (docs/adapters.md), and
    a library retrying on its own (asyncua logs two lines per reconnect attempt per device)
    would otherwise fill a small box's journal during an outage. Errors and worse always pass."""

    MAX_KEYS = 1024  # bound on what is remembered; forgotten keys log again at once

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[tuple[str, str], float] = {}
        self._left: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._left[key] = self._left.get(key, 0) + 1
            return False
        if len(self._last) >= self.MAX_KEYS:
            self._last.clear()
            self._left.clear()
        self._last[key] = now
        n = self._left.pop(key, 0)
        if n:
            record.msg = f"{record.msg} ({n} similar suppressed in the last {self.interval:g}s)"
        return True


class RateLimited:
    """Logs the first event of a key, then at most one per `interval` s with a suppressed count."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0, device: str | None = None) -> None:
        self.logger = logger
        self.interval = interval
        self.device = device  # the `device` field of every line, unless a call names another
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(
        self, level: int, key: str, msg: str, *args: object, device: str | None = None, code: str | None = None
    ) -> bool:
        """`code` defaults to the key when the key is a short token (`store:full` -> store_full)."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        n = self._suppressed.pop(key, 0)
        self._last[key] = now
        if n:
            msg += f" ({n} similar suppressed in the last {self.interval:g}s)"
        if code is None and _TOKEN.fullmatch(key):
            code = key.replace(":", "_")
        self.logger.log(level, msg, *args, extra={"device": device or self.device, "code": code})
        return True

    def clear(self, key_prefix: str) -> None:
        """Forget keys (e.g. when a device recovers) so the next failure is logged at once."""
        for k in [k for k in self._last if k.startswith(key_prefix)]:
            del self._last[k]
            self._suppressed.pop(k, None)


_TOKEN = re.compile(r"[A-Za-z0-9_.:\-]{1,40}")
