"""`edgeos console passwd`: the password file the web console checks (docs/console.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from edgeos.cli.app import app
from edgeos.console.auth import set_password

console_app = typer.Typer(help="The read-only web console (docs/console.md).", no_args_is_help=True)
app.add_typer(console_app, name="console")


@console_app.command()
def passwd(
    file: Annotated[Path, typer.Argument(help="Password file (console.password_file); created if missing.")],
    user: Annotated[str, typer.Option("--user", "-u", help="User name to set.")] = "admin",
    stdin: Annotated[bool, typer.Option("--stdin", help="Read the password from standard input (scripts).")] = False,
) -> None:
    """Set a console user's password: a salted scrypt hash, never the password itself.

    The file is written mode 0600; the daemon reads it again when it changes (no restart).
    """
    if not user or ":" in user or any(c.isspace() for c in user):
        typer.echo(f"edgeos: --user: found {user!r}, expected a name without ':' or spaces", err=True)
        raise typer.Exit(2)
    if stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt(f"New password for {user}", hide_input=True, confirmation_prompt=True)
    if len(password) < 8:
        typer.echo("edgeos: a console password needs at least 8 characters", err=True)
        raise typer.Exit(2)
    try:
        set_password(file, user, password)
    except OSError as e:
        hint = f" (create {file.parent} first)" if not file.parent.exists() else ""
        typer.echo(f"edgeos: cannot write {file}: {e.strerror or e}{hint}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"password of {user!r} set in {file}")
