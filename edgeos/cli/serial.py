"""`edgeos serial test`: what a line would parse into, so a regex can be tuned without the device."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from edgeos import plugins
from edgeos.cli.app import app
from edgeos.cli.core import ConfigArg, load_or_exit
from edgeos.cli.store import clean_float
from edgeos.model import Quality

serial_app = typer.Typer(help="Serial line devices: try a device's framing and regex on sample lines.")
app.add_typer(serial_app, name="serial")


@serial_app.command("test")
def test(
    device: Annotated[str, typer.Argument(help="A serial device's name, as in the config.")],
    lines: Annotated[list[str], typer.Argument(help="Sample frames, as the device sends them (escapes: \\r \\xHH).")],
    config: ConfigArg = Path("/etc/edgeos/edgeos.toml"),
    request: Annotated[int, typer.Option("--request", "-r", help="Poll mode: which request's reply (from 1).")] = 1,
) -> None:
    """Show what each sample line would parse into: checksum, pattern, and every tag's value.

    Each line is one frame's content; a trailing terminator is stripped, and `\\r`, `\\n`, `\\t`,
    `\\xHH` stand for those bytes (so STX is `\\x02`). In poll mode the lines are read with the
    first request's pattern unless --request picks another. Exits 1 if any line is refused.
    """
    from edgeos.protocols.serial.adapter import spec_of
    from edgeos.protocols.serial.config import parse_bytes
    from edgeos.protocols.serial.framing import Frames
    from edgeos.protocols.serial.parse import Parser

    cfg = load_or_exit(config)
    dev = next((d for d in cfg.devices if d.name == device), None)
    if dev is None or dev.protocol != "serial":
        serial = ", ".join(d.name for d in cfg.devices if d.protocol == "serial") or "none"
        typer.echo(f"edgeos serial test: {device!r} is not a serial device of {config} (serial devices: {serial})")
        raise typer.Exit(2)
    plugins.load(plugins.PROTOCOLS, "serial")
    spec = spec_of(dev)
    parser = Parser(dev.name, spec)
    if spec.requests and not 1 <= request <= len(spec.requests):
        typer.echo(f"edgeos serial test: --request {request}: {device} has requests 1..{len(spec.requests)}")
        raise typer.Exit(2)
    patterns = [spec.requests[request - 1].pattern] if spec.requests else list(spec.patterns)
    names = {t.id: t for t in dev.tags}
    failed = False
    for text in lines:
        try:
            raw = parse_bytes(text, spec.encoding)
        except (ValueError, UnicodeEncodeError) as e:
            typer.echo(f"{text!r}: {e}")
            failed = True
            continue
        if spec.framing == "terminator" and raw.endswith(spec.terminator):
            raw = raw[: -len(spec.terminator)]
        typer.echo(f"frame {raw!r} ({len(raw)} bytes)")
        frames = Frames(raw, [0], [len(raw)])
        if spec.checksum is not None:
            end, ok, computed, found = parser.check(frames)
            cs = spec.checksum
            digits = 2 * (cs.size if cs.binary else cs.size // 2)
            verdict = "ok" if ok[0] else "FAILED"
            typer.echo(
                f"  checksum {cs.kind}: found {int(found[0]):0{digits}X}, computed {int(computed[0]):0{digits}X}: "
                f"{verdict}"
            )
            raw = raw[: int(end[0])]
        try:
            decoded = raw.decode(spec.encoding)
        except UnicodeDecodeError as e:
            decoded = None
            typer.echo(f"  does not decode as {spec.encoding}: {e}")
        if decoded is not None:
            typer.echo(f"  text {decoded!r}")
            for p in patterns:
                m = p.regex.search(decoded)
                typer.echo(f"  pattern {p.source}: {'matched ' + repr(m.group(0)) if m else 'no match'}")
                if m:
                    break
        res = parser.parse(frames, time.time_ns(), patterns)
        b = res.batch
        text_col = b.text.tolist() if b.text is not None else [None] * len(b)
        cols = (b.tags.tolist(), b.ts.tolist(), b.values.tolist(), b.quality.tolist(), text_col)
        for tid, ts, v, q, x in zip(*cols, strict=True):
            t = names[tid]
            kind = t.meta.kind.value
            if q != Quality.GOOD:
                shown = "-"
            elif kind == "string":
                shown = repr(x)
            elif kind == "bool":
                shown = "true" if v else "false"
            else:
                shown = str(clean_float(v))
            when = ""
            if any(p.ts_group is not None for p in patterns) and q == Quality.GOOD:
                when = "  at " + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts // 10**9)) + f".{ts % 10**9:09d}Z"
            typer.echo(f"  {t.name} = {shown} ({Quality.describe(q)}){when}")
        for f in res.failures:
            failed = True
            typer.echo(f"  refused: {f.reason}" + (f" ({f.detail})" if f.detail else ""))
    raise typer.Exit(1 if failed else 0)
