"""Built-in filter plugins, registered through the `edgeos.filters` entry points.

Each plugin checks its parameters (`fields`, `validate`) and creates a Filter that owns the
per-tag parameter and state arrays and calls one kernel per batch. Semantics are in
docs/filters.md; the executable specification is edgeos/filters/_reference.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeos.config.schema import MISSING, Field
from edgeos.filters import _reference as _ref
from edgeos.filters import kernels
from edgeos.model import Batch

Params = Mapping[int, Mapping[str, Any]]


def _positive(v: float) -> str | None:
    return None if v > 0 else f"found {v!r}, expected a number greater than 0"


def _complete(fields: Mapping[str, Field], p: Mapping[str, Any]) -> dict[str, Any]:
    """Checked params with defaults filled in, so filters can also be built by hand."""
    out = {k: (None if f.default is MISSING else f.default) for k, f in fields.items()}
    out.update(p)
    return out


def _assemble(batch: Batch, cols: tuple[np.ndarray, ...]) -> Batch:
    """A batch from a kernel's (tags, ts, values, quality, src): text follows copied rows only."""
    tags, ts, values, quality, src = cols
    text = None
    if batch.text is not None and src is not None:
        text = np.full(len(src), None, dtype=object)
        copied = src >= 0
        text[copied] = batch.text[src[copied]]
    return Batch(batch.device, tags, ts, values, quality, text)


class _Filter:
    """Common shape: parameters completed per tag, the kernel module chosen once."""

    plugin: _Plugin

    def __init__(self, n_tags: int, params: Params, impl: str = "auto") -> None:
        self._k = kernels(impl)
        self.n_tags = n_tags
        # Tags configured alike share one params object (config/load.py): they share its
        # completed copy too (7,500 dicts at 10,000 tags otherwise).
        done: dict[int, dict[str, Any]] = {}
        self.params: dict[int, dict[str, Any]] = {}
        for t, p in params.items():
            c = done.get(id(p))
            if c is None:
                c = done[id(p)] = _complete(self.plugin.fields, p)
            self.params[int(t)] = c
        self.enabled = np.zeros(n_tags, np.uint8)
        for t in self.params:
            self.enabled[t] = 1

    def _array(self, dtype: Any, key: str, fill: Any = 0, convert: Any = None) -> np.ndarray:
        a = np.full(self.n_tags, fill, dtype)
        for t, p in self.params.items():
            v = p[key]
            a[t] = convert(v, p) if convert is not None else (fill if v is None else v)
        return a

    def _slots(self) -> tuple[np.ndarray, int]:
        slot = np.full(self.n_tags, -1, np.int32)
        for k, t in enumerate(sorted(self.params)):
            slot[t] = k
        return slot, len(self.params)

    @staticmethod
    def _cols(batch: Batch) -> tuple[np.ndarray, ...]:
        return batch.tags, batch.ts, batch.values, batch.quality


class _Plugin:
    name: str
    fields: dict[str, Field]
    filter_class: type[_Filter]

    def validate(self, params: Mapping[str, Any]) -> str | None:
        """Cross-field checks; the message names the keys involved."""
        return None

    def create(self, n_tags: int, params: Params, impl: str = "auto") -> _Filter:
        return self.filter_class(n_tags, params, impl)


# --------------------------------------------------------------------------------------------


class DeadbandFilter(_Filter):
    """Report-by-exception (absolute, % of span or % of the last reported value) with a heartbeat."""

    def __init__(self, n_tags: int, params: Params, impl: str = "auto") -> None:
        super().__init__(n_tags, params, impl)
        self.params_rec = np.zeros(n_tags, _ref.DEADBAND_PARAMS)
        self.params_rec["max_silence"] = _ref.REPORT_ALL  # tags without a deadband here pass through
        for t, p in self.params.items():
            pct = p["percent"] or 0.0
            if pct > 0 and p["percent_of"] == "value":
                self.params_rec["dead_rel"][t] = pct / 100.0
            elif pct > 0:
                self.params_rec["dead_abs"][t] = pct / 100.0 * p["span"]
            else:
                self.params_rec["dead_abs"][t] = p["abs"] or 0.0
            if p["max_silence"] is not None and p["max_silence"] < 0:  # the config allows >= 1 ms
                raise ValueError(f"deadband: tag {t}: max_silence must not be negative (found {p['max_silence']} ns)")
            self.params_rec["max_silence"][t] = p["max_silence"] or _ref.NO_SILENCE_LIMIT
        self.state = np.zeros(n_tags, _ref.DEADBAND_STATE)
        self.state["ref_quality"] = _ref.NO_REF
        self.state["deadline"] = _ref.REPORT_ALL  # no reference: the first sample is reported

    def apply(self, batch: Batch) -> Batch:
        if not len(batch):
            return batch
        return _assemble(
            batch, self._k.deadband(*self._cols(batch), self.params_rec, self.state, batch.text is not None)
        )


class _DeadbandPlugin(_Plugin):
    name = "deadband"
    filter_class = DeadbandFilter
    fields = {
        "abs": Field("float", 0.0, min=0, help="report when |value - last reported| exceeds this"),
        "percent": Field("float", 0.0, min=0, help="deadband in percent of `percent_of`"),
        "percent_of": Field("choice", "span", choices=("span", "value"), help="what percent refers to"),
        "span": Field("float", None, check=_positive, help="the instrument's range (high - low)"),
        "max_silence": Field("duration", None, min=1_000_000, help="report anyway after this long"),
    }

    def validate(self, params: Mapping[str, Any]) -> str | None:
        pct = params.get("percent") or 0.0
        if pct > 0 and (params.get("abs") or 0.0) > 0:
            return "abs and percent are alternatives: set one of them"
        if pct > 0 and params.get("percent_of") == "span" and params.get("span") is None:
            return 'percent_of = "span" needs span (the instrument\'s range, high - low)'
        if params.get("span") is not None and not (pct > 0 and params.get("percent_of") == "span"):
            return 'span is only used with percent > 0 and percent_of = "span"'
        return None


# --------------------------------------------------------------------------------------------


class SwingingDoorFilter(_Filter):
    """Swinging-door compression: keeps the archived points, the trend within `deviation`."""

    def __init__(self, n_tags: int, params: Params, impl: str = "auto") -> None:
        super().__init__(n_tags, params, impl)
        self.state = np.zeros(n_tags, _ref.SWINGING_DOOR_STATE)
        self.state["enabled"] = self.enabled
        self.state["deviation"] = self._array(np.float64, "deviation", 0.0)
        self.state["min_interval"] = self._array(np.int64, "min_interval")
        self.state["max_interval"] = self._array(np.int64, "max_interval")
        self.state["slope_lo"] = -np.inf
        self.state["slope_hi"] = np.inf

    def apply(self, batch: Batch) -> Batch:
        if not len(batch):
            return batch
        return _assemble(batch, self._k.swinging_door(*self._cols(batch), self.state, batch.text is not None))

    def flush(self) -> Batch:
        """Archive every held point (the stop's flush): H always ends a valid segment from A,
        so the deviation guarantee holds, and the trend does not end at an older A."""
        st = self.state
        held = np.flatnonzero(st["has_h"])
        out = Batch("", held.astype(np.int32), st["h_ts"][held], st["h_value"][held], st["h_quality"][held])
        st["a_value"][held] = st["h_value"][held]
        st["a_ts"][held] = st["h_ts"][held]
        st["a_quality"][held] = st["h_quality"][held]
        st["has_a"][held] = 1
        st["has_h"][held] = 0
        st["slope_lo"][held] = -np.inf
        st["slope_hi"][held] = np.inf
        return out


class _SwingingDoorPlugin(_Plugin):
    name = "swinging_door"
    filter_class = SwingingDoorFilter
    fields = {
        "deviation": Field("float", min=0, help="compression deviation, in the tag's unit"),
        "min_interval": Field("duration", None, help="no archived point closer than this to the last one"),
        "max_interval": Field("duration", None, min=1, help="archive a point at least this often"),
    }

    def validate(self, params: Mapping[str, Any]) -> str | None:
        lo, hi = params.get("min_interval"), params.get("max_interval")
        if lo is not None and hi is not None and hi < lo:
            return "max_interval must not be shorter than min_interval"
        return None


# --------------------------------------------------------------------------------------------


class MovingAverageFilter(_Filter):
    """Mean over the last `count` samples or the last `window` of time; one output per input."""

    def __init__(self, n_tags: int, params: Params, impl: str = "auto") -> None:
        super().__init__(n_tags, params, impl)
        self.slot, n_slots = self._slots()
        self.count = self._array(np.int64, "count", 0, lambda c, p: p["max_samples"] if p["window"] else c)
        self.window = self._array(np.int64, "window")
        # One flat buffer, each tag's ring as long as its own count: a single long window in a
        # chain group does not size every tag's ring.
        caps = self.count[sorted(self.params)]
        self.base = (np.cumsum(caps) - caps).astype(np.int64)
        self.buf_v = np.zeros(int(caps.sum()), np.float64)
        self.buf_t = np.zeros(len(self.buf_v), np.int64)
        self.head = np.zeros(n_slots, np.int64)
        self.size = np.zeros(n_slots, np.int64)
        self.total = np.zeros(n_slots, np.float64)
        self.comp = np.zeros(n_slots, np.float64)
        self.pushes = np.zeros(n_slots, np.int64)

    def apply(self, batch: Batch) -> Batch:
        if not len(batch):
            return batch
        values = self._k.moving_average(
            *self._cols(batch),
            self.slot,
            self.count,
            self.window,
            self.base,
            self.buf_v,
            self.buf_t,
            self.head,
            self.size,
            self.total,
            self.comp,
            self.pushes,
        )
        return Batch(batch.device, batch.tags, batch.ts, values, batch.quality, batch.text)


class _MovingAveragePlugin(_Plugin):
    name = "moving_average"
    filter_class = MovingAverageFilter
    fields = {
        "count": Field("int", None, min=1, max=100_000, help="average of the last N samples"),
        "window": Field("duration", None, min=1, help="average of the samples in the last window of time"),
        "max_samples": Field("int", 1000, min=1, max=100_000, help="most samples a time window holds"),
    }

    def validate(self, params: Mapping[str, Any]) -> str | None:
        if (params.get("count") is None) == (params.get("window") is None):
            return "set exactly one of count (samples) or window (time)"
        return None


class EwmaFilter(_Filter):
    """Exponentially weighted moving average with a time constant, exact for irregular sampling."""

    def __init__(self, n_tags: int, params: Params, impl: str = "auto") -> None:
        super().__init__(n_tags, params, impl)
        self.tau = self._array(np.int64, "time_constant", 1)
        self.has_y = np.zeros(n_tags, np.uint8)
        self.y = np.zeros(n_tags, np.float64)
        self.y_ts = np.zeros(n_tags, np.int64)

    def apply(self, batch: Batch) -> Batch:
        if not len(batch):
            return batch
        values = self._k.ewma(*self._cols(batch), self.enabled, self.tau, self.has_y, self.y, self.y_ts)
        return Batch(batch.device, batch.tags, batch.ts, values, batch.quality, batch.text)


class _EwmaPlugin(_Plugin):
    name = "ewma"
    filter_class = EwmaFilter
    fields = {"time_constant": Field("duration", min=1, help="a step is 63% followed after this long")}


# --------------------------------------------------------------------------------------------


class RateFilter(_Filter):
    """Per-second rate of change between consecutive usable samples."""

    def __init__(self, n_tags: int, params: Params, impl: str = "auto") -> None:
        super().__init__(n_tags, params, impl)
        self.has_p = np.zeros(n_tags, np.uint8)
        self.p_value = np.zeros(n_tags, np.float64)
        self.p_ts = np.zeros(n_tags, np.int64)
        self.p_quality = np.zeros(n_tags, np.uint32)

    def apply(self, batch: Batch) -> Batch:
        if not len(batch):
            return batch
        cols = self._k.rate(
            *self._cols(batch),
            self.enabled,
            self.has_p,
            self.p_value,
            self.p_ts,
            self.p_quality,
            batch.text is not None,
        )
        return _assemble(batch, cols)


class _RatePlugin(_Plugin):
    name = "rate"
    filter_class = RateFilter
    fields: dict[str, Field] = {}


class CounterDeltaFilter(_Filter):
    """Increase of a production counter per sample, across rollovers and resets."""

    def __init__(self, n_tags: int, params: Params, impl: str = "auto") -> None:
        super().__init__(n_tags, params, impl)
        self.modulus = self._array(np.float64, "bits", 2.0**32, lambda b, p: 2.0 ** int(b))
        self.max_increase = self._array(
            np.float64, "max_increase", 2.0**31, lambda m, p: 2.0 ** (int(p["bits"]) - 1) if m is None else m
        )
        self.has_p = np.zeros(n_tags, np.uint8)
        self.p_value = np.zeros(n_tags, np.float64)
        self.p_quality = np.zeros(n_tags, np.uint32)

    def apply(self, batch: Batch) -> Batch:
        if not len(batch):
            return batch
        cols = self._k.counter_delta(
            *self._cols(batch),
            self.enabled,
            self.modulus,
            self.max_increase,
            self.has_p,
            self.p_value,
            self.p_quality,
            batch.text is not None,
        )
        return _assemble(batch, cols)


def _bits(v: int) -> str | None:
    return None if v in (16, 32, 64) else f"found {v!r}, expected one of 16, 32, 64"


class _CounterDeltaPlugin(_Plugin):
    name = "counter_delta"
    filter_class = CounterDeltaFilter
    fields = {
        "bits": Field("int", 32, check=_bits, help="the counter's width: it rolls over at 2**bits"),
        "max_increase": Field(
            "float", None, check=_positive, help="largest plausible increase; a bigger wrap is a reset"
        ),
    }

    def validate(self, params: Mapping[str, Any]) -> str | None:
        bits, most = params.get("bits", 32), params.get("max_increase")
        if most is not None and bits in (16, 32, 64) and most > 2.0**bits:
            return f"max_increase {most:g} is more than a {bits}-bit counter can count (2**{bits})"
        return None


# --------------------------------------------------------------------------------------------

AGGREGATES = ("min", "max", "mean", "first", "last", "count", "stddev")


class WindowFilter(_Filter):
    """Tumbling windows aligned to the UTC clock; one aggregate per closed window, at its start."""

    def __init__(self, n_tags: int, params: Params, impl: str = "auto") -> None:
        super().__init__(n_tags, params, impl)
        self.width = self._array(np.int64, "width", 1)
        self.offset = self._array(np.int64, "offset")
        self.agg = self._array(np.uint8, "agg", 0, lambda a, p: AGGREGATES.index(a or "mean"))
        self.has_w = np.zeros(n_tags, np.uint8)
        self.w_start = np.zeros(n_tags, np.int64)
        self.n_used = np.zeros(n_tags, np.int64)
        self.n_bad = np.zeros(n_tags, np.int64)
        self.last_bad = np.zeros(n_tags, np.uint32)
        self.not_good = np.zeros(n_tags, np.uint8)
        self.first = np.zeros(n_tags, np.float64)
        self.last = np.zeros(n_tags, np.float64)
        self.vmin = np.zeros(n_tags, np.float64)
        self.vmax = np.zeros(n_tags, np.float64)
        self.shift = np.zeros(n_tags, np.float64)
        self.s1 = np.zeros(n_tags, np.float64)
        self.s2 = np.zeros(n_tags, np.float64)

    def apply(self, batch: Batch) -> Batch:
        if not len(batch):
            return batch
        cols = self._k.window(
            *self._cols(batch),
            self.enabled,
            self.width,
            self.offset,
            self.agg,
            self.has_w,
            self.w_start,
            self.n_used,
            self.n_bad,
            self.last_bad,
            self.not_good,
            self.first,
            self.last,
            self.vmin,
            self.vmax,
            self.shift,
            self.s1,
            self.s2,
            batch.text is not None,
        )
        return _assemble(batch, cols)

    def flush(self) -> Batch:
        """Emit every open window (the stop's flush) as an aggregate over the part seen so far,
        marked UNCERTAIN_SUB_NORMAL (a window of only Bad samples keeps its Bad code), and
        close it. After a restart the rest of that window is the first window seen, and is
        marked the same way, so neither part passes for the whole window."""
        out = _ref._Out(False)
        for t in np.flatnonzero(self.has_w & self.enabled):
            self.not_good[t] |= 2  # seen only in part
            _ref._window_emit(
                out,
                int(t),
                int(self.w_start[t]),
                int(self.agg[t]),
                int(self.n_used[t]),
                int(self.n_bad[t]),
                int(self.last_bad[t]),
                int(self.not_good[t]),
                float(self.first[t]),
                float(self.last[t]),
                float(self.vmin[t]),
                float(self.vmax[t]),
                float(self.shift[t]),
                float(self.s1[t]),
                float(self.s2[t]),
            )
            self.has_w[t] = 0
        tags, ts, values, quality, _ = out.columns()
        return Batch("", tags, ts, values, quality)


class _WindowPlugin(_Plugin):
    name = "window"
    filter_class = WindowFilter
    fields = {
        "width": Field("duration", min=1_000_000, help="window length; windows start at multiples of it (UTC)"),
        "agg": Field("choice", "mean", choices=AGGREGATES, help="the aggregate emitted per window"),
        "offset": Field("duration", None, help="shift the window grid (e.g. to a local midnight)"),
    }

    def validate(self, params: Mapping[str, Any]) -> str | None:
        off, width = params.get("offset"), params.get("width")
        if off is not None and width is not None and off >= width:
            return "offset must be shorter than width"
        return None


# --------------------------------------------------------------------------------------------

HAMPEL_SIGMA = 1.4826  # MAD -> standard deviation for normally distributed noise


class SpikeFilter(_Filter):
    """Marks outliers against the median of the recent samples as UNCERTAIN_SENSOR_NOT_ACCURATE."""

    def __init__(self, n_tags: int, params: Params, impl: str = "auto") -> None:
        super().__init__(n_tags, params, impl)
        self.slot, n_slots = self._slots()
        self.count = self._array(np.int64, "window", 7)
        hampel = {t: p["method"] != "median" for t, p in self.params.items()}
        self.k_mad = self._array(np.float64, "threshold", 0.0, lambda v, p: v * HAMPEL_SIGMA)
        for t, h in hampel.items():
            if not h:
                self.k_mad[t] = 0.0
        self.floor = self._array(np.float64, "deviation", 0.0)
        if (self.count > _ref.MAX_SPIKE_WINDOW).any():
            raise ValueError(f"spike window is at most {_ref.MAX_SPIKE_WINDOW} samples")
        cap = int(self.count.max(initial=1)) or 1
        self.buf_v = np.zeros((n_slots, cap), np.float64)
        self.buf_sorted = np.zeros((n_slots, cap), np.float64)
        self.head = np.zeros(n_slots, np.int64)
        self.size = np.zeros(n_slots, np.int64)

    def apply(self, batch: Batch) -> Batch:
        if not len(batch):
            return batch
        quality = self._k.spike(
            *self._cols(batch),
            self.slot,
            self.count,
            self.k_mad,
            self.floor,
            self.buf_v,
            self.buf_sorted,
            self.head,
            self.size,
        )
        return Batch(batch.device, batch.tags, batch.ts, batch.values, quality, batch.text)


class _SpikePlugin(_Plugin):
    name = "spike"
    filter_class = SpikeFilter
    fields = {
        "method": Field("choice", "hampel", choices=("hampel", "median"), help="how the limit is set"),
        "window": Field("int", 7, min=3, max=_ref.MAX_SPIKE_WINDOW, help="samples the median is taken over"),
        "threshold": Field("float", 3.0, check=_positive, help="hampel: limit in robust standard deviations"),
        "deviation": Field("float", 0.0, min=0, help="median: the limit; hampel: the smallest limit"),
    }

    def validate(self, params: Mapping[str, Any]) -> str | None:
        if params.get("method") == "median" and not params.get("deviation"):
            return 'method = "median" needs deviation > 0 (the largest accepted distance from the median)'
        return None


# --------------------------------------------------------------------------------------------

RANGE_MODES = ("bad", "uncertain", "clamp")


class RangeFilter(_Filter):
    """Values outside [low, high] become Bad, Uncertain, or are clamped (GOOD_CLAMPED)."""

    def __init__(self, n_tags: int, params: Params, impl: str = "auto") -> None:
        super().__init__(n_tags, params, impl)
        self.low = self._array(np.float64, "low", -np.inf)
        self.high = self._array(np.float64, "high", np.inf)
        self.mode = self._array(np.uint8, "mode", 0, lambda m, p: RANGE_MODES.index(m or "bad"))

    def apply(self, batch: Batch) -> Batch:
        if not len(batch):
            return batch
        values, quality = self._k.range_check(*self._cols(batch), self.enabled, self.low, self.high, self.mode)
        return Batch(
            batch.device, batch.tags, batch.ts, batch.values if values is None else values, quality, batch.text
        )


class _RangePlugin(_Plugin):
    name = "range"
    filter_class = RangeFilter
    fields = {
        "low": Field("float", None, help="lowest valid value (inclusive)"),
        "high": Field("float", None, help="highest valid value (inclusive)"),
        "mode": Field("choice", "bad", choices=RANGE_MODES, help="what happens to a value outside the limits"),
    }

    def validate(self, params: Mapping[str, Any]) -> str | None:
        lo, hi = params.get("low"), params.get("high")
        if lo is None and hi is None:
            return "set low, high or both"
        if lo is not None and hi is not None and lo > hi:
            return "low must not be greater than high"
        return None


for _cls, _plugin in (
    (DeadbandFilter, _DeadbandPlugin),
    (SwingingDoorFilter, _SwingingDoorPlugin),
    (MovingAverageFilter, _MovingAveragePlugin),
    (EwmaFilter, _EwmaPlugin),
    (RateFilter, _RatePlugin),
    (CounterDeltaFilter, _CounterDeltaPlugin),
    (WindowFilter, _WindowPlugin),
    (SpikeFilter, _SpikePlugin),
    (RangeFilter, _RangePlugin),
):
    _cls.plugin = _plugin()

deadband = DeadbandFilter.plugin
swinging_door = SwingingDoorFilter.plugin
moving_average = MovingAverageFilter.plugin
ewma = EwmaFilter.plugin
rate = RateFilter.plugin
counter_delta = CounterDeltaFilter.plugin
window = WindowFilter.plugin
spike = SpikeFilter.plugin
range_ = RangeFilter.plugin  # the entry point is named "range"
