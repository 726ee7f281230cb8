"""edgeos-sysfs: the `sysfs` protocol, numbers polled from files (Linux sysfs/procfs and the like).

A minimal third-party adapter as an OEM ships one: this plugin object (named by the entry point
in pyproject.toml), the adapter in adapter.py, and sample.toml beside them for `edgeos init`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

# Field and Problems are the plugin-facing config types docs/adapters.md names in edgeos.config.
from edgeos import DeviceConfig, Field, Problems, ValueKind
from edgeos_sysfs.adapter import SysfsAdapter, read_number

__all__ = ["SysfsAdapter", "SysfsProtocol", "plugin", "read_number"]


class SysfsProtocol:
    """Describes the protocol's config keys and builds one adapter per device."""

    name = "sysfs"
    device_fields: Mapping[str, Field] = {}
    tag_fields: Mapping[str, Field] = {
        "path": Field("str", "", help="absolute path of a file that holds one number"),
        "scale": Field("float", 1.0, help="value = number in the file * scale + offset"),
        "offset": Field("float", 0.0, help="value = number in the file * scale + offset"),
    }

    def tag_kind(self, options: Mapping[str, Any]) -> ValueKind:
        return ValueKind.NUMBER

    def validate(self, device: DeviceConfig, path: str, problems: Problems) -> None:
        """Refuse at load what could only fail at every poll: no path, a relative one, a write."""
        for i, t in enumerate(device.tags):
            where = f"{path}.tags[{i}]"
            p = t.options["path"]
            if not p:
                problems.add(f"{where}.path", 'missing: the file to read, e.g. "/sys/class/thermal/thermal_zone0/temp"')
            elif not os.path.isabs(p):
                # The daemon's working directory is not the config's (systemd starts it in /).
                problems.add(f"{where}.path", f'found "{p}", expected an absolute path')
            if t.meta.writable:
                problems.add(f"{where}.writable", "sysfs tags are read-only")

    def create(self, device: DeviceConfig) -> SysfsAdapter:
        return SysfsAdapter(device)

    def describe(self, device: DeviceConfig) -> list[str]:
        """What `edgeos check` prints under the device: each tag's file and conversion."""
        lines = []
        for t in device.tags:
            o = t.options
            conv = (f" * {o['scale']:g}" if o["scale"] != 1 else "") + (f" + {o['offset']:g}" if o["offset"] else "")
            lines.append(f"{t.name}: {o['path']}{conv}")
        return lines


plugin = SysfsProtocol()
