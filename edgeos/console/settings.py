"""The `[console]` table: where the console listens and who may read it, checked at load.

A console on any address other than loopback is readable by the plant network, so it needs a
password file or an explicit `allow_anonymous = true`; anything else is refused at load.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeos.config.schema import Field, Problems, parse_table

DEFAULT_PORT = 9120

CONSOLE_FIELDS: dict[str, Field] = {
    "enabled": Field("bool", True, help="the read-only web console (docs/console.md)"),
    "address": Field("str", "127.0.0.1", help="address to bind; anything but loopback needs auth"),
    "port": Field("int", DEFAULT_PORT, min=0, max=65535, help="0 picks a free port (tests)"),
    "password_file": Field("str", None, help="file written by `edgeos console passwd`"),
    "allow_anonymous": Field("bool", False, help="serve a non-loopback address without a password"),
    "cert_file": Field("str", None, help="TLS certificate (PEM), with key_file"),
    "key_file": Field("str", None, help="TLS private key (PEM)"),
}


@dataclass(frozen=True)
class ConsoleSettings:
    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    password_file: Path | None = None
    allow_anonymous: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def tls(self) -> bool:
        return self.cert_file is not None

    def url(self, port: int | None = None) -> str:
        host = self.address
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{self.port if port is None else port}/"


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def parse_console(raw: Any, base: Path, problems: Problems) -> ConsoleSettings:
    """Check `[console]`; every problem goes into `problems` (reported with the rest)."""
    c = parse_table(raw if raw is not None else {}, CONSOLE_FIELDS, "console", problems)
    if not c:
        return ConsoleSettings()

    def path(key: str) -> Path | None:
        v = c.get(key)
        return None if not v else (base / v).resolve()

    s = ConsoleSettings(
        enabled=c.get("enabled", True),
        address=c.get("address", "127.0.0.1"),
        port=c.get("port", DEFAULT_PORT),
        password_file=path("password_file"),
        allow_anonymous=c.get("allow_anonymous", False),
        cert_file=path("cert_file"),
        key_file=path("key_file"),
    )
    if not s.enabled:
        return s
    if not is_loopback(s.address) and s.password_file is None and not s.allow_anonymous:
        problems.add(
            "console.address",
            f'"{s.address}" is not loopback: set console.password_file (see `edgeos console passwd`) '
            "or, to let anyone on the network read it, console.allow_anonymous = true",
        )
    if s.password_file is not None and not s.password_file.is_file():
        problems.add("console.password_file", f"file {c['password_file']!r} not found (relative to {base})")
    if (s.cert_file is None) != (s.key_file is None):
        problems.add("console.cert_file", "cert_file and key_file must be given together")
    for key in ("cert_file", "key_file"):
        p = getattr(s, key)
        if p is not None and not p.is_file():
            problems.add(f"console.{key}", f"file {c[key]!r} not found (relative to {base})")
    return s
