"""Packaging: the pure build is explicit and loud, never a silent fallback; a failed compile says
how to get either build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pure_build_runs_on_reference_kernels_and_says_so(tmp_path):
    target = tmp_path / "site"
    env = {**os.environ, "EDGEOS_NO_EXTENSIONS": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr
    assert not list(target.glob("edgeos/filters/_kernels*.so")) and not list(target.glob("edgeos/sync/_frame*.so"))
    assert not (target / "protocols").exists()
    run_env = {**os.environ, "PYTHONPATH": str(target)}
    version = subprocess.run(
        [sys.executable, "-m", "edgeos.cli", "version"], env=run_env, capture_output=True, text=True, cwd=tmp_path
    )
    assert version.returncode == 0, version.stderr
    assert "kernels: reference" in version.stdout
    demo = subprocess.run(
        [sys.executable, "-m", "edgeos.cli", "demo", "--dir", str(tmp_path / "d"), "--duration", "1"],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert demo.returncode == 0, demo.stderr
    assert "compiled filter kernels are missing" in demo.stderr


def test_a_missing_compiler_fails_the_install_with_both_ways_out(tmp_path):
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc")}
    env.pop("EDGEOS_NO_EXTENSIONS", None)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(tmp_path / "site"), str(ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert build.returncode != 0
    out = build.stdout + build.stderr
    assert "compiling the filter kernels and the sync's framing (ext/*.pyx) failed" in out and "no-such-cc" in out
    assert "apt install gcc python3-dev" in out and "EDGEOS_NO_EXTENSIONS=1" in out


def test_the_unit_lets_the_longest_allowed_orderly_stop_finish():
    import re

    from edgeos.config.load import GATEWAY_FIELDS
    from edgeos.config.units import parse_duration_ns

    unit = (ROOT / "systemd" / "edgeos.service").read_text()
    stop = re.search(r"^TimeoutStopSec=(\S+)$", unit, re.M).group(1)
    assert parse_duration_ns(stop) > GATEWAY_FIELDS["shutdown_timeout"].max
    assert re.search(r"^RuntimeDirectory=edgeos$", unit, re.M)  # /run/edgeos: the live status


def test_the_unit_runs_as_the_user_and_group_its_sysusers_file_creates():
    import re

    unit = (ROOT / "systemd" / "edgeos.service").read_text()
    sysusers = (ROOT / "systemd" / "edgeos.sysusers.conf").read_text()
    user = re.search(r"^User=(\S+)$", unit, re.M).group(1)
    assert re.search(r"^Group=(\S+)$", unit, re.M).group(1) == user
    assert re.search(rf"^u {user} ", sysusers, re.M)
    assert "DynamicUser=yes" not in unit  # a dynamic group cannot be joined by operators
    assert re.search(r"^UMask=0027$", unit, re.M)
