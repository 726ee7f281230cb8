"""Model-based store test: a hypothesis state machine drives the store's public API (append,
commit, crash without commit, reopen, retention, compaction, query) beside a plain model.

Invariants after every step: what was committed and not yet due for retention is present;
nothing present was never committed (no partial, duplicated or invented sample); a query
returns exactly what the model holds. Retention drops whole units and chunks (docs/store.md
I6), so a sample older than the cutoff *may* stay: the model keeps it as "may be dropped",
and once the store dropped it, it must stay dropped. A deliberately broken store (retention
whose cutoff is an hour late, as a forward clock jump would make it) must be caught.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from edgeos import Batch, TagMeta
from edgeos.store import StoreReader, StoreSettings, StoreWriter

SEC = 10**9
T0 = 1_767_225_600 * SEC
RETENTION = 120 * SEC
TAGS = [TagMeta(0, "a", "x"), TagMeta(1, "a", "y"), TagMeta(2, "b", "z")]
SETTINGS = StoreSettings(
    time_resolution_ns=1,
    retention_ns=RETENTION,
    compact_min_samples=4,
    chunk_samples=2,
    compact_after_ns=3600 * SEC,
)
RUN = settings(
    max_examples=int(os.environ.get("EDGEOS_MODEL_EXAMPLES", "20")),
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


class StoreModel(RuleBasedStateMachine):
    writer_cls: type[StoreWriter] = StoreWriter

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="edgeos-model-")
        self.w: StoreWriter | None = self.writer_cls(self.dir, TAGS, SETTINGS)
        self.t = T0
        self.pending: list[Batch] = []
        self.pending_rows: list[tuple[int, int, float]] = []
        self.sure: dict[tuple[int, int], float] = {}  # (tag, ts) -> value: must be present
        self.maybe: dict[tuple[int, int], float] = {}  # older than a retention cutoff: may be gone
        self.commits = 0

    def teardown(self) -> None:
        if self.w is not None:
            self.w.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- rules ---------------------------------------------------------------------------------

    @rule(
        device=st.sampled_from(["a", "b"]),
        n=st.integers(1, 6),
        step=st.integers(1, 40),
        values=st.lists(st.floats(allow_infinity=False, width=64), min_size=6, max_size=6),
    )
    def append(self, device: str, n: int, step: int, values: list[float]) -> None:
        ids = [0, 1] if device == "a" else [2]
        tags, ts = [], []
        for k in range(n):
            self.t += step * SEC // 4 + 1  # every sample its own time: the order is unambiguous
            tags.append(ids[k % len(ids)])
            ts.append(self.t)
        vals = np.array(values[:n], float)
        self.pending.append(
            Batch(device, np.array(tags, np.int32), np.array(ts, np.int64), vals, np.zeros(n, np.uint32))
        )
        self.pending_rows += list(zip(tags, ts, vals.tolist(), strict=True))

    @precondition(lambda self: self.w is not None and self.pending)
    @rule()
    def commit(self) -> None:
        assert self.w is not None
        self.w.write(self.pending)
        for tag, ts, v in self.pending_rows:
            self.sure[(tag, ts)] = v
        self.pending, self.pending_rows = [], []
        self.commits += 1

    @precondition(lambda self: self.w is not None)
    @rule()
    def crash_without_commit(self) -> None:
        """The process dies: what was appended but not committed is gone; no clean-shutdown mark."""
        assert self.w is not None
        self.w.db.close()  # no checkpoint of ours, no clean_shutdown row
        os.close(self.w._lock_fd)  # the kernel releases a dead process's lock
        self.w._lock_fd = -1
        self.w = None
        self.pending, self.pending_rows = [], []

    @rule()
    def reopen(self) -> None:
        if self.w is not None:
            self.w.close()
        self.w = self.writer_cls(self.dir, TAGS, SETTINGS)

    @precondition(lambda self: self.w is not None)
    @rule(ahead=st.integers(0, 300))
    def retention(self, ahead: int) -> None:
        assert self.w is not None
        now = self.t + ahead * SEC
        self.w.trim(now)
        cutoff = now - RETENTION
        for key in [k for k in self.sure if k[1] < cutoff]:
            self.maybe[key] = self.sure.pop(key)

    @precondition(lambda self: self.w is not None)
    @rule(force=st.booleans())
    def compaction(self, force: bool) -> None:
        assert self.w is not None
        for _ in range(20):
            if not self.w.compact(self.t, force=force):
                break

    # -- the invariant: a query equals the model ------------------------------------------

    @invariant()
    def queries_equal_the_model(self) -> None:
        if not os.path.exists(os.path.join(self.dir, "edgeos.db")):
            return
        with StoreReader(self.dir) as r:
            present: dict[tuple[int, int], float] = {}
            for meta in TAGS:
                h = r.history(f"{meta.device}/{meta.name}")
                assert (np.diff(h.ts) > 0).all(), "history out of order or duplicated"
                for ts, v in zip(h.ts.tolist(), h.values.tolist(), strict=True):
                    present[(meta.id, ts)] = v
        missing = self.sure.keys() - present.keys()
        assert not missing, f"committed samples lost: {sorted(missing)[:5]} of {len(missing)}"
        invented = present.keys() - self.sure.keys() - self.maybe.keys()
        assert not invented, f"samples present that were never committed: {sorted(invented)[:5]}"
        for key, v in present.items():
            want = self.sure.get(key, self.maybe.get(key))
            assert v == want or (v != v and want != want), f"{key}: stored {v!r}, committed {want!r}"
        # Dropped by retention stays dropped.
        for key in [k for k in self.maybe if k not in present]:
            del self.maybe[key]


def test_store_matches_its_model() -> None:
    run_state_machine_as_test(StoreModel, settings=RUN)


class _LateCutoffWriter(StoreWriter):
    """Negative control: retention computed an hour ahead (a forward clock jump, unguarded)."""

    def trim(self, now_ns: int) -> None:
        super().trim(now_ns + 3600 * SEC)


class _BrokenModel(StoreModel):
    writer_cls = _LateCutoffWriter


def test_negative_control_a_store_that_drops_too_much_is_caught() -> None:
    quick = settings(RUN, phases=[Phase.generate], max_examples=200)  # found is enough: no shrinking
    with pytest.raises(AssertionError, match="committed samples lost"):
        run_state_machine_as_test(_BrokenModel, settings=quick)
