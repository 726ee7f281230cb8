"""The `simulated` protocol: sine, ramp, random walk, step, square, counter, bool and text signals."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgeos.protocols.simulated.adapter import SimulatedAdapter
from edgeos.protocols.simulated.config import DEVICE_FIELDS, TAG_FIELDS

from edgeos.adapter import DeviceConfig
from edgeos.config.schema import Problems
from edgeos.model import ValueKind


class SimulatedProtocol:
    name = "simulated"
    # Its devices exist only inside the running daemon: `edgeos write --direct` has nothing to reach.
    in_process = True
    device_fields = DEVICE_FIELDS
    tag_fields = TAG_FIELDS

    def tag_kind(self, options: Mapping[str, Any]) -> ValueKind:
        return {"bool": ValueKind.BOOL, "text": ValueKind.STRING}.get(options.get("signal", ""), ValueKind.NUMBER)

    def validate(self, device: DeviceConfig, path: str, problems: Problems) -> None:
        for i, t in enumerate(device.tags):
            if t.options["signal"] == "text" and not t.options["states"]:
                problems.add(f"{path}.tags[{i}].states", "a text signal needs at least one state")

    def create(self, device: DeviceConfig) -> SimulatedAdapter:
        return SimulatedAdapter(device)


plugin = SimulatedProtocol()
