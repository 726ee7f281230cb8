"""The error tree; each carries the context a plant engineer needs to act on it."""

from __future__ import annotations

from dataclasses import dataclass


class EdgeosError(Exception):
    """Base of every error edgeos raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where (file, line, key path), what was found, what is expected."""

    file: str
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(EdgeosError):
    """An invalid config; carries every problem found in one pass."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class DeviceError(EdgeosError):
    """A device could not be reached or answered wrongly; `code` is low-cardinality for metrics."""

    def __init__(self, device: str, message: str, *, code: str = "device", stage: str = "read"):
        self.device = device
        self.code = code
        self.stage = stage
        super().__init__(f"{device}: {stage}: {message}")


class StoreError(EdgeosError):
    """The local store cannot be opened or written."""


class SyncError(EdgeosError):
    """The upstream sync failed (connection, credentials, TLS)."""


class PluginError(EdgeosError):
    """An entry-point plugin could not be loaded; names the distribution and the cause."""

    def __init__(self, group: str, name: str, dist: str, cause: BaseException | str):
        self.group = group
        self.name = name
        self.dist = dist
        self.cause = cause
        super().__init__(f"plugin {name!r} ({group}, from {dist}) failed to load: {cause}")
