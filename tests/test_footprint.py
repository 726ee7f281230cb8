"""The daemon's start imports only what the daemon uses (docs/benchmarks.md, "Footprint")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeos.cli import _plain_run

PROBE = """
import atexit, sys
atexit.register(lambda: print("LOADED", " ".join(m for m in ("pydantic", "edgeos.runtime") if m in sys.modules)))
sys.argv = ["edgeos", *sys.argv[1:]]
from edgeos.cli import main
main()
"""


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-c", "a.toml"], {"config": Path("a.toml")}),
        (["a.toml"], {"config_file": Path("a.toml")}),
        (["--config=a.toml", "--log-level", "debug"], {"config": Path("a.toml"), "log_level": "debug"}),
        (["a.toml", "--log-level=info"], {"config_file": Path("a.toml"), "log_level": "info"}),
        (["a.toml", "-c", "a.toml"], {"config_file": Path("a.toml"), "config": Path("a.toml")}),
        ([], None),  # the default config: typer's path
        (["--help"], None),
        (["-c"], None),
        (["-c", "a.toml", "-c", "b.toml"], None),
        (["a.toml", "b.toml"], None),
        (["-c", "a.toml", "--log-format", "json"], None),  # an option it does not know: typer
    ],
)
def test_plain_run_arguments(args, expected):
    assert _plain_run(args) == expected


def test_run_does_not_load_typers_pydantic(tmp_path):
    # An invalid config exits at load, with the same message and code as through typer, and
    # the process never imported pydantic (typer's parameter conversion does).
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nid = "x"\n')
    r = subprocess.run([sys.executable, "-c", PROBE, "run", "-c", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "invalid config" in r.stderr and "data_dir" in r.stderr
    assert r.stdout.split("LOADED", 1)[1].split() == ["edgeos.runtime"]
    # The typer path still handles everything else, e.g. help.
    r = subprocess.run([sys.executable, "-c", PROBE, "run", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--log-level" in r.stdout
