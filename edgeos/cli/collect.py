"""`edgeos collect`: the plant-side collector (broker -> PostgreSQL), and its check and query helpers.

Imported by the CLI only; the collector package (and asyncpg, the `edgeos[collector]` extra) is
loaded inside the commands, so the daemon never imports it.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from edgeos.cli.app import app
from edgeos.logs import setup as setup_logging

collect_app = typer.Typer(
    help="Plant historian: take every gateway's units off the broker into PostgreSQL, exactly once "
    "(docs/collector.md).",
    no_args_is_help=False,
)
app.add_typer(collect_app, name="collect")

CollectConfig = Annotated[Path, typer.Option("--config", "-c", help="collector.toml (docs/collector.md).")]


def _password(cfg) -> str | None:
    from edgeos.collector.config import CollectorConfigError

    try:
        return cfg.password()
    except CollectorConfigError as e:
        typer.echo(f"edgeos collect: {e}", err=True)
        raise typer.Exit(2) from None


def _load(path: Path):
    try:
        from edgeos.collector import config
    except ImportError as e:  # asyncpg missing
        typer.echo(f"edgeos collect: {e}; install the extra: pip install 'edgeos[collector]'", err=True)
        raise typer.Exit(2) from None
    try:
        return config.load(path)
    except config.CollectorConfigError as e:
        typer.echo(f"edgeos collect: {e}", err=True)
        raise typer.Exit(2) from None


@collect_app.callback(invoke_without_command=True)
def collect(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="collector.toml (docs/collector.md).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the collector in the foreground until SIGTERM or Ctrl-C (what edgeos-collect.service starts)."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None:
        typer.echo("edgeos collect: give the config with -c collector.toml", err=True)
        raise typer.Exit(2)
    cfg = _load(config)
    setup_logging(log_level)
    from edgeos.collector.config import CollectorConfigError
    from edgeos.collector.schema import SchemaError
    from edgeos.collector.service import Collector

    async def main() -> None:
        c = Collector(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, c.stop)
        try:
            await c.run()
        except asyncio.CancelledError:
            pass
        finally:
            await c.db.close()

    try:
        asyncio.run(main())
    except CollectorConfigError as e:  # the password file, read as the collector starts
        typer.echo(f"edgeos collect: {e}", err=True)
        raise typer.Exit(2) from None
    except SchemaError as e:
        typer.echo(f"edgeos collect: {e}", err=True)
        raise typer.Exit(1) from None


@collect_app.command("check")
def check(config: CollectConfig) -> None:
    """Validate the config, then connect to PostgreSQL (schema migrated) and to a broker."""
    cfg = _load(config)
    password = _password(cfg)
    from edgeos.collector import db as dbm
    from edgeos.collector import schema
    from edgeos.collector.service import transport_options
    from edgeos.errors import SyncError
    from edgeos.sync.mqtt import MqttTransport

    async def main() -> int:
        bad = 0
        d = dbm.Database(cfg.dsn, password=password)
        try:
            await d.connect()
            assert d.conn is not None
            v = await d.conn.fetchval("SELECT version FROM edgeos_collector")
            typer.echo(f"postgresql: ok (schema version {v})")
        except (dbm.DatabaseError, schema.SchemaError) as e:
            typer.echo(f"postgresql: FAILED: {e}", err=True)
            bad = 1
        finally:
            await d.close()
        # A clean session of its own: a check leaves no persistent session behind on the broker.
        options = {**transport_options(cfg.broker), "client_id": cfg.broker["client_id"] + "-check"}
        options["clean_start"] = True
        for server in cfg.broker["servers"]:
            try:
                transport = MqttTransport("collector", {**options, "servers": [server]}, cfg.base)
                async with asyncio.timeout(10), transport.session() as s:
                    typer.echo(f"{s.where}: ok")
            except (SyncError, TimeoutError) as e:
                typer.echo(f"broker: FAILED: {e}", err=True)
                bad = 1
        return bad

    raise typer.Exit(asyncio.run(main()))


@collect_app.command("query")
def query(
    config: CollectConfig,
    tag: Annotated[str, typer.Argument(help="gateway/device/name, e.g. line1-gw/press1/temperature.")],
    since: Annotated[
        str, typer.Option(help="Start, as `edgeos query` takes it: 1h (before now), an ISO time, @unix.")
    ] = "1h",
    until: Annotated[str | None, typer.Option(help="End, in the same forms (default: now).")] = None,
) -> None:
    """Print one tag's samples (ts, value, quality, text) as CSV; plain SQL stays the main interface."""
    cfg = _load(config)
    password = _password(cfg)
    import datetime as dt
    import time

    import asyncpg

    from edgeos.config.units import parse_time_ns

    def moment(text: str, option: str, now_ns: int) -> dt.datetime:
        try:
            ns = parse_time_ns(text, now_ns)
        except ValueError as e:
            typer.echo(f"edgeos collect query: {option}: {e}", err=True)
            raise typer.Exit(2) from None
        return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=ns // 1000)

    now_ns = time.time_ns()
    start = moment(since, "--since", now_ns)
    end = moment(until, "--until", now_ns) if until else moment("now", "", now_ns + 10**9)

    async def main() -> list:
        conn = await asyncpg.connect(cfg.dsn, password=password, timeout=10)
        try:
            if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM tags WHERE key = $1)", tag):
                typer.echo(f"edgeos collect query: no tag {tag!r} in the historian (gateway/device/name)", err=True)
                raise typer.Exit(1)
            sql = "SELECT ts, value, quality, text FROM samples_between($1, $2, $3) ORDER BY ts"
            return await conn.fetch(sql, tag, start, end)
        finally:
            await conn.close()

    try:
        rows = asyncio.run(main())
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        typer.echo(f"edgeos collect query: PostgreSQL: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(1) from None
    import csv

    out = csv.writer(sys.stdout, lineterminator="\n")  # a string value may hold commas, quotes
    out.writerow(("ts", "value", "quality", "text"))
    for r in rows:
        out.writerow((r["ts"].isoformat(), repr(r["value"]), r["quality"], r["text"] or ""))
