"""`edgeos run`'s body, without typer: what the daemon imports is what it keeps for its life.

typer, click, rich and the other commands' modules cost the daemon about 2 MB of RSS it never
uses (docs/benchmarks.md, "Footprint"). `edgeos.cli.main` calls `run_daemon` directly for a
plain `edgeos run -c FILE` (`plain_run` says which argument lists are plain); the typer
command `run` calls the same function, so the daemon's behaviour lives here only.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any


def plain_run(args: list[str]) -> dict[str, Any] | None:
    """The keyword arguments of `run` for `[CONFIG] [-c|--config CONFIG] [--log-level L]
    [--log-format F]`, or None for anything else (typer handles it, with its messages)."""
    kw: dict[str, Any] = {}
    names = {"-c": "config", "--config": "config", "--log-level": "log_level", "--log-format": "log_format"}
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
        kw[name] = Path(value) if name in ("config", "config_file") else value
    if "config_file" not in kw and "config" not in kw:
        return None  # the default config: typer's path says which
    return kw


class _Held(logging.Handler):
    """Log records kept until logging is set up."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def run_daemon(config: Path, log_level: str | None = None, log_format: str = "auto") -> int:
    """Run the daemon in the foreground until SIGTERM; the exit code (2: invalid config or
    arguments, 1: it failed)."""
    import asyncio
    import gc

    from edgeos.config import load_config
    from edgeos.errors import ConfigError, EdgeosError
    from edgeos.logs import FORMATS, redact
    from edgeos.logs import setup as setup_logging
    from edgeos.runtime import Runtime

    # What loading the config logs (a key that is not used, say) waits for the log format the
    # command line asks for: a log shipper reading `--log-format json` takes only JSON lines.
    held = _Held()
    edgeos_log = logging.getLogger("edgeos")
    edgeos_log.addHandler(held)
    propagate, edgeos_log.propagate = edgeos_log.propagate, False
    try:
        cfg = load_config(config)
    except ConfigError as e:
        for record in held.records:
            print(f"{record.levelname.lower()}: {redact(record.getMessage())}", file=sys.stderr)
        n = len(e.problems)
        print(f"{config}: invalid config ({n} problem{'s' if n != 1 else ''}):", file=sys.stderr)
        for p in e.problems:
            print(f"  {redact(str(p))}", file=sys.stderr)
        return 2
    finally:
        edgeos_log.removeHandler(held)
        edgeos_log.propagate = propagate
    if log_format not in FORMATS:
        print(f"edgeos: --log-format {log_format!r}: expected one of {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    levels = ("debug", "info", "warning", "error")
    if log_level is not None and log_level.lower() not in levels:
        print(f"edgeos: --log-level {log_level!r}: expected one of {', '.join(levels)}", file=sys.stderr)
        return 2
    setup_logging(log_level or cfg.gateway.log_level, log_format)
    for record in held.records:
        logging.getLogger(record.name).handle(record)
    rt = Runtime(cfg)
    # What is alive now (modules, plugins, the config) lives as long as the daemon: kept out of
    # the collector's full passes, which otherwise stall the loop for tens of ms (polls late).
    gc.freeze()
    # Young collections every 20,000 new container objects, not 700: most of what a poll or a
    # publish response allocates is freed by its reference count before a collection sees it,
    # and fewer of them survive into the older generations. Measured on the e2e load: the
    # collector's time 639 -> 270-305 ms in 15 s with the freeze after start-up below
    # (docs/benchmarks.md); only cyclic garbage waits longer.
    gc.set_threshold(20_000, 10, 10)
    try:
        asyncio.run(_run(rt))
    except EdgeosError as e:
        print(f"edgeos: {redact(str(e))}", file=sys.stderr)
        return 1
    if rt.failed:  # it stopped itself (a failed fsync): non-zero, so systemd restarts it
        print(f"edgeos: {rt.failed}", file=sys.stderr)
        return 1
    return 0


async def _run(rt: Any) -> None:
    """`rt.run()`; once its devices are connected (at most 10 s), what start-up built (request
    plans, filter state, the store's and subscriptions' objects) is frozen too: it lives as
    long as the daemon, and each full collection walked all of it (49 ms each, e2e load)."""
    import asyncio
    import gc

    task = asyncio.create_task(rt.run(handle_signals=True), name="runtime")

    async def started() -> None:
        await rt.running.wait()
        await rt.wait_connected()

    ready = asyncio.create_task(started(), name="started")
    await asyncio.wait({task, ready}, timeout=10.0, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if not task.done():
        gc.freeze()
    await task
