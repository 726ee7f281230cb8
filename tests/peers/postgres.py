"""A throwaway PostgreSQL server for tests and benchmarks: the Debian `postgresql` binaries, initdb
in a temporary directory, a random loopback port and a unix socket in that directory.

initdb refuses to run as root (and tests run as root here and in CI), so as root the server runs
as the `postgres` system user (created by the Debian package) in a directory it owns. The
machine's own PostgreSQL service (port 5432) is never touched.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL binaries not found: install the Debian package postgresql (scripts/setup --test)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """One PostgreSQL cluster. `dsn(db)` for clients; `stop()`/`start()` keep its data."""

    def __init__(self, *, settings: dict[str, str] | None = None) -> None:
        self.bin = _bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="edgeos-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.dir),
            "fsync": "off",  # a test server: crash safety of the host is not under test
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "128MB",
            "max_connections": "50",
            "log_min_messages": "warning",
            **(settings or {}),
        }
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "postgres.log"
        self._run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"]
        )

    def _run(self, args: list[str]) -> None:
        r = subprocess.run(args, user=self.user, capture_output=True, text=True, cwd=self.dir, timeout=120)
        if r.returncode:
            raise RuntimeError(f"{args[0]} failed: {r.stderr or r.stdout}")

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        args = [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        for k, v in self.settings.items():
            args += ["-c", f"{k}={v}"]
        log = open(self.log, "ab")  # noqa: SIM115 - handed to the child, closed when it exits
        self.proc = subprocess.Popen(args, user=self.user, stdout=log, stderr=log, cwd=self.dir)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log.read_text()[-2000:]}")
            r = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"], capture_output=True
            )
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError("postgres did not start")

    def stop(self, mode: signal.Signals = signal.SIGINT) -> None:
        """SIGINT: fast shutdown (clients disconnected, data kept)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(mode)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def create_database(self, name: str) -> str:
        self._run(
            [str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name],
        )
        return self.dsn(name)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Postgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
