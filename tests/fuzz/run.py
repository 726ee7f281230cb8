"""Run one fuzz target for a time budget; print one JSON line: examples run, crashes found.

    python tests/fuzz/run.py TARGET SECONDS [--broken] [--stop-at-first] [--fixed-seeds]

Hypothesis drives the target in rounds of fresh random seeds until the time is up. With
--fixed-seeds (the suite's smoke run) round k uses seed k, so CI replays the same inputs on every
run and a red CI always reproduces; new inputs are explored by bench/bench_fuzz.py. A crash is
an exception outside the target's documented error types (or a broken invariant); hypothesis
shrinks it, and the smallest failing input is printed (repr) for tests/cases/.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import warnings
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import HypothesisException

sys.path.insert(0, str(Path(__file__).parent))
import targets  # noqa: E402


def main() -> None:
    name, seconds = sys.argv[1], float(sys.argv[2])
    broken = "--broken" in sys.argv
    stop_first = "--stop-at-first" in sys.argv
    fixed = "--fixed-seeds" in sys.argv
    target = (targets.BROKEN if broken else targets.TARGETS)[name]
    examples = 0
    crashes: list[dict] = []
    seen: set[str] = set()
    last: list[object] = [None]

    @settings(
        max_examples=400,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        # A negative control only needs to be caught: shrinking it would cost the time budget.
        phases=[Phase.generate] if stop_first else list(Phase),
    )
    @given(target.strategy)
    def one(inp: object) -> None:
        nonlocal examples
        examples += 1
        try:
            target.run(inp)
        except target.allowed:
            pass
        except Exception:
            last[0] = inp
            raise

    deadline = time.monotonic() + seconds
    warnings.simplefilter("ignore")
    rounds = 0
    while time.monotonic() < deadline:
        rounds += 1
        try:
            (seed(rounds)(one) if fixed else one)()
        except HypothesisException:
            raise
        except Exception as e:  # noqa: BLE001 - every other exception is a finding
            key = f"{type(e).__name__}:{traceback.extract_tb(e.__traceback__)[-1].lineno}"
            if key not in seen:
                seen.add(key)
                tb = traceback.extract_tb(e.__traceback__)[-1]
                crashes.append(
                    {
                        "error": f"{type(e).__name__}: {e}"[:300],
                        "where": f"{tb.filename}:{tb.lineno}",
                        "input": repr(last[0])[:4000],
                    }
                )
            if stop_first:
                break
    print(json.dumps({"target": name, "broken": broken, "examples": examples, "crashes": crashes}))


if __name__ == "__main__":
    main()
