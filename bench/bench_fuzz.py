"""Longer fuzzing runs than the suite's 30 s smoke: every target of tests/fuzz/targets.py in
its own process, all at once. `python bench/run.py fuzz` (60 s each, --quick 20 s) or
`python bench/bench_fuzz.py SECONDS`. A crash prints its smallest input: add it to tests/cases/."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

RUN = Path(__file__).resolve().parents[1] / "tests" / "fuzz" / "run.py"
TARGETS = ("config", "serial", "wire", "modbus")


def fuzz(seconds: float) -> dict[str, dict]:
    procs = {
        t: subprocess.Popen([sys.executable, str(RUN), t, str(seconds)], stdout=subprocess.PIPE, text=True)
        for t in TARGETS
    }
    out = {}
    for t, p in procs.items():
        stdout, _ = p.communicate(timeout=seconds * 3 + 120)
        out[t] = json.loads(stdout.strip().splitlines()[-1])
    return out


def run(quick: bool) -> Iterator[tuple[str, float, str]]:
    seconds = 20.0 if quick else 60.0
    for t, r in fuzz(seconds).items():
        yield f"{t}.examples", r["examples"], f"examples in {seconds:g} s"
        yield f"{t}.crashes", len(r["crashes"]), "crashes"
        for c in r["crashes"]:
            print(f"# {t}: {c['error']} at {c['where']}\n#   input: {c['input'][:500]}", file=sys.stderr)


if __name__ == "__main__":
    secs = float(sys.argv[1]) if len(sys.argv) > 1 else 300.0
    for t, r in fuzz(secs).items():
        print(f"fuzz.{t}.examples: {r['examples']} examples in {secs:g} s")
        print(f"fuzz.{t}.crashes: {len(r['crashes'])} crashes")
        for c in r["crashes"]:
            print(json.dumps(c, indent=1))
