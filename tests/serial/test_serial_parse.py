"""The parser alone (frames in, a Batch out): whatever the bytes, it never raises, and every
frame is accounted for as Good or Bad samples of the tags it should have carried."""

from __future__ import annotations

import math

import numpy as np
import pytest
from edgeos.protocols.serial.adapter import spec_of
from edgeos.protocols.serial.framing import TerminatorFramer
from edgeos.protocols.serial.parse import Parser
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeos import Quality

BAD = int(Quality.BAD_DECODING_ERROR)

TWO_PATTERNS = """
[[devices]]
name = "d"
protocol = "serial"
port = "/dev/ttyS9"
terminator = "LF"
encoding = "utf-8"
checksum = "sum8"
checksum_gap = 1
pattern = ['^A,(?P<a>[^,]+)(?:,(?P<opt>\\d+))?$', '^B,(?P<b>\\w+),(?P<n>\\S+)$']
tags = [
  {{ name = "a" }},
  {{ name = "opt", type = "integer" }},
  {{ name = "b", type = "string" }},
  {{ name = "n", type = "integer" }},
]
"""


@pytest.fixture(scope="module")
def serial_config_once(tmp_path_factory):
    """The device, loaded once for many hypothesis examples."""
    from edgeos.config import load_config

    p = tmp_path_factory.mktemp("cfg") / "edgeos.toml"
    p.write_text('[gateway]\nid = "gw"\ndata_dir = "data"\n' + TWO_PATTERNS.format())
    return load_config(p).devices[0]


def frame(text: str) -> bytes:
    raw = text.encode()
    return raw + b"*" + f"{sum(raw) & 0xFF:02X}".encode() + b"\n"


def parse(device, data: bytes):
    spec = spec_of(device)
    framer = TerminatorFramer(spec.terminator, spec.max_frame)
    return Parser(device.name, spec).parse(framer.feed(data), 123)


def rows(device, batch) -> list[tuple]:
    names = {t.id: t.name for t in device.tags}
    text = batch.text.tolist() if batch.text is not None else [None] * len(batch)
    return [
        (names[t], v, q, x)
        for t, v, q, x in zip(batch.tags.tolist(), batch.values.tolist(), batch.quality.tolist(), text, strict=True)
    ]


def test_several_patterns_optional_groups_and_values_that_do_not_convert(serial_config):
    dev = serial_config(TWO_PATTERNS.format()).devices[0]
    res = parse(dev, frame("A,1.5") + frame("B,xy,12.5") + frame("A,2,7") + frame("C,?"))
    got = rows(dev, res.batch)
    # Frame order is kept; the optional group is absent in the first frame (no sample for opt);
    # "12.5" is not an integer: only that tag is Bad; a frame no pattern matches is Bad for all.
    assert [(r[0], r[2]) for r in got[:5]] == [("a", 0), ("b", 0), ("n", BAD), ("a", 0), ("opt", 0)]
    assert (got[0][1], got[1][3], got[3][1], got[4][1]) == (1.5, "xy", 2.0, 7.0)
    assert math.isnan(got[1][1]) and math.isnan(got[2][1])
    assert [r[0] for r in got[5:]] == ["a", "opt", "b", "n"] and {r[2] for r in got[5:]} == {BAD}
    assert sorted(f.reason for f in res.failures) == ["no_match", "value"]


tags = st.sampled_from([b"A,", b"B,", b"*", b"\n", b",", b"\xff", b"1", b".5", b"x", b"9" * 30])


@settings(max_examples=300)
@given(st.lists(st.one_of(tags, st.binary(max_size=8)), max_size=40))
def test_any_bytes_never_raise_and_every_frame_is_accounted_for(serial_config_once, pieces):
    dev = serial_config_once
    data = b"".join(pieces)
    res = parse(dev, data)
    b = res.batch
    assert len(b.tags) == len(b.values) == len(b.quality) == len(b.ts)
    bad_frames = len(res.failures) - sum(1 for f in res.failures if f.reason == "value")
    assert int((b.quality == BAD).sum()) >= 4 * bad_frames
    assert np.isnan(b.values[b.quality == BAD]).all()


TIMED = """
[[devices]]
name = "t"
protocol = "serial"
port = "/dev/ttyS9"
terminator = "LF"
pattern = '^(?P<time>[^;]+);(?P<v>\\S+)$'
timestamp_group = "time"
timestamp_format = "{fmt}"
timezone = "{tz}"
tags = [{{ name = "v" }}]
"""


def test_device_timestamps_in_every_format(serial_config):
    cases = [
        ("unix", "UTC", "1764844200.5", 1764844200_500_000_000),
        ("unix_ms", "UTC", "1764844200123", 1764844200_123_000_000),
        ("unix_ns", "UTC", "1764844200123456789", 1764844200_123456789),
        ("iso8601", "UTC", "2025-12-04T10:30:00+01:00", 1764840600_000_000_000),
        ("iso8601", "Europe/Berlin", "2025-12-04 10:30:00.25", 1764840600_250_000_000),
        ("%y%m%d%H%M%S", "UTC", "251204093000", 1764840600_000_000_000),
    ]
    for fmt, tz, text, want in cases:
        dev = serial_config(TIMED.format(fmt=fmt, tz=tz)).devices[0]
        res = parse(dev, f"{text};1.5\nnot-a-time;2\n".encode())
        assert res.batch.ts.tolist()[0] == want, (fmt, text)
        assert res.batch.quality.tolist() == [0, BAD], fmt
        assert [f.reason for f in res.failures] == ["timestamp"]


def test_a_format_without_a_date_takes_the_date_nearest_the_arrival(serial_config):
    # NMEA's GGA carries a time of day only: strptime's 1900 stored Good samples a century
    # back, out of every query of recent data (an independent tester's finding).
    import datetime as dt

    from edgeos.protocols.serial.config import strptime_fill
    from edgeos.protocols.serial.parse import _nearest

    assert [strptime_fill(f) for f in ("%H%M%S.%f", "%m-%d %H:%M", "%d.%m.%Y %H:%M", "%c", "%%Y %H")] == [
        "date",
        "year",
        "",
        "",
        "date",
    ]
    utc = dt.UTC
    now = dt.datetime(2026, 12, 4, 0, 0, 30, tzinfo=utc)
    t = dt.datetime(1900, 1, 1, 23, 59, 58, tzinfo=utc)  # stamped before midnight, arrived after
    assert _nearest(t, "date", now) == dt.datetime(2026, 12, 3, 23, 59, 58, tzinfo=utc)
    now = dt.datetime(2026, 12, 3, 23, 59, 59, tzinfo=utc)
    t = dt.datetime(1900, 1, 1, 0, 0, 1, tzinfo=utc)  # the device's clock a little ahead
    assert _nearest(t, "date", now) == dt.datetime(2026, 12, 4, 0, 0, 1, tzinfo=utc)
    now = dt.datetime(2027, 1, 1, 0, 5, tzinfo=utc)
    t = dt.datetime(1900, 12, 31, 23, 59, tzinfo=utc)
    assert _nearest(t, "year", now) == dt.datetime(2026, 12, 31, 23, 59, tzinfo=utc)

    dev = serial_config(TIMED.format(fmt="%H%M%S.%f", tz="UTC")).devices[0]
    now = dt.datetime.now(utc)
    res = parse(dev, f"{now:%H%M%S.%f};1.5\n".encode())
    got = dt.datetime.fromtimestamp(res.batch.ts.tolist()[0] / 1e9, utc)
    assert res.batch.quality.tolist() == [0]
    assert abs(got - now) < dt.timedelta(seconds=5), got  # today (or the nearest day), at that time


def test_a_format_strptime_refuses_is_a_config_problem(serial_config):
    from edgeos.errors import ConfigError

    with pytest.raises(ConfigError, match=r"timestamp_format: found \"%H%Q\": 'Q' is a bad directive"):
        serial_config(TIMED.format(fmt="%H%Q", tz="UTC"))
    with pytest.raises(ConfigError, match=r"timestamp_format: found \"HHMMSS\", expected a strptime format"):
        serial_config(TIMED.format(fmt="HHMMSS", tz="UTC"))
