"""Core commands: run, check, init, version, demo."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from edgeos import filters, plugins
from edgeos.cli.app import app
from edgeos.config import Config, GatewayConfig, load_config
from edgeos.config.load import load_gateway
from edgeos.errors import ConfigError
from edgeos.logs import redact

ConfigArg = Annotated[Path, typer.Option("--config", "-c", help="Config file (TOML); see docs/config.md.")]
DEFAULT_CONFIG = Path("/etc/edgeos/edgeos.toml")
# run, check and status take the config either way: `edgeos check FILE` or `edgeos check -c FILE`.
ConfigPos = Annotated[
    Path | None, typer.Argument(help="Config file, as an alternative to -c.", show_default=False, metavar="CONFIG")
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help=f"Config file (TOML); see docs/config.md. Default: {DEFAULT_CONFIG}."),
]


def pick_config(positional: Path | None, option: Path | None) -> Path:
    """The config named positionally or with -c (both only when they agree), else the default."""
    if positional is not None and option is not None and positional != option:
        typer.echo(f"edgeos: two configs given ({positional} and -c {option}); give one", err=True)
        raise typer.Exit(2)
    return positional or option or DEFAULT_CONFIG


def load_or_exit(path: Path) -> Config:
    """Load a config or print every problem and exit 2: the shared entry of commands taking -c."""
    try:
        return load_config(path)
    except ConfigError as e:
        _refuse(path, e)


def _problems(e: ConfigError) -> str:
    n = len(e.problems)
    return f"{n} problem{'s' if n != 1 else ''}"


def _refuse(path: Path, e: ConfigError) -> NoReturn:
    typer.echo(f"{path}: invalid config ({_problems(e)}):", err=True)
    for p in e.problems:
        typer.echo(f"  {redact(str(p))}", err=True)
    raise typer.Exit(2)


def gateway_or_exit(path: Path) -> GatewayConfig:
    """The [gateway] table for commands that only read the store (status, tags, query,
    export). They need no secret from the environment (set in the service's, not in the
    engineer's shell), and they still read the store while the rest of the config is invalid
    (mid-edit, or refused by a reload while the daemon runs on the one it loaded), saying so."""
    try:
        return load_config(path, check_environment=False).gateway
    except ConfigError as e:
        try:
            gateway = load_gateway(path)
        except ConfigError:
            _refuse(path, e)
        typer.echo(
            f"{path}: invalid config ({_problems(e)}; `edgeos check` lists them): "
            f"reading {gateway.data_dir}, the data directory its [gateway] table names",
            err=True,
        )
        return gateway


@app.command()
def run(
    config_file: ConfigPos = None,
    config: ConfigOpt = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error; overrides the config.")] = None,
    log_format: Annotated[
        str,
        typer.Option(
            help="auto (journal under journald, else text), text, journal (syslog priority prefix, "
            "no timestamp) or json (one object per line, for log shippers)."
        ),
    ] = "auto",
) -> None:
    """Run the daemon in the foreground until SIGTERM or Ctrl-C (what the systemd unit starts).

    The config is checked first; a config with any problem is refused as a whole. On SIGTERM
    polling stops, every sample already read is committed to the store, and the exit code is 0.
    """
    from edgeos.cli.daemon import run_daemon

    code = run_daemon(pick_config(config_file, config), log_level, log_format)
    if code:
        raise typer.Exit(code)


@app.command()
def check(
    config_file: ConfigPos = None,
    config: ConfigOpt = None,
    security: bool = typer.Option(False, "--security", help="also report TLS/OPC UA modes, certificates, listeners"),
) -> None:
    """Validate a config without running it, and summarise what it would do.

    Prints the devices, their tags and the tag reads per second the poll intervals ask for,
    the request plan where the protocol has one, the kernels in use and the loaded plugins.
    Exit code 2 and one line per problem when the config is invalid. `--security` adds, per
    connection and listener, the TLS / OPC UA security, certificate expiry and the unit's exposure.
    """
    config = pick_config(config_file, config)
    cfg = load_or_exit(config)
    if why := _unwritable(cfg.gateway.data_dir):
        typer.echo(f"{config}: invalid config (1 problem):", err=True)
        typer.echo(f"  gateway.data_dir: {cfg.gateway.data_dir} {why}", err=True)
        raise typer.Exit(2)
    enabled = [d for d in cfg.devices if d.enabled]  # what will be read: disabled devices are not
    total_tags = sum(len(d.tags) for d in enabled)
    total_rate = sum(cfg.polls_per_second(d) for d in enabled)
    typer.echo(f"{config}: OK")
    typer.echo(f"gateway   {cfg.gateway.id}   data_dir {cfg.gateway.data_dir}")
    typer.echo(f"store     {_budget(cfg)}")
    typer.echo(f"writes    {_writes(cfg)}")
    typer.echo(f"kernels   {filters.implementation()}")
    upstream = f"enabled: {', '.join(_brokers(cfg.upstream.options))}" if cfg.upstream.enabled else "disabled"
    typer.echo(f"upstream  {upstream}{'' if cfg.upstream.enabled else ' (data stays on this gateway)'}")
    typer.echo(
        "plugins   "
        + "; ".join(
            f"{g.split('.')[-1]}: " + ", ".join(f"{p.name} {p.version}" for p in plugins.available(g))
            for g in (plugins.PROTOCOLS, plugins.FILTERS)
        )
    )
    typer.echo("")
    typer.echo(f"{'DEVICE':<20} {'PROTOCOL':<12} {'TAGS':>6} {'READS/S':>10}  STATE")
    for d in cfg.devices:
        typer.echo(
            f"{d.name:<20} {d.protocol:<12} {len(d.tags):>6} {cfg.polls_per_second(d):>10.1f}  "
            f"{'enabled' if d.enabled else 'disabled'}"
        )
        describe = getattr(plugins.load(plugins.PROTOCOLS, d.protocol), "describe", None)
        if describe is not None:
            try:
                lines = list(describe(d))
            except Exception as e:  # noqa: BLE001 - third-party code: its bug is a line, not a traceback
                name = plugins.label(plugins.PROTOCOLS, d.protocol)
                lines = [f"{name}: its describe() failed: {type(e).__name__}: {e} (a bug in the plugin)"]
            for line in lines:
                typer.echo(f"    {redact(line)}")
    off = len(cfg.devices) - len(enabled)
    typer.echo(
        f"total: {len(enabled)} devices, {total_tags} tags, {total_rate:.1f} tag reads/s"
        + (f" ({off} disabled device{'s' if off != 1 else ''} not counted)" if off else "")
    )
    if security:  # issue 28: per connection and listener, and the unit's exposure
        from edgeos.service.security import report

        for line in report(cfg):
            typer.echo(redact(line))


def _writes(cfg: Config) -> str:
    """The estimated flash wear of this config (docs/store.md, "Writes to the disk")."""
    from edgeos.config.units import format_duration_ns
    from edgeos.service.status import live_path
    from edgeos.store import estimate_write_bytes_per_day

    devices = [d for d in cfg.devices if d.enabled]
    samples = sum(cfg.polls_per_second(d) for d in devices)
    # Tags that share an interval are read in one poll cycle; each cycle is a commit at most.
    cycles = sum(1e9 / iv for d in devices for iv in {t.poll_interval_ns for t in d.tags})
    interval = cfg.store.commit_interval_ns
    fsync = cfg.store.fsync_interval_ns
    est = estimate_write_bytes_per_day(samples, cycles, interval / 1e9, fsync / 1e9)
    commits = cycles if interval <= 0 else min(cycles, 1e9 / interval)
    status = ""
    if not _on_tmpfs(live_path(cfg.gateway.data_dir, cfg.gateway.run_dir).parent):
        est += 4096 * 86_400  # one 4 KiB page a second (docs/store.md, "Writes to the disk")
        status = "; the live status goes to the data disk too (0.35 GB/day of it): set gateway.run_dir to a tmpfs"
    when = "every commit" if fsync <= 0 else f"every {format_duration_ns(fsync)}"
    return (
        f"about {est / 1e9:.2f} GB/day to the data disk, estimated ({commits:.1f} commits/s, fsynced {when}: "
        "a longer store.fsync_interval writes less and can lose more at a power cut)" + status
    )


def _on_tmpfs(path: Path) -> bool:
    """Whether `path` is on a memory file system (the longest mount point of /proc/mounts)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    target = str(path.absolute())
    best, kind = "", ""
    for point, fstype in mounts:
        point = point.replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fstype
    return kind in ("tmpfs", "ramfs")


def _brokers(o: dict) -> list[str]:
    """Each broker the sync will try, as host:port with the default port filled in (a bare
    host alone did not say where it connects)."""
    from edgeos.sync.mqtt import _host_port, servers

    return [_host_port(h, p) for h, p in servers(o)]


def _budget(cfg: Config) -> str:
    from edgeos.config.units import format_duration_ns
    from edgeos.store import default_max_size

    st = cfg.store
    if st.max_size:
        size = f"max_size {st.max_size / 2**20:.0f} MiB"
    else:
        n, how = default_max_size(cfg.gateway.data_dir)
        size = f"max_size {n / 2**20:.0f} MiB (default: {how})"
    keep = f"retention {format_duration_ns(st.retention_ns)}" if st.retention_ns else "no retention limit"
    return f"{size}; {keep}"


def _age(seconds: float) -> str:
    """A short age for the status table: 0.4s, 12s, 5m, 3h, 2d."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _listed(items: object) -> str:
    if isinstance(items, dict):
        return ", ".join(f"{k} ({v})" for k, v in items.items())
    return ", ".join(map(str, items)) if isinstance(items, list | tuple) else str(items)


def _unwritable(directory: Path) -> str | None:
    """Why the daemon, run as this user, could not create or write `directory` (None: it can).
    Run under the unit's sandbox (ExecStartPre) this also sees ProtectSystem's read-only /etc."""
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            return "cannot be created"
        probe = probe.parent
    if not probe.is_dir():
        return f"cannot be created: {probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == directory else f"cannot be created: {probe} is not writable"
        return f"{what} by this user (uid {os.getuid()})" + ("; a read-only file system?" if _read_only(probe) else "")
    return None


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


GATEWAY_HEADER = """\
## edgeos configuration. Reference: docs/config.md. Check it with: edgeos check FILE
## Durations are written "250ms", "1s", "5m", "1h", "7d"; sizes "512MiB", "2GiB".

[gateway]
  ## Unique id of this gateway; appears in payloads and topics.
  id = "gateway1"
  ## Where the store and state live; relative paths are relative to this file.
  data_dir = "data"
  # log_level = "info"
  ## Bound on an orderly stop (flush everything read, close devices).
  # shutdown_timeout = "10s"

[store]
  ## Samples are committed as soon as nothing more is queued (one commit per poll cycle),
  ## at most commit_samples at a time; a kill cannot lose a commit. The commits are fsynced
  ## every fsync_interval: a power cut can lose that much, and a longer one wears flash less.
  # commit_samples = 10000
  # commit_interval = "0s"
  # fsync_interval = "2s"
  ## Bounds on history; the oldest data goes first. Without max_size the store keeps to a
  ## quarter of the file system it is on (at least 64 MiB); `edgeos check` shows the figure.
  # retention = "90d"
  # max_size = "8GiB"

## Forwarding upstream is off unless enabled: by default all data stays in the plant.
# [upstream]
#   enabled = true
#   host = "broker.plant.local"
#   port = 8883
#   tls = true
#   ca_file = "ca.pem"
#   username = "gateway1"
#   password_file = "mqtt.password"

## Prometheus metrics at /metrics and a health check at /healthz (docs/metrics.md), on
## loopback unless you change address; enabled = false turns the server off.
# [http]
#   enabled = true
#   address = "127.0.0.1"
#   port = 9180
#   metrics_per_tag = false
## /healthz answers 503 when a device is down longer than device_down, or upstream lags more.
# [health]
#   device_down = "60s"
#   sync_lag = "5m"
"""


def _sample(protocol: str) -> str | None:
    """The protocol's sample.toml, None when its package ships none. Raises what importing the
    package raises (a plugin that fails to import)."""
    ep_value = next((p.value for p in plugins.available(plugins.PROTOCOLS) if p.name == protocol), None)
    if ep_value is None:
        return None
    pkg = ep_value.split(":")[0]
    try:
        files = resources.files(pkg)
    except TypeError:  # a plain module, not a package: nothing beside it to ship
        return None
    try:
        return (files / "sample.toml").read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the config; '-' for standard output.")] = Path(
        "edgeos.toml"
    ),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    system: Annotated[
        bool | None,
        typer.Option(
            "--system/--local",
            help="data_dir for the systemd unit (/var/lib/edgeos), or beside the file (./data). "
            "Default: --system for a file under /etc.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Write a commented example config to start from.

    It runs as written (a simulated device) and carries every installed protocol's sample,
    commented out, with each option explained and its default shown. The parent directory is
    created when missing (/etc/edgeos on a fresh gateway).
    """
    problems: list[str] = []
    if str(path) == "-":
        typer.echo(starting_config(False, problems), nl=False)
        for line in problems:
            typer.echo(f"edgeos init: {line}", err=True)
        return
    out = starting_config(system if system is not None else _system_install(path), problems)
    for line in problems:
        typer.echo(f"edgeos init: {line}", err=True)
    if path.exists() and not force:
        typer.echo(f"{path} exists; use --force to overwrite", err=True)
        raise typer.Exit(1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(out, encoding="utf-8")
    except OSError as e:
        typer.echo(
            f"edgeos: cannot write {path}: {e.strerror} (run as a user who may write there, or use sudo)", err=True
        )
        raise typer.Exit(1) from None
    typer.echo(f"wrote {path}; check it with: edgeos check {path}")


SYSTEM_DATA_DIR = "/var/lib/edgeos"


def starting_config(system: bool, problems: list[str] | None = None) -> str:
    """The commented example config of `edgeos init` (and `edgeos service install`). A protocol
    whose package fails to import is a comment line in it, and a line in `problems`."""
    parts = [GATEWAY_HEADER]
    for info in plugins.available(plugins.PROTOCOLS):
        try:
            text = _sample(info.name)
        except Exception as e:  # a plugin that fails to import: the others' samples still go out
            why = redact(f"{type(e).__name__}: {e}").replace("\n", " ")
            parts.append(f"\n## ---- protocol: {info.name} ({info.dist} {info.version}): not loadable: {why} ----\n")
            if problems is not None:
                problems.append(f"protocol {info.name} ({info.dist} {info.version}) failed to import: {why}; no sample")
            continue
        if text is None:
            continue
        if info.name != "simulated":
            text = "".join(f"# {ln}" if ln.strip() else ln for ln in text.splitlines(keepends=True))
        parts.append(f"\n## ---- protocol: {info.name} ({info.dist} {info.version}) ----\n{text}")
    out = "".join(parts)
    if system:
        # The shipped unit runs with ProtectSystem=strict: /etc is read-only to the daemon, and
        # its state directory is /var/lib/edgeos.
        out = out.replace('  data_dir = "data"', f'  data_dir = "{SYSTEM_DATA_DIR}"', 1)
    return out


def _system_install(path: Path) -> bool:
    """A config written under /etc is for the systemd unit, whose StateDirectory is /var/lib/edgeos."""
    return Path("/etc") in path.absolute().parents


@app.command()
def version() -> None:
    """Print the versions of edgeos, its kernels and its main dependencies."""
    from edgeos import __version__

    typer.echo(f"edgeos {__version__}")
    typer.echo(f"kernels: {filters.implementation()}")
    typer.echo(f"python {platform.python_version()} ({sys.platform}, {platform.machine()})")
    for dist in ("numpy", "msgpack", "pymodbus", "aiomqtt", "typer", "asyncua"):
        try:
            typer.echo(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            typer.echo(f"{dist} (not installed)")


@app.command()
def demo(
    data_dir: Annotated[
        Path | None,
        typer.Option("--dir", help="Keep the demo's store here (default: a temporary directory, removed at exit)."),
    ] = None,
    duration: Annotated[float, typer.Option(help="Stop after this many seconds (0: run until Ctrl-C).")] = 0.0,
) -> None:
    """See edgeos work in one command: simulated devices, filters and a local store.

    Starts a filling machine that speaks Modbus TCP on 127.0.0.1 (read through the real
    Modbus adapter) and three simulated machines (a press, an oven, a packer), runs the full
    runtime with filters and a store in a temporary directory (or --dir), and shows the live
    values updating in the terminal until Ctrl-C, with the URL of the web console, where the
    same values and their trends are in a browser. Nothing leaves this computer.
    """
    from edgeos.demo import run_demo

    if data_dir is None:
        with tempfile.TemporaryDirectory(prefix="edgeos-demo-") as tmp:
            run_demo(Path(tmp), duration, temporary=True)
    else:
        run_demo(data_dir, duration)


@app.command()
def status(
    config_file: ConfigPos = None,
    config: ConfigOpt = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Read this data directory instead.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
    fmt: Annotated[
        str, typer.Option("--format", help="table (for people) or json (the status document, for scripts).")
    ] = "table",
) -> None:
    """Show whether the daemon runs, its devices, store counters and upstream sync lag.

    Whether it runs is asked of the store's lock, which the daemon holds while it runs (so a
    daemon killed with SIGKILL shows as stopped at once); the figures come from the status it
    rewrites every second (in /run/edgeos when that exists, else in its data directory). Exit
    code 1 when it is not running.
    """
    import datetime as dt
    import json

    from edgeos.service.status import daemon_pid, read_status

    if fmt not in ("table", "json"):
        typer.echo(f"--format: found {fmt!r}, expected table or json", err=True)
        raise typer.Exit(2)
    as_json = as_json or fmt == "json"

    if data_dir is not None:
        directory, run_dir = data_dir, None
    else:
        gateway = gateway_or_exit(pick_config(config_file, config))
        directory, run_dir = gateway.data_dir, gateway.run_dir
    unread: list[Path] = []
    try:
        pid = daemon_pid(directory)
        doc, age = read_status(directory, run_dir, unread)
    except PermissionError as e:
        from edgeos.cli.store import denied

        denied(e.filename or directory)
    if doc is None:
        typer.echo(f"edgeos is not running here: no status in {directory}", err=True)
        raise typer.Exit(1)
    running = pid is not None
    for path in unread:  # the live status may be there: what follows may be an older one
        typer.echo(f"warning: cannot read {path} (permission denied); the status shown may be older", err=True)
    if not running:
        # The devices' states are the dead daemon's last word (a SIGKILL leaves "running"):
        # none runs now; what each was doing is kept beside. A disabled one never ran.
        for d in doc.get("devices", {}).values():
            if d.get("state") not in ("stopped", "disabled"):
                d["last_state"], d["state"] = d.get("state"), "stopped"
            d["up"] = False
    now = doc["time"] + age  # ages from now, not from a status that may be old
    if as_json:
        typer.echo(json.dumps({**doc, "running": running}, indent=2))
        raise typer.Exit(0 if running else 1)
    if running:
        state = f"running (pid {pid})"
        if age > 10:
            state += f"; its status is {age:.0f}s old"
    elif doc.get("stopped"):
        state = f"not running (stopped {age:.0f}s ago)"
    else:
        state = f"not running (last status {age:.0f}s old: it did not stop cleanly)"
    typer.echo(f"gateway   {doc['gateway']}   {state}   kernels {doc.get('kernels')}")
    c = doc["counters"]
    typer.echo(
        f"samples   read {c['read']}, stored {c['stored']}, dropped by filters {c['filtered_out']}, "
        f"dropped while the store was unavailable {c['dropped_store_unavailable']}"
        + (f", lost at a stop that ran out of time {c['dropped_at_stop']}" if c.get("dropped_at_stop") else "")
    )
    st = doc.get("store") or {}
    if st:
        typer.echo(
            f"store     compacted {st['compacted_samples']}, dropped by retention {st['dropped_retention']}, "
            f"dropped for the size budget {st['dropped_budget']}, never forwarded {st.get('dropped_unsent', 0)}"
            + (f", undecodable units set aside {st['quarantined_units']}" if st.get("quarantined_units") else "")
            + (f", damaged files set aside {c['store_recoveries']}" if c.get("store_recoveries") else "")
        )
        up = doc.get("time", 0) - c.get("started_ns", 0) / 1e9
        if "written_bytes" in st and up > 0:
            rate = st["written_bytes"] / up * 86_400
            typer.echo(f"writes    {st['written_bytes'] / 1e6:.1f} MB to the data disk, {rate / 1e9:.2f} GB/day")
    ss = doc.get("store_stats") or {}
    if ss:
        used, budget = ss.get("used_bytes", 0), ss.get("max_size", 0)
        share = f" of {budget / 1e6:,.0f} MB budget ({100 * used / budget:.0f}%)" if budget else ""
        oldest = ss.get("oldest_ns", 0)
        horizon = f", oldest sample {_age(now - oldest / 1e9)} old" if oldest else ""
        refusing = "; REFUSING WRITES (samples wait in memory)" if doc.get("store_failing") else ""
        typer.echo(f"usage     {used / 1e6:,.1f} MB{share}, {ss.get('chunks', 0)} chunks{horizon}{refusing}")
    sync = doc.get("sync")
    if sync:
        last = sync["last_publish_ns"]
        when = dt.datetime.fromtimestamp(last / 1e9, dt.UTC).isoformat(timespec="seconds") if last else "never"
        typer.echo(
            f"upstream  {sync['state']}; behind by {sync['backlog_samples']} samples "
            f"({sync['backlog_units']} units, {sync['lag_seconds']:.1f}s); last publish {when}"
            + (f"; last error: {sync['last_error']}" if sync["last_error"] else "")
        )
    else:
        typer.echo("upstream  disabled")
    http = doc.get("http")
    if http and running and http.get("port"):
        typer.echo(f"metrics   http://{http['address']}:{http['port']}/metrics  (and /healthz)")
    typer.echo(
        f"{'DEVICE':<20} {'STATE':<11} {'UP':<4} {'LAST VALUES':>11} {'SAMPLES':>10} {'FAILURES':>9}  LAST ERROR"
    )
    for name, d in doc["devices"].items():
        up = "up" if d.get("up", d["state"] == "running") and running else "down"
        last = d.get("last_ok_ns")
        values = "never" if last == 0 else "-" if last is None else _age(now - last / 1e9) + " ago"
        error, when = d["last_error"], d.get("last_error_ns")
        if error and when:  # a device up again shows its last error with its age, not as current
            error = f"{_age(now - when / 1e9)} ago: {error}"
        typer.echo(f"{name:<20} {d['state']:<11} {up:<4} {values:>11} {d['samples']:>10} {d['failures']:>9}  {error}")
        refused = (d.get("health") or {}).get("refused_tags")
        if refused:
            typer.echo(f"{'':<20} refused by the device (kept Bad, asked again later): {_listed(refused)}")
    if not running:
        raise typer.Exit(1)
