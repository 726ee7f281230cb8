"""Benchmark runner: `python bench/run.py [NAME ...] [--quick]`.

Each bench/bench_NAME.py defines `run(quick: bool)` yielding (figure, value, unit); the runner
prints `NAME.FIGURE: VALUE UNIT`, one line per figure, so runs can be compared line by line.
Baselines are measured in the same run and reported as ratios, never hard-coded.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def available() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _fmt(v: float) -> str:
    if v != v:
        return "nan"
    if isinstance(v, int) or (abs(v) >= 100 and float(v).is_integer()):
        return str(int(v))
    return f"{v:.4g}" if abs(v) < 1000 else str(round(v))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="keep every benchmark under a minute")
    ap.add_argument("--list", action="store_true", help="list benchmarks and exit")
    args = ap.parse_args(argv)
    found = available()
    if args.list:
        print("\n".join(found))
        return 0
    unknown = [n for n in args.names if n not in found]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(found)}", file=sys.stderr)
        return 2
    import edgeos
    from edgeos import filters

    print(
        f"# edgeos {edgeos.__version__}, kernels {filters.implementation()}, python {platform.python_version()}, "
        f"{platform.machine()}, {'quick' if args.quick else 'full'}",
        flush=True,
    )
    for name in args.names or list(found):
        t0 = time.perf_counter()
        for figure, value, unit in _load(found[name]).run(args.quick):
            print(f"{name}.{figure}: {_fmt(value)} {unit}", flush=True)
        print(f"# {name}: {time.perf_counter() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
