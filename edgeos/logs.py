"""One line per event on stderr, and a rate limit per key so a dead device cannot flood the log."""

from __future__ import annotations

import logging
import sys
import time


class _Formatter(logging.Formatter):
    converter = time.gmtime

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        # One event, one line: fold tracebacks and embedded newlines.
        return super().format(record).replace("\n", " | ")


def setup(level: str = "info") -> None:
    root = logging.getLogger("edgeos")
    root.setLevel(level.upper())
    if not any(getattr(h, "_edgeos", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h._edgeos = True  # type: ignore[attr-defined]
        h.setFormatter(_Formatter())
        root.addHandler(h)
        root.propagate = False


class RateLimited:
    """Logs the first event of a key, then at most one per `interval` s with a suppressed count."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        n = self._suppressed.pop(key, 0)
        self._last[key] = now
        if n:
            msg += f" ({n} similar suppressed in the last {self.interval:g}s)"
        self.logger.log(level, msg, *args)
        return True

    def clear(self, key_prefix: str) -> None:
        """Forget keys (e.g. when a device recovers) so the next failure is logged at once."""
        for k in [k for k in self._last if k.startswith(key_prefix)]:
            del self._last[k]
            self._suppressed.pop(k, None)
