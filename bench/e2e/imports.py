"""What each import costs in resident memory: `python bench/e2e/imports.py [MODULE ...]`.

Imports the modules one after the other in this interpreter and prints the growth of VmRSS
after each (a module's cost includes whatever it pulls in that an earlier line did not), then
the modules the daemon's start imports in the end. The default order is the daemon's: what it
needs first, then the CLI's and the protocols' libraries. Run it in a fresh interpreter.
"""

from __future__ import annotations

import gc
import importlib
import sys

DEFAULT = [
    "asyncio",
    "numpy",
    "msgpack",
    "sqlite3",
    "edgeos.model",
    "edgeos.wire",
    "edgeos.filters",
    "edgeos.config",
    "edgeos.pipeline",
    "edgeos.store",
    "aiomqtt",
    "edgeos.sync",
    "edgeos.runtime",
    "edgeos",
    "click",
    "rich",
    "pydantic",
    "typer",
    "edgeos.cli",
    "edgeos.protocols.simulated",
    "pymodbus",
    "edgeos.protocols.modbus",
    "serial",
    "edgeos.protocols.serial",
    "asyncua",
    "edgeos.protocols.opcua",
]


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main(names: list[str]) -> None:
    gc.collect()
    base = last = rss_kb()
    print(f"{'interpreter':<28} {base / 1024:6.1f} MB")
    for name in names:
        before = set(sys.modules)
        try:
            importlib.import_module(name)
        except ImportError as e:
            print(f"{name:<28} not installed ({e})")
            continue
        gc.collect()
        now = rss_kb()
        new = len(set(sys.modules) - before)
        print(f"{name:<28} {(now - last) / 1024:+6.1f} MB  {now / 1024:6.1f} MB  ({new} modules)")
        last = now


if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT)
