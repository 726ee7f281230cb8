"""A real full disk (a 12 MiB tmpfs in a private mount namespace): survive, buffer, resume."""

from __future__ import annotations

from pathlib import Path

CHILD = Path(__file__).with_name("diskfull_child.py")


def test_disk_full_is_survived_and_writing_resumes(on_tmpfs):
    out, r = on_tmpfs(CHILD, "12m", timeout=120)
    assert r["errors_when_full"] > 0 and r["running_while_full"]
    assert "disk full" in out.stderr or "full" in out.stderr
    # Memory stayed bounded: the oldest samples over memory_buffer were dropped and counted.
    assert r["dropped_when_full"] > 0
    assert "dropped the" in out.stderr and "oldest samples" in out.stderr
    # Space came back: writing resumed, and every sample is either stored or counted dropped.
    assert r["stored"] + r["dropped"] == r["read"]
    assert r["count"] == r["stored"]
    assert r["errors_after_recovery"] == 0 and r["integrity"] == "ok"
