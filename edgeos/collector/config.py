"""collector.toml: read and checked once, every error in one pass (docs/collector.md lists the keys)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeos.config.schema import unknown_key_message
from edgeos.config.units import split_server


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

    def password(self) -> str | None:
        """The database password from `password_file` (None: the DSN's, PGPASSWORD or
        ~/.pgpass, as libpq's clients take them). Raises CollectorConfigError naming the file."""
        if not self.password_file:
            return None
        path = self.base / self.password_file
        try:
            return path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise CollectorConfigError(f"{self.path.name}: database.password_file: cannot read {path}: {e}") from e

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
_COLLECTOR_KEYS = {
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
}
_DATABASE_KEYS = {"dsn", "password_file", "retention", "rollup_after"}
_HTTP_KEYS = {"listen"}
# As a gateway's id (docs/config.md): what the topics and the ledger's keys are made of.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
# (key, attribute, smallest, largest): counts, then durations in seconds.
_COUNTS = [("batch_units", 1, 1_000_000), ("writers", 1, 64), ("pack_min", 0, 1_000_000)]
_DURATIONS = [
    ("batch_wait", 0.0, 3600.0),
    ("reorder_wait", 0.0, 86400.0),
    ("replay_retry", 0.1, 86400.0),
    ("maintain_every", 1.0, 86400.0),
]


def _unknown(name: str, where: str, key: str, allowed: set[str]) -> str:
    return f"{name}: {where}{key}: {unknown_key_message(key, dict.fromkeys(sorted(allowed)))}"


def _count(value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"found {value!r}, expected a whole number")
    if not lo <= value <= hi:
        raise ValueError(f"found {value}, expected {lo}..{hi}")
    return value


def _duration(value: Any, lo: float, hi: float) -> float:
    v = seconds(value)
    if not lo <= v <= hi:
        raise ValueError(f"found {value!r}, expected {lo:g}s..{hi:g}s")
    return v


def parse_listen(value: str) -> tuple[str, int]:
    """ "HOST:PORT" (IPv6 in brackets) of the HTTP endpoint."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f'found {value!r}, expected "HOST:PORT" (e.g. "127.0.0.1:9108"), or "" for none')
    return host.strip("[]") or "127.0.0.1", int(port)


def load(path: Path | str) -> CollectorConfig:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CollectorConfigError(f"{path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise CollectorConfigError(f"{path}: {e}") from e
    name = path.name
    errors: list[str] = []
    known = {"broker", "database", "collector", "http"}
    errors += [_unknown(name, "", k, known) for k in doc if k not in known]
    tables = {}
    for sect in known:
        t = doc.get(sect, {})
        if not isinstance(t, dict):
            errors.append(f"{name}: {sect}: found {t!r}, expected a table [{sect}]")
            t = {}
        tables[sect] = t
    b = dict(tables["broker"])
    errors += [_unknown(name, "broker.", k, _BROKER_KEYS) for k in b if k not in _BROKER_KEYS]
    servers: list[tuple[str, int]] = []
    tls = bool(b.get("tls", False))
    default_port = 8883 if tls else 1883
    if b.get("servers"):
        # The gateway's `upstream.servers` rules (docs/config.md): one parser for both.
        for i, s in enumerate(b["servers"]):
            try:
                servers.append(split_server(str(s), default_port))
            except ValueError as e:
                errors.append(f"{name}: broker.servers[{i}]: found {s!r}, expected host:port ({e})")
    elif b.get("host"):
        port = str(b.get("port", default_port))
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            errors.append(f"{name}: broker.port: found {port!r}, expected a port from 1 to 65535")
        else:
            servers.append((str(b["host"]), int(port)))
    if not servers:
        errors.append(f"{name}: broker.servers: at least one broker is needed (or broker.host)")
    b["servers"] = servers
    b["mqtt_version"] = str(b.get("mqtt_version", "5"))
    if b["mqtt_version"] not in ("5", "3.1.1"):
        errors.append(f"{name}: broker.mqtt_version: found {b['mqtt_version']!r}, expected 5 or 3.1.1")
    b.setdefault("client_id", "edgeos-collector")
    try:
        b["receive_maximum"] = _count(b.get("receive_maximum", 64), 1, 65535)
    except ValueError as e:
        errors.append(f"{name}: broker.receive_maximum: {e}")
        b["receive_maximum"] = 64
    try:
        b["keepalive"] = max(1, int(_duration(b.get("keepalive", "30s"), 1.0, 65535.0)))
    except ValueError as e:
        errors.append(f"{name}: broker.keepalive: {e}")
    d, c, h = tables["database"], tables["collector"], tables["http"]
    if not d.get("dsn"):
        errors.append(f"{name}: database.dsn: missing (e.g. postgresql://edgeos@db.plant/historian)")
    cfg = CollectorConfig(path=path, broker=b, dsn=d.get("dsn", ""), password_file=d.get("password_file"))
    if cfg.password_file and not (cfg.base / cfg.password_file).is_file():
        errors.append(f"{name}: database.password_file: file {cfg.password_file!r} not found (relative to {cfg.base})")
    limits = [(key, _count, lo, hi) for key, lo, hi in _COUNTS] + [(k, _duration, lo, hi) for k, lo, hi in _DURATIONS]
    for key, parse, lo, hi in limits:
        if key in c:
            try:
                setattr(cfg, key, parse(c[key], lo, hi))
            except ValueError as e:
                errors.append(f"{name}: collector.{key}: {e}")
    if "gateways" in c:
        gws = c["gateways"]
        if not isinstance(gws, list) or not all(isinstance(g, str) for g in gws):
            errors.append(f'{name}: collector.gateways: found {gws!r}, expected a list of gateway ids ["line1-gw"]')
        else:
            bad = [g for g in gws if not _NAME.match(g)]
            if bad:
                errors.append(
                    f"{name}: collector.gateways: found {bad[0]!r}, expected gateway ids of letters, digits, "
                    "'_', '.', '-' (starting with a letter or digit), as on the gateways"
                )
            cfg.gateways = list(gws)
    for key in ("topic_prefix", "replay_topic"):
        if key in c:
            if not isinstance(c[key], str) or not c[key]:
                errors.append(f"{name}: collector.{key}: found {c[key]!r}, expected a topic")
            else:
                setattr(cfg, key, c[key])
    for key in ("retention", "rollup_after"):
        if key in d:
            try:
                setattr(cfg, key, _duration(d[key], 60.0, 100 * 365 * 86400.0))
            except ValueError as e:
                errors.append(f"{name}: database.{key}: {e}")
    for sect, allowed, got in [
        ("collector", _COLLECTOR_KEYS, c),
        ("database", _DATABASE_KEYS, d),
        ("http", _HTTP_KEYS, h),
    ]:
        errors += [_unknown(name, f"{sect}.", k, allowed) for k in got if k not in allowed]
    if "listen" in h:
        cfg.http_listen = h["listen"] or None
        if cfg.http_listen:
            try:
                parse_listen(str(cfg.http_listen))
            except ValueError as e:
                errors.append(f"{name}: http.listen: {e}")
    if errors:
        raise CollectorConfigError("\n".join(errors))
    return cfg
