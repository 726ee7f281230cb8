"""The serial adapter as a plant engineer meets it, checked against protocols/serial/README.md.

One real daemon (`edgeos run -c CONFIG`) runs for the whole module with many line devices: socat
pty pairs (a scale, a meter, an RFID reader, an STX/ETX controller, a fixed-length device, a
quiet level sensor) and raw-TCP serial device servers (`socket://127.0.0.1:PORT`, served by
threads of this process). Checksums are computed here from their public definitions. What the
daemon made of the lines is read back with `edgeos export`, `edgeos status --json` and the live
status file (`data_dir/status.live`, docs/store.md I18).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from datetime import UTC, datetime
from functools import reduce
from pathlib import Path

import pytest

EDGEOS = str(Path(sys.executable).with_name("edgeos"))
STX, ETX = b"\x02", b"\x03"


# ---------------------------------------------------------------- checksums (public definitions)


def xor8(data: bytes) -> int:
    return reduce(lambda a, b: a ^ b, data, 0)


def lrc8(data: bytes) -> int:
    return -sum(data) & 0xFF


def sum8(data: bytes) -> int:
    return sum(data) & 0xFF


def crc16_modbus(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def crc16_ccitt(data: bytes, init: int = 0xFFFF) -> int:
    crc = init
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def crc16_xmodem(data: bytes) -> int:
    return crc16_ccitt(data, 0)


# The catalogue check values of each algorithm ("123456789"), so the peers below send right sums.
assert crc16_modbus(b"123456789") == 0x4B37
assert crc16_ccitt(b"123456789") == 0x29B1
assert crc16_xmodem(b"123456789") == 0x31C3
assert xor8(b"GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,") == 0x47


# ---------------------------------------------------------------- peers


class Pty:
    """A socat pty pair: the daemon opens `adapter`; this test writes on the device's end."""

    def __init__(self, directory: Path, name: str) -> None:
        self.err = directory / f"socat-{name}.err"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                ["socat", "-d", "-d", "pty,raw,echo=0", "pty,raw,echo=0"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + 10
        paths: list[str] = []
        while len(paths) < 2:
            assert time.monotonic() < deadline and self.proc.poll() is None, "socat gave no ptys"
            time.sleep(0.02)
            paths = re.findall(r"PTY is (\S+)", self.err.read_text())
        self.adapter, device = paths[0], paths[1]
        self.fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + 10
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                assert time.monotonic() < deadline, "the daemon does not read its pty"
                time.sleep(0.002)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class DeviceServer:
    """A raw-TCP serial device server on 127.0.0.1: one client at a time, `send` writes to it,
    `reply(request)` answers each request line (CRLF) in poll mode; it can drop its client and
    stop listening, then listen again on the same port (a device server restarted)."""

    def __init__(self, reply=None) -> None:
        self.reply = reply
        self.received = bytearray()
        self.requests: list[tuple[float, bytes]] = []
        self.conn: socket.socket | None = None
        self.connections = 0
        self.stopped = False
        self.sock: socket.socket | None = self._listen(0)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    @staticmethod
    def _listen(port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(4)
        s.settimeout(0.05)
        return s

    def _accept(self) -> None:
        while not self.stopped:
            sock = self.sock
            if sock is None:
                time.sleep(0.02)
                continue
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conn = conn
            self.connections += 1
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        pending = b""
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                self.received += data
                pending += data
                while b"\r\n" in pending:
                    request, _, pending = pending.partition(b"\r\n")
                    self.requests.append((time.monotonic(), request))
                    answer = self.reply(request) if self.reply else None
                    if answer:
                        conn.sendall(answer)

    def send(self, data: bytes) -> None:
        deadline = time.monotonic() + 10
        while self.conn is None:
            assert time.monotonic() < deadline, "the daemon did not connect to the device server"
            time.sleep(0.01)
        self.conn.sendall(data)

    def drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def unlisten(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            # close() alone is not enough: the accept thread's poll holds the socket, which
            # keeps listening (the kernel completes handshakes, then resets them) for up to
            # its 50 ms accept timeout. shutdown() stops listening now and wakes that thread.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def relisten(self) -> None:
        self.sock = self._listen(self.port)

    def close(self) -> None:
        self.stopped = True
        self.drop()
        self.unlisten()
        self.thread.join(2)


class Gateway:
    """The daemon, its config and the documented ways of reading what it did."""

    def __init__(self, directory: Path, config: str) -> None:
        self.dir = directory
        self.config = directory / "edgeos.toml"
        self.config.write_text(config)
        self.log = open(directory / "daemon.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [EDGEOS, "run", "-c", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )

    def alive(self) -> None:
        assert self.proc.poll() is None, "daemon ended:\n" + (self.dir / "daemon.log").read_text()[-3000:]

    def status(self) -> dict:
        """The status document (the live file `edgeos status --json` prints, rewritten each second)."""
        for _ in range(50):
            with contextlib.suppress(OSError, ValueError):
                return json.loads((self.dir / "data" / "status.live").read_text())
            time.sleep(0.05)
        raise AssertionError("no readable status file")

    def health(self, device: str) -> dict:
        return self.status()["devices"][device]["health"]

    def wait(self, pred, what: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        s: dict = {}
        while True:
            self.alive()
            with contextlib.suppress(OSError, ValueError, KeyError):
                s = json.loads((self.dir / "data" / "status.live").read_text())
                if pred(s):
                    return s
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {json.dumps(s.get('devices'))[:3000]}")
            time.sleep(0.1)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [EDGEOS, *args, "-c", str(self.config)], capture_output=True, text=True, timeout=60, cwd="/tmp"
        )

    def export(self) -> dict[str, list[tuple[str, str, str]]]:
        """`edgeos export`: tag -> [(time, value, quality), ...] in time order."""
        out = self.cli("export", "-o", "-", "--since", "30m")
        assert out.returncode == 0, out.stderr
        rows: dict[str, list[tuple[str, str, str]]] = {}
        for r in csv.DictReader(io.StringIO(out.stdout)):
            rows.setdefault(r["tag"], []).append((r["time"], r["value"], r["quality"]))
        return rows

    def export_until(self, counts: dict[str, int], timeout: float = 10.0) -> dict:
        """Export until each tag has at least that many rows (the store commits at once)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.export()
            if all(len(rows.get(t, [])) >= n for t, n in counts.items()):
                return rows
            if time.monotonic() > deadline:
                return rows
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def vals(rows):
    """(value, quality) pairs; a value is a float, or None when empty (NaN, a failed read)."""
    return [(float(v) if v != "" else None, q) for _, v, q in rows]


def texts(rows):
    return [(v, q) for _, v, q in rows]


# ---------------------------------------------------------------- the gateway under test

PTYS = ["scale", "meter", "rfid", "stx", "fixed", "quiet"]
SERVERS = ["counter", "latin", "nmea", "lrc", "sum8", "ccitt", "crc", "xmodem", "fast", "poll", "poll2", "drop"]
BAD = "BAD_DECODING_ERROR"


class PollDevice:
    """Answers `W` with a weight while `answer` is true; never answers `T?`."""

    def __init__(self) -> None:
        self.answer = True

    def __call__(self, request: bytes) -> bytes | None:
        if request == b"W" and self.answer:
            return b"W=+12.50\r\n"
        return None


def poll2_reply(request: bytes) -> bytes | None:
    # The reply, then a frame nobody asked for, then an unfinished frame left on the line.
    return b"R=1500\r\nEXTRA\r\nPART" if request == b"R" else None


def config_text(ports: dict[str, str]) -> str:
    p = ports
    return f"""
[gateway]
id = "serialdoc"
data_dir = "data"
run_dir = "run"
shutdown_timeout = "5s"

[http]
port = 0

[[devices]]
name = "scale"
protocol = "serial"
port = "{p["scale"]}"
max_frame = 64
pattern = '^(?P<status>ST|US),GS,(?P<weight>[+-]\\d+\\.\\d+) ?(?P<u>kg|g|lb)$'
tags = [
  {{ name = "weight", scale = 1000, offset = -5, unit = "g" }},
  {{ name = "stable", group = "status", type = "bool", true_values = ["st"] }},
  {{ name = "unit", group = "u", type = "string" }},
]

[[devices]]
name = "meter"
protocol = "serial"
port = "{p["meter"]}"
terminator = "LF"
pattern = '^V=(?P<volts>-?\\d+\\.\\d+)\\r?$'
tags = [{{ name = "volts" }}]

[[devices]]
name = "rfid"
protocol = "serial"
port = "{p["rfid"]}"
terminator = '\\r'
pattern = '^(?P<rfid>[0-9A-F]{{10}}),(?P<t>\\S+)$'
timestamp_group = "t"
timestamp_format = "unix_ms"
tags = [{{ name = "rfid", type = "string" }}]

[[devices]]
name = "stx"
protocol = "serial"
port = "{p["stx"]}"
framing = "start_end"
start = "STX"
end = "ETX"
trailer = 1
checksum = "xor"
checksum_format = "binary"
pattern = '^(?P<temp>-?\\d+\\.\\d)C$'
tags = [{{ name = "temp" }}]

[[devices]]
name = "fixed"
protocol = "serial"
port = "{p["fixed"]}"
framing = "fixed"
frame_length = 7
start = "hex:23"
pattern = '^#?(?P<level>\\d{{4}}\\.\\d)$'
tags = [{{ name = "level" }}]

[[devices]]
name = "quiet"
protocol = "serial"
port = "{p["quiet"]}"
silence_timeout = "500ms"
pattern = '^L=(?P<lvl>\\d+)$'
tags = [{{ name = "lvl", type = "integer" }}]

[[devices]]
name = "counter"
protocol = "serial"
port = "{p["counter"]}"
pattern = ['^N=(?P<count>[^;]*)(;D=(?P<door>[^;]*))?$', '^V=(?P<volts>.*)$']
tags = [
  {{ name = "count", type = "integer" }},
  {{ name = "door", type = "bool" }},
  {{ name = "volts" }},
]

[[devices]]
name = "nmea"
protocol = "serial"
port = "{p["nmea"]}"
checksum = "xor"
checksum_from = 1
checksum_gap = 1
pattern = [
  '^\\$PXYZ,(?P<level>-?\\d+\\.\\d+),(?P<ok>[AV])$',
  '^\\$GPGGA,[^,]*,[^,]*,[NS],[^,]*,[EW],\\d,(?P<sats>\\d+),[^,]*,(?P<alt>[-\\d.]+),M,',
]
tags = [
  {{ name = "level" }},
  {{ name = "ok", type = "bool", true_values = ["A"] }},
  {{ name = "sats", type = "integer" }},
  {{ name = "alt", unit = "m" }},
]

[[devices]]
name = "latin"
protocol = "serial"
port = "{p["latin"]}"
encoding = "latin-1"
pattern = '^T=(?P<t>-?\\d+\\.\\d) ?(?P<u>.*)$'
tags = [{{ name = "t" }}, {{ name = "u", type = "string" }}]

[[devices]]
name = "lrc"
protocol = "serial"
port = "{p["lrc"]}"
checksum = "lrc"
pattern = '^P=(?P<pressure>\\d+\\.\\d)$'
tags = [{{ name = "pressure" }}]

[[devices]]
name = "sum8"
protocol = "serial"
port = "{p["sum8"]}"
checksum = "sum8"
checksum_from = 1
checksum_gap = 1
pattern = '^@T=(?P<t>-?\\d+\\.\\d)$'
tags = [{{ name = "t" }}]

[[devices]]
name = "ccitt"
protocol = "serial"
port = "{p["ccitt"]}"
checksum = "crc16_ccitt"
checksum_gap = 1
pattern = '^F=(?P<flow>\\d+\\.\\d+)$'
tags = [{{ name = "flow" }}]

[[devices]]
name = "crc"
protocol = "serial"
port = "{p["crc"]}"
framing = "start_end"
end = '\\x03'
trailer = 2
checksum = "crc16_modbus"
checksum_format = "binary"
pattern = '^(?P<flow>\\d+\\.\\d+)$'
tags = [{{ name = "flow" }}]

[[devices]]
name = "xmodem"
protocol = "serial"
port = "{p["xmodem"]}"
framing = "start_end"
trailer = 2
checksum = "crc16_xmodem"
checksum_format = "binary"
checksum_gap = 1
pattern = '^(?P<flow>\\d+\\.\\d+)$'
tags = [{{ name = "flow" }}]

[[devices]]
name = "fast"
protocol = "serial"
port = "{p["fast"]}"
pattern = '^C=(?P<n>\\d+)$'
tags = [{{ name = "n", type = "integer" }}]

[[devices]]
name = "poll"
protocol = "serial"
port = "{p["poll"]}"
mode = "poll"
pattern = '^W=(?P<weight>[+-]?\\d+\\.\\d+)$'
requests = [
  {{ send = "W\\r\\n", interval = "250ms", timeout = "400ms" }},
  {{ send = "T?\\r\\n", pattern = '^T=(?P<temp>-?\\d+\\.\\d)$', interval = "250ms", timeout = "150ms" }},
]
tags = [{{ name = "weight" }}, {{ name = "temp" }}]

[[devices]]
name = "poll2"
protocol = "serial"
port = "{p["poll2"]}"
mode = "poll"
pattern = '^R=(?P<rpm>\\d+)$'
requests = [{{ send = "R\\r\\n", interval = "300ms", timeout = "250ms" }}]
tags = [{{ name = "rpm", type = "integer" }}]

[[devices]]
name = "drop"
protocol = "serial"
port = "{p["drop"]}"
reconnect_min = "50ms"
reconnect_max = "200ms"
pattern = '^(?P<status>ST|US),GS,(?P<weight>[+-]\\d+\\.\\d+) ?(?P<u>kg|g|lb)$'
tags = [{{ name = "weight" }}]
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    d = tmp_path_factory.mktemp("serialdoc")
    ptys: dict[str, Pty] = {}
    servers: dict[str, DeviceServer] = {}
    gateway = None
    poll = PollDevice()
    try:
        for name in PTYS:
            ptys[name] = Pty(d, name)
        replies = {"poll": poll, "poll2": poll2_reply}
        for name in SERVERS:
            servers[name] = DeviceServer(replies.get(name))
        ports = {n: p.adapter for n, p in ptys.items()} | {n: s.url for n, s in servers.items()}
        gateway = Gateway(d, config_text(ports))
        gateway.peers = ptys | servers
        gateway.poll = poll
        gateway.wait(
            lambda s: (
                all(dev["health"].get("connected") for dev in s["devices"].values()) and len(s["devices"]) == len(ports)
            ),
            "every device connected",
            timeout=20,
        )
        yield gateway
    finally:
        if gateway is not None:
            gateway.stop()
        for p in ptys.values():
            p.close()
        for s in servers.values():
            s.close()


def nmea(body: str, lower: bool = False) -> bytes:
    cs = f"{xor8(body[1:].encode()):02X}"
    return f"{body}*{cs.lower() if lower else cs}\r\n".encode()


def nmea_with_letter() -> str:
    """A $PXYZ sentence whose checksum has a hex letter in it (to test lower-case digits)."""
    for tenths in range(100, 200):
        body = f"$PXYZ,{tenths / 10:.1f},V"
        if re.search("[A-F]", f"{xor8(body[1:].encode()):02X}"):
            return body
    raise AssertionError("no such sentence")


def bcc_frame(data: bytes, bad: bool = False) -> bytes:
    bcc = xor8(data + ETX) ^ (0x55 if bad else 0)
    return STX + data + ETX + bytes([bcc])


def crc_frame(data: bytes, algo, order: str, covers_etx: bool, bad: bool = False) -> bytes:
    crc = algo(data + ETX if covers_etx else data) ^ (0x0101 if bad else 0)
    return STX + data + ETX + crc.to_bytes(2, order)


STATIC: dict[str, list[bytes]] = {}


@pytest.fixture(scope="module")
def static(gw):
    """Every listening device gets its lines (one write each, devices interleaved 40 ms apart),
    then one export and one `edgeos status --json` for the tests below."""
    now_ms = int(time.time() * 1000)
    gw.rfid_times = (now_ms - 60_000, now_ms - 30_000)
    letter = nmea_with_letter()
    gw.nmea_letter = letter
    script = {
        "scale": [
            b"ST,GS,+0012.34 kg\r\n",
            b"US,GS,-0001.50 lb\r\n",
            b"hello\r\n",
            b"ST,GS,+1.00 kg\nST,GS,+2.00 kg\r\n",  # LF alone under CRLF joins the next line
            b"\r\n",  # a blank line
            b"ST,GS,+0\xb5.00 kg\r\n",  # not ASCII
            b"A" * 100,  # overlong (max_frame 64), in two reads
            b"A" * 50 + b"\r\n",
            b"ST,GS,+0003.00 kg\r\n",
            b"ST,GS,+0005.00 kg\r",  # the terminator split over two reads
            b"\n",
            b"ST,GS,+00",  # one frame split over two reads
            b"04.00 kg\r\n",
        ],
        "meter": [b"V=1.50\r\n", b"V=2.50\n", b"V=-3.25\r\n", b"9" * 2000 + b"\n", b"V=4.00\n"],
        "rfid": [
            f"04A1B2C3D4,{gw.rfid_times[0]}\r".encode(),
            f"1A2B3C4D5E,{gw.rfid_times[1]}\r".encode(),
            b"0000000001,notatime\r",
        ],
        "stx": [
            b"zz" + bcc_frame(b"21.5C"),
            bcc_frame(b"22.0C", bad=True),
            STX + b"23" + bcc_frame(b"24.0C"),  # a start before the end: incomplete
            b"\r\n" + bcc_frame(b"-5.5C"),
            bcc_frame(b"9" * 1100),  # longer than max_frame (1024)
            bcc_frame(b"25.0C"),
        ],
        "fixed": [b"xx#0012.5", b"#0013.0", b"?#0014.0"],
        "counter": [
            b"N=42;D= On \r\n",
            b"N=43\r\n",
            b"N=12.5\r\n",
            b"V=-0.25\r\n",
            b"V=inf\r\n",
            b"V=abc\r\n",
            b"V=1,5\r\n",
            b"X\r\n",
        ],
        "nmea": [
            nmea("$PXYZ,12.5,A"),
            nmea(letter, lower=True),
            b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n",
            b"$PXYZ,14.0,A*00\r\n",  # wrong (its sum is 0x54)
            b"$PXYZ,15.0,A\r\n",  # missing
            b"$PXYZ,16.0,A*4\xb0\r\n",  # not hex, not ASCII
        ],
        "latin": [b"T=21.5 \xb0C\r\n"],
        "lrc": [
            b"P=101.3" + f"{lrc8(b'P=101.3'):02X}".encode() + b"\r\n",
            b"P=102.0" + f"{lrc8(b'P=102.0') ^ 1:02X}".encode() + b"\r\n",
        ],
        "sum8": [
            b"@T=21.0;" + f"{sum8(b'T=21.0'):02X}".encode() + b"\r\n",
            b"@T=22.0;" + f"{sum8(b'@T=22.0;'):02X}".encode() + b"\r\n",  # summed over the wrong bytes
        ],
        "ccitt": [
            b"F=3.25|" + f"{crc16_ccitt(b'F=3.25'):04X}".encode() + b"\r\n",
            b"F=4.50|" + f"{crc16_xmodem(b'F=4.50'):04X}".encode() + b"\r\n",  # the init-0 variant
        ],
        "crc": [
            crc_frame(b"0123.45", crc16_modbus, "little", True),
            crc_frame(b"0124.00", crc16_modbus, "big", True),  # wrong byte order
        ],
        "xmodem": [
            crc_frame(b"7.5", crc16_xmodem, "big", False),
            crc_frame(b"8.5", crc16_xmodem, "big", True),  # the ETX is outside (gap 1)
        ],
        "fast": [b"".join(b"C=%d\r\n" % i for i in range(500))],
    }
    STATIC.update(script)
    for step in range(max(len(v) for v in script.values())):
        for name, chunks in script.items():
            if step < len(chunks):
                gw.peers[name].send(chunks[step])
        time.sleep(0.04)
    sent = {name: sum(len(c) for c in chunks) for name, chunks in script.items()}
    gw.wait(
        lambda s: all(s["devices"][n]["health"]["bytes"] >= b for n, b in sent.items()),
        "every byte read",
    )
    rows = gw.export_until(
        {
            "scale/weight": 10,
            "meter/volts": 5,
            "rfid/rfid": 3,
            "stx/temp": 7,
            "fixed/level": 3,
            "counter/volts": 5,
            "nmea/level": 5,
            "latin/u": 1,
            "lrc/pressure": 2,
            "sum8/t": 2,
            "ccitt/flow": 2,
            "crc/flow": 2,
            "xmodem/flow": 2,
            "fast/n": 500,
        }
    )
    out = gw.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    return rows, json.loads(out.stdout)


# ---------------------------------------------------------------- terminator framing, patterns, tags


def test_scale_lines_become_tags_with_types_scale_and_offset(static):
    rows, _ = static
    w, stable, unit = rows["scale/weight"], rows["scale/stable"], rows["scale/unit"]
    good = [(v, q) for v, q in vals(w) if q == "GOOD"]
    # value = number * scale + offset; the frame split over two reads is joined
    assert good == [(12335.0, "GOOD"), (-1505.0, "GOOD"), (2995.0, "GOOD"), (4995.0, "GOOD"), (3995.0, "GOOD")]
    # bool: the group's text compared stripped and in any case with true_values (["st"])
    assert [v for v, q in vals(stable) if q == "GOOD"] == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert [v for v, q in texts(unit) if q == "GOOD"] == ["kg", "lb", "kg", "kg", "kg"]


def test_bad_lines_are_counted_and_give_bad_samples_in_place(static, gw):
    rows, status = static
    # good, good, no match, LF-joined (no match), blank (no match), not ASCII, overlong, good, good
    expected = [12335.0, -1505.0, None, None, None, None, None, 2995.0, 4995.0, 3995.0]
    assert [v for v, _ in vals(rows["scale/weight"])] == expected
    for tag in ("scale/weight", "scale/stable", "scale/unit"):
        qualities = [q for _, _, q in rows[tag]]
        assert qualities == ["GOOD"] * 2 + [BAD] * 5 + ["GOOD"] * 3, tag
    h = status["devices"]["scale"]["health"]
    assert h.get("bad_no_match", 0) == 3
    assert h.get("bad_decode", 0) == 1
    assert h.get("bad_overlong", 0) == 1
    assert h["bad_frames"] == 5
    assert h["garbage_bytes"] > 0  # the overlong frame's bytes were discarded
    assert h["last_bad"]
    assert status["devices"]["scale"]["state"] == "running"
    # logged at most once a minute per reason: three no-match frames in three reads, one line
    log = (gw.dir / "daemon.log").read_text()
    assert len([ln for ln in log.splitlines() if " scale " in ln and "no_match" in ln]) == 1, log[-3000:]


def test_unfinished_tail_kept_between_reads_is_bounded_by_max_frame(static):
    _, status = static
    h = status["devices"]["scale"]["health"]
    assert 0 < h["peak_buffered_bytes"] <= 64  # the split frame was kept; the 100 A's were not
    assert h["buffered_bytes"] == 0


def test_lf_terminator_takes_crlf_and_lf_lines(static):
    rows, status = static
    volts = vals(rows["meter/volts"])
    assert volts == [(1.5, "GOOD"), (2.5, "GOOD"), (-3.25, "GOOD"), (None, BAD), (4.0, "GOOD")]
    h = status["devices"]["meter"]["health"]
    assert h["bad_frames"] == 1
    assert h.get("bad_overlong", 0) == 1  # 2000 bytes in one read, longer than max_frame
    assert h["peak_buffered_bytes"] <= 1024


def test_cr_terminated_reader_with_the_devices_own_time(static, gw):
    rows, status = static
    r = rows["rfid/rfid"]
    stamps = [
        datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z" for ms in gw.rfid_times
    ]
    assert [(t, v, q) for t, v, q in r if q == "GOOD"] == [
        (stamps[0], "04A1B2C3D4", "GOOD"),
        (stamps[1], "1A2B3C4D5E", "GOOD"),
    ]
    # a timestamp that does not parse makes the frame Bad
    assert [q for _, _, q in r if q != "GOOD"] == [BAD]
    assert status["devices"]["rfid"]["health"].get("bad_timestamp", 0) == 1


def test_integer_bool_optional_groups_and_values_that_do_not_convert(static):
    rows, status = static
    # N=42;D= On / N=43 / N=12.5 (not whole) / ... / X (no pattern: every pattern's tags)
    assert vals(rows["counter/count"]) == [(42.0, "GOOD"), (43.0, "GOOD"), (None, BAD), (None, BAD)]
    # " On " is true (stripped, any case); N=43 has no D= part: no sample for door
    assert vals(rows["counter/door"]) == [(1.0, "GOOD"), (None, BAD)]
    # -0.25, inf (not finite), abc, 1,5 (decimal comma), X
    assert vals(rows["counter/volts"]) == [(-0.25, "GOOD"), (None, BAD), (None, BAD), (None, BAD), (None, BAD)]
    h = status["devices"]["counter"]["health"]
    assert h.get("bad_value", 0) == 4
    assert h.get("bad_no_match", 0) == 1
    assert h["bad_frames"] == 5


def test_encoding_other_than_ascii(static):
    rows, _ = static
    assert vals(rows["latin/t"]) == [(21.5, "GOOD")]
    assert texts(rows["latin/u"]) == [("\u00b0C", "GOOD")]


# ---------------------------------------------------------------- start/end and fixed framing


def test_stx_etx_bcc_garbage_and_incomplete_frames(static):
    rows, status = static
    assert vals(rows["stx/temp"]) == [
        (21.5, "GOOD"),
        (None, BAD),  # wrong BCC
        (None, BAD),  # incomplete
        (24.0, "GOOD"),
        (-5.5, "GOOD"),
        (None, BAD),  # overlong
        (25.0, "GOOD"),  # resynchronised at the next start
    ]
    h = status["devices"]["stx"]["health"]
    assert h.get("bad_checksum", 0) == 1
    assert h.get("bad_incomplete", 0) == 1
    assert h.get("bad_overlong", 0) == 1
    assert h["garbage_bytes"] >= 4 + 1024  # "zz", "\r\n" and the overlong frame's bytes
    assert h["bad_frames"] == 3
    assert h["peak_buffered_bytes"] <= 1024


def test_fixed_length_frames_resync_on_start(static):
    # Reading: frame_length counts the frame's bytes on the line, its start included
    # ("every frame_length bytes; ... each frame begins with those bytes").
    rows, _ = static
    assert vals(rows["fixed/level"]) == [(12.5, "GOOD"), (13.0, "GOOD"), (14.0, "GOOD")]


# ---------------------------------------------------------------- checksums


def test_nmea_xor_hex_checksum(static, gw):
    rows, status = static
    letter_level = float(gw.nmea_letter.split(",")[1])
    # good, good (lower-case hex), GPGGA (other pattern), wrong, missing, non-hex
    assert vals(rows["nmea/level"]) == [(12.5, "GOOD"), (letter_level, "GOOD"), (None, BAD), (None, BAD), (None, BAD)]
    assert vals(rows["nmea/ok"]) == [(1.0, "GOOD"), (0.0, "GOOD"), (None, BAD), (None, BAD), (None, BAD)]
    # the classic $GPGGA ... *47 sentence; a failed checksum in listen mode with several
    # patterns gives all of their tags a Bad sample
    assert vals(rows["nmea/sats"]) == [(8.0, "GOOD"), (None, BAD), (None, BAD), (None, BAD)]
    assert vals(rows["nmea/alt"]) == [(545.4, "GOOD"), (None, BAD), (None, BAD), (None, BAD)]
    h = status["devices"]["nmea"]["health"]
    assert h.get("bad_checksum", 0) == 3
    assert h.get("bad_decode", 0) == 0  # a non-ASCII byte in a checksummed frame is a checksum failure


@pytest.mark.parametrize(
    ("tag", "good"),
    [("lrc/pressure", 101.3), ("sum8/t", 21.0), ("ccitt/flow", 3.25), ("crc/flow", 123.45), ("xmodem/flow", 7.5)],
)
def test_checksum_algorithms(static, tag, good):
    rows, status = static
    assert vals(rows[tag]) == [(good, "GOOD"), (None, BAD)]
    h = status["devices"][tag.split("/")[0]]["health"]
    assert h.get("bad_checksum", 0) == 1
    assert h["bad_frames"] == 1


# ---------------------------------------------------------------- a fast device


def test_device_faster_than_expected(static):
    rows, status = static
    n = rows["fast/n"]
    assert vals(n) == [(float(i), "GOOD") for i in range(500)]
    h = status["devices"]["fast"]["health"]
    assert h["frames"] == 500
    assert h["bad_frames"] == 0
    assert h.get("bad_overlong", 0) == 0  # 4 KB at once is many frames, none of them long
    assert h["peak_buffered_bytes"] <= 1024
    # frames that arrive together are one batch sharing its read's time
    assert len({t for t, _, _ in n}) < 50


def test_status_json_health_fields(static):
    _, status = static
    assert status["running"] is True
    for name in PTYS + SERVERS:
        dev = status["devices"][name]
        h = dev["health"]
        for key in (
            "port",
            "connected",
            "opens",
            "bytes",
            "frames",
            "bad_frames",
            "garbage_bytes",
            "unsolicited",
            "buffered_bytes",
            "peak_buffered_bytes",
        ):
            assert key in h, (name, key)
        assert h["connected"] is True
        assert h["opens"] >= 1
    assert status["devices"]["scale"]["health"]["port"] == status["devices"]["scale"]["health"]["port"].strip()
    assert status["devices"]["counter"]["health"]["port"].startswith("socket://127.0.0.1:")
    for name in ("poll", "poll2"):
        assert {"requests", "timeouts"} <= set(status["devices"][name]["health"])


def test_serial_test_cli_tunes_a_pattern_without_the_device(gw):
    procs = [
        subprocess.Popen(
            [EDGEOS, "serial", "test", *args, "-c", str(gw.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/tmp",
        )
        for args in (
            ["scale", "ST,GS,+0012.34 kg"],
            ["scale", "ST,GS,+0012.34 kg", "hello"],
            ["stx", "21.5C\\x03" + f"\\x{xor8(b'21.5C' + ETX):02x}"],
        )
    ]
    outs = [(p.communicate(timeout=60), p.returncode) for p in procs]
    (out, err), rc = outs[0]
    assert rc == 0, out + err
    assert "12335" in out and "kg" in out
    (out, err), rc = outs[1]
    assert rc == 1, out + err  # a line refused
    (out, err), rc = outs[2]
    assert rc == 0, out + err
    assert "21.5" in out


# ---------------------------------------------------------------- poll mode


def test_poll_requests_replies_and_timeouts(gw):
    gw.poll.answer = True
    s = gw.wait(
        lambda s: s["devices"]["poll"]["health"]["requests"] >= 8 and s["devices"]["poll"]["health"]["timeouts"] >= 3,
        "poll requests and T? timeouts",
    )
    dev = s["devices"]["poll"]
    # T? has never answered on this connection: its tags are Bad, the device stays up
    assert dev["up"] is True
    received = bytes(gw.peers["poll"].received)
    assert received, "nothing was sent"
    # `send` is sent exactly as written, requests never overlapping
    assert re.fullmatch(rb"(?:W\r\n|T\?\r\n)+", received), received[:200]
    # T? is never answered: nothing else is sent until its 150 ms timeout is over
    reqs = list(gw.peers["poll"].requests)
    gaps = [b[0] - a[0] for a, b in zip(reqs, reqs[1:], strict=False) if a[1] == b"T?"]
    assert gaps and min(gaps) >= 0.14, gaps
    rows = gw.export()
    weights = vals(rows["poll/weight"])
    assert weights and all(w == (12.5, "GOOD") for w in weights)
    temps = [q for _, _, q in rows["poll/temp"]]
    assert temps and set(temps) == {"BAD_TIMEOUT"}

    # W stops answering: down at its first timeout; back up when it answers again
    base = dev["health"]["timeouts"]
    gw.poll.answer = False
    try:
        gw.wait(lambda s: s["devices"]["poll"]["up"] is False, "poll device down", timeout=6)
    finally:
        gw.poll.answer = True
    s = gw.wait(lambda s: s["devices"]["poll"]["up"] is True, "poll device up again", timeout=6)
    assert s["devices"]["poll"]["health"]["timeouts"] > base
    rows = gw.export()
    assert ("BAD_TIMEOUT" in [q for _, _, q in rows["poll/weight"]]) and rows["poll/weight"][-1][2] == "GOOD"


def test_poll_unsolicited_frames_and_unfinished_tail_are_dropped(gw):
    s = gw.wait(lambda s: s["devices"]["poll2"]["health"]["requests"] >= 4, "poll2 requests")
    h = s["devices"]["poll2"]["health"]
    assert h["unsolicited"] >= 2  # EXTRA after each reply
    assert h["garbage_bytes"] >= 4 * (h["requests"] - 2)  # PART dropped before each request
    assert h["bad_frames"] == 0  # never glued to a reply
    assert h["timeouts"] == 0
    assert h["frames"] <= h["requests"]  # the unsolicited frames are not counted as frames
    rows = gw.export()
    rpm = vals(rows["poll2/rpm"])
    assert len(rpm) >= 3 and all(r == (1500.0, "GOOD") for r in rpm)


# ---------------------------------------------------------------- silence, disconnects


def test_silence_timeout_marks_bad_once_and_next_frame_brings_it_up(gw):
    pty = gw.peers["quiet"]
    before = gw.health("quiet").get("silences", 0)
    pty.send(b"L=1\r\n")
    sent = time.monotonic()
    gw.wait(lambda s: s["devices"]["quiet"]["up"] is False, "down after 500ms of silence", timeout=6)
    while time.monotonic() < sent + 1.8:  # more than three timeouts' worth
        pty.send(b"L")  # bytes without a frame end are not a frame
        time.sleep(0.2)
    s = gw.status()["devices"]["quiet"]
    assert s["health"].get("silences", 0) == before + 1  # once, not every 500 ms
    assert s["up"] is False
    # the device sends again, more often than silence_timeout; a bad frame is a frame too
    deadline = time.monotonic() + 6
    sends = 0
    while gw.status()["devices"]["quiet"]["up"] is not True:
        assert time.monotonic() < deadline, "not up again"
        pty.send(b"?\r\n")
        sends += 1
        time.sleep(0.15)
    rows = gw.export_until({"quiet/lvl": 3})
    lvl = vals(rows["quiet/lvl"])
    i = lvl.index((1.0, "GOOD"))
    assert lvl[i : i + 3] == [(1.0, "GOOD"), (None, "BAD_TIMEOUT"), (None, BAD)]
    assert sends >= 1


def test_device_server_drops_and_comes_back(gw):
    srv = gw.peers["drop"]
    srv.send(b"ST,GS,+1.00 kg\r\n")
    gw.wait(lambda s: s["devices"]["drop"]["health"]["frames"] >= 1, "first line")
    srv.send(b"ST,GS,+9")  # a partial line, then the server goes away
    time.sleep(0.1)
    # Stop listening first: dropped while still listening, the daemon's reconnect (backoff from
    # 25 ms) could complete in between and count one more open.
    srv.unlisten()
    srv.drop()
    gw.wait(lambda s: s["devices"]["drop"]["health"]["connected"] is False, "connection lost", timeout=6)
    time.sleep(0.6)  # several refused reconnects (backoff from 25..100 ms)
    srv.relisten()
    s = gw.wait(
        lambda s: s["devices"]["drop"]["health"]["connected"] is True and s["devices"]["drop"]["health"]["opens"] >= 2,
        "reconnected",
        timeout=8,
    )
    srv.send(b"ST,GS,+2.00 kg\r\n")
    s = gw.wait(lambda s: s["devices"]["drop"]["health"]["frames"] >= 2, "line after reconnect")
    dev = s["devices"]["drop"]
    assert dev["health"]["opens"] == 2  # counters survive reopening (a reset would read 1)
    assert dev["health"]["frames"] == 2
    assert dev["health"]["bad_frames"] == 0  # the partial line was not glued to the next one
    assert dev["connects"] >= 2 and dev["failures"] >= 1
    gw.alive()  # the daemon keeps running
    rows = gw.export_until({"drop/weight": 3})
    # one Bad sample for the outage, not one per failed reconnect
    assert vals(rows["drop/weight"]) == [(1.0, "GOOD"), (None, "BAD_COMM_FAILURE"), (2.0, "GOOD")]


def test_config_problems_are_refused_at_load_all_at_once(gw, tmp_path):
    pts = gw.peers["scale"].adapter
    link = tmp_path / "by-id-scale"
    link.symlink_to(pts)
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        f"""
[gateway]
id = "bad"
data_dir = "data"

[[devices]]
name = "a"
protocol = "serial"
port = "{pts}"
pattern = '^(?P<x>\\d+)$'
tags = [{{ name = "x" }}, {{ name = "y", group = "x" }}]

[[devices]]
name = "b"
protocol = "serial"
port = "{link}"
pattern = '^(?P<v>\\d+);(?P<t>.*)$'
timestamp_group = "t"
timestamp_format = "%Q"
tags = [{{ name = "flow.rate" }}]
"""
    )
    out = subprocess.run([EDGEOS, "check", "-c", str(cfg)], capture_output=True, text=True, timeout=60, cwd="/tmp")
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    # one group for two tags; %Q; a dotted tag name without group; one port through a symlink
    assert "devices[0](a).tags[1](y).group" in text, text
    assert re.search(r"devices\[1\]\S*\.timestamp_format: .*%Q", text), text
    assert "devices[1](b).tags[0](flow.rate)" in text, text
    assert re.search(r"devices\[1\]\S*\.port: .*share", text), text
