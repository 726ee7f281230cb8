"""The `edgeos` command: thin typer shells around the runtime, the config and the store.

One module per family of commands, each registering on `app`; none holds daemon logic.

`edgeos run` with plain arguments skips typer altogether: typer converts parameters through
pydantic, and typer, click, rich and the other commands' modules would stay resident in the
daemon for its whole life (about 7 MB; see "Footprint" in docs/benchmarks.md). `main` calls
`edgeos.cli.daemon.run_daemon`, which the typer command `run` calls too, so the daemon's
behaviour lives in one place; any other form of `run` (help, another option) goes through typer.
The commands' modules (and typer) are imported on first use of `app` or the other names here.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from edgeos.cli.daemon import plain_run as _plain_run

__all__ = ["GATEWAY_HEADER", "_sample", "app", "load_or_exit", "main"]


def _commands() -> Any:
    """Import every command module (each registers on the app) and return the typer app."""
    from edgeos.cli import collect, console, core, device, opcua, serial, service, store  # noqa: F401  (registers commands)
    from edgeos.cli.app import app

    return app


def __getattr__(name: str) -> Any:
    if name in ("GATEWAY_HEADER", "_sample", "load_or_exit"):
        _commands()
        from edgeos.cli import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Cli(types.ModuleType):
    """`edgeos.cli.app` is the typer app, loaded on first use, even after the import system
    has bound the submodule of the same name here (it does on every import of a command module)."""

    @property
    def app(self) -> Any:
        return _commands()

    @app.setter
    def app(self, value: Any) -> None:
        pass


sys.modules[__name__].__class__ = _Cli


def main() -> None:
    from edgeos.errors import PluginError

    try:
        kw = _plain_run(sys.argv[2:]) if sys.argv[1:2] == ["run"] else None
        if kw is not None:
            from edgeos.cli.daemon import run_daemon

            config = kw.pop("config_file", None) or kw.pop("config")
            if kw.get("config", config) != config:
                print(f"edgeos: two configs given ({config} and -c {kw['config']}); give one", file=sys.stderr)
                sys.exit(2)
            kw.pop("config", None)
            sys.exit(run_daemon(config, **kw))
        _commands()()
    except PluginError as e:
        print(f"edgeos: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
