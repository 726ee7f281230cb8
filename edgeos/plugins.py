"""Entry-point discovery for protocols and filters; built-ins register the same way as OEMs'.

Discovery is lazy: listing names does not import plugins, and a config only loads the plugins
it names, so one broken third-party package cannot stop a gateway that does not use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from edgeos.errors import PluginError

PROTOCOLS = "edgeos.protocols"
FILTERS = "edgeos.filters"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    group: str
    value: str
    dist: str
    version: str


def _entry_points(group: str) -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in sorted(entry_points(group=group), key=lambda e: (e.name, e.value)):
        found.setdefault(ep.name, ep)
    return found


def available(group: str) -> list[PluginInfo]:
    """Plugins registered in `group`, sorted by name, without importing them."""
    out = []
    for name, ep in _entry_points(group).items():
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        out.append(PluginInfo(name, group, ep.value, dist, version))
    return out


@cache
def load(group: str, name: str) -> Any:
    """Import and return the plugin object; KeyError if unknown, PluginError if it is broken."""
    eps = _entry_points(group)
    ep = eps[name]
    dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else ep.value
    try:
        obj = ep.load()
    except Exception as e:  # any import-time failure of third-party code
        raise PluginError(group, name, dist, f"{type(e).__name__}: {e}") from e
    required = ("device_fields", "tag_fields", "create") if group == PROTOCOLS else ("fields", "create")
    missing = [a for a in required if not hasattr(obj, a)]
    if missing:
        raise PluginError(group, name, dist, f"object {ep.value} lacks {', '.join(missing)}")
    return obj


def names(group: str) -> list[str]:
    return list(_entry_points(group))
