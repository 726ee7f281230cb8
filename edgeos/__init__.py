"""edgeos: an on-premise edge runtime for factory gateways.

The stable surface for OEMs is what `__all__` lists; everything else may change between minor
versions. Payload consumers import `edgeos.wire` alone.
"""

from edgeos.adapter import (
    Adapter,
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

__version__ = "0.1.0"

__all__ = [
    "Adapter",
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
