"""Cutting a byte stream into frames: by terminator, by fixed length, or between start and end bytes.

A framer keeps only the unfinished tail of the stream between reads, never more than
`max_frame` plus its delimiters: a frame split across reads is completed by the next one, frames
glued in one read come out together, and a device that never sends its terminator cannot grow
memory. A frame longer than `max_frame` is counted and discarded up to the next frame start
(after the next terminator, or at the next start bytes). Delimiters are not part of a frame.

`feed` returns the frames as offsets into one bytes object, so the adapter can check all their
checksums at once (numpy) instead of slicing each.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Frames:
    """The complete frames of one read: data[starts[i]:ends[i]]; `bad` names the frames
    rejected while cutting (each an "overlong" or "incomplete" frame that carried tags)."""

    data: bytes
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    bad_at: list[int] = field(default_factory=list)  # how many good frames came before each bad one

    def reject(self, reason: str) -> None:
        self.bad.append(reason)
        self.bad_at.append(len(self.starts))

    def __len__(self) -> int:
        return len(self.starts)

    def frame(self, i: int) -> bytes:
        return self.data[self.starts[i] : self.ends[i]]


class Framer:
    """Base: counters shared by every framing."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.rest = b""
        self.overlong = 0  # frames longer than max_frame, discarded
        self.incomplete = 0  # start_end: a start without its end before the next start
        self.garbage_bytes = 0  # bytes outside any frame (before a start), or discarded with an overlong frame
        self.peak_buffer = 0  # the most bytes ever held between reads

    @property
    def buffered(self) -> int:
        return len(self.rest)

    def feed(self, data: bytes) -> Frames:
        raise NotImplementedError

    def drop_partial(self) -> int:
        """Forget an unfinished frame (poll mode, before a request: stale bytes must not be
        glued to the reply); counted as garbage. Returns the bytes dropped."""
        n = len(self.rest)
        self.garbage_bytes += n
        self.rest = b""
        if hasattr(self, "_scanned"):
            self._scanned = 0
        if hasattr(self, "discarding"):
            self.discarding = False
        return n

    def _keep(self, rest: bytes) -> None:
        self.rest = rest
        if len(rest) > self.peak_buffer:
            self.peak_buffer = len(rest)


class TerminatorFramer(Framer):
    def __init__(self, terminator: bytes, max_frame: int) -> None:
        super().__init__(max_frame)
        self.term = terminator
        self.discarding = False  # inside an overlong frame: drop until the next terminator
        self._scanned = 0  # bytes of `rest` already searched for the terminator

    def feed(self, data: bytes) -> Frames:
        b = self.rest + data if self.rest else data
        term, tl, mx = self.term, len(self.term), self.max_frame
        out = Frames(b)
        pos = 0
        find = b.find
        i = find(term, max(0, self._scanned - tl + 1))
        if self.discarding:
            if i < 0:
                keep = min(len(b), tl - 1)
                self.garbage_bytes += len(b) - keep
                self._scanned = keep
                self._keep(b[len(b) - keep :] if keep else b"")
                return Frames(b"")
            self.garbage_bytes += i
            self.discarding = False
            pos = i + tl
            i = find(term, pos)
        starts, ends = out.starts, out.ends
        while i >= 0:
            if i - pos > mx:
                self.overlong += 1
                self.garbage_bytes += i - pos
                out.reject("overlong")
            else:
                starts.append(pos)
                ends.append(i)
            pos = i + tl
            i = find(term, pos)
        rest = b[pos:]
        if len(rest) > mx + tl - 1:  # no terminator within max_frame (a partial one may end it)
            self.overlong += 1
            out.reject("overlong")
            keep = min(len(rest), tl - 1)
            self.garbage_bytes += len(rest) - keep
            rest = rest[len(rest) - keep :] if keep else b""
            self.discarding = True
        self._scanned = len(rest)
        self._keep(rest)
        return out


class FixedFramer(Framer):
    """Frames of `length` bytes; with `start`, each begins with those bytes (included in the
    length, not in the frame), and bytes before a start are skipped as garbage (resync)."""

    def __init__(self, length: int, start: bytes, max_frame: int) -> None:
        super().__init__(max_frame)
        self.length = length
        self.start = start

    def feed(self, data: bytes) -> Frames:
        b = self.rest + data if self.rest else data
        out = Frames(b)
        n, s, ls = len(b), self.start, len(self.start)
        pos = 0
        while True:
            if s:
                i = b.find(s, pos)
                if i < 0:
                    keep = min(n - pos, ls - 1)
                    self.garbage_bytes += n - pos - keep
                    pos = n - keep
                    break
                self.garbage_bytes += i - pos
                pos = i
            if n - pos < self.length:
                break
            out.starts.append(pos + ls)
            out.ends.append(pos + self.length)
            pos += self.length
        self._keep(b[pos:])
        return out


class StartEndFramer(Framer):
    """With `trailer`, that many bytes after the end (a BCC) belong to the frame, and the frame
    then keeps its end bytes too (a checksum often covers them): data, end, trailer."""

    def __init__(self, start: bytes, end: bytes, max_frame: int, trailer: int = 0) -> None:
        super().__init__(max_frame)
        self.start = start
        self.end = end
        self.trailer = trailer

    def feed(self, data: bytes) -> Frames:
        b = self.rest + data if self.rest else data
        out = Frames(b)
        n, s, e, ls, le, mx = len(b), self.start, self.end, len(self.start), len(self.end), self.max_frame
        pos = 0
        while True:
            i = b.find(s, pos)
            if i < 0:
                keep = min(n - pos, ls - 1)
                self.garbage_bytes += n - pos - keep
                pos = n - keep
                break
            self.garbage_bytes += i - pos
            body = i + ls
            j = b.find(e, body, body + mx + le)  # an end within max_frame
            nxt = b.find(s, body)
            if nxt >= 0 and (j < 0 or nxt < j) and nxt - body <= mx:
                # Another start before this frame's end: the end was lost; the frame is incomplete.
                self.incomplete += 1
                self.garbage_bytes += nxt - i
                out.reject("incomplete")
                pos = nxt
                continue
            if j >= 0:
                stop = j + le + self.trailer
                if self.trailer:
                    if stop > n:  # the trailer is still on its way
                        pos = i
                        break
                    out.starts.append(body)
                    out.ends.append(stop)
                else:
                    out.starts.append(body)
                    out.ends.append(j)
                pos = stop
                continue
            if n - body <= mx + le - 1:  # may still end within max_frame: wait for more
                pos = i
                break
            # No end within max_frame: counted, discarded up to the next start.
            self.overlong += 1
            out.reject("overlong")
            if nxt >= 0:
                self.garbage_bytes += nxt - i
                pos = nxt
                continue
            keep = min(n - body, ls - 1)
            self.garbage_bytes += n - i - keep
            pos = n - keep
            break
        self._keep(b[pos:])
        return out


def framer_for(spec) -> Framer:  # spec: config.Spec
    if spec.framing == "terminator":
        return TerminatorFramer(spec.terminator, spec.max_frame)
    if spec.framing == "fixed":
        return FixedFramer(spec.frame_length, spec.start, spec.max_frame)
    return StartEndFramer(spec.start, spec.end, spec.max_frame, spec.trailer)
