"""Typed, validated configuration: what the rest of the daemon reads, never raw TOML."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeos.adapter import DeviceConfig, TagConfig
from edgeos.console.settings import ConsoleSettings
from edgeos.model import TagMeta


@dataclass(frozen=True)
class GatewayConfig:
    id: str
    data_dir: Path
    run_dir: Path | None = None  # None: /run/edgeos when writable, else data_dir (service/status.py)
    log_level: str = "info"
    shutdown_timeout_ns: int = 10_000_000_000
    queue_batches: int = 256


@dataclass(frozen=True)
class StoreConfig:
    commit_samples: int = 10_000
    commit_interval_ns: int = 0  # 0: group commit, as soon as the writer has nothing more queued
    fsync_interval_ns: int = 2_000_000_000  # 0: every commit is fsynced
    retention_ns: int | None = None
    max_size: int | None = None
    memory_buffer: int = 64 * 1024 * 1024
    time_resolution_ns: int = 1_000_000
    compact_after_ns: int = 600_000_000_000
    unit_version: int = 3  # of the units the store writes (and so sends upstream): docs/payload.md


@dataclass(frozen=True)
class UpstreamConfig:
    """MQTT forwarding; `enabled = false` keeps all data in the plant."""

    enabled: bool
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HttpConfig:
    """The local HTTP server (/metrics, /healthz): on by default, on loopback only."""

    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 9180
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_connections: int = 32
    metrics_per_tag: bool = False  # 10,000 tags must not become 10,000 series by default


@dataclass(frozen=True)
class HealthConfig:
    """Bounds past which /healthz answers 503."""

    device_down_ns: int = 60_000_000_000
    device_down_by_name: dict[str, int] = field(default_factory=dict)  # per-device overrides
    sync_lag_ns: int = 300_000_000_000

    def device_bound_ns(self, device: str) -> int:
        return self.device_down_by_name.get(device, self.device_down_ns)


@dataclass(frozen=True)
class Config:
    source: Path
    gateway: GatewayConfig
    store: StoreConfig
    devices: tuple[DeviceConfig, ...]
    upstream: UpstreamConfig
    http: HttpConfig = field(default_factory=HttpConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)  # docs/console.md

    @property
    def tags(self) -> tuple[TagMeta, ...]:
        """Every tag's metadata; `tags[i].id == i`."""
        return tuple(t.meta for d in self.devices for t in d.tags)

    def tag_configs(self) -> tuple[TagConfig, ...]:
        return tuple(t for d in self.devices for t in d.tags)

    def device(self, name: str) -> DeviceConfig:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def polls_per_second(self, device: DeviceConfig) -> float:
        """Tag reads per second the device's poll intervals ask for."""
        return sum(1e9 / t.poll_interval_ns for t in device.tags)
