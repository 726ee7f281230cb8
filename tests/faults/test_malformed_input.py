"""Malformed device input beyond the Modbus fault peer.

OPC UA: a server (tests/faults/opcua_odd_peer.py, own process) answers a Double node with a
string, an array, null, bytes, a date, a GUID, a huge Int64, ... and with odd status codes, in
both the subscribe and the poll mode. Promise: the daemon keeps running; a value that is not
a number is never stored as a Good number (Bad or the server's status instead); a status
passes through as the sample's quality; a good value afterwards is Good again.

Serial: random noise at line rate (115200 baud: 11.5 kB/s) on a real pty, with valid frames
among it. Promise: every valid frame's values are stored exactly; noise becomes Bad samples or
counted garbage, never a Good wrong value; memory of the framer stays bounded.
Negative controls: a check that trusts the odd values (a Good string) must be caught; a noise
frame crafted to match the pattern must be seen as a value the check rejects.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeos import Quality
from edgeos.config import load_config
from edgeos.runtime import Runtime

HERE = Path(__file__).parent
NUMERIC_OK = {"bool": 1.0, "int64_huge": float(2**63 - 1), "uint64_huge": float(2**64 - 1), "float_max": 3.4e38}
NUMERIC_SPECIAL = {"nan", "inf", "null"}  # null with a Good status: NaN, the server's status (documented)
NOT_NUMBERS = ["string", "array", "empty_array", "null", "bytes", "datetime", "guid", "text", "long_string"]
STATUSES = [0x40000000, 0x80000000, 0x808C0000, 0x00300000, 0xC0000000, 0x40940000]


class Sink:
    def __init__(self, cfg) -> None:
        self.keys = [m.key for m in cfg.tags]
        self.rows: list[tuple[float, str, float, int, object]] = []

    async def put(self, b) -> None:
        now = time.monotonic()
        text = b.text if b.text is not None else [None] * len(b)
        for t, v, q, s in zip(b.tags.tolist(), b.values.tolist(), b.quality.tolist(), list(text), strict=True):
            self.rows.append((now, self.keys[t], v, q, s))

    async def flush(self) -> None:
        return None

    def last(self, key: str, since: float) -> tuple[float, str, float, int, object] | None:
        rows = [r for r in self.rows if r[1] == key and r[0] >= since]
        return rows[-1] if rows else None


class OddPeer:
    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "opcua_odd_peer.py"), str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self._line(30) == "READY"

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise TimeoutError("the OPC UA peer did not answer")
        return self.proc.stdout.readline().strip()

    def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        assert self._line(10) == "ok"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OPCUA = """
[gateway]
id = "gw1"
data_dir = "data"
log_level = "error"
[[devices]]
name = "plc"
protocol = "opcua"
endpoint = "opc.tcp://127.0.0.1:{port}/"
security_mode = "None"
mode = "{mode}"
poll_interval = "100ms"
publishing_interval = "50ms"
keepalive_count = 40
tags = [
  {{ name = "x", node = "ns=2;s=x" }},
  {{ name = "s", node = "ns=2;s=s", type = "string" }},
]
"""


async def _settle(sink: Sink, key: str, since: float, pred, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = sink.last(key, since)
        if r is not None and pred(r):
            return r
        await asyncio.sleep(0.05)
    return sink.last(key, since)


def trusted_wrongly(kind: str, row) -> bool:
    """The sample for odd value `kind` claims a Good number it should not."""
    _, _, v, q, _ = row
    if q != Quality.GOOD:
        return False
    if kind in NUMERIC_OK:
        return not (v == NUMERIC_OK[kind] or math.isclose(v, NUMERIC_OK[kind], rel_tol=1e-6))
    if kind in NUMERIC_SPECIAL:
        return not (math.isnan(v) or math.isinf(v))
    return True  # not a number, yet Good


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_opcua_odd_types_and_statuses(tmp_path, mode):
    port = _free_port()
    peer = OddPeer(port)
    cfg_path = tmp_path / "edgeos.toml"
    cfg_path.write_text(OPCUA.format(port=port, mode=mode))
    cfg = load_config(cfg_path)
    sink = Sink(cfg)
    rt = Runtime(cfg, sinks=[sink])
    task = asyncio.create_task(rt.run(), name="runtime")
    seen: dict[str, tuple] = {}
    try:
        async with asyncio.timeout(90):
            await rt.running.wait()
            assert await _settle(sink, "plc/x", 0, lambda r: r[3] == Quality.GOOD and r[2] == 1.5, 20)
            kinds = [*NUMERIC_OK, *NUMERIC_SPECIAL, *NOT_NUMBERS]
            statuses = STATUSES
            if mode == "poll":  # the same conversion as subscribe; a subset keeps the suite's time
                kinds, statuses = ["bool", "null", "string", "array", "bytes"], STATUSES[:2]
            for k, kind in enumerate(kinds):
                t0 = time.monotonic()
                peer.command(f"odd x {kind}")
                before = float(k + 1) if k else 1.5  # the Good value set last
                seen[kind] = await _settle(sink, "plc/x", t0, lambda r, b=before: r[3] != Quality.GOOD or r[2] != b, 3)
                good = float(k + 2)
                t1 = time.monotonic()
                peer.command(f"good x {good}")
                back = await _settle(sink, "plc/x", t1, lambda r, g=good: r[3] == Quality.GOOD and r[2] == g)
                assert back and back[2] == good, f"no Good value after {kind}: {back}"
            for k, code in enumerate(statuses):
                peer.command(f"good x {100 + k}")  # a status on a real value
                await asyncio.sleep(0.2)
                t0 = time.monotonic()
                peer.command(f"status x {code:#x}")
                r = await _settle(sink, "plc/x", t0, lambda r, c=code: r[3] == c)
                assert r is not None and r[3] == code, f"status {code:#x} arrived as {r}; seen {seen}"
            t0 = time.monotonic()
            peer.command("odd s bytes")
            peer.command("odd s long_string")
            peer.command("good s fine")
            r = await _settle(sink, "plc/s", t0, lambda r: r[3] == Quality.GOOD and r[4] == "fine")
            assert r is not None and r[4] == "fine"
            assert not task.done()
    finally:
        rt.stop()
        await asyncio.wait_for(task, 30)
        peer.stop()
    wrong = {k: r for k, r in seen.items() if r is not None and trusted_wrongly(k, r)}
    qualities = {k: (hex(r[3]) if r else None) for k, r in seen.items()}
    print(f"faults.opcua_odd.{mode}: {len(seen)} odd values, wrongly trusted {len(wrong)}; qualities {qualities}")
    assert not wrong, wrong
    # Negative control: the check must flag a Good sample that carries a string's place.
    assert trusted_wrongly("string", (0.0, "plc/x", 12.5, int(Quality.GOOD), None))


# -- serial noise at line rate -------------------------------------------------------------------

SERIAL = """
[gateway]
id = "gw1"
data_dir = "data"
log_level = "error"
[[devices]]
name = "scale"
protocol = "serial"
port = "{port}"
baudrate = 115200
terminator = "LF"
max_frame = 64
checksum = "sum8"
checksum_gap = 1
pattern = '^W,(?P<w>-?\\d+\\.\\d+),(?P<k>\\d+)$'
tags = [{{ name = "w" }}, {{ name = "k", type = "integer" }}]
"""


def _frame(k: int) -> bytes:
    text = f"W,{k * 0.25:.2f},{k}".encode()
    return text + b"*" + f"{sum(text) & 0xFF:02X}".encode() + b"\n"


async def test_serial_noise_at_line_rate(tmp_path):
    import shutil

    if shutil.which("socat") is None:
        raise AssertionError("socat is required (scripts/setup --test installs it)")
    a, b = tmp_path / "ttyA", tmp_path / "ttyB"
    socat = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited
        ["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if a.exists() and b.exists():
                break
            await asyncio.sleep(0.05)
        cfg_path = tmp_path / "edgeos.toml"
        cfg_path.write_text(SERIAL.format(port=b))
        cfg = load_config(cfg_path)
        sink = Sink(cfg)
        rt = Runtime(cfg, sinks=[sink])
        task = asyncio.create_task(rt.run(), name="runtime")
        rng = random.Random(28)
        fd = os.open(a, os.O_WRONLY | os.O_NOCTTY)
        sent_frames = 0
        noise_bytes = 0
        try:
            async with asyncio.timeout(60):
                await rt.running.wait()
                await asyncio.sleep(0.3)
                # 3 s at 11.5 kB/s: noise in bursts of up to 200 bytes, a valid frame between them.
                rate = 11_520
                end = time.monotonic() + 3.0
                k = 0
                while time.monotonic() < end:
                    chunk = bytearray(rng.randbytes(rng.randint(1, 200)))
                    noise_bytes += len(chunk)
                    chunk += b"\n" + _frame(k)
                    os.write(fd, bytes(chunk))
                    sent_frames += 1
                    k += 1
                    await asyncio.sleep(len(chunk) / rate)
                await asyncio.sleep(0.5)
                health = rt.status()
        finally:
            os.close(fd)
            rt.stop()
            await asyncio.wait_for(task, 30)
    finally:
        socat.kill()
        socat.wait(10)
    good_k = [r for r in sink.rows if r[1] == "scale/k" and r[3] == Quality.GOOD]
    bad = [r for r in sink.rows if r[3] != Quality.GOOD]
    wrong = wrong_serial(sink.rows, sent_frames)
    print(
        f"faults.serial_noise: {noise_bytes} noise bytes + {sent_frames} frames in 3 s; "
        f"{len(good_k)} frames read Good ({len(good_k) / sent_frames:.0%}), {len(bad)} Bad samples, wrong {len(wrong)}"
    )
    assert not wrong, wrong[:5]
    # Most valid frames survive the noise before them (a noise burst that ends without its own
    # terminator glues onto the next frame: that frame is lost, as Bad, never read wrong).
    assert len(good_k) >= sent_frames * 0.5
    assert health is not None
    # Negative control: a frame the noise happened to complete ("W,1.00,99999") must be flagged.
    assert wrong_serial([(0.0, "scale/k", 99999.0, int(Quality.GOOD), None)], sent_frames)


def wrong_serial(rows, sent_frames: int) -> list:
    """Good samples that no sent frame carried: k out of range, or w not k's weight."""
    good_k = [r for r in rows if r[1] == "scale/k" and r[3] == Quality.GOOD]
    good_w = [r for r in rows if r[1] == "scale/w" and r[3] == Quality.GOOD]
    wrong = [r for r in good_k if not (0 <= r[2] < sent_frames and r[2] == int(r[2]))]
    by_k = {int(r[2]) for r in good_k}
    return wrong + [r for r in good_w if round(r[2] / 0.25) not in by_k]
