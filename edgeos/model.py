"""The types that cross rooms: columnar batches, quality codes, tag metadata.

Nothing here imports anything else of edgeos, so every room (and OEM code) can use it.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TAG_DTYPE = np.dtype(np.int32)
TS_DTYPE = np.dtype(np.int64)
VALUE_DTYPE = np.dtype(np.float64)
QUALITY_DTYPE = np.dtype(np.uint32)


class Quality(enum.IntEnum):
    """OPC UA StatusCode values (Part 4, 7.39 and Part 6 Annex A); the top two bits are the severity.

    Codes pass through unchanged from OPC UA servers, so any uint32 status code is a valid
    quality; this enum names the ones edgeos itself produces.
    """

    GOOD = 0x00000000
    GOOD_CLAMPED = 0x00300000  # GoodClamped: value was limited by a range filter
    UNCERTAIN = 0x40000000
    UNCERTAIN_LAST_USABLE = 0x40900000  # UncertainLastUsableValue
    UNCERTAIN_SENSOR_NOT_ACCURATE = 0x40930000  # spike filter verdict
    UNCERTAIN_ENGINEERING_UNITS_EXCEEDED = 0x40940000
    UNCERTAIN_SUB_NORMAL = 0x40A40000  # UncertainSubNormal: a window's aggregate over part of it (stop)
    BAD = 0x80000000
    BAD_COMM_FAILURE = 0x80050000  # BadCommunicationError
    BAD_TIMEOUT = 0x800A0000
    BAD_OUT_OF_RANGE = 0x803C0000
    BAD_CONFIG_ERROR = 0x80890000  # BadConfigurationError
    BAD_NOT_CONNECTED = 0x808A0000
    BAD_DEVICE_FAILURE = 0x808B0000  # device exception response
    BAD_SENSOR_FAILURE = 0x808C0000
    BAD_DECODING_ERROR = 0x80070000  # garbage or wrong-length response
    BAD_WAITING_FOR_INITIAL_DATA = 0x80320000
    BAD_NODE_ID_UNKNOWN = 0x80340000  # OPC UA: the server does not know the tag's node
    BAD_TYPE_MISMATCH = 0x80740000  # OPC UA: a value the tag's type cannot hold (an array, text)

    @staticmethod
    def severity(code: int) -> str:
        """'good', 'uncertain' or 'bad' for any status code."""
        top = (int(code) >> 30) & 0b11
        return ("good", "uncertain", "bad", "bad")[top]

    @staticmethod
    def describe(code: int) -> str:
        """In words: edgeos's own name, else the OPC UA standard's (any code a server or an
        adapter sets), with the low 16 info bits as +0xNNNN when set; else the hex code."""
        code = int(code)
        try:
            return Quality(code).name
        except ValueError:
            pass
        from edgeos.statuscodes import NAMES  # the whole standard's names: only when asked

        base, info = code & 0xFFFF0000, code & 0xFFFF
        try:
            name = Quality(base).name
        except ValueError:
            name = NAMES.get(base)
        if name is None:
            return f"0x{code:08X}"
        return f"{name}+0x{info:04X}" if info else name


def is_good(quality: np.ndarray) -> np.ndarray:
    """Vectorised: True where the severity is Good."""
    return (quality >> np.uint32(30)) == 0


def is_bad(quality: np.ndarray) -> np.ndarray:
    """Vectorised: True where the severity is Bad."""
    return (quality >> np.uint32(30)) >= 2


# Bad for want of an answer, as opposed to an answer that is Bad (a refused address, a sensor
# failure): BadTimeout, BadCommunicationError, BadNotConnected, BadNoCommunication.
_NO_ANSWER = np.array([0x800A0000, 0x80050000, 0x808A0000, 0x80310000], np.uint32)


def is_unanswered(quality: np.ndarray) -> np.ndarray:
    """Vectorised: True where the sample is Bad because the device did not answer (the
    status code's flag bits ignored)."""
    return np.isin(quality & np.uint32(0xFFFF0000), _NO_ANSWER)


class ValueKind(enum.Enum):
    """How a tag's value is carried: numbers and booleans in the float64 column, strings beside it."""

    NUMBER = "number"
    BOOL = "bool"
    STRING = "string"


@dataclass(frozen=True, slots=True)
class TagMeta:
    """What every room knows about a tag; `id` indexes per-tag state arrays in the runtime."""

    id: int
    device: str
    name: str
    kind: ValueKind = ValueKind.NUMBER
    unit: str = ""
    description: str = ""
    writable: bool = False

    @property
    def key(self) -> str:
        """Gateway-wide unique name, `device/tag`."""
        return f"{self.device}/{self.name}"


def _as(arr: Any, dtype: np.dtype, name: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype != dtype:
        if a.size and not np.can_cast(a.dtype, dtype, casting="same_kind"):
            raise TypeError(f"Batch.{name}: dtype {a.dtype} cannot be used as {dtype}")
        a = a.astype(dtype)
    if a.ndim != 1:
        raise ValueError(f"Batch.{name}: expected a 1-d column, got shape {a.shape}")
    # Compiled kernels take contiguous memory; a column sliced from a 2-d array is copied once here.
    return np.ascontiguousarray(a)


_ARRAY_OVERHEAD = 112  # an ndarray object and its header
_BATCH_OVERHEAD = 576  # the Batch, its four arrays, and the deque slot that holds it


@dataclass(frozen=True, slots=True)
class Batch:
    """Samples from one device as parallel columns: tag ids, UTC ns timestamps, values, quality.

    String-valued tags carry NaN in `values` and their text in `text` (an object column,
    None when the batch has no string tag); booleans are 0.0/1.0 in `values`.
    """

    device: str
    tags: np.ndarray
    ts: np.ndarray
    values: np.ndarray
    quality: np.ndarray
    text: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        tags = _as(self.tags, TAG_DTYPE, "tags")
        n = len(tags)
        cols = {
            "tags": tags,
            "ts": _as(self.ts, TS_DTYPE, "ts"),
            "values": _as(self.values, VALUE_DTYPE, "values"),
            "quality": _as(self.quality, QUALITY_DTYPE, "quality"),
        }
        if self.text is not None:
            cols["text"] = np.asarray(self.text, dtype=object)
        for name, col in cols.items():
            if len(col) != n:
                raise ValueError(f"Batch.{name}: length {len(col)} != {n} tags")
            object.__setattr__(self, name, col)

    def __len__(self) -> int:
        return len(self.tags)

    def memory_bytes(self) -> int:
        """What holding this batch costs in memory: the columns, the Python objects around them
        (about 570 bytes a batch, measured with tracemalloc) and the text. It bounds what waits in
        memory while the disk refuses writes, where one-sample batches cost 25 times their columns."""
        size = _BATCH_OVERHEAD + self.tags.nbytes + self.ts.nbytes + self.values.nbytes + self.quality.nbytes
        if self.text is not None:
            size += _ARRAY_OVERHEAD + 8 * len(self.text)
            size += sum(sys.getsizeof(s) for s in self.text.tolist() if s is not None)
        return size

    @classmethod
    def empty(cls, device: str) -> Batch:
        return cls(
            device,
            np.empty(0, TAG_DTYPE),
            np.empty(0, TS_DTYPE),
            np.empty(0, VALUE_DTYPE),
            np.empty(0, QUALITY_DTYPE),
        )

    @classmethod
    def filled(cls, device: str, tags: Sequence[int] | np.ndarray, ts: int, value: float, quality: int) -> Batch:
        """One sample per tag, all with the same time, value and quality (e.g. Bad on failure)."""
        t = np.asarray(tags, dtype=TAG_DTYPE)
        n = len(t)
        return cls(
            device,
            t,
            np.full(n, ts, TS_DTYPE),
            np.full(n, value, VALUE_DTYPE),
            np.full(n, quality, QUALITY_DTYPE),
        )

    def take(self, index: np.ndarray) -> Batch:
        """Rows selected by a boolean mask or an index array, as a new batch."""
        return Batch(
            self.device,
            self.tags[index],
            self.ts[index],
            self.values[index],
            self.quality[index],
            None if self.text is None else self.text[index],
        )

    @staticmethod
    def concat(device: str, parts: Sequence[Batch]) -> Batch:
        """Join batches of one device; the text column appears if any part has one."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return Batch.empty(device)
        if len(parts) == 1:
            return parts[0]
        text = None
        if any(p.text is not None for p in parts):
            text = np.concatenate([p.text if p.text is not None else np.full(len(p), None, object) for p in parts])
        return Batch(
            device,
            np.concatenate([p.tags for p in parts]),
            np.concatenate([p.ts for p in parts]),
            np.concatenate([p.values for p in parts]),
            np.concatenate([p.quality for p in parts]),
            text,
        )
