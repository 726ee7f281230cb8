"""collector.toml: read and checked once, every error in one pass (docs/collector.md lists the keys)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class CollectorConfigError(Exception):
    pass


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_FACTOR = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def seconds(value: Any) -> float:
    """ "250ms", "5s", "2h", "365d" or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"found {value!r}, expected a duration such as 250ms, 5s, 2h or 30d")
    return float(m.group(1)) * _FACTOR[m.group(2)]


@dataclass
class CollectorConfig:
    path: Path
    broker: dict[str, Any]
    dsn: str
    password_file: str | None = None
    gateways: list[str] = field(default_factory=list)
    topic_prefix: str = "edgeos"
    replay_topic: str = "{prefix}/{gateway}/replay"
    batch_units: int = 2000
    writers: int = 2
    pack_min: int = 16
    batch_wait: float = 0.2
    retention: float = 365 * 86400.0
    rollup_after: float = 2 * 3600.0
    maintain_every: float = 60.0
    reorder_wait: float = 5.0
    replay_retry: float = 30.0
    http_listen: str | None = "127.0.0.1:9108"

    @property
    def base(self) -> Path:
        return self.path.parent

    def topics(self) -> list[str]:
        p = self.topic_prefix
        gws = self.gateways or ["+"]
        out = []
        for g in gws:
            out += [f"{p}/{g}/+/data", f"{p}/{g}/tags", f"{p}/{g}/status", f"{p}/{g}/replay/gone"]
        return out


_BROKER_KEYS = {
    "servers",
    "host",
    "port",
    "tls",
    "ca_file",
    "cert_file",
    "key_file",
    "tls_insecure",
    "username",
    "password_file",
    "password_env",
    "mqtt_version",
    "client_id",
    "keepalive",
    "receive_maximum",
}


def load(path: Path | str) -> CollectorConfig:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CollectorConfigError(f"{path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise CollectorConfigError(f"{path}: {e}") from e
    errors: list[str] = []
    known = {"broker", "database", "collector", "http"}
    errors += [
        f"{path.name}: unknown section or key {k!r} (expected one of {', '.join(sorted(known))})"
        for k in doc
        if k not in known
    ]
    b = dict(doc.get("broker", {}))
    errors += [f"{path.name}: broker.{k}: unknown key" for k in b if k not in _BROKER_KEYS]
    servers: list[tuple[str, int]] = []
    tls = bool(b.get("tls", False))
    default_port = 8883 if tls else 1883
    for s in b.get("servers") or ([f"{b['host']}:{b.get('port', default_port)}"] if b.get("host") else []):
        host, _, port = str(s).rpartition(":")
        if not host:
            host, port = str(s), str(default_port)
        if not port.isdigit():
            errors.append(f"{path.name}: broker.servers: {s!r} is not host:port")
            continue
        servers.append((host.strip("[]"), int(port)))
    if not servers:
        errors.append(f"{path.name}: broker.servers: at least one broker is needed (or broker.host)")
    b["servers"] = servers
    b["mqtt_version"] = str(b.get("mqtt_version", "5"))
    if b["mqtt_version"] not in ("5", "3.1.1"):
        errors.append(f"{path.name}: broker.mqtt_version: found {b['mqtt_version']!r}, expected 5 or 3.1.1")
    b.setdefault("client_id", "edgeos-collector")
    b.setdefault("receive_maximum", 64)
    try:
        b["keepalive"] = max(1, int(seconds(b.get("keepalive", "30s"))))
    except ValueError as e:
        errors.append(f"{path.name}: broker.keepalive: {e}")
    d = doc.get("database", {})
    c = doc.get("collector", {})
    h = doc.get("http", {})
    if not d.get("dsn"):
        errors.append(f"{path.name}: database.dsn: missing (e.g. postgresql://edgeos@db.plant/historian)")
    cfg = CollectorConfig(path=path, broker=b, dsn=d.get("dsn", ""), password_file=d.get("password_file"))
    for key, attr, conv in [
        ("gateways", "gateways", list),
        ("topic_prefix", "topic_prefix", str),
        ("replay_topic", "replay_topic", str),
        ("batch_units", "batch_units", int),
        ("writers", "writers", int),
        ("pack_min", "pack_min", int),
        ("batch_wait", "batch_wait", seconds),
        ("reorder_wait", "reorder_wait", seconds),
        ("replay_retry", "replay_retry", seconds),
        ("maintain_every", "maintain_every", seconds),
    ]:
        if key in c:
            try:
                setattr(cfg, attr, conv(c[key]))
            except (TypeError, ValueError) as e:
                errors.append(f"{path.name}: collector.{key}: {e}")
    for key in ("retention", "rollup_after"):
        if key in d:
            try:
                setattr(cfg, key, seconds(d[key]))
            except ValueError as e:
                errors.append(f"{path.name}: database.{key}: {e}")
    for sect, allowed, got in [
        (
            "collector",
            {
                "writers",
                "pack_min",
                "gateways",
                "topic_prefix",
                "replay_topic",
                "batch_units",
                "batch_wait",
                "reorder_wait",
                "replay_retry",
                "maintain_every",
            },
            c,
        ),
        ("database", {"dsn", "password_file", "retention", "rollup_after"}, d),
        ("http", {"listen"}, h),
    ]:
        errors += [
            f"{path.name}: {sect}.{k}: unknown key (expected one of {', '.join(sorted(allowed))})"
            for k in got
            if k not in allowed
        ]
    if "listen" in h:
        cfg.http_listen = h["listen"] or None
    if errors:
        raise CollectorConfigError("\n".join(errors))
    return cfg
