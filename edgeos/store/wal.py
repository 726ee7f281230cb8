"""Committed transactions a damaged WAL hides from SQLite (docs/store.md I9, I14).

SQLite replays the WAL from its start and stops at the first frame whose checksum (or salt)
fails: what follows is treated as a write torn by a crash and ignored, without an error. A
killed process cannot leave that shape when a later *commit* frame is intact (its frames were
all written, in order, before it), so a valid commit frame after the first failing one means
damage in the middle: a bad sector, a stray write. Those transactions were committed (and may
have been forwarded upstream); the store cannot read them back, but it must say so, keep the
WAL's bytes, and never give their unit ids again.

The format (https://www.sqlite.org/fileformat2.html#walformat): a 32-byte header (magic, the
checksums' byte order in its lowest bit, page size, salts, header checksum), then frames of a
24-byte header (page number, database size after a commit or 0, salts, cumulative checksum) and
one page. Each frame's checksum is seeded with the one before it, so every frame is checked
here against its predecessor's stored checksum: the frames are independent and checked as
numpy columns, a block at a time (no more than BLOCK frames in memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = 0x377F0682  # | 1: checksums over big-endian words
HEADER = 32
FRAME_HEADER = 24
BLOCK = 2048  # frames read and checked at once (about 2 MiB of 1 KiB pages)


@dataclass(frozen=True)
class WalDamage:
    """`bad` is the first frame SQLite will not replay (0-based); `hidden` counts the intact
    commit frames after it, the transactions lost with it; `frames` is the WAL's frame count."""

    bad: int
    hidden: int
    frames: int


def _checksum(words: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SQLite's walChecksumBytes over each row of `words` (uint32, rows of an even length),
    seeded per row: s1 += x[i] + s2; s2 += x[i + 1] + s1, modulo 2**32."""
    cols = np.ascontiguousarray(words.T)  # one row per word position: each step reads a row
    s1, s2 = s1.copy(), s2.copy()
    for i in range(0, cols.shape[0], 2):
        s1 += cols[i] + s2
        s2 += cols[i + 1] + s1
    return s1, s2


def check(path: Path) -> WalDamage | None:
    """The damage of the WAL at `path`, or None when SQLite will replay every committed frame
    (no WAL, an empty one, or one whose only invalid frames are at its end)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return None
    with f:
        head = f.read(HEADER)
        if len(head) < HEADER:
            return None
        h = np.frombuffer(head, ">u4")
        magic, page = int(h[0]), int(h[2])
        if magic & ~1 != MAGIC:
            return None  # not a WAL SQLite would read at all (nothing was ever committed in it)
        page = 65536 if page == 1 else page
        order = ">u4" if magic & 1 else "<u4"
        size = FRAME_HEADER + page
        frames = (path.stat().st_size - HEADER) // size
        salts = (h[4], h[5])
        one = np.ones(1, np.uint32)
        s1, s2 = _checksum(np.frombuffer(head[:24], order).reshape(1, 6), 0 * one, 0 * one)
        header_ok = bool(s1[0] == h[6] and s2[0] == h[7])
        seed = (h[6:7].astype(np.uint32), h[7:8].astype(np.uint32))
        bad = 0 if not header_ok else None
        hidden = 0
        for start in range(0, frames, BLOCK):
            n = min(BLOCK, frames - start)
            raw = np.frombuffer(f.read(n * size), np.uint8)
            n = len(raw) // size
            if not n:
                break
            block = raw[: n * size].reshape(n, size)
            fh = block[:, :FRAME_HEADER].copy().view(">u4")  # (n, 6): page, commit, salt1, salt2, ck1, ck2
            words = np.concatenate([block[:, :8], block[:, FRAME_HEADER:]], axis=1).view(order)
            seed1 = np.concatenate([seed[0], fh[:-1, 4]]).astype(np.uint32)
            seed2 = np.concatenate([seed[1], fh[:-1, 5]]).astype(np.uint32)
            c1, c2 = _checksum(words, seed1, seed2)
            valid = (fh[:, 2] == salts[0]) & (fh[:, 3] == salts[1]) & (c1 == fh[:, 4]) & (c2 == fh[:, 5])
            if bad is None and not valid.all():
                bad = start + int(np.argmin(valid))
            if bad is not None:
                after = np.arange(start, start + n) > bad
                hidden += int(np.count_nonzero(valid & after & (fh[:, 1] != 0)))
            seed = (fh[-1:, 4].astype(np.uint32), fh[-1:, 5].astype(np.uint32))
    if bad is None or not hidden:
        return None
    return WalDamage(bad, hidden, frames)
