"""Modbus TCP as other vendors' devices behave, checked against the documents alone.

A small Modbus TCP server written here from raw sockets (Modbus Application Protocol v1.1b3,
Modbus Messaging on TCP/IP v1.0b) runs in a separate process with several listeners on random
127.0.0.1 ports, each with its own register contents and quirks (exceptions, slowness, closing
after each answer, wrong transaction ids, wrong byte counts, one connection only). The real
daemon (`edgeos run -c CONFIG`) polls all of them at once; what it stored is read back with the
documented CLI (`edgeos tags`, `edgeos query`, `edgeos export`, `edgeos status --json`) and
what the server received is logged per request (MBAP header, function code, address, count).

Documents: README.md, docs/config.md, docs/model.md, docs/store.md, protocols/modbus/README.md.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

EDGEOS = str(Path(sys.executable).parent / "edgeos")
RUN_AFTER_FIRST_SAMPLES = 6.0  # seconds the daemon keeps polling once every device has samples

# -- the server (runs in a child process) ----------------------------------------------------

# Register / bit contents a unit serves unless its spec overrides an address.
DEFAULTS = {
    "hr": lambda a: (a + 1000) & 0xFFFF,
    "ir": lambda a: (a + 2000) & 0xFFFF,
    "coil": lambda a: int(a % 3 == 0),
    "di": lambda a: int(a % 5 == 0),
}
TABLE_OF_FC = {1: "coil", 2: "di", 3: "hr", 4: "ir"}
TABLE_SIZE = 10000  # every table implements addresses 0..9999


def _recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _answer(spec, unit_spec, busy_left, unit, fc, body):
    """The PDU a device per the Modbus Application Protocol spec answers, with the spec's quirks."""

    def exc(code):
        return bytes([fc | 0x80, code])

    if unit_spec.get("exception"):
        return exc(unit_spec["exception"])
    if busy_left.get(unit, 0) > 0:
        busy_left[unit] -= 1
        return exc(0x06)
    if fc not in TABLE_OF_FC:
        return exc(0x01)
    if len(body) != 4:
        return exc(0x03)
    addr, count = struct.unpack(">HH", body)
    table = TABLE_OF_FC[fc]
    limit = 2000 if table in ("coil", "di") else 125
    if not 1 <= count <= limit:
        return exc(0x03)
    if addr + count > TABLE_SIZE:
        return exc(0x02)
    illegal = unit_spec.get("illegal", {}).get(table, ())
    if any(addr <= a < addr + count for a in illegal):
        return exc(0x02)
    over = unit_spec.get(table, {})
    values = [over.get(a, DEFAULTS[table](a)) for a in range(addr, addr + count)]
    if table in ("coil", "di"):
        data = bytearray((count + 7) // 8)
        for i, v in enumerate(values):
            if v:
                data[i // 8] |= 1 << (i % 8)
        return bytes([fc, len(data)]) + bytes(data)
    quirk = spec.get("bytecount")
    if quirk == "short":
        values = values[:-1]
    elif quirk == "long":
        values = [*values, 0x5A5A]
    data = b"".join(struct.pack(">H", v) for v in values)
    return bytes([fc, len(data)]) + data


def _serve_connection(sock, spec, state, log, conn_id):
    try:
        while True:
            head = _recv_exact(sock, 7)
            if head is None:
                return
            tid, proto, length, unit = struct.unpack(">HHHB", head)
            pdu = _recv_exact(sock, length - 1) if length > 1 else b""
            if pdu is None:
                return
            fc = pdu[0] if pdu else -1
            rec = {"l": spec["name"], "c": conn_id, "t": time.monotonic(), "tid": tid, "proto": proto}
            rec.update({"len": length, "unit": unit, "fc": fc})
            if fc in TABLE_OF_FC and len(pdu) == 5:
                rec["addr"], rec["count"] = struct.unpack(">HH", pdu[1:5])
            log(rec)
            unit_spec = spec["units"].get(unit)
            if unit_spec is None:
                continue  # no such unit here: a TCP device answers nothing
            if spec.get("delay"):
                time.sleep(spec["delay"])
            answer = _answer(spec, unit_spec, state["busy_left"], unit, fc, pdu[1:])
            mode = spec.get("tid", "echo")
            rtid = {"echo": tid, "plus1": (tid + 1) & 0xFFFF or 1, "zero": 0}[mode]
            sock.sendall(struct.pack(">HHHB", rtid, 0, len(answer) + 1, unit) + answer)
            if spec.get("close_after_answer"):
                return
    except OSError:
        return
    finally:
        with state["lock"]:
            state["active"] -= 1
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def _accept_loop(srv, spec, log):
    state = {"active": 0, "lock": threading.Lock(), "busy_left": dict(spec.get("busy_first", {}))}
    n = 0
    while True:
        try:
            sock, _ = srv.accept()
        except OSError:
            return
        n += 1
        with state["lock"]:
            refuse = spec.get("single") and state["active"] >= 1
            if not refuse:
                state["active"] += 1
        if refuse:  # an embedded device with one connection slot: others are closed at once
            log({"l": spec["name"], "event": "rejected", "c": n, "t": time.monotonic()})
            sock.close()
            continue
        log({"l": spec["name"], "event": "accepted", "c": n, "t": time.monotonic()})
        threading.Thread(target=_serve_connection, args=(sock, spec, state, log, n), daemon=True).start()


def _server_main(specs, log_path, pipe):
    lock = threading.Lock()
    out = open(log_path, "a")  # noqa: SIM115 - lives as long as the process

    def log(rec):
        with lock:
            out.write(json.dumps(rec) + "\n")
            out.flush()

    ports = {}
    for spec in specs:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        ports[spec["name"]] = srv.getsockname()[1]
        threading.Thread(target=_accept_loop, args=(srv, spec, log), daemon=True).start()
    pipe.send(ports)
    pipe.recv()  # until told to stop (or terminated)


# -- what the devices hold ---------------------------------------------------------------------


def regs(fmt, value):
    """Big-endian (ABCD) registers of a value, as a vendor's manual lays them out."""
    raw = struct.pack(">" + fmt, value)
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def swap_bytes(rs):
    return [((r & 0xFF) << 8) | (r >> 8) for r in rs]


def place(table, start, values):
    table.update({start + i: v for i, v in enumerate(values)})


TYPES_HR: dict[int, int] = {}
place(TYPES_HR, 0, [0xFFFE, 0xFFFE])
place(TYPES_HR, 2, regs("i", -123456789))  # int32 ABCD
place(TYPES_HR, 4, regs("I", 3000000000)[::-1])  # uint32 CDAB (word swap)
place(TYPES_HR, 6, regs("f", 123.456))  # float32 ABCD
place(TYPES_HR, 8, regs("f", -0.15625)[::-1])  # float32 CDAB
place(TYPES_HR, 10, swap_bytes(regs("f", 25.5)))  # float32 BADC
place(TYPES_HR, 12, swap_bytes(regs("f", 3.14159)[::-1]))  # float32 DCBA (little-endian)
place(TYPES_HR, 14, regs("d", 1234.5678))  # float64 ABCD
place(TYPES_HR, 18, regs("d", -98765.4321)[::-1])  # float64 CDAB: register order reversed
place(TYPES_HR, 22, regs("q", -1234567890123))  # int64 ABCD
place(TYPES_HR, 26, regs("Q", 2**53))  # uint64 ABCD
place(TYPES_HR, 30, swap_bytes(regs("q", -5)[::-1]))  # int64 DCBA
place(TYPES_HR, 34, regs("8s", b"PUMP-7\x00\x00"))  # string, high byte first
place(TYPES_HR, 38, swap_bytes(regs("8s", b"Line 3  ")))  # string BADC, trailing spaces
place(TYPES_HR, 42, [(0x85 << 8) | 0xC8])  # int8 high = -123, uint8 low = 200
place(TYPES_HR, 43, [0x8008])  # bits 3 and 15 set
place(TYPES_HR, 44, regs("h", -1234))  # int16, scale 0.01
place(TYPES_HR, 45, [500])  # uint16, scale 0.1, offset -40
place(TYPES_HR, 46, regs("e", 1.5))  # float16
place(TYPES_HR, 47, swap_bytes([0x1234]))  # uint16 BADC
place(TYPES_HR, 100, [4242])  # six-digit Modicon 400101
TYPES_IR: dict[int, int] = {0: 1111}
place(TYPES_IR, 1, regs("h", -300))
place(TYPES_IR, 2, regs("f", 9.75))
TYPES_COIL = {0: 1, 1: 0, 2: 1, 9: 1, 10: 0}
TYPES_DI = {0: 0, 1: 1, 2: 1, 7: 1, 8: 1}
TYPES_UNIT = {"hr": TYPES_HR, "ir": TYPES_IR, "coil": TYPES_COIL, "di": TYPES_DI}

# (name, address, extra keys, expected value as `edgeos tags --format json` shows it)
TYPE_TAGS = [
    ("u16", "40001", {"type": "uint16"}, 65534),
    ("i16", "hr1", {"type": "int16"}, -2),
    ("i32", "hr2", {"type": "int32"}, -123456789),
    ("u32_cdab", "hr4", {"type": "uint32", "byte_order": "CDAB"}, 3000000000),
    ("f32", "hr6", {"type": "float32"}, 123.456),
    ("f32_cdab", "hr8", {"type": "float32", "byte_order": "CDAB"}, -0.15625),
    ("f32_badc", "hr10", {"type": "float32", "byte_order": "BADC"}, 25.5),
    ("f32_dcba", "hr12", {"type": "float32", "byte_order": "DCBA"}, 3.14159),
    ("f64", "hr14", {"type": "float64"}, 1234.5678),
    ("f64_cdab", "hr18", {"type": "float64", "byte_order": "CDAB"}, -98765.4321),
    ("i64", "hr22", {"type": "int64"}, -1234567890123),
    ("u64", "hr26", {"type": "uint64"}, 2**53),
    ("i64_dcba", "hr30", {"type": "int64", "byte_order": "DCBA"}, -5),
    ("text", "hr34", {"type": "string", "length": 8}, "PUMP-7"),
    ("text_badc", "hr38", {"type": "string", "length": 8, "byte_order": "BADC"}, "Line 3"),
    ("hi_i8", "hr42", {"type": "int8", "byte": "high"}, -123),
    ("lo_u8", "hr42", {"type": "uint8"}, 200),
    ("bit3", "40044.3", {}, True),
    ("bit15", "hr43.15", {}, True),
    ("bit0", "hr43.0", {}, False),
    ("scaled", "hr44", {"type": "int16", "scale": 0.01}, -12.34),
    ("scaled_off", "hr45", {"type": "uint16", "scale": 0.1, "offset": -40.0}, 10.0),
    ("f16", "hr46", {"type": "float16"}, 1.5),
    ("u16_badc", "hr47", {"type": "uint16", "byte_order": "BADC"}, 0x1234),
    ("six_digit", "400101", {}, 4242),
    ("ir_u16", "ir0", {}, 1111),
    ("ir_i16", "30002", {"type": "int16"}, -300),
    ("ir_f32", "30003", {"type": "float32"}, 9.75),
    ("coil0", "coil0", {}, True),
    ("coil1", "co1", {}, False),
    ("coil2", "00003", {}, True),
    ("coil9", "00010", {}, True),
    ("coil10", "coil10", {}, False),
    ("di0", "di0", {}, False),
    ("di1", "discrete_1", {}, True),
    ("di2", "10003", {}, True),
    ("di7", "di7", {}, True),
    ("di8", "di8", {}, True),
]

LIMIT_HR = list(range(0, 300, 7))
LIMIT_IR = list(range(0, 260, 13))
LIMIT_COIL = list(range(0, 4200, 150))
LIMIT_DI = list(range(0, 2600, 250))
SMALL_HR = list(range(0, 41, 4))
SMALL_COIL = list(range(0, 41, 5))

SPECS = [
    {"name": "types", "units": {1: TYPES_UNIT, 2: TYPES_UNIT}},
    {"name": "limits", "units": {1: {}, 2: {}}},
    {"name": "mbap", "units": {17: {}}},
    {
        "name": "gateway",
        "units": {1: {}, 2: {"exception": 0x0B}, 3: {"illegal": {"hr": [5]}}, 4: {}, 5: {"exception": 0x06}},
        "busy_first": {4: 1},
    },
    {"name": "slow_ok", "units": {1: {}}, "delay": 0.25},
    {"name": "slow_to", "units": {1: {}}, "delay": 1.0},
    {"name": "closer", "units": {1: {}}, "close_after_answer": True},
    {"name": "badtid", "units": {1: {}}, "tid": "plus1"},
    {"name": "zero_def", "units": {1: {}}, "tid": "zero"},
    {"name": "zero_ok", "units": {1: {}}, "tid": "zero"},
    {"name": "short", "units": {1: {}}, "bytecount": "short"},
    {"name": "long", "units": {1: {}}, "bytecount": "long"},
    {"name": "single", "units": {1: {}, 2: {}}, "single": True},
]


def _toml_value(v):
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


def _device(name, port, unit, tags, **keys):
    lines = [
        "[[devices]]",
        f'name = "{name}"',
        'protocol = "modbus"',
        'host = "127.0.0.1"',
        f"port = {port}",
        f"unit_id = {unit}",
        'reconnect_min = "100ms"',
        'reconnect_max = "500ms"',
    ]
    keys.setdefault("poll_interval", "200ms")
    lines += [f"{k} = {_toml_value(v)}" for k, v in keys.items()]
    for tname, addr, extra in tags:
        lines += ["  [[devices.tags]]", f'  name = "{tname}"', f'  address = "{addr}"']
        lines += [f"  {k} = {_toml_value(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def _hr0():
    return [("v", "hr0", {})]


def _config(tmp, ports):
    p = ports
    parts = [
        textwrap.dedent(f"""\
        [gateway]
        id = "vendor-gw"
        data_dir = "{tmp / "data"}"
        run_dir = "{tmp / "run"}"

        [http]
        enabled = false

        """)
    ]
    parts.append(_device("types", p["types"], 1, [(n, a, e) for n, a, e, _ in TYPE_TAGS], poll_interval="300ms"))
    parts.append(
        _device("based", p["types"], 2, [("w0", "hr1", {}), ("f", "hr7", {"type": "float32"})], address_base=1)
    )
    limit_tags = (
        [(f"hr{a}", f"hr{a}", {}) for a in LIMIT_HR]
        + [(f"ir{a}", f"ir{a}", {}) for a in LIMIT_IR]
        + [(f"coil{a}", f"coil{a}", {}) for a in LIMIT_COIL]
        + [(f"di{a}", f"di{a}", {}) for a in LIMIT_DI]
    )
    parts.append(_device("limits", p["limits"], 1, limit_tags, poll_interval="500ms"))
    small_tags = [(f"hr{a}", f"hr{a}", {}) for a in SMALL_HR] + [(f"coil{a}", f"coil{a}", {}) for a in SMALL_COIL]
    parts.append(_device("small", p["limits"], 2, small_tags, poll_interval="500ms", max_registers=10, max_bits=16))
    parts.append(_device("mbap", p["mbap"], 17, [("v", "hr0", {}), ("w", "hr3", {})]))
    parts.append(_device("gw1", p["gateway"], 1, [("a", "hr0", {}), ("b", "hr1", {})]))
    parts.append(_device("gw2", p["gateway"], 2, _hr0()))
    parts.append(_device("gw3", p["gateway"], 3, [("r4", "hr4", {}), ("r5", "hr5", {}), ("r6", "hr6", {})]))
    parts.append(_device("gw4", p["gateway"], 4, _hr0()))
    parts.append(_device("gw5", p["gateway"], 5, _hr0()))
    parts.append(_device("slow_ok", p["slow_ok"], 1, _hr0(), poll_interval="500ms"))
    parts.append(_device("slow_to", p["slow_to"], 1, _hr0(), timeout="300ms", retries=0, poll_interval="500ms"))
    parts.append(_device("closer", p["closer"], 1, _hr0()))
    parts.append(_device("badtid", p["badtid"], 1, _hr0()))
    parts.append(_device("zero_def", p["zero_def"], 1, _hr0()))
    parts.append(_device("zero_ok", p["zero_ok"], 1, _hr0(), zero_transaction_id=True))
    parts.append(_device("short", p["short"], 1, [("a", "hr0", {}), ("b", "hr1", {})]))
    parts.append(_device("long", p["long"], 1, [("a", "hr0", {}), ("b", "hr1", {})]))
    parts.append(_device("single1", p["single"], 1, _hr0()))
    parts.append(_device("single2", p["single"], 2, _hr0()))
    cfg = tmp / "edgeos.toml"
    cfg.write_text("\n".join(parts))
    return cfg


def _cli(*args, timeout=30):
    r = subprocess.run([EDGEOS, *args], capture_output=True, text=True, timeout=timeout, cwd="/tmp")
    return r


def _status(cfg):
    r = _cli("status", "--json", "-c", str(cfg))
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError:
        return None


class Plant:
    pass


@pytest.fixture(scope="module")
def plant(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vendor")
    log_path = tmp / "server.jsonl"
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_server_main, args=(SPECS, str(log_path), child), daemon=True)
    server.start()
    daemon = None
    try:
        assert parent.poll(10), "the Modbus server did not start"
        ports = parent.recv()
        cfg = _config(tmp, ports)
        out = open(tmp / "daemon.log", "wb")  # noqa: SIM115
        daemon = subprocess.Popen(
            [EDGEOS, "run", "-c", str(cfg), "--log-format", "text"], stdout=out, stderr=subprocess.STDOUT, cwd="/tmp"
        )
        deadline = time.monotonic() + 20
        status = None
        while time.monotonic() < deadline:
            assert daemon.poll() is None, (tmp / "daemon.log").read_text()
            status = _status(cfg)
            devs = (status or {}).get("devices") or {}
            if devs and all(d.get("samples", 0) > 0 for d in devs.values()):
                break
            time.sleep(0.5)
        time.sleep(RUN_AFTER_FIRST_SAMPLES)
        status = _status(cfg)
        daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(timeout=20)
        out.close()
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=10)
        if server.is_alive():
            parent.send("stop")
        server.join(3)
        if server.is_alive():
            server.terminate()
            server.join(5)
    p = Plant()
    p.cfg, p.ports, p.status, p.rc = cfg, ports, status, rc
    p.daemon_log = (tmp / "daemon.log").read_text(errors="replace")
    p.log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    r = _cli("tags", "--format", "json", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    p.tags = {d["tag"]: d for d in (json.loads(line) for line in r.stdout.splitlines() if line.strip())}
    r = _cli("export", "--since", "1h", "-o", "-", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    p.samples = {}
    for row in csv.DictReader(io.StringIO(r.stdout)):
        p.samples.setdefault(row["tag"], []).append(row)
    return p


def requests_of(plant, listener, unit=None):
    return [r for r in plant.log if r["l"] == listener and "fc" in r and (unit is None or r["unit"] == unit)]


def qualities(plant, tag):
    return [s["quality"] for s in plant.samples.get(tag, [])]


def describe(plant, tag):
    return f"{tag}: last={plant.tags.get(tag)} qualities={qualities(plant, tag)[-12:]}"


# -- the tests ---------------------------------------------------------------------------------


def test_daemon_ran_and_stopped_cleanly(plant):
    assert plant.rc == 0, plant.daemon_log[-3000:]
    assert plant.status is not None and plant.status["running"] is True


@pytest.mark.parametrize(("name", "expected"), [(t[0], t[3]) for t in TYPE_TAGS], ids=[t[0] for t in TYPE_TAGS])
def test_every_type_and_byte_order_decodes_as_the_vendor_documents(plant, name, expected):
    tag = plant.tags.get(f"types/{name}")
    assert tag is not None, f"types/{name} not stored; tags: {sorted(plant.tags)[:10]}"
    assert tag["quality"] == "GOOD", describe(plant, f"types/{name}")
    if isinstance(expected, str):
        assert tag["value"] == expected
    elif isinstance(expected, bool):
        # README: booleans as true/false
        assert tag["value"] is expected
    else:
        assert tag["value"] == expected
    # every sample of the run decodes to the same value and is Good
    rows = plant.samples[f"types/{name}"]
    assert all(r["quality"] == "GOOD" for r in rows), qualities(plant, f"types/{name}")


def test_export_values_are_exact(plant):
    """README: export writes values exact (full float64 precision; booleans 0.0/1.0)."""
    last = {t: rows[-1]["value"] for t, rows in plant.samples.items()}
    assert float(last["types/u64"]) == 2**53
    assert float(last["types/i64"]) == -1234567890123
    assert float(last["types/f64"]) == 1234.5678
    assert float(last["types/f32"]) == struct.unpack(">f", struct.pack(">f", 123.456))[0]
    assert float(last["types/scaled"]) == pytest.approx(-12.34, abs=1e-12)
    assert last["types/coil0"] in ("1.0", "1")
    assert last["types/coil1"] in ("0.0", "0")
    assert last["types/text"] == "PUMP-7"


def test_address_base_1_shifts_prefixed_addresses(plant):
    """README: with address_base = 1, `hr1` is wire address 0."""
    assert plant.tags["based/w0"]["value"] == 65534, describe(plant, "based/w0")
    assert plant.tags["based/f"]["value"] == 123.456, describe(plant, "based/f")
    addrs = {(r["fc"], r["addr"]) for r in requests_of(plant, "types", 2)}
    assert all(a == 0 for fc, a in addrs if fc == 3), addrs


def test_input_and_holding_registers_use_their_own_function_codes(plant):
    reqs = requests_of(plant, "types", 1)
    fcs = {r["fc"] for r in reqs}
    assert fcs == {1, 2, 3, 4}, fcs
    ir = [r for r in reqs if r["fc"] == 4]
    assert all(r["addr"] <= 0 and r["addr"] + r["count"] >= 4 for r in ir), ir[:3]


def fewest_requests(addrs, limit):
    """Fewest reads of at most `limit` addresses covering every address (greedy is optimal)."""
    n, end = 0, -1
    for a in sorted(addrs):
        if a >= end:
            n, end = n + 1, a + limit
    return n


def test_requests_stay_within_spec_limits_and_are_fewest(plant):
    """Spec: 1..125 registers (FC 3/4), 1..2000 bits (FC 1/2) per request; README: on TCP the
    plan has the fewest requests possible."""
    reqs = [r for r in plant.log if "count" in r]
    assert reqs
    for r in reqs:
        limit = 2000 if r["fc"] in (1, 2) else 125
        assert 1 <= r["count"] <= limit, r
    lim = requests_of(plant, "limits", 1)
    by_fc = {fc: {(r["addr"], r["count"]) for r in lim if r["fc"] == fc} for fc in (1, 2, 3, 4)}
    # every tag is covered and the plan uses the fewest requests: ceil(span / limit)
    for fc, addrs, limit in ((3, LIMIT_HR, 125), (4, LIMIT_IR, 125), (1, LIMIT_COIL, 2000), (2, LIMIT_DI, 2000)):
        plan = by_fc[fc]
        for a in addrs:
            assert any(s <= a < s + n for s, n in plan), (fc, a, sorted(plan))
        assert len(plan) == fewest_requests(addrs, limit), (fc, sorted(plan))
    for a in LIMIT_HR:
        assert plant.tags[f"limits/hr{a}"]["value"] == a + 1000
    for a in LIMIT_COIL:
        assert plant.tags[f"limits/coil{a}"]["value"] is (a % 3 == 0)
    for a in LIMIT_DI:
        assert plant.tags[f"limits/di{a}"]["value"] is (a % 5 == 0)


def test_max_registers_and_max_bits_are_respected(plant):
    small = requests_of(plant, "limits", 2)
    assert small
    for r in small:
        assert r["count"] <= (16 if r["fc"] in (1, 2) else 10), r
    for a in SMALL_HR:
        assert plant.tags[f"small/hr{a}"]["value"] == a + 1000, describe(plant, f"small/hr{a}")
    for a in SMALL_COIL:
        assert plant.tags[f"small/coil{a}"]["value"] is (a % 3 == 0)


def test_mbap_header_is_correct(plant):
    """Messaging on TCP/IP: protocol id 0, length = unit id + PDU, the configured unit id;
    README: edgeos never sends transaction id 0."""
    reqs = [r for r in plant.log if "fc" in r]
    assert reqs
    for r in reqs:
        assert r["proto"] == 0, r
        assert r["tid"] != 0, r
        if r["fc"] in (1, 2, 3, 4):
            assert r["len"] == 6, r
    mb = requests_of(plant, "mbap")
    assert mb and {r["unit"] for r in mb} == {17}
    assert plant.tags["mbap/v"]["value"] == 1000 and plant.tags["mbap/w"]["value"] == 1003
    # on one connection, requests in a row never reuse the previous transaction id
    by_conn = {}
    for r in reqs:
        by_conn.setdefault((r["l"], r["c"]), []).append(r["tid"])
    for key, tids in by_conn.items():
        assert all(a != b for a, b in zip(tids, tids[1:], strict=False)), (key, tids[:10])


def test_illegal_address_isolates_the_refused_tag(plant):
    """README: exception 2 → split; only the refused tag is BAD_DEVICE_FAILURE, neighbours Good,
    the held tag is not asked again before retry_refused (1m) and not bridged."""
    assert plant.tags["gw3/r4"]["value"] == 1004 and plant.tags["gw3/r4"]["quality"] == "GOOD"
    assert plant.tags["gw3/r6"]["value"] == 1006 and plant.tags["gw3/r6"]["quality"] == "GOOD"
    assert plant.tags["gw3/r5"]["quality"] == "BAD_DEVICE_FAILURE", describe(plant, "gw3/r5")
    assert set(qualities(plant, "gw3/r5")) == {"BAD_DEVICE_FAILURE"}
    assert set(qualities(plant, "gw3/r4")) == {"GOOD"}, describe(plant, "gw3/r4")
    reqs = requests_of(plant, "gateway", 3)
    t0 = reqs[0]["t"]
    late = [r for r in reqs if r["t"] > t0 + 3 and r["addr"] <= 5 < r["addr"] + r["count"]]
    assert not late, late[:3]
    refused = plant.status["devices"]["gw3"]["health"].get("refused_tags")
    assert refused, plant.status["devices"]["gw3"]["health"]
    assert plant.status["devices"]["gw3"]["up"] is True


def test_busy_once_is_resent_and_good(plant):
    """README: busy → re-sent up to `retries` times, 50 ms apart."""
    reqs = requests_of(plant, "gateway", 4)
    assert len(reqs) >= 2
    first, second = reqs[0], reqs[1]
    assert (first["fc"], first["addr"], first["count"]) == (second["fc"], second["addr"], second["count"])
    assert 0.03 <= second["t"] - first["t"] <= 0.5, second["t"] - first["t"]
    assert set(qualities(plant, "gw4/v")) == {"GOOD"}, describe(plant, "gw4/v")
    assert plant.tags["gw4/v"]["value"] == 1000


def test_always_busy_is_bad_device_failure_and_resent(plant):
    """docs/model.md: BAD_DEVICE_FAILURE: the device answered with an exception. Ambiguity:
    protocols/modbus/README.md does not name the final quality after busy re-sends."""
    q = qualities(plant, "gw5/v")
    assert q and "GOOD" not in q
    assert plant.tags["gw5/v"]["quality"] == "BAD_DEVICE_FAILURE", describe(plant, "gw5/v")
    reqs = requests_of(plant, "gateway", 5)
    assert len(reqs) >= 4


def test_gateway_target_failed_is_comm_failure_and_others_keep_polling(plant):
    """README: exception 11 → BAD_COMM_FAILURE, the device is down while the gateway's
    connection stays up; other units on that connection keep polling."""
    q = qualities(plant, "gw2/v")
    assert q and "GOOD" not in q
    assert "BAD_COMM_FAILURE" in q, describe(plant, "gw2/v")
    assert plant.tags["gw2/v"]["quality"] == "BAD_COMM_FAILURE", describe(plant, "gw2/v")
    devs = plant.status["devices"]
    assert devs["gw2"]["up"] is False
    assert devs["gw1"]["up"] is True
    # unit 1 behind the same gateway: Good all along, polled at its 200 ms all the run
    q1 = qualities(plant, "gw1/a")
    assert set(q1) == {"GOOD"}, describe(plant, "gw1/a")
    assert len(q1) >= RUN_AFTER_FIRST_SAMPLES / 0.2 * 0.6, len(q1)
    accepted = [r for r in plant.log if r["l"] == "gateway" and r.get("event") == "accepted"]
    assert len(accepted) == 1, accepted


def test_slow_device_within_timeout_is_good(plant):
    q = qualities(plant, "slow_ok/v")
    assert q and set(q) == {"GOOD"}, describe(plant, "slow_ok/v")
    assert plant.tags["slow_ok/v"]["value"] == 1000


def test_device_slower_than_timeout_is_bad_timeout_and_never_good(plant):
    """README: no response within `timeout` → BAD_TIMEOUT; a late answer (other transaction id)
    is never turned into values."""
    q = qualities(plant, "slow_to/v")
    assert q and "GOOD" not in q, describe(plant, "slow_to/v")
    assert "BAD_TIMEOUT" in q, describe(plant, "slow_to/v")
    assert plant.status["devices"]["slow_to"]["up"] is False
    # the others kept their pace meanwhile
    assert len(qualities(plant, "closer/v")) + len(qualities(plant, "gw1/a")) > 20


def test_device_closing_after_each_answer_keeps_giving_values(plant):
    rows = plant.samples.get("closer/v", [])
    good = [r for r in rows if r["quality"] == "GOOD"]
    assert len(good) >= 3, describe(plant, "closer/v")
    assert all(float(r["value"]) == 1000 for r in good)
    accepted = [r for r in plant.log if r["l"] == "closer" and r.get("event") == "accepted"]
    assert len(accepted) >= 3
    bad = {r["quality"] for r in rows} - {"GOOD"}
    assert bad <= {"BAD_COMM_FAILURE"}, bad


def test_wrong_transaction_id_is_decoding_error_counted_and_reset(plant):
    q = qualities(plant, "badtid/v")
    assert q and "GOOD" not in q, describe(plant, "badtid/v")
    assert "BAD_DECODING_ERROR" in q, describe(plant, "badtid/v")
    health = plant.status["devices"]["badtid"]["health"]
    assert health.get("tid_mismatches", 0) > 0, health
    conns = [r for r in plant.log if r["l"] == "badtid" and r.get("event") == "accepted"]
    assert len(conns) >= 2  # the connection is reset before the next request


def test_transaction_id_zero_rejected_by_default_accepted_with_option(plant):
    q = qualities(plant, "zero_def/v")
    assert q and "GOOD" not in q and "BAD_DECODING_ERROR" in q, describe(plant, "zero_def/v")
    q = qualities(plant, "zero_ok/v")
    assert q and set(q) == {"GOOD"}, describe(plant, "zero_ok/v")
    assert plant.tags["zero_ok/v"]["value"] == 1000


@pytest.mark.parametrize("dev", ["short", "long"])
def test_wrong_byte_count_is_decoding_error(plant, dev):
    """README Faults: wrong length → BAD_DECODING_ERROR; never turned into values."""
    for t in ("a", "b"):
        q = qualities(plant, f"{dev}/{t}")
        assert q and "GOOD" not in q, describe(plant, f"{dev}/{t}")
        assert plant.tags[f"{dev}/{t}"]["quality"] == "BAD_DECODING_ERROR", describe(plant, f"{dev}/{t}")
    assert plant.status["devices"][dev]["up"] is True  # a device that answers Bad values is up


def test_server_with_one_connection_slot_serves_both_units(plant):
    """README: devices with the same endpoint share one connection."""
    for d in ("single1", "single2"):
        q = qualities(plant, f"{d}/v")
        assert q and set(q) == {"GOOD"}, describe(plant, f"{d}/v")
        assert plant.tags[f"{d}/v"]["value"] == 1000
    rejected = [r for r in plant.log if r["l"] == "single" and r.get("event") == "rejected"]
    assert not rejected, rejected
    units = {r["unit"] for r in requests_of(plant, "single")}
    assert units == {1, 2}


def test_query_shows_the_same_values(plant):
    r = _cli(
        "query", "types/f32", "types/text", "types/bit3", "--since", "1h", "--format", "json", "-c", str(plant.cfg)
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    vals = {row["tag"]: row["value"] for row in rows}
    assert vals == {"types/f32": 123.456, "types/text": "PUMP-7", "types/bit3": True}
