"""The `edgeos` command: thin typer shells around the runtime, the config and the store.

One module per family of commands, each registering on `app`; none holds daemon logic.

`edgeos run` with plain arguments skips typer's argument parsing: typer converts parameters
through pydantic, which would stay resident in the daemon for its whole life (about 5 MB; see
"Footprint" in docs/benchmarks.md). It calls the same `run` command function, so the daemon's
behaviour lives in one place; any other form of `run` (help, another option) goes through typer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from edgeos.cli import collect, console, core, device, opcua, serial, service, store  # noqa: F401  (registers commands)
from edgeos.cli.app import app
from edgeos.cli.core import GATEWAY_HEADER, _sample, load_or_exit
from edgeos.errors import PluginError

__all__ = ["GATEWAY_HEADER", "_sample", "app", "load_or_exit", "main"]


def _plain_run(args: list[str]) -> dict[str, Any] | None:
    """The keyword arguments of `run` for `[CONFIG] [-c|--config CONFIG] [--log-level L]`,
    or None for anything else (typer handles it, with its messages)."""
    kw: dict[str, Any] = {}
    names = {"-c": "config", "--config": "config", "--log-level": "log_level"}
    i = 0
    while i < len(args):
        a = args[i]
        key, eq, value = a.partition("=")
        if a.startswith("-") and eq and key in names and key != "-c":
            name = names[key]
            i += 1
        elif a in names and i + 1 < len(args) and not args[i + 1].startswith("-"):
            name, value = names[a], args[i + 1]
            i += 2
        elif not a.startswith("-") and "config_file" not in kw:
            name, value = "config_file", a
            i += 1
        else:
            return None
        if name in kw or not value:
            return None
        kw[name] = Path(value) if name != "log_level" else value
    if "config_file" not in kw and "config" not in kw:
        return None  # the default config: typer's path says which
    return kw


def main() -> None:
    try:
        kw = _plain_run(sys.argv[2:]) if sys.argv[1:2] == ["run"] else None
        if kw is not None:
            import typer

            try:
                core.run(**kw)
            except typer.Exit as e:
                sys.exit(e.exit_code)
            return
        app()
    except PluginError as e:
        print(f"edgeos: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
