"""The latency trace (edgeos/trace.py): a batch's row follows it through the filters to its
commit, and the dump is the bench's input."""

import json

import numpy as np

from edgeos.model import Batch
from edgeos.trace import COLS, Trace


def test_a_batch_row_follows_it_from_emit_to_commit(tmp_path):
    t = Trace(str(tmp_path / "trace.json"))
    raw = Batch.filled("m1", np.array([1, 2], np.int32), 5_000, 1.0, 0)
    t.emitted(raw)
    kept = Batch.filled("m1", np.array([2], np.int32), 5_000, 1.0, 0)  # what a filter let through
    t.piped(raw, 6_000, kept)
    t.committed([kept], 7_000, 42)
    t.event("maintain", 1)
    t.read(42)
    t.emitted(Batch.empty("m1"))  # nothing read: no row
    t.dump()
    doc = json.loads((tmp_path / "trace.json").read_text())
    assert doc["cols"] == list(COLS)
    assert doc["devices"] == ["m1"]
    (row,) = doc["rows"]
    ts, emit, pipe_in, pipe_out, c0, c1, top = row
    assert (ts, pipe_in, c0, top) == (5_000, 6_000, 7_000, 42)
    assert emit <= pipe_out <= c1 and emit > 0
    assert [e[0] for e in doc["events"]] == ["maintain"]
    assert doc["reads"][0][1] == 42
    assert not t.by_obj  # nothing kept once committed
