"""What a third-party adapter author is promised: docs/adapters.md, examples/edgeos-sysfs/README.md
and README.md's embedding/plugin parts, checked from the outside.

Plugins are built as an author would from the documents (a package with pyproject.toml and an
`edgeos.protocols` entry point), installed with pip --target into a directory of their own (never
into the venv), and the venv's `edgeos check`/`run`/`status`/`write`/`init`/`export` are run as
subprocesses with that directory on PYTHONPATH.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-test" / "bin"
PY = VENV / "python"
EDGEOS = VENV / "edgeos"
EXAMPLE = ROOT / "examples" / "edgeos-sysfs"

# ---------------------------------------------------------------------------------------------
# The plugin an author writes from docs/adapters.md. One module, several entry points: `acme` is
# a well-behaved adapter whose device keys select a behaviour (a contract breach, a lost link, a
# close that raises...), the others carry one plugin bug each (docs/adapters.md, Registration 2).
# Events go to a trace file named by the `path` device key `trace`.
# ---------------------------------------------------------------------------------------------

ACME = '''
"""{module}: a third-party plugin written from docs/adapters.md."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from edgeos import Answer, Batch, DeviceError, Field, ValueKind

ORIGIN = "{module}"


def trace(device, event):
    path = device.options.get("trace") or ""
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{{device.name}} {{event}}\\n")


class AcmeAdapter:
    def __init__(self, device):
        self.device = device
        self.polls = 0
        self.closed = 0
        self.ids = np.array([t.meta.id for t in device.tags], np.int32)
        trace(device, "create")

    async def connect(self):
        trace(self.device, "connect")
        if self.device.options["connect_fails"]:
            raise DeviceError(self.device.name, "acme unreachable", code="connect", stage="connect")

    def batch(self, device=None, ids=None, shift=0, quality=0, offset=0.0):
        ids = self.ids if ids is None else ids
        n = len(ids)
        return Batch(
            device or self.device.name,
            ids,
            np.full(n, time.time_ns() + shift, np.int64),
            np.full(n, float(self.polls) + offset, np.float64),
            np.full(n, quality, np.uint32),
        )

    async def run(self, emit):
        o = self.device.options
        mode = o["mode"]
        trace(self.device, "run")
        try:
            while True:
                self.polls += 1
                try:
                    if mode == "foreign_device":
                        await emit(self.batch(device="someone-else"), answer=Answer.YES)
                    elif mode == "foreign_tag":
                        # the first device's tag ids (0, 1): another device's tags
                        await emit(self.batch(ids=np.array([0, 1], np.int32), offset=1000.0), answer=Answer.YES)
                    elif mode == "not_batch":
                        await emit({{"device": self.device.name}}, answer=Answer.YES)
                    elif mode == "no_answer":
                        await emit(self.batch(quality=0x800A0000))
                    elif mode == "say_no":
                        await emit(self.batch(), answer=Answer.NO)
                    elif mode == "future":
                        await emit(self.batch(shift=3600 * 10**9), answer=Answer.YES)
                    else:
                        await emit(self.batch(), answer=Answer.YES, source="all")
                except DeviceError as e:
                    trace(self.device, f"emit-error {{e.code}}")
                    raise
                if mode == "returns":
                    trace(self.device, "return")
                    return
                if o["fail_after"] and self.polls >= o["fail_after"]:
                    trace(self.device, "lost")
                    raise DeviceError(self.device.name, "acme link lost", code="lost")
                await asyncio.sleep(self.device.poll_interval_ns / 1e9)
        except asyncio.CancelledError:
            trace(self.device, "cancelled")
            raise

    async def write(self, tag, value):
        trace(self.device, f"write {{tag.meta.name}} {{value}}")
        if float(value) > 100:
            raise DeviceError(self.device.name, "acme refuses values above 100", code="refused", stage="write")
        return round(float(value) * 2) / 2

    async def close(self):
        self.closed += 1
        trace(self.device, "close")
        if self.device.options["close_sleep"]:
            await asyncio.sleep(self.device.options["close_sleep"])
            trace(self.device, "close-finished")
        if self.device.options["close_raises"]:
            raise RuntimeError("acme close exploded")

    def health(self):
        return {{"acme_polls": self.polls, "acme_flavour": "vanilla"}}


MODES = ("good", "foreign_device", "foreign_tag", "not_batch", "returns", "no_answer", "say_no", "future")


class AcmeProtocol:
    device_fields = {{
        "mode": Field("choice", "good", choices=MODES),
        "trace": Field("path", ""),
        "fail_after": Field("int", 0),
        "connect_fails": Field("bool", False),
        "create_fails": Field("bool", False),
        "close_raises": Field("bool", False),
        "close_sleep": Field("float", 0.0),
    }}
    tag_fields = {{"register": Field("int", 0, min=0, max=65535)}}

    def tag_kind(self, options):
        return ValueKind.NUMBER

    def validate(self, device, path, problems):
        for i, t in enumerate(device.tags):
            if t.options["register"] == 13:
                problems.add(f"{{path}}.tags[{{i}}].register", "register 13 is unlucky")

    def create(self, device):
        trace(device, "create-attempt")
        if device.options["create_fails"]:
            raise RuntimeError("acme create failed")
        return AcmeAdapter(device)

    def describe(self, device):
        return [f"plan from {{ORIGIN}}: {{t.meta.name}} at register {{t.options['register']}}" for t in device.tags]


class BadValidate(AcmeProtocol):
    def validate(self, device, path, problems):
        raise ZeroDivisionError("acme validate bug")


class BadKind(AcmeProtocol):
    def tag_kind(self, options):
        raise KeyError("acme tag_kind bug")


class BadDefault(AcmeProtocol):
    tag_fields = {{"register": Field("int", "forty-two")}}


plugin = AcmeProtocol()
bad_validate = BadValidate()
bad_kind = BadKind()
bad_default = BadDefault()
'''

ACME_SAMPLE = """\
## acme-sample-marker: a machine read through the acme plugin.
[[devices]]
  ## Unique name of the device.
  name = "acme1"
  protocol = "acme"
  # mode = "good"

  [[devices.tags]]
    name = "speed"
    # register = 0
"""


def _package(root: Path, dist: str, version: str, module: str, entry_points: dict[str, str], source: str) -> Path:
    pkg = root / dist
    (pkg / module).mkdir(parents=True)
    (pkg / module / "__init__.py").write_text(source)
    (pkg / module / "sample.toml").write_text(ACME_SAMPLE)
    eps = "\n".join(f'{name} = "{value}"' for name, value in entry_points.items())
    (pkg / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{dist}"
            version = "{version}"
            requires-python = ">=3.11"
            dependencies = ["edgeos>=0.1,<0.2", "numpy"]

            [project.entry-points."edgeos.protocols"]
            """
        )
        + eps
        + textwrap.dedent(
            f"""

            [tool.setuptools]
            packages = ["{module}"]

            [tool.setuptools.package-data]
            {module} = ["sample.toml"]
            """
        )
    )
    return pkg


def _copy_example(root: Path) -> Path:
    """Copy examples/edgeos-sysfs and rename it, as its README says to start an adapter."""
    dst = root / "edgeos-myfs"
    shutil.copytree(EXAMPLE, dst, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    (dst / "edgeos_sysfs").rename(dst / "edgeos_myfs")
    for f in [dst / "pyproject.toml", *sorted((dst / "edgeos_myfs").glob("*.py")), dst / "edgeos_myfs" / "sample.toml"]:
        text = f.read_text()
        text = text.replace("edgeos_sysfs", "edgeos_myfs").replace("edgeos-sysfs", "edgeos-myfs")
        text = text.replace('sysfs = "edgeos_myfs:plugin"', 'myfs = "edgeos_myfs:plugin"')
        text = text.replace('protocol = "sysfs"', 'protocol = "myfs"').replace('name = "sysfs"', 'name = "myfs"')
        text = text.replace('version = "0.1.0"', 'version = "0.3.1"')
        f.write_text(text)
    return dst


def _pip_target(site: Path, *pkgs: Path) -> None:
    r = subprocess.run(
        # The venv has setuptools 65 and no `wheel`, so --no-build-isolation cannot build any
        # package here; pip's isolated build takes the backend from pip's configured index, as
        # scripts/setup's install of examples/edgeos-sysfs does.
        [str(PY), "-m", "pip", "install", "--no-deps", "-q"] + ["--target", str(site), *map(str, pkgs)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two plugin directories: `main` (acme, a plugin that fails to import, the copied example) and
    `dup` (two packages registering one name, one registering the built-in `simulated`)."""
    root = tmp_path_factory.mktemp("plugins")
    src = root / "src"
    acme = _package(
        src,
        "edgeos-acme",
        "2.3.4",
        "acme_edge",
        {
            "acme": "acme_edge:plugin",
            "acme_badvalidate": "acme_edge:bad_validate",
            "acme_badkind": "acme_edge:bad_kind",
            "acme_baddefault": "acme_edge:bad_default",
        },
        ACME.format(module="acme_edge"),
    )
    broken = _package(
        src,
        "edgeos-acme-broken",
        "0.7.1",
        "acme_broken_mod",
        {"acme_broken": "acme_broken_mod:plugin"},
        'raise ImportError("libacme.so.3: cannot open shared object file")\n',
    )
    myfs = _copy_example(src)
    # Installed second by name, but first by entry-point value ("aaa_twin:plugin" < "zzz_twin:plugin").
    twin_first = _package(
        src, "edgeos-twin-first", "1.0.0", "zzz_twin", {"twin": "zzz_twin:plugin"}, ACME.format(module="zzz_twin")
    )
    twin_second = _package(
        src, "edgeos-twin-second", "2.0.0", "aaa_twin", {"twin": "aaa_twin:plugin"}, ACME.format(module="aaa_twin")
    )
    shadow = _package(
        src,
        "edgeos-shadow",
        "5.5.5",
        "shadow_sim",
        {"simulated": "shadow_sim:plugin"},
        ACME.format(module="shadow_sim"),
    )
    main, dup = root / "site-main", root / "site-dup"
    _pip_target(main, acme, broken, myfs)
    _pip_target(dup, twin_first, twin_second, shadow)
    return {"main": main, "dup": dup}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _env(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(site)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("INVOCATION_ID", None)
    env.pop("JOURNAL_STREAM", None)
    return env


def _cli(site: Path, *args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EDGEOS), *args], capture_output=True, text=True, env=_env(site), cwd=cwd, timeout=timeout
    )


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def acme_device(name: str, *, protocol: str = "acme", tags: tuple = ("a", "b"), **opts: object) -> str:
    lines = [
        "[[devices]]",
        f'name = "{name}"',
        f'protocol = "{protocol}"',
        'poll_interval = "50ms"',
        'reconnect_min = "50ms"',
        'reconnect_max = "100ms"',
        f'trace = "{name}.trace"',
    ]
    lines += [f"{k} = {_toml(v)}" for k, v in opts.items()]
    for i, t in enumerate(tags):
        tag = t if isinstance(t, dict) else {"name": t}
        lines.append("  [[devices.tags]]")
        lines += [f"  {k} = {_toml(v)}" for k, v in {"register": i + 1, **tag}.items() if v is not None]
    return "\n".join(lines) + "\n"


def write_config(tmp_path: Path, *devices: str, shutdown_timeout: str = "4s") -> Path:
    cfg = tmp_path / "edgeos.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""\
            [gateway]
            id = "gw"
            data_dir = "data"
            run_dir = "run"
            shutdown_timeout = "{shutdown_timeout}"

            [http]
            enabled = false

            """
        )
        + "\n".join(devices)
    )
    return cfg


def wait_for(cond, timeout: float = 8.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def trace(tmp_path: Path, device: str) -> list[str]:
    f = tmp_path / f"{device}.trace"
    if not f.exists():
        return []
    return [line.split(" ", 1)[1] for line in f.read_text().splitlines() if line.startswith(device + " ")]


class Daemon:
    """`edgeos run` in a subprocess, started from a directory that is not the config's."""

    def __init__(self, site: Path, cfg: Path) -> None:
        self.site, self.cfg = site, cfg
        self.log_path = cfg.parent / "daemon.log"
        self.cwd = cfg.parent / "elsewhere"
        self.cwd.mkdir(exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(EDGEOS), "run", "--log-format", "text", "-c", str(cfg)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=_env(site),
            cwd=self.cwd,
        )
        self.rc: int | None = None
        self.stop_seconds: float | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict:
        r = _cli(self.site, "status", "--json", "-c", str(self.cfg))
        try:
            return json.loads(r.stdout)
        except ValueError:
            return {}

    def device(self, name: str) -> dict:
        return (self.status().get("devices") or {}).get(name) or {}

    def stop(self, timeout: float = 15.0) -> int:
        if self.rc is None:
            t0 = time.monotonic()
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.rc = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.rc = self.proc.wait(timeout=5)
                self.rc = -999
            self.stop_seconds = time.monotonic() - t0
            self._log.close()
        return self.rc

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def export(site: Path, cfg: Path) -> list[dict[str, str]]:
    out = cfg.parent / "export.csv"
    until = f"@{int(time.time()) + 3 * 3600}"
    r = _cli(site, "export", "--since", "2h", "--until", until, "--out", str(out), "-c", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def rows_of(rows: list[dict[str, str]], tag: str, quality: str | None = None) -> list[dict[str, str]]:
    return [r for r in rows if r["tag"] == tag and (quality is None or r["quality"] == quality)]


# ---------------------------------------------------------------------------------------------
# Registration, `edgeos check`, plugin load errors
# ---------------------------------------------------------------------------------------------


def test_check_lists_loaded_plugins_with_their_versions_and_describe_lines(sites, tmp_path):
    """adapters.md Registration 1-2 (describe); sysfs README: check shows "sysfs 0.1.0"."""
    cfg = write_config(tmp_path, acme_device("m1"))
    r = _cli(sites["main"], "check", str(cfg))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    plugins = next(line for line in out.splitlines() if line.startswith("plugins"))
    assert "acme 2.3.4" in plugins
    assert "myfs 0.3.1" in plugins  # the copied example, under its new name and version
    # describe(device): lines printed under the device
    assert "plan from acme_edge: a at register 1" in out
    assert "plan from acme_edge: b at register 2" in out


def test_plugin_keys_are_checked_with_the_common_ones_in_one_pass(sites, tmp_path):
    """Registration 2: the runtime checks the protocol's keys with the common keys, reports unknown
    keys and every problem in one pass (validate's problems included)."""
    dev = acme_device(
        "m1",
        tags=(
            {"name": "a", "regster": 4},
            {"name": "b", "register": 70000},
            {"name": "c", "register": 13},
            {"name": "d", "poll_interval": 1},
        ),
        mode="sideways",
    )
    r = _cli(sites["main"], "check", str(write_config(tmp_path, dev)))
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "Traceback" not in out
    lines = out.splitlines()
    assert any("regster" in line and "register" in line.replace("regster", "") for line in lines), out
    assert any("tags[1]" in line and "register" in line and "70000" in line for line in lines), out
    assert any("tags[2]" in line and "unlucky" in line for line in lines), out
    assert any("tags[3]" in line and "poll_interval" in line for line in lines), out
    assert any("mode" in line and "sideways" in line for line in lines), out


@pytest.mark.parametrize(
    ("protocol", "cause"),
    [
        ("acme_badvalidate", "acme validate bug"),
        ("acme_badkind", "acme tag_kind bug"),
        ("acme_baddefault", "forty-two"),
    ],
)
def test_plugin_bug_is_a_config_problem_naming_plugin_and_package(sites, tmp_path, protocol, cause):
    """Registration 2: "A `validate` or `tag_kind` that raises (a plugin's bug), or a field default
    its kind refuses, is reported as a config problem naming the plugin and its package." """
    # the default applies only to a tag that does not set the key
    dev = acme_device("m1", protocol=protocol, tags=({"name": "a", "register": None},))
    r = _cli(sites["main"], "check", str(write_config(tmp_path, dev)))
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "Traceback" not in out, out
    assert protocol in out, out
    assert "edgeos-acme" in out, out


def test_plugin_that_fails_to_import_is_named_with_package_version_and_cause(sites, tmp_path):
    """Registration 4: "reported as `PluginError` naming the entry point, the distribution and
    version, and the cause; only configs that use it are refused." """
    cfg = write_config(tmp_path, acme_device("m1", protocol="acme_broken"))
    for cmd in (["check", str(cfg)], ["run", "--log-format", "text", str(cfg)]):
        r = _cli(sites["main"], *cmd, timeout=20)
        out = r.stdout + r.stderr
        assert r.returncode != 0, out
        assert "acme_broken" in out, out
        assert "edgeos-acme-broken" in out, out
        assert "0.7.1" in out, out
        assert "libacme.so.3" in out, out
        assert "Traceback" not in out, out


def test_plugin_that_fails_to_import_does_not_refuse_other_configs(sites, tmp_path):
    cfg = write_config(tmp_path, acme_device("m1"))
    r = _cli(sites["main"], "check", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout


def test_two_packages_one_name_first_by_entry_point_value_and_a_warning(sites, tmp_path):
    """Registration 5: between two third-party packages the first by entry-point value is used;
    the ones not used are named in a warning when the name is loaded."""
    cfg = write_config(tmp_path, acme_device("m1", protocol="twin"))
    r = _cli(sites["dup"], "check", str(cfg))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "plan from aaa_twin" in out  # aaa_twin:plugin < zzz_twin:plugin
    assert "plan from zzz_twin" not in out
    plugins = next(line for line in out.splitlines() if line.startswith("plugins"))
    assert "twin 2.0.0" in plugins, plugins
    # the one not used is named (by its package or its entry-point value) in a warning
    assert any(
        "twin" in line and ("zzz_twin" in line or "edgeos-twin-first" in line)
        for line in out.splitlines()
        if not line.startswith("    plan")
    ), out


def test_builtin_protocol_is_never_replaced_and_the_other_package_is_named(sites, tmp_path):
    """Registration 5: a built-in protocol is never replaced by another package registering the
    same name; the one not used is named in a warning when the name is loaded."""
    cfg = write_config(
        tmp_path,
        '[[devices]]\nname = "s1"\nprotocol = "simulated"\n[[devices.tags]]\nname = "t"\nsignal = "sine"\n',
    )
    r = _cli(sites["dup"], "check", str(cfg))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "plan from shadow_sim" not in out
    plugins = next(line for line in out.splitlines() if line.startswith("plugins"))
    assert "simulated 5.5.5" not in plugins, plugins
    warning = [
        line for line in out.splitlines() if "simulated" in line and ("shadow_sim" in line or "edgeos-shadow" in line)
    ]
    assert warning, out


def test_init_assembles_the_packages_sample_toml(sites, tmp_path):
    """Registration 3 and the sysfs README: `edgeos init` includes a package's sample.toml."""
    out = tmp_path / "new.toml"
    r = _cli(sites["main"], "init", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    text = out.read_text()
    assert "acme-sample-marker" in text
    assert "edgeos-myfs" in text  # the copied example's sample.toml, renamed


# ---------------------------------------------------------------------------------------------
# Running plugins: emit, health, shutdown, close
# ---------------------------------------------------------------------------------------------


def test_good_adapter_runs_health_in_status_path_resolved_shutdown_cancels_run_then_close(sites, tmp_path):
    """Registration 2 ("path" resolved against the config's directory), the adapter table (health
    in `edgeos status --json`), and Backpressure/cancellation (shutdown is cancellation of run)."""
    cfg = write_config(tmp_path, acme_device("m1"))
    with Daemon(sites["main"], cfg) as d:
        dev = wait_for(lambda: (x := d.device("m1")) and x.get("up") and x.get("samples", 0) >= 6 and x, what="m1 up")
        health = dev["health"]
        assert health.get("acme_flavour") == "vanilla", dev
        assert health.get("acme_polls", 0) >= 1, dev
        assert (tmp_path / "m1.trace").exists()  # resolved against the config file's directory
        assert not (d.cwd / "m1.trace").exists()
        assert d.stop() == 0, d.log()
    events = trace(tmp_path, "m1")
    assert "cancelled" in events, events
    assert events.index("close") > events.index("cancelled"), events
    rows = export(sites["main"], cfg)
    good = rows_of(rows, "m1/a", "GOOD")
    assert len(good) >= 6
    # every sample read is committed at a stop: the last value the adapter emitted is stored
    assert float(good[-1]["value"]) >= 6


@pytest.mark.parametrize("mode", ["foreign_device", "foreign_tag", "not_batch"])
def test_contract_breach_is_dropped_logged_and_the_device_restarted(sites, tmp_path, mode):
    """Batches: a breach is a DeviceError (code contract) raised from emit, the batch is dropped
    (the log says how many samples), the device is restarted; other devices go on."""
    cfg = write_config(tmp_path, acme_device("ok"), acme_device("x", mode=mode))
    with Daemon(sites["main"], cfg) as d:
        wait_for(lambda: trace(tmp_path, "x").count("create") >= 3, what="x restarted twice")
        ok_before = d.device("ok").get("samples", 0)
        wait_for(lambda: d.device("ok").get("samples", 0) >= ok_before + 5, what="ok still producing")
        x = d.device("x")
        assert d.stop() == 0
    events = trace(tmp_path, "x")
    assert "emit-error contract" in events, events
    log = d.log()
    breach_lines = [line for line in log.splitlines() if " x" in line and "contract" in line]
    assert breach_lines, log
    if mode != "not_batch":
        assert any(re.search(r"\b2 samples?\b", line) for line in breach_lines), breach_lines
    assert x.get("last_error_code") == "contract", x
    rows = export(sites["main"], cfg)
    assert not rows_of(rows, "x/a", "GOOD") and not rows_of(rows, "x/b", "GOOD")
    assert all(float(r["value"]) < 1000 for r in rows_of(rows, "ok/a") + rows_of(rows, "ok/b") if r["value"])
    assert len(rows_of(rows, "ok/a", "GOOD")) >= 5


def test_run_that_returns_is_a_failure_and_the_device_restarts(sites, tmp_path):
    """Adapter table: "Returning is treated as a failure ("run() returned")"; metrics.md: code `ended`."""
    cfg = write_config(tmp_path, acme_device("x", mode="returns"))
    with Daemon(sites["main"], cfg) as d:
        wait_for(lambda: trace(tmp_path, "x").count("create") >= 3, what="x restarted twice")
        x = wait_for(lambda: (s := d.device("x")) and s.get("failures", 0) >= 2 and s, what="x's failures")
        assert d.stop() == 0
    assert x["last_error_code"] == "ended", x
    assert "run() returned" in x["last_error"] or "run() returned" in d.log(), (x, d.log())
    assert x.get("failures", 0) >= 2, x


def test_lost_connection_records_one_comm_failure_per_tag_closes_and_recreates(sites, tmp_path):
    """Errors and quality: a connection failure raises; the runtime records one Bad sample per tag
    (BAD_COMM_FAILURE) when the device goes down, closes the adapter, and creates a new one."""
    cfg = write_config(tmp_path, acme_device("x", fail_after=3))
    with Daemon(sites["main"], cfg) as d:
        wait_for(lambda: trace(tmp_path, "x").count("create") >= 3, what="x recreated")
        assert d.stop() == 0
    events = trace(tmp_path, "x")
    lost = events.count("lost")
    # each adapter is closed before the next one is created
    first_close, second_create = events.index("close"), [i for i, e in enumerate(events) if e == "create"][1]
    assert first_close < second_create, events
    rows = export(sites["main"], cfg)
    for tag in ("x/a", "x/b"):
        bad = rows_of(rows, tag, "BAD_COMM_FAILURE")
        assert 1 <= len(bad) <= lost, (tag, lost, bad)
        assert all(r["value"] == "" for r in bad)
        assert len(rows_of(rows, tag, "GOOD")) >= 3 * (lost - 1)


@pytest.mark.parametrize("option", ["connect_fails", "create_fails"])
def test_device_that_never_connects_has_one_not_connected_sample_and_one_log_line(sites, tmp_path, option):
    """Registration 2 (create raises: retried as after a failed connect) and Errors and quality:
    BAD_NOT_CONNECTED once when it goes down, not again at each failed reconnect; errors logged
    at most once a minute per (device, code); other devices are not affected."""
    cfg = write_config(tmp_path, acme_device("ok"), acme_device("x", **{option: True}))
    with Daemon(sites["main"], cfg) as d:
        wait_for(lambda: trace(tmp_path, "x").count("create-attempt") >= 4, what="x retried")
        wait_for(lambda: d.device("ok").get("samples", 0) >= 5, what="ok producing")
        x = d.device("x")
        assert d.stop() == 0
    assert x.get("up") is False and x.get("failures", 0) >= 3, x
    cause = "acme unreachable" if option == "connect_fails" else "acme create failed"
    assert sum(cause in line for line in d.log().splitlines()) == 1, d.log()
    rows = export(sites["main"], cfg)
    for tag in ("x/a", "x/b"):
        assert [r["quality"] for r in rows_of(rows, tag)] == ["BAD_NOT_CONNECTED"], rows_of(rows, tag)
    assert len(rows_of(rows, "ok/a", "GOOD")) >= 5
    if option == "connect_fails":
        events = trace(tmp_path, "x")
        assert events.count("close") >= events.count("connect") - 1, events


def test_close_that_raises_is_logged_and_ignored(sites, tmp_path):
    """Adapter table, close: "the runtime logs and ignores it if it does"."""
    cfg = write_config(tmp_path, acme_device("x", fail_after=2, close_raises=True))
    with Daemon(sites["main"], cfg) as d:
        wait_for(lambda: trace(tmp_path, "x").count("run") >= 3, what="x reconnected after raising closes")
        assert d.proc.poll() is None
        assert d.stop() == 0, d.log()
    assert "acme close exploded" in d.log()


def test_slow_close_at_shutdown_is_bounded_by_half_the_shutdown_timeout(sites, tmp_path):
    """Adapter table, close: "bounded by min(5 s, shutdown_timeout / 2)": with shutdown_timeout 6s,
    a close that would take 30 s is given 3 s, and the stop is orderly (exit code 0, data kept)."""
    cfg = write_config(tmp_path, acme_device("x", close_sleep=30.0), shutdown_timeout="6s")
    with Daemon(sites["main"], cfg) as d:
        wait_for(lambda: d.device("x").get("samples", 0) >= 3, what="x producing")
        rc = d.stop(timeout=20)
    assert rc == 0, d.log()
    assert d.stop_seconds is not None and d.stop_seconds < 5.0, (d.stop_seconds, d.log())
    assert "close-finished" not in trace(tmp_path, "x")
    assert len(rows_of(export(sites["main"], cfg), "x/a", "GOOD")) >= 3


@pytest.mark.parametrize(("mode", "up"), [("good", True), ("say_no", False), ("no_answer", False)])
def test_answers_decide_whether_the_device_is_up(sites, tmp_path, mode, up):
    """Answers: `answer=NO`, or no answer given and every sample Bad for want of an answer
    (BadTimeout), is not an answer: the device is down, and a NO records no success."""
    cfg = write_config(tmp_path, acme_device("x", mode=mode))
    with Daemon(sites["main"], cfg) as d:
        x = wait_for(lambda: (s := d.device("x")) and s.get("samples", 0) >= 6 and s, what="x producing")
        x = d.device("x")
        assert d.stop() == 0
    assert x["up"] is up, x
    if not up:
        assert not x.get("last_ok_ns"), x
    else:
        assert x["last_ok_ns"] > 0, x


def test_timestamps_ahead_are_stored_as_given_with_one_clock_ahead_warning(sites, tmp_path):
    """Batches: timestamps are stored as given; one more than a minute ahead is said in a warning
    (code `clock_ahead`, once a minute per device)."""
    cfg = write_config(tmp_path, acme_device("x", mode="future"))
    t0 = time.time()
    with Daemon(sites["main"], cfg) as d:
        wait_for(lambda: d.device("x").get("samples", 0) >= 6, what="x producing")
        assert d.stop() == 0
    log = d.log().splitlines()
    ahead = [line for line in log if "clock_ahead" in line]
    assert len(ahead) == 1, ahead
    rows = rows_of(export(sites["main"], cfg), "x/a", "GOOD")
    assert len(rows) >= 6
    from datetime import datetime

    first = datetime.fromisoformat(rows[0]["time"].replace("Z", "+00:00")).timestamp()
    assert first >= t0 + 3500, rows[0]


def test_write_returns_the_device_value_and_refusals_fail(sites, tmp_path):
    """Adapter table, write: only for writable tags; DeviceError on refusal; the returned value is
    what `edgeos write` prints. README: PermissionError for a tag not configured writable."""
    cfg = write_config(tmp_path, acme_device("x", tags=({"name": "w", "writable": True}, "ro")))
    site = sites["main"]
    with Daemon(site, cfg) as d:
        wait_for(lambda: d.device("x").get("up"), what="x up")
        ok = _cli(site, "write", "-c", str(cfg), "x", "w", "7.3")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "7.5" in ok.stdout, ok.stdout
        refused = _cli(site, "write", "-c", str(cfg), "x", "w", "150")
        assert refused.returncode != 0, refused.stdout
        assert "above 100" in refused.stdout + refused.stderr
        ro = _cli(site, "write", "-c", str(cfg), "x", "ro", "5")
        assert ro.returncode != 0, ro.stdout
        assert d.proc.poll() is None
        assert d.stop() == 0
    writes = [e for e in trace(tmp_path, "x") if e.startswith("write")]
    assert len(writes) == 2 and writes[0] == "write w 7.3" and writes[1].startswith("write w 150"), writes


# ---------------------------------------------------------------------------------------------
# The example, copied and renamed as its README says
# ---------------------------------------------------------------------------------------------


def test_copied_example_refuses_relative_path_and_writable(sites, tmp_path):
    """sysfs README: `edgeos check` refuses a tag without a `path`, a relative path, and `writable = true`."""
    dev = textwrap.dedent(
        """\
        [[devices]]
        name = "fs"
        protocol = "myfs"
        [[devices.tags]]
        name = "nopath"
        [[devices.tags]]
        name = "rel"
        path = "temp"
        [[devices.tags]]
        name = "w"
        path = "/tmp/x"
        writable = true
        """
    )
    r = _cli(sites["main"], "check", str(write_config(tmp_path, dev)))
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    lines = out.splitlines()
    assert any("tags[0]" in line and "path" in line for line in lines), out
    assert any("tags[1]" in line and "absolute" in line for line in lines), out
    assert any("tags[2]" in line and "writable" in line for line in lines), out


def test_copied_example_reads_files_with_documented_qualities(sites, tmp_path):
    """sysfs README, Errors and quality: missing file BAD_SENSOR_FAILURE, not a number
    BAD_DECODING_ERROR, the other tags keep their values, never a restart; status health shows
    files_read, read_errors, failing_tags, last_error."""
    (tmp_path / "temp").write_text("42500\n")
    (tmp_path / "junk").write_text("hello\n")
    dev = textwrap.dedent(
        f"""\
        [[devices]]
        name = "fs"
        protocol = "myfs"
        poll_interval = "50ms"
        [[devices.tags]]
        name = "temp"
        path = "{tmp_path / "temp"}"
        scale = 0.001
        [[devices.tags]]
        name = "gone"
        path = "{tmp_path / "missing"}"
        [[devices.tags]]
        name = "junk"
        path = "{tmp_path / "junk"}"
        """
    )
    cfg = write_config(tmp_path, dev)
    with Daemon(sites["main"], cfg) as d:
        fs = wait_for(
            lambda: (s := d.device("fs")) and s.get("health", {}).get("files_read", 0) >= 9 and s, what="reads"
        )
        assert d.stop() == 0
    h = fs["health"]
    assert h["failing_tags"] == 2 and h["read_errors"] >= 6 and h["last_error"], h
    assert fs["connects"] == 1 and fs["up"] is True, fs
    rows = export(sites["main"], cfg)
    temp = rows_of(rows, "fs/temp")
    assert temp and all(r["quality"] == "GOOD" and math.isclose(float(r["value"]), 42.5) for r in temp)
    assert {r["quality"] for r in rows_of(rows, "fs/gone")} == {"BAD_SENSOR_FAILURE"}
    assert {r["quality"] for r in rows_of(rows, "fs/junk")} == {"BAD_DECODING_ERROR"}
    assert all(r["value"] == "" for r in rows_of(rows, "fs/gone") + rows_of(rows, "fs/junk"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
