"""The columnar batch and quality codes."""

from __future__ import annotations

import numpy as np
import pytest

from edgeos import Batch, Quality
from edgeos.model import is_bad, is_good


def test_batch_casts_compatible_columns_and_rejects_wrong_ones():
    b = Batch("d", [1, 2], [10, 20], [1, 2], np.zeros(2, np.uint32))
    assert b.tags.dtype == np.int32 and b.ts.dtype == np.int64 and b.values.dtype == np.float64
    with pytest.raises(ValueError, match="length 1 != 2"):
        Batch("d", [1, 2], [10], [1.0, 2.0], np.zeros(2, np.uint32))
    with pytest.raises(TypeError, match="quality"):
        Batch("d", [1], [10], [1.0], np.array([0.5]))
    with pytest.raises(ValueError, match="1-d"):
        Batch("d", [[1]], [[1]], [[1.0]], np.zeros((1, 1), np.uint32))


def test_concat_and_take_keep_text_column_aligned():
    a = Batch("d", [0], [1], [1.0], np.zeros(1, np.uint32))
    b = Batch("d", [1, 1], [2, 3], [np.nan, np.nan], np.zeros(2, np.uint32), np.array(["RUN", "IDLE"], object))
    c = Batch.concat("d", [a, b])
    assert c.text.tolist() == [None, "RUN", "IDLE"]
    assert c.take(c.tags == 1).text.tolist() == ["RUN", "IDLE"]


def test_quality_severity_follows_opc_ua_bits():
    q = np.array([Quality.GOOD, Quality.UNCERTAIN_LAST_USABLE, Quality.BAD_COMM_FAILURE, 0x80AB0000], np.uint32)
    assert is_good(q).tolist() == [True, False, False, False]
    assert is_bad(q).tolist() == [False, False, True, True]
    assert Quality.severity(0x40930000) == "uncertain"
    assert Quality.describe(0x80050000) == "BAD_COMM_FAILURE" and Quality.describe(0x80AB0000) == "BAD_INVALID_ARGUMENT"
    # Any standard code in words (as an adapter or a server sets it), info bits shown, else hex.
    assert Quality.describe(0x80740000) == "BAD_TYPE_MISMATCH" and Quality.describe(0x80340000) == "BAD_NODE_ID_UNKNOWN"
    assert Quality.describe(0x00000480) == "GOOD+0x0480" and Quality.describe(0x80740400) == "BAD_TYPE_MISMATCH+0x0400"
    assert Quality.describe(0x12345678) == "0x12345678"


def test_columns_cut_from_a_2d_array_reach_the_compiled_kernels_contiguous():
    from edgeos.filters.builtin import DeadbandFilter

    grid = np.arange(12.0).reshape(3, 4)
    b = Batch("d", np.zeros(3, np.int32), np.arange(3), grid[:, 1], np.zeros(3, np.uint32))  # a strided column
    assert b.values.flags.c_contiguous
    out = DeadbandFilter(
        1, {0: {"abs": 1.0, "percent": None, "span": None, "max_silence": None}}, impl="compiled"
    ).apply(b)
    assert out.values.tolist() == [1.0, 5.0, 9.0]
