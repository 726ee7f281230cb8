"""The adapter against a Modbus server built on libmodbus (tests/peers/libmodbus_server.c, Debian
libmodbus-dev): a peer nobody on the project wrote, with its own framing, exception rules and
float encoders. TCP on a random loopback port, and RTU on a socat pty pair."""

from __future__ import annotations

import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import edgeos_test_peers_modbus as peers  # tests/peers/modbus.py, loaded by conftest.py
import pytest

from edgeos import Quality

SOURCE = Path(__file__).parents[1] / "peers" / "libmodbus_server.c"


@pytest.fixture(scope="module")
def server_binary(tmp_path_factory) -> Path:
    """Compiled once per module. A machine without libmodbus fails here (scripts/setup --test
    installs libmodbus-dev), it does not skip."""
    cc = shutil.which("cc")
    assert cc, "no C compiler (cc): scripts/setup --test installs gcc"
    pc = subprocess.run(["pkg-config", "--cflags", "--libs", "libmodbus"], capture_output=True, text=True)
    assert pc.returncode == 0, f"libmodbus not found by pkg-config ({pc.stderr.strip()}): install libmodbus-dev"
    out = tmp_path_factory.mktemp("libmodbus") / "libmodbus_server"
    r = subprocess.run([cc, "-O1", "-Wall", "-o", str(out), str(SOURCE), *pc.stdout.split()], capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    return out


class Server:
    """One libmodbus server process; `lines` collects what it prints (requests, writes)."""

    def __init__(self, binary: Path, *args: str) -> None:
        self.proc = subprocess.Popen([str(binary), *args], stdout=subprocess.PIPE, text=True)
        first = self.proc.stdout.readline().split()
        assert first and first[0] in ("PORT", "READY"), f"the server did not start: {first}"
        self.port = int(first[1]) if first[0] == "PORT" else 0
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def requests(self) -> list[tuple[int, int, int, int]]:
        return [tuple(int(x) for x in ln.split()[1:]) for ln in list(self.lines) if ln.startswith("REQ ")]

    def written(self, kind: str, at_least: int = 0) -> list[list[int]]:
        """The server prints after it answered: wait (bounded) for `at_least` such lines."""
        deadline = time.monotonic() + 5
        while True:
            got = [[int(x) for x in ln.split()[1:]] for ln in list(self.lines) if ln.startswith(kind + " ")]
            if len(got) >= at_least or time.monotonic() > deadline:
                return got
            time.sleep(0.01)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        self.proc.stdout.close()


@pytest.fixture
def libmodbus(server_binary):
    started: list[Server] = []

    def start(*args: str) -> Server:
        s = Server(server_binary, *args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def regs(fmt: str, value, order: str = "ABCD") -> str:
    """A 32-bit (or other) value as registers for a SPEC, its bytes on the wire in `order` as
    the Modbus README names them (A the most significant)."""
    b = struct.pack(">" + fmt, value)
    if len(b) == 4:
        b = bytes(b["ABCD".index(c)] for c in order)
    return ",".join(str(x) for x in struct.unpack(f">{len(b) // 2}H", b))


async def test_values_libmodbus_serves_read_as_the_documents_say(libmodbus, modbus_config, run_runtime):
    """Floats in the four byte orders, integers as the Modbus convention (big-endian) puts them,
    bits, input registers with scale, served from libmodbus's map; and every request the
    server saw is within the protocol's limits."""
    srv = libmodbus(
        "tcp",
        f"hr=0:{regs('f', 3.25)}",
        f"hr=2:{regs('f', -21.5, 'CDAB')}",
        f"hr=4:{regs('f', 1234.5, 'BADC')}",
        f"hr=6:{regs('f', -0.125, 'DCBA')}",
        f"hr=10:{regs('h', -12345)}",
        f"hr=11:{regs('i', -123456789)}",
        f"hr=13:{regs('I', 3_000_000_000)}",
        f"hr=15:{regs('d', -2.718281828459045)}",
        f"ir=20:{0x0102}",
        "co=7:1,0,1",
        "di=190:0,1",
        "hr=199:777",
        "hr=1000:" + ",".join(str(i) for i in range(300)),
    )
    tags = ",\n".join(
        [
            '{ name = "abcd", address = "hr0", type = "float32" }',
            '{ name = "cdab", address = "40003", type = "float32", byte_order = "CDAB" }',
            '{ name = "badc", address = "hr4", type = "float32", byte_order = "BADC" }',
            '{ name = "dcba", address = "hr6", type = "float32", byte_order = "DCBA" }',
            '{ name = "i16", address = "hr10", type = "int16" }',
            '{ name = "i32", address = "hr11", type = "int32" }',
            '{ name = "u32", address = "hr13", type = "uint32" }',
            '{ name = "f64", address = "hr15", type = "float64" }',
            '{ name = "ir", address = "30021", scale = 0.5, offset = 1.0 }',
            '{ name = "c7", address = "coil7" }',
            '{ name = "c8", address = "00009" }',
            '{ name = "c9", address = "coil9" }',
            '{ name = "d191", address = "di191" }',
            '{ name = "last", address = "hr199" }',
            *(f'{{ name = "r{i}", address = "hr{1000 + i}" }}' for i in range(300)),
        ]
    )
    cfg = modbus_config(peers.device(srv.port, tags))
    sink = peers.Collect(cfg)
    await run_runtime(cfg, sinks=[sink], until=lambda rt: all(len(sink.good(k)) >= 3 for k in sink.keys))
    want = {
        "abcd": 3.25,
        "cdab": -21.5,
        "badc": 1234.5,
        "dcba": -0.125,
        "i16": -12345,
        "i32": -123456789,
        "u32": 3_000_000_000,
        "f64": -2.718281828459045,
        "ir": 0x0102 * 0.5 + 1.0,
        "c7": 1,
        "c8": 0,
        "c9": 1,
        "d191": 1,
        "last": 777,
        **{f"r{i}": i for i in range(300)},
    }
    assert {k.split("/")[1]: sink.good(k)[-1][1] for k in sink.keys} == want
    reqs = srv.requests()
    assert reqs and {fc for _, fc, _, _ in reqs} == {1, 2, 3, 4}, reqs
    assert any(fc == 3 and a >= 1000 and n > 1 for _, fc, a, n in reqs), reqs  # 300 registers coalesced, in pieces
    limits = {1: 2000, 2: 2000, 3: 125, 4: 125}
    assert all(1 <= n <= limits[fc] and a + n <= 65536 for _, fc, a, n in reqs), reqs
    assert {u for u, *_ in reqs} == {1}


async def test_an_address_libmodbus_does_not_map_is_bad_alone(libmodbus, modbus_config, run_runtime):
    """libmodbus refuses a whole request reaching past its map (exception 2, illegal data
    address). The register it does hold, next to the refused one, stays Good."""
    srv = libmodbus("tcp", "hr=1998:41,42")
    tags = (
        '{ name = "a", address = "hr1998" }, { name = "b", address = "hr1999" }, '
        '{ name = "beyond", address = "hr2000" }, { name = "far", address = "hr2050" }'
    )
    cfg = modbus_config(peers.device(srv.port, tags))
    sink = peers.Collect(cfg)
    await run_runtime(
        cfg,
        sinks=[sink],
        until=lambda rt: len(sink.good("plc/b")) >= 3 and sink.rows.get("plc/beyond") and sink.rows.get("plc/far"),
    )
    assert sink.good("plc/a")[-1][1] == 41 and sink.good("plc/b")[-1][1] == 42
    for k in ("plc/beyond", "plc/far"):
        assert sink.rows[k] and all(q == Quality.BAD_DEVICE_FAILURE for _, _, q in sink.rows[k]), sink.rows[k]


async def test_writes_land_in_libmodbus_memory(libmodbus, modbus_config):
    """A write goes out as the Modbus convention says: the server's memory afterwards holds the
    value's registers (big-endian; CDAB swapped) and the coil."""
    from edgeos import plugins

    srv = libmodbus("tcp")
    tags = (
        '{ name = "sp", address = "hr20", type = "float32", writable = true }, '
        '{ name = "swapped", address = "hr30", type = "int32", byte_order = "CDAB", writable = true }, '
        '{ name = "small", address = "hr40", type = "int16", writable = true }, '
        '{ name = "run", address = "coil5", writable = true }'
    )
    dev = modbus_config(peers.device(srv.port, tags)).devices[0]
    adapter = plugins.load(plugins.PROTOCOLS, "modbus").create(dev)
    await adapter.connect()
    try:
        by = {t.name: t for t in dev.tags}
        await adapter.write(by["sp"], 72.5)
        await adapter.write(by["swapped"], -100_000)
        await adapter.write(by["small"], -2)
        await adapter.write(by["run"], True)
        got = await adapter.read(adapter.poll_groups()[0], time.time_ns())
    finally:
        await adapter.close()
    hr = {w[0]: w[1:] for w in srv.written("HR", 3)}
    hi, lo = struct.unpack(">2H", struct.pack(">i", -100_000))
    assert hr[20] == list(struct.unpack(">2H", struct.pack(">f", 72.5)))
    assert hr[30] == [lo, hi] and hr[40] == [0xFFFE]
    assert srv.written("CO", 1) == [[5, 1]]
    assert sorted(got.values.tolist()) == sorted([72.5, -100_000.0, -2.0, 1.0])


async def test_rtu_on_a_serial_line_served_by_libmodbus(libmodbus, pty_pair, modbus_config, run_runtime):
    """RTU framing (CRC, silences) as libmodbus reads and writes it, at 19200 baud on a pty. A
    second device on the line asks a unit libmodbus does not answer: it times out alone."""
    libmodbus("rtu", pty_pair.a, "3", f"hr=0:{regs('f', 21.5)}", "hr=2:7,8,9", "co=1:1")

    def rtu(name: str, unit: int, tags: str) -> str:
        return f"""
[[devices]]
name = "{name}"
protocol = "modbus"
transport = "rtu"
serial_port = "{pty_pair.b}"
baudrate = 19200
unit = {unit}
poll_interval = "200ms"
timeout = "300ms"
retries = 0
reconnect_min = "50ms"
reconnect_max = "200ms"
tags = [{tags}]
"""

    tags = (
        '{ name = "t", address = "40001", type = "float32" }, { name = "r", address = "hr3" }, '
        '{ name = "c", address = "coil1" }'
    )
    cfg = modbus_config(rtu("m3", 3, tags) + rtu("ghost", 4, '{ name = "g", address = "hr0" }'))
    sink = peers.Collect(cfg)
    rt = await run_runtime(
        cfg,
        sinks=[sink],
        until=lambda rt: all(len(sink.good(k)) >= 3 for k in ("m3/t", "m3/r", "m3/c")) and sink.rows.get("ghost/g"),
        timeout=20,
    )
    assert [sink.good(k)[-1][1] for k in ("m3/t", "m3/r", "m3/c")] == [21.5, 8, 1]
    assert rt.devices["m3"].failures == 0, rt.devices["m3"].last_error
    assert not sink.good("ghost/g") and rt.devices["ghost"].failures > 0
