"""The `serial` protocol: line devices (scales, barcode and RFID readers, meters, old controllers)
on a serial port or a serial device server; frames parsed into tags by a regular expression."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgeos.protocols.serial.adapter import SerialAdapter
from edgeos.protocols.serial.config import DEVICE_FIELDS, TAG_FIELDS, build_spec, tag_kind

from edgeos.adapter import DeviceConfig
from edgeos.config.schema import Problems
from edgeos.config.units import format_duration_ns
from edgeos.model import ValueKind

__all__ = ["SerialAdapter", "SerialProtocol", "plugin"]


class SerialProtocol:
    name = "serial"
    device_fields = DEVICE_FIELDS
    tag_fields = TAG_FIELDS

    def tag_kind(self, options: Mapping[str, Any]) -> ValueKind:
        return tag_kind(options)

    def validate(self, device: DeviceConfig, path: str, problems: Problems) -> None:
        build_spec(device.options, device.tags, device.poll_interval_ns, path, problems)
        for i, t in enumerate(device.tags):
            if t.meta.writable:
                problems.add(f"{path}.tags[{i}].writable", f'serial tags are read-only (tag "{t.name}")')

    def create(self, device: DeviceConfig) -> SerialAdapter:
        return SerialAdapter(device)

    def describe(self, device: DeviceConfig) -> list[str]:
        """What `edgeos check` prints: the line, the framing, the checksum, each pattern's tags."""
        spec = build_spec(device.options, device.tags, device.poll_interval_ns)
        assert spec is not None
        lines = [f"serial {spec.line}, {spec.mode} mode", spec.framing_text()]
        if spec.checksum is not None:
            lines.append(spec.checksum.describe())
        shown = set()
        for r in spec.requests:
            lines.append(
                f"request {r.text!r} every {format_duration_ns(r.interval_ns)}, "
                f"reply within {format_duration_ns(r.timeout_ns)}: pattern {r.pattern.source}"
            )
            shown.add(r.pattern.source)
        for p in spec.patterns:
            if p.source not in shown:
                lines.append(f"pattern {p.source}")
            lines.append("  -> " + ", ".join(f"{s.name} ({s.type})" for s in p.slots))
        return lines


plugin = SerialProtocol()
