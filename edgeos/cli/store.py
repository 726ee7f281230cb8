"""Query commands: tags, query, export. Read-only: safe while the daemon runs."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Annotated, NoReturn

import numpy as np
import typer

from edgeos.cli import core
from edgeos.cli.app import app
from edgeos.cli.core import ConfigPos, gateway_or_exit
from edgeos.config.units import parse_duration_ns, parse_time_ns
from edgeos.errors import StoreError
from edgeos.model import Quality
from edgeos.store import StoreReader, aggregate
from edgeos.store.reader import CSV_HEADER, csv_rows

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="Config file; its gateway.data_dir is the store to read.")
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Read this data directory instead of the config's.")
]
FormatOpt = Annotated[str, typer.Option("--format", "-f", help="table, csv or json.")]


def _open(config: Path, data_dir: Path | None) -> StoreReader:
    directory = (data_dir if data_dir is not None else gateway_or_exit(config).data_dir).absolute()
    try:
        return StoreReader(directory)
    except PermissionError as e:
        denied(e.filename or directory)
    except StoreError as e:
        db = directory / "edgeos.db"
        if db.exists() and not os.access(db, os.R_OK):
            denied(db)
        typer.echo(f"edgeos: {e}", err=True)
        raise typer.Exit(1) from None


def denied(path: object) -> NoReturn:
    """One line for a permission problem: what was denied, and the three ways in."""
    typer.echo(
        f"edgeos: permission denied: {path}. Run as the service user, join the group that may read "
        "the store (docs/store.md), or use sudo.",
        err=True,
    )
    raise typer.Exit(1)


def _iso(ns: int) -> str:
    if not ns:
        return "-"
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _when(text: str, what: str, now: int) -> int:
    try:
        return parse_time_ns(text, now)
    except ValueError as e:
        typer.echo(f"edgeos: --{what}: {e}", err=True)
        raise typer.Exit(2) from None


def _value(v: float | str, kind: str = "number") -> str | float | bool | None:
    """A stored value as people read it: text as is, booleans as true/false, and numbers without
    binary noise: a whole number exact; a value that is exactly a float32 (a float32 register,
    say) in float32's shortest form (123.456, not 123.45600128173828); any other at 15
    significant digits, which a float64 holds exactly (62.48, not 62.480000000000004).
    `edgeos export` writes every value exact."""
    if isinstance(v, str):
        return v
    if math.isnan(v):
        return None
    if kind == "bool":
        return v != 0.0
    return clean_float(v)


def clean_float(v: float) -> float:
    # A whole number is shown exact: a 64-bit register's 2**53 is 9007199254740992, not the
    # float32 form 9.007199e+15 of the same bits, nor 15 digits of a larger one.
    if math.isinf(v) or len(repr(v)) <= 12 or v.is_integer():  # already short, or whole
        return v
    f32 = np.float32(v)
    if float(f32) == v:
        return float(str(f32))
    return float(f"{v:.15g}")


def _cell(v: object) -> str:
    """Table and CSV text: booleans as true/false (as JSON and the demo print them), None empty."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _emit(rows: list[dict], fmt: str) -> None:
    if fmt == "json":
        for r in rows:
            sys.stdout.write(json.dumps(r) + "\n")
        return
    if not rows:
        return
    cols = list(rows[0])
    if fmt == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(cols)
        w.writerows([_cell(r[c]) for c in cols] for r in rows)
        return
    if fmt != "table":
        typer.echo(f"edgeos: --format: found {fmt!r}, expected table, csv or json", err=True)
        raise typer.Exit(2)
    text = [[_cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    typer.echo("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for t in text:
        typer.echo("  ".join(x.ljust(w) for x, w in zip(t, widths, strict=True)).rstrip())


@app.command()
def tags(
    config_file: ConfigPos = None,
    config: core.ConfigOpt = None,
    data_dir: DataDirOpt = None,
    fmt: FormatOpt = "table",
) -> None:
    """List every stored tag with its last value, time and quality.

    Reads the local store (the config's data_dir, or --data-dir); safe while the daemon runs.
    The config may be named as for run and status: `edgeos tags FILE` or `-c FILE`.
    """
    with _open(core.pick_config(config_file, config), data_dir) as store:
        rows = [
            {
                "tag": t.key,
                "value": _value(v, t.kind),
                "unit": t.unit,
                "time": _iso(ts),
                "quality": Quality.describe(q),
            }
            for t, ts, v, q in store.latest()
        ]
    _emit(rows, fmt)


@app.command()
def query(
    tag: Annotated[list[str], typer.Argument(help="Tags as device/tag (or a tag name unique to one device).")],
    since: Annotated[
        str, typer.Option(help='Start: "1h" (ago), "now", ISO 8601 such as 2026-11-22T08:00Z, or @unix.')
    ] = "1h",
    until: Annotated[str, typer.Option(help="End, same forms as --since.")] = "now",
    every: Annotated[str | None, typer.Option(help='Aggregate into buckets of this length, e.g. "1m".')] = None,
    agg: Annotated[str, typer.Option(help="With --every: mean, min, max, first, last or count.")] = "mean",
    config: ConfigOpt = Path("/etc/edgeos/edgeos.toml"),
    data_dir: DataDirOpt = None,
    fmt: FormatOpt = "table",
) -> None:
    """Print the history of one or more tags over a time range, raw or aggregated.

    Times are UTC in the output. With --every, buckets are aligned to multiples of the bucket
    length (whole minutes for "1m") and Bad samples are left out of the aggregate.
    """
    now = time.time_ns()
    lo, hi = _when(since, "since", now), _when(until, "until", now)
    _check_range(lo, hi, since, until)
    if agg not in ("mean", "min", "max", "first", "last", "count"):
        typer.echo(f"edgeos: --agg: found {agg!r}, expected one of mean, min, max, first, last, count", err=True)
        raise typer.Exit(2)
    try:
        step = parse_duration_ns(every) if every else None
    except ValueError as e:
        typer.echo(f"edgeos: --every: {e}", err=True)
        raise typer.Exit(2) from None
    if every and not step:
        typer.echo(f"edgeos: --every: found {every!r}, expected a bucket longer than 0", err=True)
        raise typer.Exit(2)
    if agg != "mean" and not step:  # asked for an aggregate: say it needs buckets, not print raw rows
        typer.echo(f"edgeos: --agg {agg} needs --every (the bucket length, e.g. 1m)", err=True)
        raise typer.Exit(2)
    rows: list[dict] = []
    left_out = 0  # samples of tags with no bucket: all Bad, or not numbers (text, NaN)
    with _open(config, data_dir) as store:
        for name in tag:
            try:
                h = store.history(name, lo, hi)
            except KeyError as e:
                typer.echo(f"edgeos: {e.args[0]}", err=True)
                raise typer.Exit(1) from None
            if step:
                starts, vals, counts = aggregate(h, step, agg)
                if not len(starts):
                    left_out += len(h)
                rows += [
                    {"time": _iso(int(t)), "tag": h.tag.key, agg: _value(float(v)), "samples": int(c)}
                    for t, v, c in zip(starts, vals, counts, strict=True)
                ]
            else:
                text = h.text or [None] * len(h)
                rows += [
                    {
                        "time": _iso(int(t)),
                        "tag": h.tag.key,
                        "value": _value(s if s is not None else float(v), h.tag.kind),
                        "quality": Quality.describe(int(q)),
                    }
                    for t, v, q, s in zip(h.ts, h.values, h.quality, text, strict=True)
                ]
        span = None if rows else store.time_range()
    if not rows:
        what = f" to aggregate ({left_out} left out: Bad, or not a number)" if left_out else ""
        held = ""
        if span is not None and hi < span[0]:
            # Said, so an empty answer is not read as "the machine sent nothing then".
            held = (
                f" (the store's oldest sample is from {_iso(span[0])}; retention and the size budget drop the oldest)"
            )
        typer.echo(f"edgeos: no samples of {', '.join(tag)}{what} between {_iso(lo)} and {_iso(hi)}{held}", err=True)
    _emit(rows, fmt)


def _check_range(lo: int, hi: int, since: str, until: str) -> None:
    if hi < lo:
        typer.echo(f"edgeos: --until {until} ({_iso(hi)}) is before --since {since} ({_iso(lo)})", err=True)
        raise typer.Exit(2)


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV file to write ('-' for standard output).")],
    since: Annotated[str, typer.Option(help="Start (same forms as query).")],
    until: Annotated[str, typer.Option(help="End.")] = "now",
    tag: Annotated[list[str] | None, typer.Argument(help="Tags to export (default: all).")] = None,
    config: ConfigOpt = Path("/etc/edgeos/edgeos.toml"),
    data_dir: DataDirOpt = None,
) -> None:
    """Export raw history to CSV (time, tag, value, quality), sorted by time.

    Streams one hour at a time, so a year of history needs no more memory than an hour of it.
    """
    now = time.time_ns()
    lo, hi = _when(since, "since", now), _when(until, "until", now)
    _check_range(lo, hi, since, until)
    rows = 0
    with _open(config, data_dir) as store:
        try:
            infos = [store.resolve(t) for t in tag] if tag else store.tags()
        except KeyError as e:
            typer.echo(f"edgeos: {e.args[0]}", err=True)
            raise typer.Exit(1) from None
        try:
            fh = sys.stdout if str(out) == "-" else out.open("w", newline="", encoding="utf-8")
        except OSError as e:
            typer.echo(f"edgeos: --out {out}: {e.strerror or e}", err=True)
            raise typer.Exit(1) from None
        try:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(CSV_HEADER)
            for chunk in csv_rows(store, infos, lo, hi):
                w.writerows(chunk)
                rows += len(chunk)
        finally:
            if fh is not sys.stdout:
                fh.close()
    if str(out) != "-":
        typer.echo(f"wrote {rows} samples to {out}", err=True)
