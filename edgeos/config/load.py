"""Load and check a config file in one pass; every problem is reported, then nothing runs."""

from __future__ import annotations

import functools
import logging
import os
import re
import string
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeos import plugins
from edgeos.adapter import DeviceConfig, FilterSpec, TagConfig
from edgeos.config.model import Config, GatewayConfig, HealthConfig, HttpConfig, StoreConfig, UpstreamConfig
from edgeos.config.schema import Field, Problems, parse_table, unknown_key_message
from edgeos.config.secrets import check_options as check_secret_files
from edgeos.config.tags_csv import read_tags_csv
from edgeos.config.units import split_server
from edgeos.console.settings import parse_console
from edgeos.errors import ConfigError, PluginError, Problem
from edgeos.model import TagMeta, ValueKind

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _name_check(what: str):
    def check(v: str) -> str | None:
        if not _NAME.match(v) or len(v) > 128:
            return (
                f"found {v!r}, expected a {what} name of letters, digits, '_', '.', '-' "
                "(starting with a letter or digit, at most 128 characters)"
            )
        return None

    return check


def _named(path: str, name: Any) -> str:
    """`path(name)` when `name` is a valid name: an index alone cannot be found among 300 tags."""
    if isinstance(name, str) and _NAME.match(name) and len(name) <= 128:
        return f"{path}({name})"
    return path


def _template_check(*allowed: str):
    """A topic template may use only `allowed` placeholders: an unknown one would raise KeyError
    at every publish, a malformed one ValueError."""

    def check(v: str) -> str | None:
        names = ", ".join(f"{{{a}}}" for a in allowed)
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as e:
            return f'found "{v}": {e} (write {{{{ and }}}} for literal braces); allowed placeholders: {names}'
        for f in fields:
            if f not in allowed:
                return f"unknown placeholder {{{f}}}; allowed: {names}"
        return None

    return check


def _servers_check(v: list[str]) -> str | None:
    """Each broker as host, host:port, [v6] or [v6]:port, port 1-65535; at least one. Every
    malformed entry is named at once."""
    if not v:
        return 'found an empty list, expected at least one "host:port"'
    wrong = []
    for i, entry in enumerate(v):
        try:
            split_server(entry, 1)
        except ValueError as e:
            wrong.append(f'servers[{i}] "{entry}" ({e})')
    if wrong:
        return f'found {", ".join(wrong)}, expected "host:port", "host", or "[v6 address]:port"'
    return None


GATEWAY_FIELDS: dict[str, Field] = {
    "id": Field("str", help="this gateway's unique id, used in topics and payloads", check=_name_check("gateway")),
    "data_dir": Field("str", help="directory for the store and state, relative to the config file"),
    "run_dir": Field("str", None, help="tmpfs directory for the live status file (default /run/edgeos if writable)"),
    "log_level": Field("choice", "info", choices=("debug", "info", "warning", "error")),
    "shutdown_timeout": Field("duration", "10s", min=100_000_000, max=600_000_000_000),
    "queue_batches": Field("int", 256, min=4, max=1_000_000, help="bound of each internal queue"),
}

STORE_FIELDS: dict[str, Field] = {
    "commit_samples": Field("int", 10_000, min=1, max=10_000_000),
    "commit_interval": Field(
        "duration", "0s", min=0, max=1_000_000_000, help="0: commit as soon as nothing more is queued (group commit)"
    ),
    "fsync_interval": Field(
        "duration",
        "2s",
        min=0,
        max=60_000_000_000,
        help="how often commits are fsynced (what a power cut can lose; 0: every commit)",
    ),
    "retention": Field("duration", None, min=60_000_000_000),
    "max_size": Field("size", None, min=1024 * 1024),
    "memory_buffer": Field("size", "64MiB", min=1024 * 1024),
    "time_resolution": Field("duration", "1ms", min=1, max=1_000_000_000, help="timestamps are stored to this"),
    "compact_after": Field("duration", "10m", min=1_000_000_000, max=86_400_000_000_000),
    "unit_version": Field(
        "choice", 3, choices=(2, 3), help="3: compressed units; 2: plain, for consumers whose edgeos.wire predates 3"
    ),
}

UPSTREAM_FIELDS: dict[str, Field] = {
    "enabled": Field("bool", False),
    "host": Field("str", "127.0.0.1"),
    "port": Field("int", None, min=1, max=65535),
    "client_id": Field("str", None),
    "topic": Field("str", "edgeos/{gateway}/{device}/data", check=_template_check("gateway", "device")),
    "status_topic": Field("str", "edgeos/{gateway}/status", check=_template_check("gateway")),
    "mqtt_version": Field("choice", "5", choices=("5", "3.1.1")),
    "keepalive": Field("duration", "30s", min=1_000_000_000),
    "tls": Field("bool", False),
    "ca_file": Field("str", None),
    "cert_file": Field("str", None),
    "key_file": Field("str", None),
    "tls_insecure": Field("bool", False, help="skip hostname verification (never in production)"),
    "username": Field("str", None),
    "password_file": Field("str", None, secret="file"),
    "password_env": Field("str", None, secret="env"),
    "max_inflight": Field("int", 16, min=1, max=65535),
    "rate_limit_bytes": Field("size", None),
    "rate_limit_messages": Field("float", None, min=0.001),
    "reconnect_min": Field("duration", "1s", min=10_000_000),
    "reconnect_max": Field("duration", "60s", min=100_000_000),
    # Issue 25: broker failover, the message size cap, replay on request.
    "servers": Field("list", None, item="str", check=_servers_check, help='["host:port", ...], tried in turn'),
    "max_message": Field("size", "128KiB", min=4096, max=256 * 1024 * 1024),
    "replay_topic": Field("str", "edgeos/{gateway}/replay", check=_template_check("gateway")),
    "replay_window": Field("duration", "24h", min=0, max=366 * 86_400_000_000_000),
}

DEVICE_FIELDS: dict[str, Field] = {
    "name": Field("str", help="unique device name", check=_name_check("device")),
    "protocol": Field("str", help="an installed protocol adapter"),
    "enabled": Field("bool", True),
    "poll_interval": Field("duration", "1s", min=1_000_000, max=86_400_000_000_000),
    "reconnect_min": Field("duration", "500ms", min=1_000_000),
    "reconnect_max": Field("duration", "30s", min=1_000_000),
    "tags": Field("any", None),
    "tags_csv": Field("str", None, help="CSV file of tags, relative to the config file"),
}

TAG_FIELDS: dict[str, Field] = {
    "name": Field("str", help="tag name, unique within the device", check=_name_check("tag")),
    "unit": Field("str", ""),
    "description": Field("str", ""),
    "poll_interval": Field("duration", None, min=1_000_000, max=86_400_000_000_000),
    "writable": Field("bool", False),
    "filters": Field("any", None),
}

HTTP_FIELDS: dict[str, Field] = {
    "enabled": Field("bool", True, help="the local HTTP server: /metrics, /healthz"),
    "address": Field("str", "127.0.0.1", help="bind address; loopback unless you mean to expose it"),
    "port": Field("int", 9180, min=0, max=65535),
    "tls_cert": Field("str", None, help="PEM certificate chain, relative to the config file"),
    "tls_key": Field("str", None, help="PEM private key, relative to the config file"),
    "max_connections": Field("int", 32, min=1, max=10_000),
    "metrics_per_tag": Field("bool", False, help="one series per tag in /metrics (off: 10,000 tags, 10,000 series)"),
}

HEALTH_FIELDS: dict[str, Field] = {
    "device_down": Field("duration", "60s", min=1_000_000_000, help="a device down longer is unhealthy"),
    "sync_lag": Field("duration", "5m", min=1_000_000_000, help="an upstream lag over this is unhealthy"),
    "devices": Field("any", None, help="per-device device_down: a table of device name = duration"),
}

TOP_KEYS = {"gateway", "store", "devices", "upstream", "http", "health", "console"}


def load_config(path: str | os.PathLike[str], *, check_environment: bool = True) -> Config:
    """Parse and check `path`; raise ConfigError listing every problem found.

    `check_environment=False` is for commands that only read the store (`status`, `tags`,
    `query`, `export`): a secret's environment variable is set in the service's environment,
    not in the shell of the engineer who reads the store, and none of them needs it."""
    path = Path(path)
    problems = Problems(str(path))
    return parse_config(_read_toml(path, problems), path, problems, check_environment=check_environment)


def _read_toml(path: Path, problems: Problems) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.add("", "file not found (`edgeos init` writes a commented one to start from)")
    except (OSError, UnicodeDecodeError) as e:
        problems.add("", f"cannot read: {e}")
    except tomllib.TOMLDecodeError as e:
        problems.add("", f"invalid TOML: {e}", line=_toml_error_line(str(e)))
    raise ConfigError(problems.items)


def load_gateway(path: str | os.PathLike[str]) -> GatewayConfig:
    """The [gateway] table of `path` alone, checked; raise ConfigError for its problems only.

    For commands that read a store while the rest of the config may be mid-edit: the daemon
    runs on the config it loaded, and `edgeos status` must still find its data directory."""
    path = Path(path)
    problems = Problems(str(path))
    gw = _gateway_table(_read_toml(path, problems), problems)
    problems.raise_if_any()
    return _gateway(gw, path.parent)


def _gateway_table(raw: Mapping[str, Any], problems: Problems) -> dict[str, Any]:
    if "gateway" not in raw:
        problems.add("gateway", "missing required table [gateway] (id, data_dir)")
    return parse_table(raw.get("gateway", {}), GATEWAY_FIELDS, "gateway", problems)


def _gateway(gw: Mapping[str, Any], base: Path) -> GatewayConfig:
    data_dir = Path(gw["data_dir"])
    if not data_dir.is_absolute():
        data_dir = (base / data_dir).resolve()
    return GatewayConfig(
        id=gw["id"],
        data_dir=data_dir,
        run_dir=None if gw["run_dir"] is None else (base / gw["run_dir"]).resolve(),
        log_level=gw["log_level"],
        shutdown_timeout_ns=gw["shutdown_timeout"],
        queue_batches=gw["queue_batches"],
    )


def _toml_error_line(msg: str) -> int | None:
    m = re.search(r"line (\d+)", msg)
    return int(m.group(1)) if m else None


def parse_config(
    raw: Mapping[str, Any], path: Path, problems: Problems | None = None, *, check_environment: bool = True
) -> Config:
    """Check an already-parsed TOML document (for OEMs who build configs in code)."""
    problems = problems or Problems(str(path))
    base = path.parent
    for key in raw:
        if key not in TOP_KEYS:
            problems.add(key, unknown_key_message(key, dict.fromkeys(TOP_KEYS)))
    gw = _gateway_table(raw, problems)
    st = parse_table(raw.get("store", {}), STORE_FIELDS, "store", problems)
    up = parse_table(raw.get("upstream", {}), UPSTREAM_FIELDS, "upstream", problems)
    _register_secrets(up, UPSTREAM_FIELDS, base)
    if up.get("enabled") and not up.get("host"):
        problems.add("upstream.host", "missing: required when upstream.enabled = true")
    raw_up = raw.get("upstream")
    if isinstance(raw_up, dict) and "host" in raw_up and up.get("servers"):
        # Not refused: a config that gained `servers` beside its old `host` kept working.
        logging.getLogger("edgeos.config").warning(
            "%s: upstream.host %r is not used: upstream.servers lists the brokers", problems.file, raw_up["host"]
        )
    if up.get("enabled"):
        for key in ("ca_file", "cert_file", "key_file", "password_file"):
            if up.get(key) and not (base / up[key]).exists():
                problems.add(f"upstream.{key}", f"file {up[key]!r} not found (relative to {base})")
        if bool(up.get("cert_file")) != bool(up.get("key_file")):
            problems.add("upstream.cert_file", "cert_file and key_file must be given together")
        if check_environment and up.get("password_env") and up["password_env"] not in os.environ:
            problems.add("upstream.password_env", f"environment variable {up['password_env']!r} is not set")
    check_secret_files(up, base, "upstream", problems)

    ht = parse_table(raw.get("http", {}), HTTP_FIELDS, "http", problems)
    check_secret_files(ht, base, "http", problems)
    if isinstance(raw.get("console"), dict):
        check_secret_files(raw["console"], base, "console", problems)
    console = parse_console(raw.get("console", {}), base, problems, http=ht)
    for key in ("tls_cert", "tls_key"):
        if ht.get(key) and not (base / ht[key]).exists():
            problems.add(f"http.{key}", f"file {ht[key]!r} not found (relative to {base})")
    if bool(ht.get("tls_cert")) != bool(ht.get("tls_key")):
        problems.add("http.tls_cert", "tls_cert and tls_key must be given together")
    he = parse_table(raw.get("health", {}), HEALTH_FIELDS, "health", problems)
    down_by_name = _health_devices(he.get("devices"), problems)

    raw_devices = raw.get("devices", [])
    devices: list[DeviceConfig] = []
    if not isinstance(raw_devices, list):
        problems.add("devices", "found a table, expected an array of tables: write [[devices]]")
        raw_devices = []
    seen_devices: dict[str, int] = {}
    next_id = 0
    placed: list[tuple[int, DeviceConfig]] = []
    for i, rd in enumerate(raw_devices):
        dpath = f"devices[{i}]"
        dev = _parse_device(rd, dpath, base, problems, next_id)
        if dev is None:
            continue
        placed.append((i, dev))
        if dev.name in seen_devices:
            problems.add(
                f"{dpath}.name", f"duplicate device name {dev.name!r} (also devices[{seen_devices[dev.name]}])"
            )
        seen_devices[dev.name] = i
        next_id += len(dev.tags)
        devices.append(dev)
    if not raw_devices:
        problems.add("devices", "no devices configured: add at least one [[devices]] table")
    _check_shared_ports(placed, problems)
    for name in down_by_name:
        if name not in seen_devices:
            problems.add(f"health.devices.{name}", unknown_key_message(name, seen_devices))

    problems.raise_if_any()
    return Config(
        source=path,
        gateway=_gateway(gw, base),
        store=StoreConfig(
            commit_samples=st["commit_samples"],
            commit_interval_ns=st["commit_interval"],
            fsync_interval_ns=st["fsync_interval"],
            retention_ns=st["retention"],
            max_size=st["max_size"],
            memory_buffer=st["memory_buffer"],
            time_resolution_ns=st["time_resolution"],
            compact_after_ns=st["compact_after"],
            unit_version=st["unit_version"],
        ),
        devices=tuple(devices),
        upstream=UpstreamConfig(enabled=up.get("enabled", False), options=up),
        http=HttpConfig(
            enabled=ht["enabled"],
            address=ht["address"],
            port=ht["port"],
            tls_cert=(base / ht["tls_cert"]).resolve() if ht["tls_cert"] else None,
            tls_key=(base / ht["tls_key"]).resolve() if ht["tls_key"] else None,
            max_connections=ht["max_connections"],
            metrics_per_tag=ht["metrics_per_tag"],
        ),
        health=HealthConfig(
            device_down_ns=he["device_down"], device_down_by_name=down_by_name, sync_lag_ns=he["sync_lag"]
        ),
        console=console,
    )


def _register_secrets(values: Mapping[str, Any], fields: Mapping[str, Field], base: Path) -> None:
    """Values of fields marked secret (or the files and variables they name) are masked in every
    log line and error text from now on (edgeos.logs.redact)."""
    from edgeos.logs import register_secret_ref

    for key, f in fields.items():
        if f.secret:
            register_secret_ref(f.secret, values.get(key), base)


def _health_devices(raw: Any, problems: Problems) -> dict[str, int]:
    """[health.devices]: device name = how long it may be down (checked against devices below)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.add("health.devices", "expected a table of device name = duration")
        return {}
    out = {}
    for name, value in raw.items():
        ns = Field("duration", min=1_000_000_000).parse(value, f"health.devices.{name}", problems)
        if isinstance(ns, int):
            out[name] = ns
    return out


LINE_SETTINGS = ("baudrate", "parity", "bytesize", "stopbits")


def _serial_port(dev: DeviceConfig) -> tuple[str, str, tuple | None] | None:
    """(key, port, line settings) of a device that opens a serial port: Modbus RTU devices share
    their line (one master polls each unit in turn) and give its settings; any other reader
    owns its port alone (None)."""
    o = dev.options
    if dev.protocol == "modbus" and o.get("transport") == "rtu" and o.get("serial_port"):
        return "serial_port", o["serial_port"], tuple(o.get(k) for k in LINE_SETTINGS)
    if dev.protocol == "serial" and o.get("port"):
        return "port", o["port"], None
    return None


def _check_shared_ports(devices: list[tuple[int, DeviceConfig]], problems: Problems) -> None:
    """Two devices on one port would each read half of the other's bytes: refused at load,
    except Modbus RTU devices among themselves, with the same line settings (the line has one
    baud rate). Symlinks (/dev/serial/by-id/...) are resolved."""
    owner: dict[str, tuple[int, DeviceConfig, tuple | None]] = {}
    for i, dev in devices:
        found = _serial_port(dev)
        if found is None or not dev.enabled:
            continue
        key, port, line = found
        real = port if "://" in port else os.path.realpath(port)
        first = owner.get(real)
        if first is None:
            owner[real] = (i, dev, line)
        elif line is None or first[2] is None:
            problems.add(
                f"devices[{i}].{key}",
                f'"{port}" is also the port of device "{first[1].name}" (devices[{first[0]}]): two devices may '
                "not share one port (only Modbus RTU devices share a line among themselves)",
            )
        elif line != first[2]:
            theirs = ", ".join(f"{k} {v}" for k, v in zip(LINE_SETTINGS, first[2], strict=True))
            ours = ", ".join(f"{k} {v}" for k, v in zip(LINE_SETTINGS, line, strict=True))
            problems.add(
                f"devices[{i}].{key}",
                f'"{port}" is also the line of device "{first[1].name}" (devices[{first[0]}], {theirs}): '
                f"devices on one serial line must use the same line settings (found {ours})",
            )


def _protocol(name: Any, path: str, problems: Problems) -> Any:
    if not isinstance(name, str):
        return None
    try:
        return plugins.load(plugins.PROTOCOLS, name)
    except KeyError:
        known = ", ".join(plugins.names(plugins.PROTOCOLS)) or "(none installed)"
        problems.add(path, f"found {name!r}, expected an installed protocol: {known}")
    except PluginError as e:
        problems.add(path, str(e))
    return None


class TagOptions(Mapping[str, Any]):
    """A tag's adapter options, read-only: values in a tuple, the key index shared by the tags
    with the same keys (144 bytes a tag where a dict of 7 keys takes 272)."""

    __slots__ = ("_index", "_values")

    def __init__(self, index: dict[str, int], values: tuple[Any, ...]) -> None:
        self._index = index
        self._values = values

    def __getitem__(self, key: str) -> Any:
        return self._values[self._index[key]]

    def __iter__(self) -> Any:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def get(self, key: str, default: Any = None) -> Any:
        i = self._index.get(key)
        return default if i is None else self._values[i]

    def __repr__(self) -> str:
        return repr(dict(self))


class _Shared:
    """One object for equal values across a device's tags: its 1,000 rows read "float32",
    "ABCD" and `deadband(abs=2)` as 1,000 equal strings and chains each, kept for the daemon's
    life (about 2 MB per 10,000 tags; docs/benchmarks.md, "Footprint"). Filter specs are shared
    as whole objects (they are frozen; the pipeline reads their params and keeps its own)."""

    def __init__(self) -> None:
        self._seen: dict[Any, Any] = {}
        self._keys: dict[tuple[str, ...], dict[str, int]] = {}

    def options(self, opts: dict[str, Any]) -> Mapping[str, Any]:
        """A tag's options as `TagOptions`: its keys' index shared by the device's tags."""
        keys = tuple(opts)
        index = self._keys.get(keys)
        if index is None:
            index = self._keys[keys] = {k: i for i, k in enumerate(keys)}
        return TagOptions(index, tuple(self.value(v) for v in opts.values()))

    def value(self, v: Any) -> Any:
        if type(v) is str:
            return self._seen.setdefault(v, v)
        return v

    def filters(self, specs: list[FilterSpec]) -> tuple[FilterSpec, ...]:
        out = []
        for f in specs:
            try:
                key = (FilterSpec, f.name, tuple(f.params.items()))
                out.append(self._seen.setdefault(key, f))
            except TypeError:  # an unhashable param (a list): kept as it is
                out.append(f)
        # By identity: FilterSpec's hash would hash its params dict. Each one is alive in a tag.
        return self._seen.setdefault((tuple, *map(id, out)), tuple(out))


def _parse_device(rd: Any, dpath: str, base: Path, problems: Problems, first_id: int) -> DeviceConfig | None:
    if not isinstance(rd, dict):
        problems.add(dpath, "expected a table ([[devices]])")
        return None
    plugin = _protocol(rd.get("protocol"), f"{dpath}.protocol", problems)
    dev_fields = dict(DEVICE_FIELDS)
    extra = dict(plugin.device_fields) if plugin else {}
    if plugin is None:
        # Without the plugin its keys cannot be checked; don't report them as unknown too.
        rd = {k: v for k, v in rd.items() if k in DEVICE_FIELDS}
    owner = functools.partial(plugins.label, plugins.PROTOCOLS, rd.get("protocol"))
    d = parse_table(rd, dev_fields, dpath, problems, extra=extra, owner=owner)
    for key, f in extra.items():  # a plugin's file names: relative to the config, not to where it runs
        if f.kind == "path" and isinstance(d.get(key), str) and d[key]:
            d[key] = str(base / d[key])
    _register_secrets(d, extra, base)
    check_secret_files(d, base, dpath, problems)
    for key, f in DEVICE_FIELDS.items():
        if key not in d:  # present but invalid: reported; carry on with the default
            if f.required:
                return None
            d[key] = f.parse(f.default, "", Problems(problems.file)) if f.default is not None else None
    if d["reconnect_min"] > d["reconnect_max"]:
        problems.add(f"{dpath}.reconnect_min", "must not exceed reconnect_max")

    tag_fields = dict(TAG_FIELDS)
    if plugin:
        tag_fields.update(plugin.tag_fields)
    # (file, index path, path naming device and tag, line, raw); CSV rows have a line, no path.
    sources: list[tuple[str, str, str, int | None, Any]] = []
    raw_tags = d["tags"]
    if raw_tags is not None:
        if not isinstance(raw_tags, list):
            problems.add(f"{dpath}.tags", "expected an array of tables: write [[devices.tags]]")
        else:
            dnamed = _named(dpath, rd.get("name"))
            for j, rt in enumerate(raw_tags):
                tname = rt.get("name") if isinstance(rt, dict) else None
                sources.append((problems.file, f"{dpath}.tags[{j}]", _named(f"{dnamed}.tags[{j}]", tname), None, rt))
    if d["tags_csv"]:
        csv_path = base / d["tags_csv"]
        before = len(problems.items)
        rows = read_tags_csv(csv_path, tag_fields, problems)
        for p in problems.items[before:]:
            if p.path == "tags_csv":
                problems.items[problems.items.index(p)] = type(p)(problems.file, f"{dpath}.tags_csv", p.message)
        for line, rt in rows:
            sources.append((str(csv_path), "", "", line, rt))
    if not sources and not problems:
        problems.add(f"{dpath}.tags", "no tags: add [[devices.tags]] tables or tags_csv")

    tags: list[TagConfig] = []
    shared = _Shared()
    places: list[tuple[str, str, int | None]] = []  # (file, path, line) of each tag in `tags`
    names: dict[str, str] = {}
    for file, tpath, lpath, line, rt in sources:
        sub = Problems(file)
        if plugin is None and isinstance(rt, dict):
            rt = {k: v for k, v in rt.items() if k in TAG_FIELDS}
        t = parse_table(rt, tag_fields, lpath, sub, extra=None, owner=owner)
        opts = {k: v for k, v in t.items() if k not in TAG_FIELDS}
        # tag_kind is promised checked options; if the tag's own keys are wrong its kind is unknown.
        kind = None if sub else (_tag_kind(plugin, d["protocol"], opts, lpath, sub) if plugin else ValueKind.NUMBER)
        fpath = f"{lpath}.filters" if lpath else "filters"
        filters = _parse_filters(t.get("filters"), fpath, sub, tag=t.get("name"), kind=kind)
        for p in sub.items:
            path = p.path if tpath else p.path.lstrip(".")
            problems.add(path, p.message, line=line if p.line is None else p.line, file=p.file)
        # A duplicate name is reported even beside the tag's other problems: all in one pass.
        name = t.get("name")
        if isinstance(name, str):
            if name in names:
                problems.add(
                    f"{lpath}.name" if lpath else "name",
                    f"duplicate tag name {name!r} in device {d['name']!r} (first at {names[name]})",
                    line=line,
                    file=file,
                )
                continue
            names[name] = f"{file}:{line}" if line else tpath
        if sub or "name" not in t or kind is None:
            continue
        meta = TagMeta(
            id=first_id + len(tags),
            device=d["name"],
            name=t["name"],
            kind=kind,
            unit=shared.value(t["unit"]),
            description=shared.value(t["description"]),
            writable=t["writable"],
        )
        tags.append(
            TagConfig(
                meta=meta,
                poll_interval_ns=t["poll_interval"] or d["poll_interval"],
                filters=shared.filters(filters),
                options=shared.options(opts),
            )
        )
        places.append((file, lpath, line))
    dev = DeviceConfig(
        name=d["name"],
        protocol=d["protocol"],
        options={k: v for k, v in d.items() if k not in DEVICE_FIELDS},
        tags=tuple(tags),
        poll_interval_ns=d["poll_interval"],
        reconnect_min_ns=d["reconnect_min"],
        reconnect_max_ns=d["reconnect_max"],
        enabled=d["enabled"],
    )
    if plugin is not None and tags:
        before = len(problems.items)
        try:
            plugin.validate(dev, dpath, problems)
        except Exception as e:  # third-party code: its bug is this device's problem, said once
            problems.add(f"{dpath}.protocol", _plugin_bug(d["protocol"], "validate", e))
        _relocate(problems, before, dpath, places)
    return dev


def _plugin_bug(protocol: str, hook: str, e: Exception) -> str:
    return (
        f"{plugins.label(plugins.PROTOCOLS, protocol)}: its {hook}() failed: "
        f"{type(e).__name__}: {e} (a bug in the plugin: {hook} reports problems, it does not raise)"
    )


def _tag_kind(plugin: Any, protocol: str, opts: dict[str, Any], path: str, problems: Problems) -> ValueKind | None:
    try:
        return plugin.tag_kind(opts)
    except Exception as e:
        problems.add(path, _plugin_bug(protocol, "tag_kind", e))
        return None


def _relocate(problems: Problems, start: int, dpath: str, places: list[tuple[str, str, int | None]]) -> None:
    """Point a plugin's `tags[i]` problems at the tag's own place, naming it.

    The plugin indexes `DeviceConfig.tags`, which skips tags that failed and appends CSV rows,
    so its index need not be the config's.
    """
    prefix = f"{dpath}.tags["
    for k in range(start, len(problems.items)):
        p = problems.items[k]
        if not p.path.startswith(prefix):
            continue
        index, closed, rest = p.path[len(prefix) :].partition("]")
        if not (closed and index.isdigit() and int(index) < len(places) and rest[:1] in ("", ".")):
            continue
        file, path, line = places[int(index)]
        problems.items[k] = Problem(file, path + rest if path else rest.lstrip("."), p.message, line)


def _parse_filters(
    raw: Any, path: str, problems: Problems, *, tag: str | None = None, kind: ValueKind | None = None
) -> list[FilterSpec]:
    """The tag's chain; `kind` None (unknown) skips the text check rather than guess."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.add(path, 'expected a list of tables such as [{type = "deadband", abs = 0.5}]')
        return []
    out = []
    for k, spec in enumerate(raw):
        fpath = f"{path}[{k}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
            problems.add(fpath, 'expected a table with a "type" key naming the filter')
            continue
        name = spec["type"]
        try:
            plugin = plugins.load(plugins.FILTERS, name)
        except KeyError:
            known = ", ".join(plugins.names(plugins.FILTERS)) or "(none installed)"
            problems.add(f"{fpath}.type", f"found {name!r}, expected one of the installed filters: {known}")
            continue
        except PluginError as e:
            problems.add(f"{fpath}.type", str(e))
            continue
        params = parse_table(
            {k: v for k, v in spec.items() if k != "type"},
            plugin.fields,
            fpath,
            problems,
            owner=functools.partial(plugins.label, plugins.FILTERS, name),
        )
        check = getattr(plugin, "validate", None)
        if check is not None and params:
            msg = check(params)
            if msg:
                problems.add(fpath, msg)
        # String tags carry NaN in the value column: a numeric filter would compare NaNs and drop text.
        if kind is ValueKind.STRING and not getattr(plugin, "accepts_text", False):
            problems.add(f"{fpath}.type", f"filter {name!r} needs a numeric tag; tag {tag!r} is a string")
            continue
        out.append(FilterSpec(name, params))
    return out
