"""Configuration: one TOML file (plus tag CSVs), typed and checked once at load."""

from edgeos.config.load import load_config, parse_config
from edgeos.config.model import Config, GatewayConfig, StoreConfig, UpstreamConfig
from edgeos.config.schema import Field, Problems
from edgeos.config.units import parse_duration_ns, parse_size

__all__ = [
    "Config",
    "Field",
    "GatewayConfig",
    "Problems",
    "StoreConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
    "parse_duration_ns",
    "parse_size",
]
