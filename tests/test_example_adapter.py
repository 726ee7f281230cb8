"""The OEM example adapter (examples/edgeos-sysfs) against real files, through the real runtime;
and where the scripts install the test-only fixture plugins (never into a user's .venv)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeos import ConfigError, ProtocolPlugin, Quality, Runtime, plugins
from edgeos.cli import GATEWAY_HEADER, _sample, app
from edgeos.config import load_config
from edgeos.store import StoreReader

ROOT = Path(__file__).parents[1]
GATEWAY = '[gateway]\nid = "gw"\ndata_dir = "data"\nshutdown_timeout = "5s"\n'


def _device(*tags: str, interval: str = "20ms") -> str:
    return (
        GATEWAY
        + f'[[devices]]\nname = "host"\nprotocol = "sysfs"\npoll_interval = "{interval}"\n'
        + "".join(f"[[devices.tags]]\n{t}\n" for t in tags)
    )


def test_the_example_is_installed_as_a_third_party_plugin():
    info = next((p for p in plugins.available(plugins.PROTOCOLS) if p.name == "sysfs"), None)
    assert info is not None, "examples/edgeos-sysfs is not installed (scripts/setup --test installs it)"
    assert (info.dist, info.value) == ("edgeos-sysfs", "edgeos_sysfs:plugin")
    assert isinstance(plugins.load(plugins.PROTOCOLS, "sysfs"), ProtocolPlugin)


def _latest(rt: Runtime, key: str) -> tuple[float, int]:
    ((value, quality),) = [(v, q) for m, _, v, q in rt.latest.rows() if m.key == key]
    return value, quality


async def _until(rt: Runtime, key: str, good: bool, value: float | None = None) -> None:
    async with asyncio.timeout(10):
        while True:
            v, q = _latest(rt, key)
            if (q == Quality.GOOD) == good and (value is None or v == pytest.approx(value)):
                return
            await asyncio.sleep(0.01)


def _runs(key: str, data_dir: Path) -> list[tuple[str, float | None]]:
    """The stored history of a tag as runs of (quality, value), NaN as None."""
    with StoreReader(data_dir) as store:
        h = store.history(key)
    out: list[tuple[str, float | None]] = []
    for v, q in zip(h.values.tolist(), h.quality.tolist(), strict=True):
        item = (Quality.describe(q), None if math.isnan(v) else round(v, 9))
        if not out or out[-1] != item:
            out.append(item)
    return out


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.got: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.got.append(record.getMessage())


async def test_runtime_reads_scaled_values_and_a_file_that_disappears_recovers(tmp_path, write_config, caplog):
    temp, level, junk = tmp_path / "temp", tmp_path / "level", tmp_path / "junk"
    temp.write_text("45000\n")  # millidegrees, as /sys/class/thermal/*/temp holds them
    level.write_text(" 12.5 ")
    junk.write_text("hello\n")
    cfg = load_config(
        write_config(
            _device(
                f'name = "temp"\npath = "{temp}"\nscale = 0.001\nunit = "degC"',
                f'name = "level"\npath = "{level}"\nscale = 2.0\noffset = -2.5',
                f'name = "junk"\npath = "{junk}"',
            )
        )
    )
    caplog.set_level(logging.INFO, logger="edgeos.sysfs")
    # On the logger itself: the CLI's log set-up (run by other tests) stops "edgeos" propagating.
    logger, logged = logging.getLogger("edgeos.sysfs"), _Lines()
    logger.addHandler(logged)
    rt = Runtime(cfg)
    task = asyncio.create_task(rt.run(), name="runtime-under-test")
    try:
        async with asyncio.timeout(15):
            await rt.running.wait()
            await _until(rt, "host/temp", good=True, value=45.0)
            temp.unlink()  # the sensor is unplugged
            await _until(rt, "host/temp", good=False)
            assert _latest(rt, "host/level") == (22.5, Quality.GOOD)  # the other tags read on
            replacement = tmp_path / "temp.new"
            replacement.write_text("50000\n")
            os.replace(replacement, temp)  # and plugged in again
            await _until(rt, "host/temp", good=True, value=50.0)
    finally:
        rt.stop()
        await asyncio.wait_for(task, 15)
        logger.removeHandler(logged)

    host = rt.devices["host"]
    assert (host.connects, host.failures) == (1, 0)  # a failing file never restarts the device
    data = cfg.gateway.data_dir
    assert _runs("host/temp", data) == [("GOOD", 45.0), ("BAD_SENSOR_FAILURE", None), ("GOOD", 50.0)]
    assert _runs("host/level", data) == [("GOOD", 22.5)]
    assert _runs("host/junk", data) == [("BAD_DECODING_ERROR", None)]
    # Each failure is logged when it starts, and the recovery once: not at every poll.
    lines = logged.got
    assert len([m for m in lines if m.startswith("host/temp:")]) == 2, lines
    assert any("host/temp" in m and "No such file" in m and "BAD_SENSOR_FAILURE" in m for m in lines), lines
    assert any("host/temp" in m and "readable again" in m for m in lines), lines
    assert len([m for m in lines if m.startswith("host/junk:")]) == 1, lines


@pytest.mark.parametrize(
    ("content", "path", "quality"),
    [
        ("  -3.25\n", None, Quality.GOOD),
        ("", None, Quality.BAD_DECODING_ERROR),
        ("12 13\n", None, Quality.BAD_DECODING_ERROR),
        ("nan\n", None, Quality.BAD_DECODING_ERROR),
        ("1" * 5000, None, Quality.BAD_DECODING_ERROR),
        (None, "{tmp}/missing", Quality.BAD_SENSOR_FAILURE),
        (None, "{tmp}", Quality.BAD_CONFIG_ERROR),  # a directory
        (None, "/proc/sys/vm/drop_caches", Quality.BAD_CONFIG_ERROR),  # write-only, even for root
        (None, "/proc/self/mem", Quality.BAD_DEVICE_FAILURE),  # EIO, as from a sensor that did not answer
    ],
    ids=["number", "empty", "two-numbers", "nan", "too-long", "missing", "directory", "denied", "eio"],
)
async def test_each_file_error_gives_its_quality_and_never_raises(tmp_path, write_config, content, path, quality):
    if content is not None:
        (tmp_path / "value").write_text(content)
        path = str(tmp_path / "value")
    path = path.format(tmp=tmp_path)
    good = tmp_path / "good"
    good.write_text("7")
    cfg = load_config(write_config(_device(f'name = "x"\npath = "{path}"', f'name = "ok"\npath = "{good}"')))
    (device,) = cfg.devices
    adapter = plugins.load(plugins.PROTOCOLS, "sysfs").create(device)
    await adapter.connect()
    (group,) = adapter.poll_groups()
    batch = await adapter.read(group, 1_700_000_000 * 10**9)
    await adapter.close()
    assert batch.quality.tolist() == [quality, Quality.GOOD]
    assert batch.values[1] == 7.0
    assert (batch.values[0] == -3.25) if quality == Quality.GOOD else math.isnan(batch.values[0])
    assert adapter.health()["read_errors"] == (quality != Quality.GOOD)


def test_validate_refuses_a_tag_without_a_path_a_relative_path_and_a_write(write_config):
    cfg = write_config(
        _device('name = "a"', 'name = "b"\npath = "temp"', 'name = "c"\npath = "/tmp/c"\nwritable = true')
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    msg = str(info.value)
    assert "tags[0](a).path: missing: the file to read" in msg
    assert 'tags[1](b).path: found "temp", expected an absolute path' in msg
    assert "tags[2](c).writable: sysfs tags are read-only" in msg
    assert len(info.value.problems) == 3  # all of them in one pass


def test_init_carries_the_example_sample_and_it_is_a_valid_config(tmp_path):
    out = CliRunner().invoke(app, ["init", "-"])
    assert out.exit_code == 0, out.output
    assert "## ---- protocol: sysfs (edgeos-sysfs 0.1.0) ----" in out.output
    assert '#     path = "/sys/class/thermal/thermal_zone0/temp"' in out.output  # commented out
    assert "#     # offset = 0.0" in out.output  # defaults shown, double commented
    sample = tmp_path / "sysfs.toml"
    sample.write_text(GATEWAY_HEADER + _sample("sysfs"))
    (device,) = load_config(sample).devices
    assert device.protocol == "sysfs" and device.tags[0].options["scale"] == 0.001
    check = CliRunner().invoke(app, ["check", str(sample)])
    assert check.exit_code == 0, check.output
    assert "cpu_temperature: /sys/class/thermal/thermal_zone0/temp * 0.001" in check.output


# --------------------------------------------------------------------------------------------
# The scripts: fixtures only where tests run. They run from a copy, with a stand-in Python that
# records each command instead of building (the real build takes a minute; CI runs it anyway).

_STUB = r"""#!/usr/bin/env bash
echo "$0 $*" >> "$STUB_LOG"
if [ "${1:-}" = "-m" ] && [ "${2:-}" = "venv" ]; then
  mkdir -p "$3/bin"
  for tool in python ruff pytest; do cp "$STUB_SELF" "$3/bin/$tool"; done
elif [ "${1:-}" = "-" ]; then  # the setup's query for installed distributions
  cat > /dev/null
  shift
  for name in "$@"; do case " $STUB_INSTALLED " in *" $name "*) echo "$name" ;; esac; done
fi
exit 0
"""


@pytest.fixture
def scripts(tmp_path):
    """Run a copy of scripts/setup and scripts/test in tmp_path; returns (run, log lines)."""
    (tmp_path / "scripts").mkdir()
    for name in ("setup", "test"):
        shutil.copy2(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    python = stubs / "python3"
    python.write_text(_STUB)
    python.chmod(0o755)
    apt = stubs / "apt-get"  # so a missing Debian package is never really installed here
    apt.write_text('#!/bin/sh\necho "apt-get $*" >> "$STUB_LOG"\n')
    apt.chmod(0o755)
    log = tmp_path / "commands.log"

    def run(*args: str, installed: str = "") -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != "EDGEOS_VENV"}
        env.update(
            PATH=f"{stubs}:{env['PATH']}",
            PYTHON=str(python),
            STUB_SELF=str(python),
            STUB_LOG=str(log),
            STUB_INSTALLED=installed,
        )
        log.write_text("")
        done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return [ln.replace(str(tmp_path) + "/", "") for ln in log.read_text().splitlines()]

    return run


def test_scripts_test_keeps_the_fixtures_out_of_the_users_venv(scripts, tmp_path):
    lines = scripts("scripts/test", "-x")
    assert not (tmp_path / ".venv").exists()
    installs = [ln for ln in lines if " -m pip install -q " in ln and "--upgrade" not in ln]
    assert installs == [
        ".venv-test/bin/python -m pip install -q .[test] ./tests/fixture_plugin ./examples/edgeos-sysfs"
    ]
    assert lines[-1] == ".venv-test/bin/pytest -x"


def test_scripts_setup_removes_fixtures_an_older_test_run_left_in_the_users_venv(scripts, tmp_path):
    lines = scripts("scripts/setup", installed="edgeos-example-plugin edgeos-fixture-plugin edgeos-sysfs")
    assert ".venv/bin/python -m pip uninstall -q -y edgeos-example-plugin edgeos-fixture-plugin" in lines
    assert [ln for ln in lines if " -m pip install -q " in ln and "--upgrade" not in ln] == [
        ".venv/bin/python -m pip install -q ."
    ]
    # With --test the fixtures stay; only their former name goes.
    lines = scripts("scripts/setup", "--test", installed="edgeos-example-plugin edgeos-fixture-plugin")
    assert ".venv/bin/python -m pip uninstall -q -y edgeos-example-plugin" in lines


@pytest.mark.parametrize("first", ["edgeos", "edgeos.adapter", "edgeos.config"])
def test_the_public_api_annotations_resolve_for_oem_tooling(first):
    """typing.get_type_hints() on every public class and its methods (what IDEs, docs tools and
    plugin checkers call): a name imported only for type checkers made it raise NameError. In a
    fresh interpreter, whichever module is imported first."""
    code = f"""
import typing, {first}
import edgeos
for name in edgeos.__all__:
    obj = getattr(edgeos, name)
    if isinstance(obj, type) or callable(obj):
        typing.get_type_hints(obj)
        for m in dir(obj):
            if not m.startswith("_") and callable(getattr(obj, m, None)):
                typing.get_type_hints(getattr(obj, m))
print("ok", len(edgeos.__all__))
"""
    import sys

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok ")
