"""edgeos.wire as a consumer uses it: the deduplicator that turns at-least-once into exactly-once."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeos import wire


def test_a_unit_far_behind_the_top_is_still_new():
    # After a long outage the live lane raises the top at once; the backlog then arrives from
    # far behind it and must not be taken for a repeat.
    d = wire.Deduplicator()
    assert d.first_time("gw", 2_000_002)
    assert d.first_time("gw", 1_000_001)  # 1,000,001 behind the top
    assert d.first_time("gw", 1)
    assert not d.first_time("gw", 1_000_001) and not d.first_time("gw", 1)


def test_memory_follows_the_gaps_not_the_count():
    d = wire.Deduplicator()
    for seq in range(1, 300_001):
        assert d.first_time("gw", seq)
    assert d.gaps("gw") == [] and d.ranges("gw") == [(1, 300_000)]
    # Another device's units are another consumer's: the seqs one consumer sees have gaps.
    for seq in (300_010, 300_012, 300_011):
        assert d.first_time("gw", seq)
    assert d.ranges("gw") == [(1, 300_000), (300_010, 300_012)]
    assert d.gaps("gw") == [(300_001, 300_009)]
    assert not d.first_time("gw", 300_011)
    assert d.first_time("gw", 300_005)
    assert d.gaps("gw") == [(300_001, 300_004), (300_006, 300_009)]


def test_gateways_are_independent():
    d = wire.Deduplicator()
    assert d.first_time("a", 5) and d.first_time("b", 5)
    assert not d.first_time("a", 5)
    assert d.ranges("a") == [(5, 5)] and d.ranges("nobody") == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 60)), max_size=200))
def test_same_answers_as_a_plain_set(offers):
    d = wire.Deduplicator()
    seen: set[tuple[str, int]] = set()
    for gateway, seq in offers:
        assert d.first_time(gateway, seq) == ((gateway, seq) not in seen)
        seen.add((gateway, seq))
    for gateway in ("a", "b"):
        ranges = d.ranges(gateway)
        # Sorted, disjoint and not touching (adjacent runs are merged), covering exactly the set.
        assert all(lo <= hi for lo, hi in ranges)
        assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(ranges))
        assert {s for lo, hi in ranges for s in range(lo, hi + 1)} == {s for g, s in seen if g == gateway}


def test_a_compressed_column_that_inflates_past_its_length_is_refused():
    import zlib

    import msgpack
    import numpy as np
    import pytest

    from edgeos import wire

    good = wire.encode_unit("d", np.arange(4, dtype=np.int32), np.arange(4), np.ones(4), np.zeros(4, np.uint32))
    doc = msgpack.unpackb(good, raw=False)
    doc["ts"] = zlib.compress(b"\0" * 50_000_000)  # 50 MB of zeros in a few kB
    with pytest.raises(ValueError, match="wrong length"):
        wire.decode_unit(msgpack.packb(doc, use_bin_type=True))
