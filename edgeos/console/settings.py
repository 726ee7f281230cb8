"""The `[console]` table: whether the console is served and who may read it, checked at load.

The console is served by the daemon's one HTTP server (`[http]`: address, port, TLS). On any
address other than loopback it is readable by the plant network, so it then needs a password
file or an explicit `allow_anonymous = true`; anything else is refused at load.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeos.config.schema import Field, Problems, parse_table

CONSOLE_FIELDS: dict[str, Field] = {
    "enabled": Field("bool", True, help="the read-only web console on the [http] server (docs/console.md)"),
    "password_file": Field("str", None, help="file written by `edgeos console passwd`"),
    "allow_anonymous": Field("bool", False, help="serve a non-loopback http.address without a password"),
}


@dataclass(frozen=True)
class ConsoleSettings:
    enabled: bool = True
    password_file: Path | None = None
    allow_anonymous: bool = False


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def url(address: str, port: int, tls: bool) -> str:
    """Where a browser on this machine finds the console."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(address, address)
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}/"


def parse_console(raw: Any, base: Path, problems: Problems, *, http: Mapping[str, Any]) -> ConsoleSettings:
    """Check `[console]` against the parsed `[http]` table; problems go into `problems`."""
    c = parse_table(raw if raw is not None else {}, CONSOLE_FIELDS, "console", problems)
    s = ConsoleSettings(
        enabled=c.get("enabled", True),
        password_file=(base / c["password_file"]).resolve() if c.get("password_file") else None,
        allow_anonymous=c.get("allow_anonymous", False),
    )
    if not s.enabled or not http.get("enabled", True):
        return s
    address = http.get("address", "127.0.0.1")
    if not is_loopback(address) and s.password_file is None and not s.allow_anonymous:
        problems.add(
            "console.password_file",
            f'http.address "{address}" is not loopback: set console.password_file (see `edgeos console passwd`), '
            "or console.allow_anonymous = true to let anyone on that network read the console, "
            "or console.enabled = false",
        )
    if s.password_file is not None and not s.password_file.is_file():
        problems.add("console.password_file", f"file {c['password_file']!r} not found (relative to {base})")
    return s
