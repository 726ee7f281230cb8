"""The local durable store: every sample the gateway reads, kept on the gateway."""

from edgeos.store.sqlite import Store, open_store

__all__ = ["Store", "open_store"]
