"""Durations ("250ms", "5m"), sizes ("512MiB") and broker addresses ("host:port", "[v6]:port")
as plant engineers write them."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h|d)\s*$")
_DURATION_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
    "d": 86_400_000_000_000,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|kB|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_BYTES = {
    None: 1,
    "B": 1,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}


def _q(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def parse_duration_ns(text: str) -> int:
    """'250ms' -> 250_000_000. Raises ValueError with the accepted forms."""
    m = _DURATION.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f'found {_q(text)}, expected a duration such as "250ms", "1s", "5m", "1h", "7d"')
    return round(float(m.group(1)) * _DURATION_NS[m.group(2)])


def parse_size(text: str | int) -> int:
    """'512MiB' -> 536870912; a bare integer is bytes."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    m = _SIZE.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f'found {_q(text)}, expected a size such as "512MiB", "2GiB", "100MB"')
    return round(float(m.group(1)) * _SIZE_BYTES[m.group(2)])


def format_duration_ns(ns: int) -> str:
    """Inverse of parse_duration_ns for display, choosing the largest exact unit."""
    for unit in ("d", "h", "m", "s", "ms", "us"):
        if ns and ns % _DURATION_NS[unit] == 0:
            return f"{ns // _DURATION_NS[unit]}{unit}"
    return f"{ns}ns"


def format_size(n: int) -> str:
    """A size limit as written in configs: the largest binary unit it is a whole number of."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if n and n % _SIZE_BYTES[unit] == 0:
            return f"{n // _SIZE_BYTES[unit]}{unit}"
    return f"{n}B"


_RELATIVE = re.compile(r"^\s*-?\s*(\d+(?:\.\d+)?\s*(?:ns|us|µs|ms|s|m|h|d))\s*(?:ago)?\s*$")


def parse_time_ns(text: str, now_ns: int) -> int:
    """`_time_ns`, within what a store holds: int64 nanoseconds, 1677-09-21 to 2262-04-11."""
    try:
        ns = _time_ns(text, now_ns)
    except OverflowError:
        ns = None
    if ns is None or not -(2**63) <= ns < 2**63:
        raise ValueError(f"found {_q(text)}, expected a time between 1678 and 2262 (the store's range)")
    return ns


def _time_ns(text: str, now_ns: int) -> int:
    """A point in time as users write it, -> UTC ns.

    "now"; relative to now: "1h", "-1h", "90m ago", "7d"; ISO 8601: "2026-11-22T10:00:00Z",
    "2026-11-22 10:00+08:00", "2026-11-22" (a time without offset is the gateway's local time);
    or "@1767225600" (Unix seconds).
    """
    import datetime as dt

    t = text.strip()
    if t == "now":
        return now_ns
    if t.startswith("@"):
        # Exact (decimal), not through a float: @1796431280.501 as a float is 64 ns early, and a
        # bound meant to include the sample stamped at that millisecond left it out.
        import decimal

        try:
            return int((decimal.Decimal(t[1:]) * 10**9).to_integral_value(decimal.ROUND_HALF_EVEN))
        except (decimal.InvalidOperation, ValueError):  # OverflowError (@inf): out of range
            pass
    m = _RELATIVE.match(t)
    if m:
        return now_ns - parse_duration_ns(m.group(1).replace(" ", ""))
    try:
        when = dt.datetime.fromisoformat(t.replace("Z", "+00:00") if t.endswith("Z") else t)
    except ValueError:
        raise ValueError(
            f'found {_q(text)}, expected a time such as "now", "1h" (ago), "2026-11-22T10:00:00Z" or "@1767225600"'
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # naive: the gateway's local time
    # Whole microseconds since the epoch, exactly (timestamp() is a float: ~64 ns off today).
    return (when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1) * 1000


def split_server(entry: str, default_port: int) -> tuple[str, int]:
    """One `servers` entry: "host", "host:port", "[v6 address]" or "[v6 address]:port", port
    1-65535. ValueError names what is wrong (an address with colons must be in brackets: is
    "fe80::1:1883" a port or part of the address?)."""
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket:
            raise ValueError("no closing ] after the IPv6 address")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{rest!r} after the ]: write [address]:port")
        import ipaddress  # only for a bracketed entry: the daemon imports it with its MQTT client

        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
        port = rest[1:] if rest else None
    elif entry.count(":") > 1:
        raise ValueError("an IPv6 address goes in brackets: [address] or [address]:port")
    else:
        host, colon, port = entry.partition(":")
        port = port if colon else None
    if not host:
        raise ValueError("no host name or address")
    if any(c.isspace() for c in host):
        raise ValueError("a space in the host name")
    if port is None:
        return host, default_port
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not a number from 1 to 65535")
    return host, int(port)
