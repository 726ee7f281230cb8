"""The `modbus` protocol: Modbus TCP, RTU on a serial line, RTU over TCP; coalesced reads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgeos.protocols.modbus.adapter import ModbusAdapter, build_groups, tag_kind
from edgeos.protocols.modbus.config import (
    DEVICE_FIELDS,
    MAX_WRITE_REGISTERS,
    TAG_FIELDS,
    tag_spec,
    tag_type,
    unit_id,
)
from edgeos.protocols.modbus.transport import endpoint_of

from edgeos.adapter import DeviceConfig
from edgeos.config.schema import Problems
from edgeos.config.units import format_duration_ns
from edgeos.model import ValueKind


class ModbusProtocol:
    name = "modbus"
    device_fields = DEVICE_FIELDS
    tag_fields = TAG_FIELDS

    def tag_kind(self, options: Mapping[str, Any]) -> ValueKind:
        return tag_kind(tag_type(dict(options)))

    def validate(self, device: DeviceConfig, path: str, problems: Problems) -> None:
        o = device.options  # every optional key is there: a refused value stands as its default
        if o["transport"] in ("tcp", "rtu_over_tcp") and not o.get("host"):
            problems.add(f"{path}.host", f'missing: required with transport = "{o["transport"]}"')
        if o["transport"] == "rtu" and o.get("host"):
            problems.add(f"{path}.host", 'applies to transport = "tcp" or "rtu_over_tcp", not "rtu" (give serial_port)')
        if o["transport"] != "rtu" and o.get("serial_port"):
            problems.add(f"{path}.serial_port", f'applies to transport = "rtu", not "{o["transport"]}" (give host)')
        if o["transport"] == "rtu":
            if not o.get("serial_port"):
                problems.add(f"{path}.serial_port", 'missing: required with transport = "rtu" (e.g. "/dev/ttyUSB0")')
            if not 1 <= unit_id(o) <= 247:
                key = "unit_id" if o.get("unit_id") is not None else "unit"
                problems.add(f"{path}.{key}", f"found {unit_id(o)}, expected 1..247 on a serial line (0 is broadcast)")
        if o.get("unit_id") is not None and o["unit"] not in (1, o["unit_id"]):
            problems.add(f"{path}.unit", f"found {o['unit']} beside unit_id = {o['unit_id']}: give unit_id alone")
        if o["zero_transaction_id"] and o["transport"] != "tcp":
            problems.add(
                f"{path}.zero_transaction_id",
                f'found true, but transaction ids exist only with transport = "tcp" (not "{o["transport"]}")',
            )
        for i, t in enumerate(device.tags):
            tpath = f"{path}.tags[{i}]"
            where = f' (tag "{t.name}")'
            spec, found = tag_spec(dict(t.options), o["address_base"])
            for key, message in found:
                problems.add(f"{tpath}.{key}", message + where)
            if spec is None:
                continue
            limit = o["max_bits"] if spec.is_bits else o["max_registers"]
            if spec.count > limit:
                problems.add(
                    f"{tpath}.length",
                    f"the tag spans {spec.count} registers, more than max_registers = {limit}{where}",
                )
            if t.meta.writable and spec.table in ("di", "ir"):
                kind = "a discrete input" if spec.table == "di" else "an input register"
                problems.add(f"{tpath}.writable", f"found true, but {kind} is read-only in Modbus{where}")
            elif t.meta.writable and not spec.is_bits and spec.count > MAX_WRITE_REGISTERS:
                problems.add(
                    f"{tpath}.length",
                    f"found {spec.length} characters ({spec.count} registers), but a writable tag is written "
                    f"with one request of at most {MAX_WRITE_REGISTERS} registers: at most "
                    f"{2 * MAX_WRITE_REGISTERS} characters{where}",
                )

    def create(self, device: DeviceConfig) -> ModbusAdapter:
        return ModbusAdapter(device)

    def describe(self, device: DeviceConfig) -> list[str]:
        """The request plan `edgeos check` prints: requests per poll and per second."""
        o = device.options
        groups = build_groups(device, learned=False)
        total = sum(len(g.plan.current.requests) * 1e9 / g.interval_ns for g in groups)
        mode = "coalesced" if o["coalesce"] else "one request per tag"
        lines = [f"modbus {endpoint_of(dict(o))} unit {unit_id(o)}: {total:.1f} requests/s ({mode})"]
        for g in groups:
            gp = g.plan.current
            reqs = gp.requests
            nbits = sum(r.count for r in reqs if r.is_bits)
            read = ", ".join(x for x in (_n(gp.registers_read, "register"), _n(nbits, "bit")) if not x.startswith("0 "))
            lines.append(
                f"every {format_duration_ns(g.interval_ns)}: {_n(len(g.tags), 'tag')} in "
                f"{_n(len(reqs), 'request')}, {read} read"
            )
            shown = reqs[:8]
            lines.extend(f"  {r.describe()}" for r in shown)
            if len(reqs) > len(shown):
                lines.append(f"  ... and {len(reqs) - len(shown)} more")
        return lines


def _n(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


plugin = ModbusProtocol()
