"""Upstream sync: forward what the store holds, in order, with no loss (docs/payload.md)."""

from edgeos.sync.engine import Session, Sync, SyncStatus, TokenBucket, Transport

__all__ = ["Session", "Sync", "SyncStatus", "TokenBucket", "Transport"]
