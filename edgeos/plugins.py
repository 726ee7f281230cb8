"""Entry-point discovery for protocols and filters; built-ins register the same way as OEMs'.

Discovery is lazy: listing names does not import plugins, and a config only loads the plugins
it names, so one broken third-party package cannot stop a gateway that does not use it.

The daemon finds and loads plugins without `importlib.metadata`, which imports email, zipfile,
csv and ~90 other modules (2.7 MB of the daemon's RSS, docs/benchmarks.md "Footprint"): it reads
the `entry_points.txt` of each `*.dist-info`/`*.egg-info` directory on `sys.path` itself, as
`importlib.metadata` does, and falls back to it wherever the path holds something else (a zip,
a finder of its own). Distribution names and versions (`available`, error messages) still come
from `importlib.metadata`.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from functools import cache
from typing import Any

from edgeos.errors import PluginError

log = logging.getLogger("edgeos.plugins")

PROTOCOLS = "edgeos.protocols"
FILTERS = "edgeos.filters"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    group: str
    value: str
    dist: str
    version: str


@dataclass(frozen=True)
class _EntryPoint:
    """An entry point found by `_scan`: `value` is `module:attr`; `path` its *-info directory."""

    name: str
    value: str
    path: str | None = None

    def load(self) -> Any:
        module, _, attrs = self.value.partition(":")
        obj = importlib.import_module(module.strip())
        for attr in attrs.split("[", 1)[0].strip().split(".") if attrs else ():
            obj = getattr(obj, attr)
        return obj


def _standard_paths() -> bool:
    """Whether every distribution is a directory on sys.path (what `_scan` reads)."""
    from importlib.machinery import BuiltinImporter, FrozenImporter, PathFinder

    standard = (BuiltinImporter, FrozenImporter, PathFinder)
    for finder in sys.meta_path:
        if getattr(finder, "find_distributions", None) and finder not in standard and type(finder) not in standard:
            return False
    return all(os.path.isdir(p or ".") or not os.path.exists(p or ".") for p in sys.path)


def _scan(group: str) -> list[_EntryPoint] | None:
    """The entry points of `group`, one distribution per normalized name (the first on sys.path,
    as `importlib.metadata.entry_points` does); None where `_standard_paths` is False."""
    if not _standard_paths():
        return None
    seen: set[str] = set()
    out = []
    for root in sys.path:
        try:
            entries = sorted(os.listdir(root or "."))
        except OSError:
            continue
        for entry in entries:
            if not entry.endswith((".dist-info", ".egg-info")):
                continue
            dist = re.sub(r"[-_.]+", "_", entry.rpartition(".")[0].partition("-")[0]).lower()
            if dist in seen:
                continue
            seen.add(dist)
            path = os.path.join(root or ".", entry)
            try:
                with open(os.path.join(path, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            section = None
            for line in text.splitlines():
                line = line.strip()
                if not line or line.startswith(("#", ";")):
                    continue
                if line.startswith("[") and line.endswith("]"):
                    section = line[1:-1].strip()
                elif section == group and "=" in line:
                    name, _, value = line.partition("=")
                    out.append(_EntryPoint(name.strip(), value.strip(), path))
    return out


def _entry_points(group: str, *, metadata: bool = False) -> dict[str, Any]:
    """name -> entry point (`importlib.metadata.EntryPoint` when `metadata`, or when the path
    needs it), the same one either way: sorted by (name, value), the first kept."""
    eps: list[Any] | None = None if metadata else _scan(group)
    if eps is None:
        from importlib.metadata import entry_points

        eps = list(entry_points(group=group))
    found: dict[str, Any] = {}
    # A built-in is never replaced by another package's plugin of the same name (an installed
    # package could otherwise swap the deadband filter or the Modbus adapter, without a word);
    # between two third-party ones the order is (name, value). The others are said at load.
    for ep in sorted(eps, key=lambda e: (e.name, not _builtin(e), e.value)):
        found.setdefault(ep.name, ep)
    return found


def _builtin(ep: Any) -> bool:
    return ep.value.startswith("edgeos.")


def shadowed(group: str, name: str) -> list[str]:
    """The entry points (`module:attr`) registering `name` in `group` beside the one used."""
    eps = _scan(group)
    if eps is None:
        from importlib.metadata import entry_points

        eps = list(entry_points(group=group))
    used = _entry_points(group).get(name)
    return sorted({ep.value for ep in eps if ep.name == name} - ({used.value} if used is not None else set()))


def package(group: str, name: str) -> str:
    """`dist version` of a plugin, for messages."""
    ep = _entry_points(group, metadata=True).get(name)
    if ep is None or ep.dist is None:
        return ep.value if ep is not None else name
    return f"{ep.dist.name} {ep.dist.version}"


def label(group: str, name: str) -> str:
    """`plugin 'name' (from dist version)`: how messages about a plugin's bug name it."""
    return f"plugin {name!r} (from {package(group, name)})"


def available(group: str) -> list[PluginInfo]:
    """Plugins registered in `group`, sorted by name, without importing them."""
    out = []
    for name, ep in _entry_points(group, metadata=True).items():
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        out.append(PluginInfo(name, group, ep.value, dist, version))
    return out


@cache
def load(group: str, name: str) -> Any:
    """Import and return the plugin object; KeyError if unknown, PluginError if it is broken."""
    ep = _entry_points(group)[name]
    try:
        obj = ep.load()
    except Exception as e:  # any import-time failure of third-party code
        raise PluginError(group, name, package(group, name), f"{type(e).__name__}: {e}") from e
    required = ("device_fields", "tag_fields", "create") if group == PROTOCOLS else ("fields", "create")
    missing = [a for a in required if not hasattr(obj, a)]
    if missing:
        raise PluginError(group, name, package(group, name), f"object {ep.value} lacks {', '.join(missing)}")
    if others := shadowed(group, name):
        log.warning(
            "plugin %r (%s): also registered by %s, not used; %s",
            name,
            ep.value,
            ", ".join(others),
            "a built-in is never replaced" if _builtin(ep) else "uninstall one of them",
        )
    return obj


def names(group: str) -> list[str]:
    return list(_entry_points(group))
