"""Tags from a CSV file beside the config: plants keep register maps in spreadsheets.

The header names the columns with the same keys as a `[[devices.tags]]` table; an empty cell
means "not set" (the default applies). Cells are text, so each is converted by its field's kind
before the usual checks, and every problem names the file and line.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeos.config.schema import Field, Problems, unknown_key_message

_TRUE = {"true", "yes", "1", "y", "on", "x"}
_FALSE = {"false", "no", "0", "n", "off", ""}


def coerce(cell: str, f: Field | None) -> Any:
    """Text cell -> the Python value a TOML file would have given for this field."""
    text = cell.strip()
    kind = f.kind if f is not None else "str"
    if kind == "bool":
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        return text
    if kind in ("int", "float"):
        try:
            return int(text, 0) if kind == "int" else float(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return text
    if kind == "any":
        return scalar(text)
    return text


def scalar(text: str) -> Any:
    """Best guess for an untyped value: int, float, bool, else the string itself."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


_FILTER = re.compile(r"^\s*([A-Za-z_][\w]*)\s*(?:\((.*)\))?\s*$")


def parse_filters(text: str) -> list[dict[str, Any]]:
    """`deadband(abs=0.5, max_silence=60s); swinging_door(deviation=0.1)` -> filter tables."""
    out: list[dict[str, Any]] = []
    for part in (p for p in text.split(";") if p.strip()):
        m = _FILTER.match(part)
        if not m:
            raise ValueError(f"found {part.strip()!r}, expected name(key=value, ...)")
        spec: dict[str, Any] = {"type": m.group(1)}
        for arg in (a for a in (m.group(2) or "").split(",") if a.strip()):
            if "=" not in arg:
                raise ValueError(f"found {arg.strip()!r} in {part.strip()!r}, expected key=value")
            k, v = arg.split("=", 1)
            spec[k.strip()] = scalar(v.strip())
        out.append(spec)
    return out


def read_tags_csv(path: Path, fields: Mapping[str, Field], problems: Problems) -> list[tuple[int, dict[str, Any]]]:
    """Rows as (line number, raw tag table); header problems are reported once."""
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        fh = path.open(newline="", encoding="utf-8-sig")
    except OSError as e:
        problems.add("tags_csv", f"cannot read {path}: {e.strerror or e}")
        return rows
    with fh:
        # The header decides the delimiter: spreadsheets export ',' or ';' (or tabs) by locale.
        first = fh.readline()
        fh.seek(0)
        delimiter = max(",;\t", key=first.count)
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            problems.add("", "empty CSV file, expected a header row naming the tag keys", file=str(path), line=1)
            return rows
        header = [h.strip() for h in header]
        bad = {h for h in header if h not in fields and h != "filters"}
        for h in header:
            if h in bad:
                problems.add(f"column {h!r}", unknown_key_message(h, fields), file=str(path), line=1)
        # A required column missing (often the misspelled one) is said once, not on every row.
        missing = [k for k, f in fields.items() if f.required and k not in header]
        for k in missing:
            what = f" ({fields[k].help})" if fields[k].help else ""
            problems.add(f"column {k!r}", f"missing: every row needs it{what}", file=str(path), line=1)
        if missing:
            return rows
        # Otherwise the rows are still read, without the unknown columns: every other problem in
        # this one pass.
        for rec in reader:
            if not any(c.strip() for c in rec) or rec[0].lstrip().startswith("#"):
                continue
            line = reader.line_num
            if len(rec) > len(header):
                problems.add(
                    "",
                    f"found {len(rec)} cells, expected at most {len(header)} (the header's columns; a cell "
                    f'that holds "{delimiter}", such as an OPC UA node id, goes in double quotes)',
                    file=str(path),
                    line=line,
                )
                continue
            raw: dict[str, Any] = {}
            for key, cell in zip(header, rec, strict=False):
                if not cell.strip() or key in bad:
                    continue
                if key == "filters":
                    try:
                        raw[key] = parse_filters(cell)
                    except ValueError as e:
                        problems.add("filters", str(e), file=str(path), line=line)
                else:
                    raw[key] = coerce(cell, fields.get(key))
            rows.append((line, raw))
    return rows
