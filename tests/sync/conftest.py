"""A real mosquitto per test (random loopback port, own config and persistence directory),
certificates made with openssl, and a subscriber that decodes and deduplicates."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest

from edgeos import wire


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(
        self,
        directory: Path,
        *,
        users: dict[str, str] | None = None,
        tls: dict[str, Path] | None = None,
        acl: str | None = None,
        persistence: bool = True,
        extra: list[str] | None = None,
    ):
        """`acl`: the text of a mosquitto acl_file (lines before any `user` line apply to
        anonymous clients); it may be changed between a stop and a start."""
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.users = users
        self.tls = tls
        self.acl = acl
        self.persistence = persistence
        self.extra = extra or []  # more mosquitto.conf lines
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "mosquitto.log"

    def _config(self) -> Path:
        lines = [
            # Started as root, mosquitto would switch to the "mosquitto" user and lose access
            # to the test's files; stay whoever we are.
            f"user {getpass.getuser()}",
            f"listener {self.port} 127.0.0.1",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.dir}/",
            "max_queued_messages 0",  # never drop for a slow subscriber
            "log_type error",
            "log_type warning",
            f"log_dest file {self.log}",
        ]
        if self.users is None:
            lines.append("allow_anonymous true")
        else:
            pw = self.dir / "passwords"
            pw.write_text("")
            for user, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        if self.acl is not None:
            acl = self.dir / "acl"
            acl.write_text(self.acl)
            # mosquitto 2.0.11 drops the connection after a denied QoS 1 publish when
            # max_queued_messages is 0 (unlimited); a large bound keeps the PUBACK refusal alone.
            lines = [ln for ln in lines if not ln.startswith("max_queued_messages")]
            lines += ["max_queued_messages 1000000", f"acl_file {acl}"]
        if self.tls:
            lines += [f"cafile {self.tls['ca']}", f"certfile {self.tls['cert']}", f"keyfile {self.tls['key']}"]
        lines += self.extra
        conf = self.dir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> None:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self._config())], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.05)
        raise TimeoutError("mosquitto did not start")

    def kill(self) -> None:
        """SIGKILL: whatever the broker held in memory is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence (queued messages of persistent sessions)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def make_broker(tmp_path):
    made: list[Broker] = []

    def make(**kw) -> Broker:
        b = Broker(tmp_path / f"broker{len(made)}", **kw)
        b.start()
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


def make_certs(directory: Path, host_san: str) -> dict[str, Path]:
    """A CA and a server certificate for `host_san` (e.g. "IP:127.0.0.1" or "DNS:wrong.example")."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "ext.cnf"
    ext.write_text(f"subjectAltName={host_san}\n")
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        ca_key,
        "-out",
        ca,
        "-days",
        "2",
        "-subj",
        "/CN=edgeos test CA",
    )
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=broker")
    run(
        "openssl",
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-out",
        cert,
        "-days",
        "2",
        "-extfile",
        ext,
    )
    return {"ca": ca, "cert": cert, "key": key}


@dataclass
class Received:
    """What a central consumer saw: every data message, decoded, in arrival order."""

    messages: list[wire.Message] = field(default_factory=list)
    status: list[dict] = field(default_factory=list)
    dictionary: dict[int, wire.TagEntry] = field(default_factory=dict)

    def units(self) -> list[tuple[int, str, wire.Unit]]:
        """(seq, device, unit) exactly once each, in sequence order."""
        dedup = wire.Deduplicator()
        out = [
            (seq, m.device, u)
            for m in self.messages
            for seq, u in zip(m.seqs, m.units, strict=True)
            if dedup.first_time(m.gateway, seq)
        ]
        return sorted(out, key=lambda x: x[0])

    def deliveries(self) -> int:
        return sum(len(m.seqs) for m in self.messages)


@contextlib.asynccontextmanager
async def subscriber(broker: Broker, **kw):
    """Persistent session (survives a broker restart with persistence), QoS 1, reconnecting."""
    import json

    got = Received()

    async def listen() -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", broker.port, identifier="central", clean_session=False, **kw
                ) as client:
                    await client.subscribe("edgeos/#", qos=1)
                    async for msg in client.messages:
                        topic = str(msg.topic)
                        if topic.endswith("/data"):
                            got.messages.append(wire.decode(msg.payload))
                        elif topic.endswith("/status"):
                            got.status.append(json.loads(msg.payload))
                        elif topic.endswith("/tags"):
                            got.dictionary = wire.decode_dictionary(msg.payload)
            except aiomqtt.MqttError:
                if asyncio.current_task().cancelling():
                    raise  # aiomqtt can turn our cancellation into an MqttError: don't reconnect then
                await asyncio.sleep(0.1)

    task = asyncio.create_task(listen())
    await asyncio.sleep(0.3)
    try:
        yield got
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError, aiomqtt.MqttError):
            await asyncio.wait_for(task, 5)


@contextlib.asynccontextmanager
async def sync_running(sync):
    """The sync's run task for the block; cancelled and the sync closed after it."""
    task = asyncio.create_task(sync.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sync.close()


@pytest.fixture
def running():
    """Factory: async with running(sync) as task."""
    return sync_running


@pytest.fixture
def certs():
    """Factory: make_certs(directory, san)."""
    return make_certs


@pytest.fixture
def subscribe():
    """Factory: async with subscribe(broker, **client_kw) as received."""
    return subscriber


@pytest.fixture
def dead_port() -> int:
    """A loopback port where nothing listens."""
    return free_port()
