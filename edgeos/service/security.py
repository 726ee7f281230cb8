"""`edgeos check --security`: what a config exposes, read from the config and the files it names.

Per connection (the upstream broker, each device, the local listeners): the transport security
(TLS, OPC UA security mode and policy, or none because the protocol has none), how the gateway
authenticates, and the days left on every certificate it names; then the systemd unit's
exposure score (`systemd-analyze security --offline=true` on the unit `edgeos service install`
writes). Nothing here connects to anything: it reports what the config asks for.

Certificates are read with `cryptography` when it is installed (asyncua depends on it), else
with the `openssl` command; a modbus-only gateway needs neither asyncua nor cryptography.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeos.config.model import Config

SOON_DAYS = 30  # a certificate closer than this to its end is warned about
MAX_EXPOSURE = 2.0  # the shipped unit scores at most this (tests/test_service_unit.py)


@dataclass
class Item:
    """One connection or listener: what it is, its security, its certificates, its warnings."""

    kind: str  # upstream, device, listener, unit
    name: str
    where: str
    security: str
    auth: str = ""
    certificates: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def certificate_end(path: Path) -> dt.datetime:
    """The earliest notAfter of the certificates in a PEM (bundle) or DER file, UTC.

    Raises OSError when unreadable and ValueError when no certificate is found."""
    data = Path(path).read_bytes()
    try:
        from cryptography import x509
    except ImportError:
        return _openssl_end(path)
    if b"-----BEGIN CERTIFICATE-----" in data:
        certs = x509.load_pem_x509_certificates(data)
    else:
        certs = [x509.load_der_x509_certificate(data)]
    return min(c.not_valid_after_utc for c in certs)


def _openssl_end(path: Path) -> dt.datetime:
    """The first certificate's notAfter, read by the openssl command (no cryptography here)."""
    if shutil.which("openssl") is None:
        raise ValueError("neither the cryptography package nor the openssl command is installed")
    for form in ("PEM", "DER"):
        done = subprocess.run(
            ["openssl", "x509", "-noout", "-enddate", "-inform", form, "-in", str(path)],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if done.returncode == 0 and "notAfter=" in done.stdout:
            text = done.stdout.split("notAfter=", 1)[1].strip()
            return dt.datetime.strptime(text.replace(" GMT", ""), "%b %d %H:%M:%S %Y").replace(tzinfo=dt.UTC)
    raise ValueError("not a certificate")


def _certificate(item: Item, label: str, path: Path, now: dt.datetime) -> None:
    try:
        end = certificate_end(path)
    except (OSError, ValueError) as e:
        item.certificates.append(f"{label} {path}: cannot read ({e})")
        item.warnings.append(f"{label} {path} cannot be read")
        return
    days = int((end - now).total_seconds() // 86400)
    if end <= now:
        item.certificates.append(f"{label} {path}: EXPIRED {-days} days ago ({end:%Y-%m-%d})")
        item.warnings.append(f"{label} {path} has expired")
    else:
        item.certificates.append(f"{label} {path}: {days} days left (until {end:%Y-%m-%d})")
        if days < SOON_DAYS:
            item.warnings.append(f"{label} {path} expires in {days} days")


def _upstream(cfg: Config, now: dt.datetime) -> Item:
    o = cfg.upstream.options
    base = cfg.source.parent
    from edgeos.sync.mqtt import servers

    brokers = servers(o)
    where = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in brokers)
    if o.get("password_file"):
        auth = f"user {o.get('username')!r}, password from file"
    elif o.get("password_env"):
        auth = f"user {o.get('username')!r}, password from ${o['password_env']}"
    elif o.get("username"):
        auth = f"user {o['username']!r}, no password"
    else:
        auth = "anonymous"
    if o.get("cert_file"):
        auth += ", client certificate"
    item = Item("upstream", "upstream", f"mqtt {where}", "", auth)
    if not o.get("tls"):
        item.security = "no TLS (cleartext)"
        if not all(_loopback(h) for h, _ in brokers):
            item.warnings.append("upstream: no TLS to a broker that is not on this machine")
    else:
        verify = "host name NOT verified (tls_insecure)" if o.get("tls_insecure") else "host name verified"
        ca = "CA from ca_file" if o.get("ca_file") else "system CAs"
        item.security = f"TLS, {ca}, {verify}"
        if o.get("tls_insecure"):
            item.warnings.append("upstream: tls_insecure accepts any broker's certificate for this host")
        for key in ("ca_file", "cert_file"):
            if o.get(key):
                _certificate(item, key, base / o[key], now)
    return item


def _device(d: Any, now: dt.datetime) -> Item:
    o: Mapping[str, Any] = d.options
    name = f"device {d.name}"
    if d.protocol == "opcua":
        mode = o.get("security_mode") or "None"
        policy = o.get("security_policy") or "None"
        sec = "OPC UA security None (no signing, no encryption)" if mode == "None" else f"OPC UA {mode} {policy}"
        if o.get("username"):
            auth = f"user {o['username']!r}"
        elif o.get("user_certificate"):
            auth = "X.509 user certificate"
        else:
            auth = "anonymous"
        item = Item("device", name, f"opcua {o.get('endpoint')}", sec, auth)
        host = re.sub(r"^opc\.tcp://", "", str(o.get("endpoint") or "")).split("/")[0].rsplit(":", 1)[0]
        if mode == "None" and not _loopback(host):
            item.warnings.append(f"{name}: OPC UA security mode None to a server that is not on this machine")
        for key in ("certificate", "user_certificate"):
            if o.get(key):
                _certificate(item, key, Path(o[key]), now)
        return item
    if d.protocol == "modbus":
        transport = o.get("transport") or "tcp"
        if transport == "rtu":
            return Item("device", name, f"modbus rtu {o.get('serial_port')}", "serial line (no network)", "none")
        where = f"modbus {transport} {o.get('host')}:{o.get('port') or 502}"
        return Item("device", name, where, "none: Modbus has no security (isolate its network)", "none")
    if d.protocol == "serial":
        return Item("device", name, f"serial {o.get('port')}", "serial line (no network)", "none")
    if d.protocol == "simulated":
        return Item("device", name, "simulated", "in process (no connection)", "none")
    return Item("device", name, d.protocol, "unknown (a third-party adapter: see its README)", "unknown")


def _listeners(cfg: Config, now: dt.datetime) -> list[Item]:
    out = []
    h, c = cfg.http, cfg.console
    if h.enabled:
        tls = h.tls_cert is not None
        if c.enabled and c.password_file is not None:
            auth = "console: password; /metrics and /healthz public"
        elif c.enabled and c.allow_anonymous:
            auth = "console: anonymous (allow_anonymous); /metrics and /healthz public"
        elif c.enabled:
            auth = "console: none (loopback only); /metrics and /healthz public"
        else:
            auth = "console off; /metrics and /healthz public"
        item = Item("listener", "http", f"{h.address}:{h.port}", "TLS" if tls else "no TLS (cleartext)", auth)
        if not _loopback(h.address):
            item.warnings.append(f"http listens on {h.address}, not only on loopback")
            if not tls:
                item.warnings.append("http: not on loopback and without TLS (passwords and data cross in cleartext)")
        if tls:
            _certificate(item, "tls_cert", h.tls_cert, now)
        out.append(item)
    else:
        out.append(Item("listener", "http", "off", "-", "-"))
    sock = cfg.gateway.data_dir / "control.sock"
    out.append(Item("listener", "control", f"unix {sock}", "local only", "file mode 0600 (the daemon's user)"))
    return out


def unit_exposure(
    analyze: str | None = None, unit_text: str | None = None, run: Callable[..., Any] = subprocess.run
) -> Item:
    """The shipped unit's `systemd-analyze security --offline=true` score, or why there is none."""
    analyze = analyze if analyze is not None else shutil.which("systemd-analyze")
    if not analyze:
        return Item("unit", "systemd unit", "edgeos.service", "not measured: systemd-analyze is not installed here")
    if unit_text is None:
        from edgeos.service import install

        unit_text = install.render_unit(install.executable(), install.DEFAULT_USER)
    with tempfile.TemporaryDirectory() as d:
        unit = Path(d) / "edgeos.service"
        unit.write_text(unit_text)
        try:
            done = run(
                [analyze, "security", "--offline=true", "--no-pager", str(unit)],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return Item("unit", "systemd unit", "edgeos.service", f"not measured: {e}")
    m = re.search(r"Overall exposure level for edgeos\.service: (\d+(?:\.\d+)?) (\S+)", done.stdout)
    if not m:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return Item("unit", "systemd unit", "edgeos.service", f"not measured: systemd-analyze said {tail[0]!r}")
    score = float(m.group(1))
    where = "edgeos.service (as `service install` writes it)"
    item = Item("unit", "systemd unit", where, f"exposure {score:.1f} {m.group(2)}")
    if score > MAX_EXPOSURE:
        item.warnings.append(f"systemd unit exposure {score:.1f} is above {MAX_EXPOSURE}")
    return item


def items(cfg: Config, *, now: dt.datetime | None = None, analyze: str | None = None) -> list[Item]:
    """Everything the report lists, in order: upstream, devices, listeners, the unit."""
    now = now or dt.datetime.now(dt.UTC)
    out = []
    if cfg.upstream.enabled:
        out.append(_upstream(cfg, now))
    else:
        out.append(Item("upstream", "upstream", "disabled", "-", "-"))
    out += [_device(d, now) for d in cfg.devices]
    out += _listeners(cfg, now)
    out.append(unit_exposure(analyze))
    return out


def report(cfg: Config, *, now: dt.datetime | None = None, analyze: str | None = None) -> list[str]:
    """The lines `edgeos check --security` prints."""
    found = items(cfg, now=now, analyze=analyze)
    lines = ["", "security"]
    for it in found:
        auth = f"; auth: {it.auth}" if it.auth else ""
        lines.append(f"  {it.name:<20} {it.where}")
        lines.append(f"  {'':<20} {it.security}{auth}")
        lines += [f"  {'':<20} {c}" for c in it.certificates]
    warnings = [w for it in found for w in it.warnings]
    lines.append(f"security warnings: {len(warnings)}")
    lines += [f"  WARNING {w}" for w in warnings]
    return lines
