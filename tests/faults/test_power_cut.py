"""Power cut, harder than kill -9: the writer runs under an LD_PRELOAD shim (compiled here with
gcc) that logs what each file write overwrote; after kill -9, every write no fsync of its file
followed is undone, so the files hold only what had reached the disk. Repeated at random
moments (commits, compactions, checkpoints cut mid-way).

Contract tested (docs/store.md as of this branch: synchronous=FULL): every commit the writer
reported is present, none partial, `PRAGMA integrity_check` ok. Under the lead's coming
synchronous=NORMAL contract only commits the store reports durable are promised; the harness is
the same (see docs/reliability.md). Negative control: the same writer with synchronous=OFF
must be caught losing reported commits.
"""

from __future__ import annotations

import random
import sqlite3
import sys
from pathlib import Path

import numpy as np

from edgeos.store import StoreReader

sys.path.insert(0, str(Path(__file__).parent))
from powercut import build_shim, cut_once  # noqa: E402

CUTS = 8


def _present(data_dir: Path) -> dict[int, int]:
    with StoreReader(data_dir) as r:
        values = np.concatenate([r.history(f"dev/t{i}").values for i in range(10)])
    ks, counts = np.unique((values // 1000).astype(np.int64), return_counts=True)
    return dict(zip(ks.tolist(), counts.tolist(), strict=True))


def run_cuts(
    tmp_path: Path,
    cuts: int,
    *,
    sync_off: bool = False,
    keep_prefix: float = 0.0,
    seed: int = 28,
    extra: tuple[str, ...] = (),
):
    shim = build_shim(tmp_path)
    data = tmp_path / "data"
    rng = random.Random(seed)
    reported: set[int] = set()
    lost: list[int] = []
    undone = 0
    start = 0
    for _ in range(cuts):
        got, counts = cut_once(
            shim, data, start, rng.uniform(0.1, 0.5), sync_off=sync_off, keep_prefix=keep_prefix, rng=rng, extra=extra
        )
        undone += counts["undone"]
        reported.update(got)
        db = sqlite3.connect(data / "edgeos.db")
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            db.close()
        present = _present(data)
        assert all(n % 1000 == 0 for n in present.values()), "a partial unit after a power cut"
        lost = sorted(reported - present.keys())
        if lost:
            break
        start = max(reported) + 1 if reported else start
    return reported, lost, undone


def test_every_reported_commit_survives_a_power_cut(tmp_path):
    reported, lost, undone = run_cuts(tmp_path, CUTS)
    print(
        f"faults.power_cut.full: {CUTS} cuts, {len(reported)} commits reported, "
        f"{undone} unsynced writes dropped, lost {len(lost)}"
    )
    assert len(reported) > 0 and undone > 0  # the shim really dropped writes
    assert not lost, f"reported commits lost by a power cut: {lost[:10]}"


def test_a_partly_written_back_cache_loses_nothing_either(tmp_path):
    """Some unsynced writes, oldest first, reached the disk before the cut."""
    reported, lost, _ = run_cuts(tmp_path, 4, keep_prefix=1.0, seed=7)
    assert reported and not lost


def test_negative_control_commits_without_fsync_are_caught(tmp_path):
    reported, lost, undone = run_cuts(tmp_path, 3, sync_off=True)
    print(f"faults.power_cut.sync_off: {len(reported)} reported, {len(lost)} lost (must be > 0)")
    assert lost, "a store that never fsyncs passed the power-cut check"


def test_under_synchronous_normal_every_durable_commit_survives(tmp_path):
    """The store.fsync_interval contract: a commit survives a power cut once flush() covered it."""
    reported, lost, undone = run_cuts(tmp_path, 6, extra=("--normal",))
    print(
        f"faults.power_cut.normal: 6 cuts, {len(reported)} durable commits reported, "
        f"{undone} unsynced writes dropped, lost {len(lost)}"
    )
    assert reported and undone > 0
    assert not lost, f"durable commits lost: {lost[:10]}"


def test_negative_control_normal_commits_reported_before_their_fsync_are_caught(tmp_path):
    reported, lost, _ = run_cuts(tmp_path, 4, extra=("--normal", "--ack-on-commit"))
    print(f"faults.power_cut.normal_ack_on_commit: {len(reported)} reported, {len(lost)} lost (must be > 0)")
    assert lost, "commits reported before their fsync survived every cut: the check cannot see the difference"
