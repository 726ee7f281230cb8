"""The runtime on a real full disk (a tmpfs in a private mount namespace): bounded memory in
real bytes, a fresh status, and a stop that accounts for every sample read."""

from __future__ import annotations

from pathlib import Path

CHILD = Path(__file__).with_name("runtime_child.py")


def test_full_disk_memory_status_and_stop(tmp_path, on_tmpfs):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out, r = on_tmpfs(CHILD, "8m", run_dir)
    assert r["store_errors"] > 0 and r["dropped"] > 0
    # (item 8) memory_buffer counts real bytes: one-sample batches cost ~600 bytes each in
    # memory, so a 1 MiB buffer holds under 2,000 of them (plus what waits in the queues, at
    # most 2 x 256), at every moment: the most seen alive, uncollected garbage included (a
    # reference cycle once kept a failed commit's batches, about 3,500 alive at a time).
    assert r["batches_held"] < 3_000, r["batches_held"]
    # (item 12) the status stays fresh while the store refuses writes.
    assert max(r["status_ages"]) < 3.0, r["status_ages"]
    # (item 10) a stop while the disk still refuses writes accounts for every sample read,
    # and says so.
    assert r["read"] == r["stored"] + r["filtered_out"] + r["dropped"] + r["dropped_at_stop"]
    assert r["dropped_at_stop"] > 0
    assert "not committed are lost" in out.stderr
    assert "Traceback" not in out.stderr
    final = r["final_status"]
    assert final["stopped"] and final["counters"]["dropped_at_stop"] == r["dropped_at_stop"]
