"""The sysfs adapter: each poll reads every file of a group once and converts it to a number.

There is no connection to lose, so nothing here raises: a file that is missing, unreadable or
not a number gives that tag a Bad sample with the reason in its quality code, the other tags
keep their values, and the tag recovers on the first good read.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeos import Batch, DeviceConfig, PollGroup, PollingAdapter, Quality, TagConfig

# Under "edgeos" so the daemon's log handler and --log-level apply to these lines too.
log = logging.getLogger("edgeos.sysfs")

MAX_BYTES = 4096
"""A sysfs attribute is at most a page; a longer file is not "a file holding a number"."""

_GONE = {errno.ENOENT, errno.ENOTDIR, errno.ENODEV, errno.ENXIO}
_REFUSED = {errno.EACCES, errno.EPERM, errno.EISDIR}


def read_number(path: str) -> tuple[float, int, str]:
    """(value, quality, reason) of one file; never raises.

    - missing (sensor unplugged, driver unloaded, wrong path): BAD_SENSOR_FAILURE
    - permission denied, a directory: BAD_CONFIG_ERROR (the gateway's set-up is wrong)
    - any other read error (EIO from a sensor that did not answer): BAD_DEVICE_FAILURE
    - not one finite number (empty, text, NaN, too long): BAD_DECODING_ERROR
    """
    try:
        # Non-blocking open and one read: a FIFO or device node named by mistake cannot hang the
        # poll, and a sysfs attribute is produced whole by a single read at offset 0.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            data = os.read(fd, MAX_BYTES + 1)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno in _GONE:
            quality = Quality.BAD_SENSOR_FAILURE
        elif e.errno in _REFUSED:
            quality = Quality.BAD_CONFIG_ERROR
        else:
            quality = Quality.BAD_DEVICE_FAILURE
        return math.nan, quality, e.strerror or type(e).__name__
    except ValueError as e:  # a path with a NUL byte
        return math.nan, Quality.BAD_CONFIG_ERROR, str(e)
    if len(data) > MAX_BYTES:
        return math.nan, Quality.BAD_DECODING_ERROR, f"longer than {MAX_BYTES} bytes"
    try:
        value = float(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return math.nan, Quality.BAD_DECODING_ERROR, f"not a number: {data[:40]!r}"
    if not math.isfinite(value):
        return math.nan, Quality.BAD_DECODING_ERROR, f"not a finite number: {data[:40]!r}"
    return value, Quality.GOOD, ""


def _read_all(paths: Sequence[str]) -> list[tuple[float, int, str]]:
    return [read_number(p) for p in paths]


@dataclass(frozen=True)
class _Plan:
    """A poll group's files and conversion columns, built once."""

    ids: np.ndarray
    paths: tuple[str, ...]
    scale: np.ndarray
    offset: np.ndarray

    @classmethod
    def of(cls, tags: Sequence[TagConfig]) -> _Plan:
        return cls(
            np.array([t.id for t in tags], np.int32),
            tuple(t.options["path"] for t in tags),
            np.array([t.options["scale"] for t in tags], np.float64),
            np.array([t.options["offset"] for t in tags], np.float64),
        )


class SysfsAdapter(PollingAdapter):
    """Polls files on the shared scheduler; `read` never raises, so the device never restarts."""

    def __init__(self, device: DeviceConfig) -> None:
        super().__init__(device)
        self.files_read = 0
        self.read_errors = 0
        self.last_error = ""
        self._failing: dict[int, str] = {}  # tag id -> the reason last logged

    def poll_groups(self) -> list[PollGroup]:
        return [PollGroup(g.interval_ns, g.tags, _Plan.of(g.tags)) for g in super().poll_groups()]

    async def read(self, group: PollGroup, now_ns: int) -> Batch:
        plan: _Plan = group.plan
        # Off the event loop: a sensor behind I2C or 1-Wire can take up to a second to answer.
        got = await asyncio.to_thread(_read_all, plan.paths)
        values = np.array([g[0] for g in got], np.float64) * plan.scale + plan.offset
        quality = np.array([g[1] for g in got], np.uint32)
        self._note(group.tags, got)
        n = len(plan.ids)
        return Batch(self.device.name, plan.ids, np.full(n, now_ns, np.int64), values, quality)

    def _note(self, tags: Sequence[TagConfig], got: list[tuple[float, int, str]]) -> None:
        """Count, and log a tag's failure when it starts or changes and its recovery: not every poll."""
        self.files_read += len(got)
        for tag, (_, quality, reason) in zip(tags, got, strict=True):
            key = f"{self.device.name}/{tag.name}"
            if quality != Quality.GOOD:
                self.read_errors += 1
                self.last_error = f"{tag.name}: {reason}"
                if self._failing.get(tag.id) != reason:
                    self._failing[tag.id] = reason
                    log.warning("%s: %s: %s (%s)", key, tag.options["path"], reason, Quality.describe(quality))
            elif self._failing.pop(tag.id, None) is not None:
                log.info("%s: %s: readable again", key, tag.options["path"])

    def health(self) -> Mapping[str, Any]:
        return {
            **super().health(),
            "files_read": self.files_read,
            "read_errors": self.read_errors,
            "failing_tags": len(self._failing),
            "last_error": self.last_error,
        }
