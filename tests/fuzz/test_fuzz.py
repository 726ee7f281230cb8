"""Fuzzing smoke: every target for ~30 s (all at once, in subprocesses, fixed seeds so that CI is
reproducible), no undocumented exception;
each deliberately broken variant must be caught; every crash found so far is replayed from
tests/cases/fuzz_*/fuzz.json. Longer runs: bench/bench_fuzz.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import targets  # noqa: E402

HERE = Path(__file__).parent
CASES = sorted((HERE.parent / "cases").glob("*/fuzz.json"))
SECONDS = float(os.environ.get("EDGEOS_FUZZ_SECONDS", "30"))


def _replay(case: dict) -> None:
    if case["target"] == "wire":
        targets.fuzz_wire(bytes.fromhex(case["payload_hex"]))
    elif case["target"] == "modbus":
        from edgeos.protocols.modbus import codec
        from edgeos.protocols.modbus.config import TagSpec

        specs = [TagSpec(**s) for s in case["specs"]]
        dec = codec.Decoder(specs, [s.start for s in specs])
        dec.decode(
            np.frombuffer(bytes.fromhex(case["regs_hex"]), ">u2"), np.frombuffer(bytes.fromhex(case["bits_hex"]), bool)
        )
        for s, v in zip(specs, case["values"], strict=True):
            codec.raw_number(s, v)
    elif case["target"] == "serial":
        targets.fuzz_serial((case["toml"], [bytes.fromhex(r) for r in case["reads_hex"]]))
    elif case["target"] == "consumer":
        # ValueError for a malformed payload is documented; anything else is the finding.
        targets.fuzz_consumer((False, [bytes.fromhex(p) for p in case["payloads_hex"]], set()))
    elif case["target"] == "replay":
        targets.fuzz_replay(bytes.fromhex(case["payload_hex"]))
    else:
        raise AssertionError(f"unknown target {case['target']!r}")


def test_there_are_regression_cases() -> None:
    assert len(CASES) >= 2


@pytest.mark.parametrize("path", CASES, ids=[p.parent.name for p in CASES])
def test_fuzz_regression_case(path: Path) -> None:
    case = json.loads(path.read_text())
    expect = case.get("expect")
    if expect:
        with pytest.raises(getattr(__builtins__, expect, None) or ValueError):
            _replay(case)
    else:
        _replay(case)


@pytest.mark.timeout(SECONDS * 3 + 60)
def test_fuzz_smoke_all_targets_and_negative_controls() -> None:
    """All targets at once (2 cores: each gets what it gets in SECONDS of wall time)."""
    run = HERE / "run.py"
    procs = {}
    for name in targets.TARGETS:
        procs[name] = subprocess.Popen(
            [sys.executable, str(run), name, str(SECONDS), "--fixed-seeds"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs[f"{name}[broken]"] = subprocess.Popen(
            [sys.executable, str(run), name, str(SECONDS), "--broken", "--stop-at-first", "--fixed-seeds"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    results = {}
    for key, p in procs.items():
        out, err = p.communicate(timeout=SECONDS * 2 + 60)
        assert p.returncode == 0, f"{key}: {err[-3000:]}"
        results[key] = json.loads(out.strip().splitlines()[-1])
    for name in targets.TARGETS:
        r = results[name]
        print(f"fuzz.{name}.examples: {r['examples']} in {SECONDS:g} s")
        assert r["examples"] > 0
        assert not r["crashes"], f"{name}: crashes found (add each to tests/cases/ and fix):\n" + json.dumps(
            r["crashes"], indent=1
        )
        b = results[f"{name}[broken]"]
        assert b["crashes"], f"{name}: the fuzzer missed the deliberately broken variant in {b['examples']} examples"
