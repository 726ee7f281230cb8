"""The numpy reading of PublishResponses and ReadResponses (client.decode_publish,
client.decode_read) against asyncua's own decoder.

Each case encodes a response with asyncua, then checks that the fast path either declines it
(None: asyncua's decoder takes it) or gives exactly the columns `columns` makes from asyncua's
DataValues: values (NaN where NaN), qualities, timestamps in every timestamp mode, text.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from asyncua import ua
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import struct_from_binary, struct_to_binary
from edgeos.protocols.opcua import client as uac

T0 = dt.datetime(2026, 12, 4, 10, 0, 0, 123456, tzinfo=dt.UTC)
V = ua.VariantType


def dv(value, vt, *, status=None, source=True, server=True, k=0):
    d = ua.DataValue(
        ua.Variant(value, vt),
        SourceTimestamp=T0 + dt.timedelta(milliseconds=k) if source else None,
        ServerTimestamp=T0 + dt.timedelta(seconds=1, microseconds=k) if server else None,
    )
    if status is not None:
        d = ua.DataValue(
            d.Value,
            StatusCode_=ua.StatusCode(status),
            SourceTimestamp=d.SourceTimestamp,
            ServerTimestamp=d.ServerTimestamp,
        )
    return d


def response(*notes, seq=7, sub=3) -> Buffer:
    r = ua.PublishResponse()
    r.Parameters.SubscriptionId = sub
    r.Parameters.AvailableSequenceNumbers = [5, 6, 7]
    r.Parameters.NotificationMessage.SequenceNumber = seq
    r.Parameters.NotificationMessage.PublishTime = T0
    r.Parameters.NotificationMessage.NotificationData = list(notes)
    return Buffer(struct_to_binary(r))


def changes(dvs, first_handle=0):
    n = ua.DataChangeNotification()
    n.MonitoredItems = [ua.MonitoredItemNotification(ClientHandle=first_handle + i, Value=d) for i, d in enumerate(dvs)]
    return n


NULL = dt.datetime(1601, 1, 1, tzinfo=dt.UTC)  # encoded as FILETIME 0: Part 6's null DateTime


def _null_source(d):
    return ua.DataValue(d.Value, SourceTimestamp=NULL, ServerTimestamp=d.ServerTimestamp)


# name -> (DataValues, does the numpy path take them)
CASES = {
    "doubles": ([dv(1.5 * i, V.Double, k=i) for i in range(50)], True),
    "nan_inf": ([dv(float("nan"), V.Double), dv(float("inf"), V.Double), dv(-0.0, V.Double)], True),
    "floats": ([dv(3.4e38, V.Float), dv(0.1, V.Float)], True),
    "bools": ([dv(True, V.Boolean), dv(False, V.Boolean, k=1)], True),
    "sbyte": ([dv(-128, V.SByte), dv(127, V.SByte)], True),
    "byte": ([dv(255, V.Byte)], True),
    "int16": ([dv(-32768, V.Int16), dv(1, V.Int16)], True),
    "uint16": ([dv(65535, V.UInt16)], True),
    "int32": ([dv(-(2**31), V.Int32), dv(2**31 - 1, V.Int32)], True),
    "uint32": ([dv(2**32 - 1, V.UInt32)], True),
    "int64": ([dv(2**63 - 1, V.Int64), dv(-(2**63), V.Int64)], True),
    "uint64": ([dv(2**64 - 1, V.UInt64)], True),
    "bad_status": ([dv(1.0, V.Double, status=0x808C0000), dv(2.0, V.Double, status=0x40000000)], True),
    "no_source_time": ([dv(1.0, V.Double, source=False)], True),
    "no_times": ([dv(1.0, V.Double, source=False, server=False)], True),
    "null_source_time": ([_null_source(dv(1.0, V.Double)), _null_source(dv(2.0, V.Double, k=1))], True),
    "null_times": ([ua.DataValue(ua.Variant(1.0, V.Double), SourceTimestamp=NULL, ServerTimestamp=NULL)], True),
    "mixed_types": ([dv(1.0, V.Double), dv(2, V.Int32)], False),
    "mixed_status": ([dv(1.0, V.Double, status=0x80000000), dv(2.0, V.Double, status=None)], None),
    "mixed_times": ([dv(1.0, V.Double), dv(2.0, V.Double, source=False)], False),
    "string": ([dv("12.5", V.String)], False),
    "array": ([dv([1.0, 2.0], V.Double)], False),
    "null": ([ua.DataValue(ua.Variant(None, V.Null), SourceTimestamp=T0)], False),
    "datetime": ([dv(T0, V.DateTime)], False),
}
KINDS = {
    "number": uac.KIND_NUMBER,
    "bool": uac.KIND_BOOL,
    "string": uac.KIND_STRING,
    "datetime": uac.KIND_DATETIME,
}


def same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.dtype == object:
        return a.tolist() == b.tolist()
    return np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_numpy_reading_equals_asyncua_decoding(name, kind) -> None:
    dvs, fast = CASES[name]
    buf = response(changes(dvs, first_handle=10))
    pub = uac.decode_publish(buf)
    slow = uac.decode_publish_slow(buf)
    assert slow.dvs is not None and len(slow.dvs) == len(dvs)
    if fast is not None:
        assert (pub is not None) == fast, name
    if pub is None:
        return
    assert (pub.subscription, pub.sequence, pub.acknowledge, pub.status) == (3, 7, True, None)
    assert pub.handles.tolist() == slow.handles.tolist() == list(range(10, 10 + len(dvs)))
    kinds = np.full(len(dvs), KINDS[kind], np.int8)
    now = 1_800_000_000_000_000_000
    for mode in ("source", "server", "gateway"):
        got = uac.publish_columns(pub, kinds, mode, now)
        want = uac.columns(slow.dvs, kinds, mode, now)
        for part, g, w in zip(("values", "quality", "ts", "text"), got, want, strict=True):
            assert same(g, w), (name, kind, mode, part, g, w)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_numpy_reading_of_reads_equals_asyncua_decoding(name, kind) -> None:
    dvs, fast = CASES[name]
    r = ua.ReadResponse()
    r.Results = dvs
    buf = Buffer(struct_to_binary(r))
    cols = uac.decode_read(buf)
    if fast is not None:
        assert (cols is not None) == fast, name
    if cols is None:
        return
    slow = struct_from_binary(ua.ReadResponse, buf.copy()).Results
    kinds = np.full(len(dvs), KINDS[kind], np.int8)
    now = 1_800_000_000_000_000_000
    for mode in ("source", "server", "gateway"):
        got = uac.numeric_columns(
            cols["values"], cols["quality"], cols.get("source"), cols.get("server"), kinds, mode, now
        )
        want = uac.columns(slow, kinds, mode, now)
        for part, g, w in zip(("values", "quality", "ts", "text"), got, want, strict=True):
            assert same(g, w), (name, kind, mode, part, g, w)


def test_keepalives_status_changes_and_several_notifications() -> None:
    keep = uac.decode_publish(response(seq=9))
    assert keep is not None and not len(keep.handles) and not keep.acknowledge and keep.status is None
    end = ua.StatusChangeNotification(Status=ua.StatusCode(ua.StatusCodes.BadTimeout))
    ended = uac.decode_publish(response(end))
    assert ended is not None and ended.status == ua.StatusCodes.BadTimeout
    assert uac.decode_publish_slow(response(end)).status == ua.StatusCodes.BadTimeout
    two = uac.decode_publish(response(changes([dv(1.0, V.Double)]), changes([dv(2.0, V.Double)], 5)))
    assert two is not None and two.handles.tolist() == [0, 5] and two.values.tolist() == [1.0, 2.0]
    # Events (or anything else) go to asyncua's decoder.
    assert uac.decode_publish(response(ua.EventNotificationList())) is None


def test_negative_control_a_misread_layout_is_caught() -> None:
    """The comparison above must be able to fail: read Int32 values as if they were Float."""
    buf = response(changes([dv(7, V.Int32), dv(-1, V.Int32)]))
    saved = dict(uac._NUMERIC)
    try:
        uac._NUMERIC[6] = "<f4"
        pub = uac.decode_publish(buf)
    finally:
        uac._NUMERIC.clear()
        uac._NUMERIC.update(saved)
    kinds = np.zeros(2, np.int8)
    got = uac.publish_columns(pub, kinds, "source", 0)[0]
    assert not same(got, uac.columns(uac.decode_publish_slow(buf).dvs, kinds, "source", 0)[0])


@pytest.mark.parametrize("name", ["null_source_time", "null_times"])
def test_a_null_timestamp_is_not_1601(name) -> None:
    """A DateTime of 0 is null (Part 6, 5.2.2.5): the source mode takes the server's timestamp
    instead, and with none of either, the gateway's time; never a sample stamped 1601."""
    dvs, _ = CASES[name]
    buf = response(changes(dvs))
    now = 1_800_000_000_000_000_000
    kinds = np.full(len(dvs), uac.KIND_NUMBER, np.int8)
    for got in (
        uac.publish_columns(uac.decode_publish(buf), kinds, "source", now)[2],
        uac.columns(uac.decode_publish_slow(buf).dvs, kinds, "source", now)[2],
    ):
        if name == "null_times":
            assert got.tolist() == [now]
        else:
            server = [int((d.ServerTimestamp.timestamp()) * 1e6) * 1000 for d in dvs]
            assert got.tolist() == server
