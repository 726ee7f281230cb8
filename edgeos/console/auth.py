"""The console's password file: one `user:scrypt$n$r$p$salt$hash` line per user.

Salted scrypt from the standard library: a stolen file costs an attacker 16 MiB and tens of
milliseconds per guess. Requests carry HTTP Basic credentials (use TLS off loopback); a header
that verified once is remembered by its SHA-256, so pages and their API calls pay the hash once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

_N, _R, _P = 2**14, 8, 1


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, maxmem=64 * 1024 * 1024, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
            maxmem=64 * 1024 * 1024, dklen=len(want),
        )  # fmt: skip
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def read_users(path: Path) -> dict[str, str]:
    users = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            user, stored = line.split(":", 1)
            users[user] = stored
    return users


def set_password(path: Path, user: str, password: str) -> None:
    """Add or replace `user`'s line; the file is written mode 0600 and swapped in atomically."""
    users = read_users(path) if path.exists() else {}
    users[user] = hash_password(password)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(f"{u}:{h}\n" for u, h in users.items()))
    os.replace(tmp, path)


class Authenticator:
    """Checks `Authorization: Basic` headers against a password file (re-read when it changes)."""

    realm = "edgeos console"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, str] = {}
        self._good: set[bytes] = set()

    def _load(self) -> None:
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._users = read_users(self.path)
            self._stamp = stamp
            self._good.clear()

    def check(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            self._load()
        except OSError:
            return False
        key = hashlib.sha256(header.encode()).digest()
        if key in self._good:
            return True
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        stored = self._users.get(user)
        if stored is None or not verify_password(password, stored):
            return False
        if len(self._good) > 256:
            self._good.clear()
        self._good.add(key)
        return True
