"""The stored unit: one device's samples from one commit window, as packed columns.

The unit's bytes are what the upstream sync forwards, so they are encoded exactly once.
Tag ids in a unit are the store's own (stable across config changes), not the runtime's.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

from edgeos.model import QUALITY_DTYPE, TAG_DTYPE, TS_DTYPE, VALUE_DTYPE

UNIT_VERSION = 1


@dataclass(frozen=True)
class Unit:
    device: str
    tags: np.ndarray
    ts: np.ndarray
    values: np.ndarray
    quality: np.ndarray
    text: list | None = None

    def __len__(self) -> int:
        return len(self.tags)


def encode(device: str, tags: np.ndarray, ts: np.ndarray, values: np.ndarray, quality: np.ndarray, text=None) -> bytes:
    doc = {
        "v": UNIT_VERSION,
        "d": device,
        "n": len(tags),
        "tag": np.ascontiguousarray(tags, TAG_DTYPE).tobytes(),
        "ts": np.ascontiguousarray(ts, TS_DTYPE).tobytes(),
        "val": np.ascontiguousarray(values, VALUE_DTYPE).tobytes(),
        "q": np.ascontiguousarray(quality, QUALITY_DTYPE).tobytes(),
    }
    if text is not None:
        doc["txt"] = list(text)
    return msgpack.packb(doc, use_bin_type=True)


def decode(data: bytes) -> Unit:
    doc = msgpack.unpackb(data, raw=False)
    if doc.get("v") != UNIT_VERSION:
        raise ValueError(f"unsupported unit version {doc.get('v')!r}")
    return Unit(
        device=doc["d"],
        tags=np.frombuffer(doc["tag"], TAG_DTYPE),
        ts=np.frombuffer(doc["ts"], TS_DTYPE),
        values=np.frombuffer(doc["val"], VALUE_DTYPE),
        quality=np.frombuffer(doc["q"], QUALITY_DTYPE),
        text=doc.get("txt"),
    )
