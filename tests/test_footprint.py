"""The daemon's start imports only what the daemon uses (docs/benchmarks.md, "Footprint")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeos.cli import _plain_run

PROBE = """
import atexit, sys
WATCH = ("pydantic", "typer", "edgeos.runtime")
atexit.register(lambda: print("LOADED", " ".join(m for m in WATCH if m in sys.modules)))
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
        (["-c", "a.toml", "--log-format", "json"], {"config": Path("a.toml"), "log_format": "json"}),
        (["-c", "a.toml", "--verbose"], None),  # an option it does not know: typer
    ],
)
def test_plain_run_arguments(args, expected):
    assert _plain_run(args) == expected


def test_run_does_not_load_typer(tmp_path):
    # An invalid config exits at load, with the same message and code as through typer, and
    # the process never imported typer nor pydantic (typer's parameter conversion does).
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nid = "x"\n')
    r = subprocess.run([sys.executable, "-c", PROBE, "run", "-c", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "invalid config" in r.stderr and "data_dir" in r.stderr
    assert r.stdout.split("LOADED", 1)[1].split() == ["edgeos.runtime"]
    # The typer path still handles everything else, e.g. help.
    r = subprocess.run([sys.executable, "-c", PROBE, "run", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--log-level" in r.stdout


def test_plain_run_refuses_two_configs(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", PROBE, "run", "a.toml", "-c", "b.toml"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "two configs given" in r.stderr


def test_plugin_discovery_without_importlib_metadata(tmp_path):
    # The daemon's own scan of entry_points.txt finds what importlib.metadata finds (the
    # built-ins and the test fixtures' plugins alike), and loading a plugin never imports it.
    probe = """
import sys
from edgeos import plugins
for g in (plugins.PROTOCOLS, plugins.FILTERS):
    plugins.load(g, plugins.names(g)[-1] if g == plugins.FILTERS else "simulated")
    print(g, sorted((n, ep.value) for n, ep in plugins._entry_points(g).items()))
print("LOADED", "importlib.metadata" in sys.modules)
for g in (plugins.PROTOCOLS, plugins.FILTERS):
    print(g, sorted((n, ep.value) for n, ep in plugins._entry_points(g, metadata=True).items()))
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[2] == "LOADED False"
    assert lines[:2] == lines[3:5]
    assert "('simulated', 'edgeos.protocols.simulated:plugin')" in lines[0]


def test_tags_share_equal_config_values(tmp_path):
    # Tags read from CSV hold one object per distinct string and filter chain (a 10,000-tag
    # gateway keeps them for its life), and their options stay a read-only mapping.
    (tmp_path / "tags.csv").write_text(
        "name,signal,amplitude,filters\n"
        + "".join(f"t{i},{'ramp' if i % 2 else 'sine'},2.5,deadband(abs=0.5)\n" for i in range(4))
    )
    (tmp_path / "edgeos.toml").write_text(
        '[gateway]\nid = "g"\ndata_dir = "data"\n[[devices]]\nname = "sim"\nprotocol = "simulated"\n'
        'tags_csv = "tags.csv"\n'
    )
    from edgeos.config import load_config

    tags = load_config(tmp_path / "edgeos.toml").devices[0].tags
    assert tags[0].filters is tags[2].filters and tags[0].filters[0].params["abs"] == 0.5
    assert tags[0].options["signal"] is tags[2].options["signal"] == "sine"
    o = tags[1].options
    assert o["signal"] == "ramp" and o.get("amplitude") == 2.5 and o.get("nope", 7) == 7 and "period" in o
    assert dict(o) == {**o} and o == dict(o) and len(o) == len(dict(o))
    with pytest.raises(KeyError):
        o["nope"]


def test_filter_state_is_sized_by_its_chain_and_shared_params_are_completed_once():
    # 10 tags, 4 of them with a swinging door, 6 with a deadband (two ways of configuring it):
    # each filter holds state for its own group's tags, numbered 0..k-1, and tags configured
    # with one params object share one completed copy.
    import numpy as np

    from edgeos.adapter import FilterSpec, TagConfig
    from edgeos.model import Batch, TagMeta
    from edgeos.pipeline import Pipeline

    door = (FilterSpec("swinging_door", {"deviation": 1.0}),)
    band = (FilterSpec("deadband", {"abs": 1.0}),)
    band_pct = (FilterSpec("deadband", {"abs": 1.0}),)  # equal, not the same object
    chains = [door, band, band, band_pct, band, band, door, band, door, door]
    p = Pipeline([TagConfig(TagMeta(i, "d", f"t{i}"), 10**9, c) for i, c in enumerate(chains)])
    (sd,), (db,) = p.chains[1:]
    assert (sd.n_tags, len(sd.state), db.n_tags, len(db.state)) == (4, 4, 6, 6)
    assert db.params[0] is db.params[1] is not db.params[2] and db.params[0] == db.params[2]
    # Out of the pipeline, gateway-wide ids again.
    ids = np.arange(10, dtype=np.int32)
    for t, expected in ((0, list(range(10))), (1, [1, 2, 3, 4, 5, 7])):  # then the doors hold theirs
        out = p.apply(Batch("d", ids, np.full(10, t, np.int64), np.full(10, 5.0 * t), np.zeros(10, np.uint32)))
        assert sorted(out.tags.tolist()) == expected
    held = p.flush()
    assert [b.tags.tolist() for b in held] == [[0, 6, 8, 9]]
