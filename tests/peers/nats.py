"""A real 3-node nats-server cluster (Debian's `nats-server`) for tests and bench: JetStream and
MQTT (3.1.1: NATS serves no other version) on each node, each with its own store directory,
every port a random loopback one. Nodes can be killed (SIGKILL) and started again.

Load it by path (tests have no package), as tests/sync/test_nats.py does, and import it as
`edgeos_test_peers_nats`:

    with NatsCluster(tmp_path) as cluster:
        cluster.mqtt_servers()   # ["127.0.0.1:P1", "127.0.0.1:P2", "127.0.0.1:P3"]
        cluster.kill(0); cluster.start(0)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class NatsCluster:
    """Three nodes n0..n2: client, cluster (route) and MQTT ports per node."""

    def __init__(self, directory: Path, nodes: int = 3) -> None:
        self.dir = Path(directory)
        self.n = nodes
        ports = _free_ports(3 * nodes)
        self.client = ports[0:nodes]
        self.route = ports[nodes : 2 * nodes]
        self.mqtt = ports[2 * nodes :]
        self.procs: list[subprocess.Popen | None] = [None] * nodes
        # A name of this cluster's own: a node of another cluster (another test, bench or helper
        # on this host) that later listens on a route port a killed node freed must not be let
        # in by the survivors, which keep dialling that port (one name for all merged clusters).
        self.name = f"edgeos-{os.urandom(4).hex()}"

    def _config(self, i: int) -> Path:
        d = self.dir / f"n{i}"
        (d / "js").mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for k, p in enumerate(self.route) if k != i)
        conf = d / "nats.conf"
        conf.write_text(
            f"""
server_name: n{i}
listen: 127.0.0.1:{self.client[i]}
jetstream {{ store_dir: "{d / "js"}", max_memory_store: 64MB, max_file_store: 1GB }}
cluster {{ name: {self.name}, listen: 127.0.0.1:{self.route[i]}, routes: [{routes}] }}
mqtt {{ listen: 127.0.0.1:{self.mqtt[i]}, stream_replicas: {self.n}, ack_wait: "5s" }}
"""
        )
        return conf

    def start(self, i: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / f"n{i}.log", "ab")  # noqa: SIM115 - owned by the process
        self.procs[i] = subprocess.Popen([NATS_SERVER, "-c", str(self._config(i))], stdout=log, stderr=log)
        log.close()

    def start_all(self, timeout: float = 30.0) -> None:
        for i in range(self.n):
            self.start(i)
        self.wait_mqtt(range(self.n), timeout)

    def wait_mqtt(self, nodes, timeout: float = 30.0) -> None:
        """Until each node's MQTT port answers a CONNECT with an accepting CONNACK (it refuses
        while JetStream has no leader)."""
        deadline = time.monotonic() + timeout
        for i in nodes:
            while not self.accepts(i):
                proc = self.procs[i]
                assert proc is not None and proc.poll() is None, (self.dir / f"n{i}.log").read_text()[-2000:]
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nats node n{i} does not accept MQTT connections")
                time.sleep(0.2)

    def accepts(self, i: int) -> bool:
        """One raw MQTT 3.1.1 CONNECT (clean session): True when CONNACK's code is 0."""
        connect = bytes([0x10, 14, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 10, 0, 2]) + b"pb"
        try:
            with socket.create_connection(("127.0.0.1", self.mqtt[i]), 1.0) as s:
                s.settimeout(3.0)
                s.sendall(connect)
                ack = s.recv(4)
                with contextlib.suppress(OSError):
                    s.sendall(bytes([0xE0, 0]))  # DISCONNECT
                return len(ack) == 4 and ack[0] == 0x20 and ack[3] == 0
        except OSError:
            return False

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        self.procs[i] = None

    def stop(self) -> None:
        for i in range(self.n):
            proc = self.procs[i]
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for i in range(self.n):
            proc = self.procs[i]
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            self.procs[i] = None

    def mqtt_servers(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.mqtt]

    def node_of(self, port: int) -> int:
        return self.mqtt.index(port)

    def __enter__(self) -> NatsCluster:
        self.start_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
