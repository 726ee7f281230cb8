"""edgeos: an on-premise edge runtime for factory gateways.

The stable surface for OEMs is what `__all__` lists; everything else may change between minor
versions. Payload consumers import `edgeos.wire` alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeos.adapter import (
        Adapter,
        Answer,
        DeviceConfig,
        Emit,
        Filter,
        FilterPlugin,
        PollGroup,
        PollingAdapter,
        ProtocolPlugin,
        Sink,
        TagConfig,
    )
    from edgeos.config import Config, load_config, parse_config
    from edgeos.config.schema import Field, Problems
    from edgeos.errors import ConfigError, DeviceError, EdgeosError, PluginError, StoreError, SyncError
    from edgeos.model import Batch, Quality, TagMeta, ValueKind
    from edgeos.runtime import Runtime

# Where each public name lives. Resolved on first use (PEP 562), so that `import edgeos.wire`
# (a payload consumer), `import edgeos.model` or a CLI command that needs neither the runtime
# nor the config loader does not pay for them: see "Footprint" in docs/benchmarks.md.
_LAZY = {
    **dict.fromkeys(
        (
            "Adapter",
            "Answer",
            "DeviceConfig",
            "Emit",
            "Filter",
            "FilterPlugin",
            "PollGroup",
            "PollingAdapter",
            "ProtocolPlugin",
            "Sink",
            "TagConfig",
        ),
        "edgeos.adapter",
    ),
    **dict.fromkeys(("Config", "load_config", "parse_config"), "edgeos.config"),
    **dict.fromkeys(("Field", "Problems"), "edgeos.config.schema"),
    **dict.fromkeys(
        ("ConfigError", "DeviceError", "EdgeosError", "PluginError", "StoreError", "SyncError"), "edgeos.errors"
    ),
    **dict.fromkeys(("Batch", "Quality", "TagMeta", "ValueKind"), "edgeos.model"),
    "Runtime": "edgeos.runtime",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgeos' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "Answer",
    "Batch",
    "Config",
    "ConfigError",
    "DeviceConfig",
    "DeviceError",
    "EdgeosError",
    "Emit",
    "Filter",
    "Field",
    "FilterPlugin",
    "PluginError",
    "PollGroup",
    "PollingAdapter",
    "Problems",
    "ProtocolPlugin",
    "Quality",
    "Runtime",
    "Sink",
    "StoreError",
    "SyncError",
    "TagConfig",
    "TagMeta",
    "ValueKind",
    "__version__",
    "load_config",
    "parse_config",
]
