"""Service commands: install and uninstall the systemd unit, reload the running daemon."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path
from typing import Annotated

import typer

from edgeos.cli.app import app
from edgeos.cli.core import ConfigOpt, ConfigPos, load_or_exit, pick_config, starting_config
from edgeos.errors import ConfigError
from edgeos.logs import redact
from edgeos.service import control
from edgeos.service import install as installer

service = typer.Typer(help="Install or remove the systemd service.", no_args_is_help=True)
app.add_typer(service, name="service")


def _print(report: installer.Report) -> None:
    for line in report.done:
        typer.echo(line)
    if report.todo:
        typer.echo("to do:")
        for line in report.todo:
            typer.echo(f"  {line}")


@service.command("install")
def install(
    root: Annotated[Path, typer.Option(help="Install into this tree (a staging root): files only.")] = Path("/"),
    user: Annotated[str, typer.Option(help="The unprivileged user (and group) the daemon runs as.")] = "edgeos",
) -> None:
    """Install the unit, its user, /var/lib/edgeos and a starting config in /etc/edgeos.

    The unit is the hardened one of systemd/edgeos.service, pointing at this installation's
    edgeos. An existing /etc/edgeos/edgeos.toml is never overwritten. With --root, files are
    written under that directory and nothing else is done (the report lists what to run on the
    target). See docs/operations.md for what the sandbox allows and how to extend it.
    """
    try:
        report = installer.install(starting_config(True), root=root, user=user)
    except OSError as e:
        typer.echo(f"edgeos: cannot install into {root}: {e} (run as root, or use --root)", err=True)
        raise typer.Exit(1) from None
    _print(report)


@service.command("uninstall")
def uninstall(
    root: Annotated[Path, typer.Option(help="Remove from this tree (a staging root): files only.")] = Path("/"),
) -> None:
    """Stop and remove the unit. The data, the config and the user stay."""
    try:
        report = installer.uninstall(root=root)
    except OSError as e:
        typer.echo(f"edgeos: cannot uninstall from {root}: {e}", err=True)
        raise typer.Exit(1) from None
    _print(report)


def _data_dir(path: Path) -> Path:
    """The data directory of a config; only gateway.data_dir is needed when the rest is broken
    (the daemon itself reports the problems)."""
    from edgeos.config import load_config

    try:
        return load_config(path).gateway.data_dir
    except ConfigError:
        pass
    try:
        d = Path(tomllib.loads(path.read_text(encoding="utf-8"))["gateway"]["data_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        load_or_exit(path)  # prints every problem, exits 2
        raise typer.Exit(2) from None
    return d if d.is_absolute() else (path.parent / d).resolve()


@app.command()
def reload(
    config_file: ConfigPos = None,
    config: ConfigOpt = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="The daemon of this data directory.")] = None,
) -> None:
    """Make the running daemon re-read its config, as SIGHUP and `systemctl reload edgeos` do.

    Devices and tags added, removed or changed are applied; the others keep polling without a
    gap, and nothing read is lost. An invalid config is refused: the daemon keeps running the
    old one, and this prints the problems and exits 1. Changes to [gateway], [store] and
    [upstream] apply at the next restart (listed). Exit 1 too when no daemon runs.
    """
    directory = data_dir or _data_dir(pick_config(config_file, config))
    try:
        reply = asyncio.run(control.request(directory, {"op": "reload"}, within=120))
    except PermissionError:
        from edgeos.cli.store import denied

        denied(control.socket_path(directory))
    if reply is None:
        typer.echo(f"edgeos: no daemon runs on {directory}", err=True)
        raise typer.Exit(1)
    if not reply.get("ok"):
        errors = reply.get("errors") or [reply.get("error") or "refused"]
        n = len(errors)
        typer.echo(
            f"edgeos: reload refused; the daemon keeps running its config ({n} problem{'s' if n != 1 else ''}):",
            err=True,
        )
        for e in errors:
            typer.echo(f"  {redact(str(e))}", err=True)
        raise typer.Exit(1)
    parts = [f"{k} {', '.join(reply[k])}" for k in ("added", "removed", "changed") if reply.get(k)]
    typer.echo(
        f"reloaded {reply.get('config', '')}: "
        + ("; ".join(parts) or "no device changed")
        + f"; {len(reply.get('unchanged', []))} unchanged, {reply.get('tags_added', 0)} new tags"
    )
    if reply.get("restart_needed"):
        typer.echo(f"not applied until a restart: [{'], ['.join(reply['restart_needed'])}]")
