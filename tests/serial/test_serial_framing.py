"""Framing: frames split across reads and glued in one read come out the same; overlong input is
counted and discarded up to the next frame start; memory stays within max_frame."""

from __future__ import annotations

from edgeos.protocols.serial.framing import FixedFramer, StartEndFramer, TerminatorFramer
from hypothesis import given, settings
from hypothesis import strategies as st


def feed_all(framer, chunks):
    frames, bad = [], []
    for c in chunks:
        f = framer.feed(c)
        frames += [f.frame(i) for i in range(len(f))]
        bad += f.bad
    return frames, bad


def cut(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [c for c in out if c]


lines = st.lists(st.binary(max_size=30).filter(lambda b: b"\r\n" not in b and not b.endswith(b"\r")), max_size=10)


@given(lines, st.lists(st.integers(0, 10_000), max_size=12))
def test_terminator_frames_do_not_depend_on_how_reads_cut_them(frames, points):
    data = b"".join(f + b"\r\n" for f in frames)
    got, bad = feed_all(TerminatorFramer(b"\r\n", 64), cut(data, points))
    assert got == frames and not bad


def test_overlong_is_counted_and_discarded_up_to_the_next_terminator():
    f = TerminatorFramer(b"\n", 10)
    got, bad = feed_all(f, [b"ok1\n", b"x" * 7, b"x" * 7, b"y" * 100, b"zz\nok2\n"])
    assert got == [b"ok1", b"ok2"] and bad == ["overlong"]
    assert f.overlong == 1 and f.peak_buffer <= 10
    # A frame over the limit that arrives whole is counted the same way.
    got, bad = feed_all(f, [b"a" * 11 + b"\nok3\n"])
    assert got == [b"ok3"] and bad == ["overlong"] and f.overlong == 2


def test_a_terminator_split_across_reads_while_discarding_is_found():
    f = TerminatorFramer(b"\r\n", 4)
    got, bad = feed_all(f, [b"abcdefgh\r", b"\nok\r\n"])
    assert got == [b"ok"] and bad == ["overlong"]


@given(
    st.lists(st.binary(min_size=1, max_size=20).filter(lambda b: b"\x02" not in b and b"\x03" not in b), max_size=8),
    st.lists(st.integers(0, 10_000), max_size=12),
)
def test_start_end_frames_with_garbage_between(frames, points):
    data = b"".join(b"noise\x02" + f + b"\x03" for f in frames) + b"tail"
    f = StartEndFramer(b"\x02", b"\x03", 64)
    got, bad = feed_all(f, cut(data, points))
    assert got == frames and not bad
    assert f.garbage_bytes == 5 * len(frames) + 4


def test_start_end_lost_end_and_overlong():
    f = StartEndFramer(b"\x02", b"\x03", 8)
    got, bad = feed_all(f, [b"\x02abc\x02def\x03", b"\x02" + b"x" * 20, b"\x02ok\x03"])
    assert got == [b"def", b"ok"] and bad == ["incomplete", "overlong"]


def test_fixed_length_with_and_without_start_sync():
    got, _ = feed_all(FixedFramer(4, b"", 64), [b"abcdef", b"gh", b"ij"])
    assert got == [b"abcd", b"efgh"]
    f = FixedFramer(5, b"#", 64)
    got, _ = feed_all(f, [b"zz#abcd#ef", b"gh#x"])
    assert got == [b"abcd", b"efgh"] and f.garbage_bytes == 2


def test_ten_megabytes_without_terminator_keep_memory_bounded():
    f = TerminatorFramer(b"\n", 1024)
    chunk = b"x" * 65536
    for _ in range(160):
        assert not f.feed(chunk).starts
    assert f.peak_buffer <= 1024 and f.overlong == 1
    got, bad = feed_all(f, [b"\nfine\n"])
    assert got == [b"fine"]


noise = st.lists(st.sampled_from([b"\x02", b"\x03", b"\r", b"\n", b"\r\n", b"ab", b"x" * 9]), max_size=40)


@settings(max_examples=500)
@given(noise, st.lists(st.integers(0, 10_000), max_size=12))
def test_any_input_any_cut_stays_within_max_frame(pieces, points):
    data = b"".join(pieces)
    for make in (
        lambda: TerminatorFramer(b"\r\n", 8),
        lambda: StartEndFramer(b"\x02", b"\x03", 8),
        lambda: StartEndFramer(b"\x02\x02", b"\r\n", 8),
        lambda: StartEndFramer(b"\x02", b"\x03", 8, 1),
        lambda: FixedFramer(5, b"\x02", 8),
        lambda: FixedFramer(3, b"", 8),
    ):
        f = make()
        got, bad = feed_all(f, cut(data, points))
        assert all(len(x) <= 8 + 2 for x in got)  # a trailer frame keeps its end and trailer
        assert f.peak_buffer <= 8 + 4  # max_frame and the delimiters
        # Cutting the input differently never changes the frames, nor the frames refused.
        assert feed_all(make(), [data]) == (got, bad)
