"""Upstream sync: forward what the store holds, in order, with no loss (docs/payload.md).

The engine is imported on first use, so the plant-side collector can import the MQTT transport
(edgeos.sync.mqtt) without the gateway's store and engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeos.sync.engine import Session, Sync, SyncStatus, TokenBucket, Transport

__all__ = ["Session", "Sync", "SyncStatus", "TokenBucket", "Transport"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from edgeos.sync import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'edgeos.sync' has no attribute {name!r}")
