"""The stored unit's byte format, shared by the store and the upstream payload.

Imports nothing of the daemon: a consumer installs edgeos and imports `edgeos.wire` alone.
A unit holds one device's samples from one commit as packed little-endian columns in a msgpack
map; it is encoded once, when committed, and forwarded as stored. docs/payload.md specifies it.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

UNIT_VERSION = 2
"""1: edgeos 0.1.0 development format (int32 tags, quality always present); still decoded."""


@dataclass(frozen=True)
class Unit:
    """Decoded columns of one unit. `tags` are the store's tag ids (see the tag dictionary)."""

    device: str
    tags: np.ndarray
    ts: np.ndarray
    values: np.ndarray
    quality: np.ndarray
    text: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.tags)


def encode_unit(
    device: str,
    tags: np.ndarray,
    ts: np.ndarray,
    values: np.ndarray,
    quality: np.ndarray,
    text: list[str | None] | None = None,
) -> bytes:
    """Columns -> bytes. Tag ids go as uint16 when they fit; an all-Good quality column is omitted."""
    n = len(tags)
    wide = n and int(tags.max()) > 0xFFFF
    doc: dict = {
        "v": UNIT_VERSION,
        "d": device,
        "n": n,
        "tag": np.ascontiguousarray(tags, "<i4" if wide else "<u2").tobytes(),
        "tw": 4 if wide else 2,
        "ts": np.ascontiguousarray(ts, "<i8").tobytes(),
        "val": np.ascontiguousarray(values, "<f8").tobytes(),
    }
    if n and quality.any():
        doc["q"] = np.ascontiguousarray(quality, "<u4").tobytes()
    if text is not None:
        doc["txt"] = list(text)
    return msgpack.packb(doc, use_bin_type=True)


def decode_unit(data: bytes) -> Unit:
    """bytes -> columns (zero-copy views where possible). Reads every version this edgeos wrote."""
    doc = msgpack.unpackb(data, raw=False)
    version = doc.get("v")
    if version not in (1, 2):
        raise ValueError(f"unit version {version!r} is newer than this edgeos understands (up to {UNIT_VERSION})")
    n = doc["n"]
    if version == 1:
        tags = np.frombuffer(doc["tag"], "<i4")
        quality = np.frombuffer(doc["q"], "<u4")
    else:
        tags = np.frombuffer(doc["tag"], "<i4" if doc["tw"] == 4 else "<u2").astype(np.int32)
        quality = np.frombuffer(doc["q"], "<u4") if "q" in doc else np.zeros(n, np.uint32)
    unit = Unit(
        device=doc["d"],
        tags=tags,
        ts=np.frombuffer(doc["ts"], "<i8"),
        values=np.frombuffer(doc["val"], "<f8"),
        quality=quality,
        text=doc.get("txt"),
    )
    if not (len(unit.tags) == len(unit.ts) == len(unit.values) == len(unit.quality) == n):
        raise ValueError("unit columns disagree in length")
    return unit
