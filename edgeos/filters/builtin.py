"""Built-in filter plugins, registered through the `edgeos.filters` entry points."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeos.config.schema import Field
from edgeos.filters import kernels
from edgeos.model import Batch


class DeadbandFilter:
    """Report-by-exception with a heartbeat; per-tag state in arrays indexed by tag id."""

    def __init__(self, n_tags: int, params: Mapping[int, Mapping[str, Any]], impl: str = "auto"):
        self._k = kernels(impl)
        self.enabled = np.zeros(n_tags, np.uint8)
        self.dead = np.zeros(n_tags, np.float64)
        self.max_silence = np.zeros(n_tags, np.int64)
        for tag, p in params.items():
            self.enabled[tag] = 1
            self.dead[tag] = p["abs"]
            self.max_silence[tag] = p["max_silence"] or 0
        self.ref_value = np.zeros(n_tags, np.float64)
        self.ref_ts = np.zeros(n_tags, np.int64)
        self.ref_quality = np.zeros(n_tags, np.uint32)
        self.has_ref = np.zeros(n_tags, np.uint8)

    def apply(self, batch: Batch) -> Batch:
        if not len(batch):
            return batch
        keep = self._k.deadband(
            batch.tags,
            batch.ts,
            batch.values,
            batch.quality,
            self.enabled,
            self.dead,
            self.max_silence,
            self.ref_value,
            self.ref_ts,
            self.ref_quality,
            self.has_ref,
        )
        mask = keep.view(bool)
        return batch if mask.all() else batch.take(mask)


class _DeadbandPlugin:
    name = "deadband"
    fields = {
        "abs": Field("float", 0.0, min=0, help="report when |value - last reported| exceeds this"),
        "max_silence": Field("duration", None, min=1_000_000, help="report anyway after this long"),
    }

    def create(self, n_tags: int, params: Mapping[int, Mapping[str, Any]], impl: str = "auto") -> DeadbandFilter:
        return DeadbandFilter(n_tags, params, impl)


deadband = _DeadbandPlugin()
