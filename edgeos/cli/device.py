"""Device commands: write a tag's value to its device."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from edgeos import plugins
from edgeos.cli.app import app
from edgeos.cli.core import ConfigArg, load_or_exit
from edgeos.cli.store import clean_float
from edgeos.errors import EdgeosError
from edgeos.model import ValueKind
from edgeos.service import control

_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no"}


def parse_value(text: str, kind: ValueKind) -> int | float | bool | str:
    """The command line's text as the tag's kind: true/false/on/off/1/0, a number, or text.

    Integers (decimal or 0x hex) stay Python ints, exact beyond 2**53 (64-bit registers)."""
    if kind is ValueKind.STRING:
        return text
    low = text.strip().lower()
    if kind is ValueKind.BOOL:
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"found {text!r}, expected true/false, on/off or 1/0")
    try:
        return int(low, 16) if low.startswith(("0x", "-0x")) else int(low)
    except ValueError:
        pass
    try:
        return float(low)
    except ValueError:
        raise ValueError(f"found {text!r}, expected a number") from None


def _as_written(asked: object, written: object) -> str:
    """The value the device now holds, and what was asked when it differs (rounded)."""
    if written is None:
        return f"{asked}"
    shown = clean_float(written) if isinstance(written, float) else written
    if isinstance(shown, bool):
        shown = "true" if shown else "false"
    if written == asked or shown == asked or isinstance(asked, bool):
        return f"{shown}"
    return f"{shown} (asked {asked}; rounded to what the tag holds)"


def _named(device: str, tag: str, error: str) -> str:
    """The error once, named once: a DeviceError already reads 'DEV: write: ...'."""
    return error if error.startswith(f"{device}:") else f"{device}/{tag}: {error}"


# A negative value ("-5") is not an option: unknown options are taken as arguments.
@app.command(context_settings={"ignore_unknown_options": True})
def write(
    device: Annotated[str, typer.Argument(help="Device name, as in the config.")],
    tag: Annotated[str, typer.Argument(help="Tag name within the device.")],
    value: Annotated[str, typer.Argument(help="New value: a number, true/false (on/off, 1/0) or text.")],
    config: ConfigArg = Path("/etc/edgeos/edgeos.toml"),
    direct: Annotated[bool, typer.Option("--direct", help="Connect to the device even if the daemon runs.")] = False,
) -> None:
    """Write one tag's value to its device, with type conversion and range checks.

    Only tags configured `writable = true` accept writes. The value is converted to the tag's
    type (scale and offset undone) and refused if it does not fit. When the daemon runs, the
    write goes through it (its control socket in the data directory) and shares its device
    connection; otherwise, or with --direct, this connects to the device itself. Directly, a
    serial port (Modbus RTU) is opened exclusively and refused while another process holds it,
    since a second master on one line would garble both.
    Negative numbers need no "--": edgeos write -c F DEV TAG -5
    """
    cfg = load_or_exit(config)
    try:
        dev = cfg.device(device)
    except KeyError:
        typer.echo(f"edgeos: no device {device!r}; devices: {', '.join(d.name for d in cfg.devices)}", err=True)
        raise typer.Exit(2) from None
    tc = next((t for t in dev.tags if t.name == tag), None)
    if tc is None:
        names = ", ".join(t.name for t in dev.tags)
        typer.echo(f"edgeos: device {device!r} has no tag {tag!r}; its tags: {names}", err=True)
        raise typer.Exit(2)
    if not tc.meta.writable:
        typer.echo(f"edgeos: {device}/{tag} is not writable (set writable = true in its config)", err=True)
        raise typer.Exit(1)
    try:
        v = parse_value(value, tc.meta.kind)
    except ValueError as e:
        typer.echo(f"edgeos: {device}/{tag}: {e}", err=True)
        raise typer.Exit(2) from None
    if not direct:
        try:
            reply = asyncio.run(
                control.request(cfg.gateway.data_dir, {"op": "write", "device": device, "tag": tag, "value": v})
            )
        except PermissionError:
            from edgeos.cli.store import denied

            denied(control.socket_path(cfg.gateway.data_dir))
        if reply is not None:
            if not reply.get("ok"):
                typer.echo(f"edgeos: {_named(device, tag, str(reply.get('error')))}", err=True)
                raise typer.Exit(1)
            typer.echo(f"wrote {device}/{tag} = {_as_written(v, reply.get('written'))} (through the running daemon)")
            return
    plugin = plugins.load(plugins.PROTOCOLS, dev.protocol)
    if getattr(plugin, "in_process", False):
        typer.echo(
            f"edgeos: {device} is a {dev.protocol} device: it exists only inside the running daemon, and no "
            f"daemon runs on {cfg.gateway.data_dir}; start it (edgeos run -c {config}) and write again. "
            "Nothing was written.",
            err=True,
        )
        raise typer.Exit(1)
    adapter = plugin.create(dev)

    async def run() -> float | bool | str | None:
        try:
            await adapter.connect()
            return await adapter.write(tc, v)
        finally:
            await adapter.close()

    try:
        written = asyncio.run(run())
    except (EdgeosError, NotImplementedError) as e:
        typer.echo(f"edgeos: {_named(device, tag, str(e))}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {device}/{tag} = {_as_written(v, written)}")
