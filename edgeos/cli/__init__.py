"""The `edgeos` command: thin typer shells around the runtime, the config and the store.

One module per family of commands, each registering on `app`; none holds daemon logic.
"""

from __future__ import annotations

import sys

from edgeos.cli import console, core, device, opcua, serial, store  # noqa: F401  (registers commands)
from edgeos.cli.app import app
from edgeos.cli.core import GATEWAY_HEADER, _sample, load_or_exit
from edgeos.errors import PluginError

__all__ = ["GATEWAY_HEADER", "_sample", "app", "load_or_exit", "main"]


def main() -> None:
    try:
        app()
    except PluginError as e:
        print(f"edgeos: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
