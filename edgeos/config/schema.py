"""A small declarative schema: typed fields, defaults, and every problem collected in one pass.

Plugins describe their device and tag options with the same `Field`s, so unknown keys, wrong
types and bad choices are reported the same way for built-in and third-party adapters.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeos.config.units import parse_duration_ns, parse_size
from edgeos.errors import ConfigError, Problem

_MISSING: Any = object()


@dataclass
class Problems:
    """Collects problems while a config is checked; `raise_if_any` ends the pass."""

    file: str
    items: list[Problem] = field(default_factory=list)
    _seen: set[Problem] = field(default_factory=set, repr=False)

    def add(self, path: str, message: str, *, line: int | None = None, file: str | None = None):
        """A "missing" problem for a key already refused is left out: the key is there, its value
        was refused, and the checks after that one see it as absent (security_mode = "none")."""
        file = file or self.file
        if message.startswith("missing") and any(p.path == path and p.file == file for p in self.items):
            return
        problem = Problem(file, path, message, line)
        if problem in self._seen:
            return  # the same problem again: one tags CSV read for several devices
        self._seen.add(problem)
        self.items.append(problem)

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)


@dataclass(frozen=True)
class Field:
    """One key: its kind, default, and constraints.

    kind is one of: str, path (a file name, resolved relative to the config file's directory:
    the daemon runs in /), int, float, bool, duration (-> ns int), size (-> bytes int),
    choice (one of `choices`), list (of `item` kind), any.
    """

    kind: str
    default: Any = _MISSING
    help: str = ""
    choices: Sequence[Any] = ()
    min: float | None = None
    max: float | None = None
    item: str = "str"
    check: Callable[[Any], str | None] | None = None  # returns an error message or None
    # A secret, never shown (edgeos.logs.redact): "value" (the key holds it), "file" (names a file
    # holding it) or "env" (names an environment variable holding it).
    secret: str = ""

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def default_value(self) -> Any:
        """The default as a parsed value would be (None stays None). A duration's or a size's
        default may be written as the config writes it ("5s") or already parsed (ns, bytes)."""
        if self.default is None:
            return None
        if self.kind in ("duration", "size") and type(self.default) is int and self.default >= 0:
            return self.default
        return self._convert(self.kind, self.default)

    def parse(self, value: Any, path: str, problems: Problems) -> Any:
        if self.secret == "value" and isinstance(value, str):
            from edgeos.logs import register_secret

            register_secret(value)  # before any problem message could quote it
        try:
            out = self._convert(self.kind, value)
        except ValueError as e:
            problems.add(path, str(e))
            return _MISSING
        if self.choices and out not in self.choices:
            expected = ", ".join(str(c) for c in self.choices)
            problems.add(path, f"found {_show(value)}, expected one of {expected}")
            return _MISSING
        if isinstance(out, int | float) and not isinstance(out, bool):
            if self.min is not None and out < self.min:
                problems.add(path, f"found {_show(value)}, expected at least {_fmt_bound(self, self.min)}")
                return _MISSING
            if self.max is not None and out > self.max:
                problems.add(path, f"found {_show(value)}, expected at most {_fmt_bound(self, self.max)}")
                return _MISSING
        if self.check is not None:
            msg = self.check(out)
            if msg:
                problems.add(path, msg)
                return _MISSING
        return out

    def _convert(self, kind: str, value: Any) -> Any:
        if kind == "any":
            return value
        if kind == "choice":
            # A choice as written or as its text: `mqtt_version = 5` is "5", `unit_version = "3"`
            # is 3 (the docs show both bare). Anything else names the choices, never a type.
            if isinstance(value, str | int) and not isinstance(value, bool):
                for c in self.choices:
                    if value == c or str(value) == str(c):
                        return c
            raise ValueError(f"found {_show(value)}, expected one of {', '.join(str(c) for c in self.choices)}")
        if kind in ("str", "path"):
            if not isinstance(value, str):
                raise ValueError(f"found {_show(value)}, expected a string")
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"found {_show(value)}, expected true or false")
            return value
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"found {_show(value)}, expected a whole number")
            return value
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"found {_show(value)}, expected a number")
            if not math.isfinite(value):
                raise ValueError(f"found {_show(value)}, expected a finite number")
            return float(value)
        if kind == "duration":
            return parse_duration_ns(value)
        if kind == "size":
            return parse_size(value)
        if kind == "list":
            if not isinstance(value, list):
                raise ValueError(f"found {_show(value)}, expected a list")
            return [self._convert(self.item, v) for v in value]
        raise AssertionError(f"unknown field kind {kind}")


def _fmt_bound(f: Field, bound: float) -> str:
    if f.kind == "duration":
        from edgeos.config.units import format_duration_ns

        return format_duration_ns(int(bound))
    if f.kind == "size":
        from edgeos.config.units import format_size

        return format_size(int(bound))
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def parse_table(
    raw: Any,
    fields: Mapping[str, Field],
    path: str,
    problems: Problems,
    *,
    extra: Mapping[str, Field] | None = None,
    owner: Callable[[], str] | None = None,
) -> dict[str, Any]:
    """Check `raw` against `fields` (plus `extra`), returning values with defaults filled in.
    `owner()` names who declared the fields, asked only for the problem a wrong default is.

    Unknown keys are problems naming the closest allowed key, because a typo silently
    ignored is a tag silently not read.
    """
    allowed = dict(fields)
    if extra:
        allowed.update(extra)
    if not isinstance(raw, dict):
        problems.add(path, f"found {_show(raw)}, expected a table")
        return {}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        kpath = f"{path}.{key}" if path else key
        f = allowed.get(key)
        if f is None:
            problems.add(kpath, unknown_key_message(key, allowed))
            continue
        parsed = f.parse(value, kpath, problems)
        if parsed is not _MISSING:
            out[key] = parsed
        elif not f.required:
            # Refused, and listed: the default stands in, so that the checks of the rest of the
            # table go on (a KeyError there was a traceback hiding every problem of the file).
            out[key] = _default(f, kpath, problems, owner)
    for key, f in allowed.items():
        if key in raw:
            continue
        if f.required:
            problems.add(f"{path}.{key}" if path else key, f"missing required key ({f.help or f.kind})")
        else:
            out[key] = _default(f, f"{path}.{key}" if path else key, problems, owner)
    return out


def _default(f: Field, path: str, problems: Problems, owner: Callable[[], str] | None = None) -> Any:
    """A field's default; one a plugin declared wrongly is a problem named by its key and its
    plugin, not a traceback from `edgeos check`."""
    try:
        return f.default_value()
    except ValueError as e:
        who = owner() if owner is not None else "the plugin"
        problems.add(path, f"the default {who} declares for this key is wrong ({e}): a bug in the plugin; set the key")
        return None


def unknown_key_message(key: str, allowed: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}; allowed: {', '.join(sorted(allowed)) or 'none (it takes no keys)'}"


MISSING = _MISSING
