"""An OEM embeds and extends edgeos, from the documents alone.

docs/adapters.md (the adapter contract), docs/model.md, docs/filters.md ("Writing a filter
(OEMs)"), README.md ("Embedding (OEMs)") and examples/edgeos-sysfs. The test writes a
third-party package, `acme-edge` (protocols `acme` and `acme_poll`, filter `acme_hold`, plus a
module that fails to import and a plugin with a wrong default), and `zz-edge` (a second package
registering an `acme-edge` name), each with a hand-written `NAME-VERSION.dist-info` on
PYTHONPATH, then runs the real `edgeos check` / `run` / `export` / `tags` / `query`, and the
`Runtime` in-process.
"""

from __future__ import annotations

import asyncio
import csv
import inspect
import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import edgeos

BIN = Path(sys.executable).parent
EDGEOS = str(BIN / "edgeos")

PLUGIN_SRC = r'''
"""acme-edge: an OEM's protocol adapters and filter for edgeos."""

import asyncio
import itertools
import json
import os
import time

import numpy as np

from edgeos import Answer, Batch, DeviceError, Field, PollingAdapter, Quality, ValueKind

EVENTS = []
QUEUES = {}
CONNECTS = {}
SERIAL = itertools.count(1)
KINDS = {"number": ValueKind.NUMBER, "bool": ValueKind.BOOL, "string": ValueKind.STRING}


def note(**event):
    EVENTS.append(event)
    path = os.environ.get("ACME_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(event) + "\n")


def queue(device):
    return QUEUES.setdefault(device, asyncio.Queue())


class AcmeAdapter:
    def __init__(self, device):
        self.device = device
        self.opts = device.options
        self.ids = {t.name: t.id for t in device.tags}
        self.aid = next(SERIAL)
        self.swallowed = False
        note(ev="create", device=device.name, aid=self.aid, script=self.opts["script"])

    async def connect(self):
        name = self.device.name
        mode = self.opts["mode"]
        CONNECTS[name] = CONNECTS.get(name, 0) + 1
        note(ev="connect", device=name, aid=self.aid, t=time.monotonic())
        if mode == "connect_fails" or (mode == "run_fails" and CONNECTS[name] > 1):
            note(ev="connect_failed", device=name, aid=self.aid)
            raise DeviceError(name, "no route to the acme box", code="connect")

    def batch(self, step):
        ids = np.array([self.ids[n] for n in step["tags"]], np.int32)
        text = np.array(step["text"], dtype=object) if "text" in step else None
        return Batch(
            self.device.name,
            ids,
            np.array(step["ts"], np.int64),
            np.array([np.nan if v is None else v for v in step["values"]], np.float64),
            np.array(step["quality"], np.uint32),
            text,
        )

    def all_tags(self, value, device=None):
        ids = np.array(sorted(self.ids.values()), np.int32)
        n = len(ids)
        return Batch(device or self.device.name, ids, np.full(n, time.time_ns(), np.int64),
                     np.full(n, value), np.zeros(n, np.uint32))

    async def run(self, emit):
        mode = self.opts["mode"]
        name = self.device.name
        if mode == "script":
            with open(self.opts["script"]) as f:
                steps = json.load(f)
            for step in steps:
                await emit(self.batch(step), answer=Answer.YES)
            note(ev="script_done", device=name)
            await asyncio.Event().wait()
        elif mode == "queue":
            q = queue(name)
            while True:
                step = await q.get()
                if step == "raise":
                    note(ev="raising", device=name)
                    raise ConnectionResetError("the acme box went away")
                kw = {}
                if step.get("answer"):
                    kw["answer"] = Answer[step["answer"]]
                if "source" in step:
                    kw["source"] = step["source"]
                batch = Batch.empty(name) if step.get("empty") else self.batch(step)
                await emit(batch, **kw)
                note(ev="emitted", device=name)
        elif mode == "run_fails":
            await emit(self.all_tags(1.0), answer=Answer.YES)
            await asyncio.sleep(0.05)
            raise ConnectionResetError("the acme box dropped the line")
        elif mode == "wrong_device":
            try:
                await emit(self.all_tags(1.0, device="somebody_else"), answer=Answer.YES)
            except DeviceError as e:
                note(ev="emit_refused", device=name, code=e.code)
                raise
            note(ev="emit_accepted", device=name)
            await asyncio.Event().wait()
        elif mode == "flood":
            ids = np.array(sorted(self.ids.values()), np.int32)
            n = len(ids)
            k = 0
            while True:
                ts = 1_000_000_000_000_000_000 + (k * n + np.arange(n, dtype=np.int64)) * 1000
                b = Batch(name, ids, ts, np.full(n, float(k)), np.zeros(n, np.uint32))
                k += 1
                note(ev="emit_called", device=name, k=k)
                await emit(b, answer=Answer.YES)
        else:  # hang, close_hangs, ignores_cancel: a read that blocks
            note(ev="run", device=name)
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    note(ev="cancelled", device=name)
                    # ignores_cancel: drops one cancellation, as 3.11's wait_for can
                    if mode != "ignores_cancel" or self.swallowed:
                        raise
                    self.swallowed = True

    async def write(self, tag, value):
        note(ev="write", device=self.device.name, tag=tag.name, value=value)
        return value

    async def close(self):
        note(ev="close", device=self.device.name, aid=self.aid)
        if self.opts["mode"] == "close_hangs":
            await asyncio.sleep(3600)

    def health(self):
        return {"acme_requests": 7}


class AcmeProtocol:
    name = "acme"
    device_fields = {
        "mode": Field(
            "choice",
            "script",
            choices=("script", "queue", "connect_fails", "create_fails", "run_fails", "wrong_device",
                     "flood", "hang", "close_hangs", "ignores_cancel", "validate_bug"),
        ),
        "script": Field("path", "steps.json"),
        "station": Field("int", 1, min=1, max=247),
    }
    tag_fields = {
        "kind": Field("choice", "number", choices=("number", "bool", "string", "boom")),
        "register": Field("int", 0, min=0, max=65535),
    }

    def tag_kind(self, options):
        if options["kind"] == "boom":
            raise ZeroDivisionError("acme bug in tag_kind")
        return KINDS[options["kind"]]

    def validate(self, device, path, problems):
        if device.options["mode"] == "validate_bug":
            raise KeyError("acme bug in validate")
        seen = {}
        for i, t in enumerate(device.tags):
            r = t.options["register"]
            if r and r in seen:
                problems.add(f"{path}.tags[{i}].register", f"register {r} already used by tag {seen[r]!r}")
            seen.setdefault(r, t.name)

    def create(self, device):
        note(ev="create_called", device=device.name)
        if device.options["mode"] == "create_fails":
            raise RuntimeError("acme bug in create")
        return AcmeAdapter(device)

    def describe(self, device):
        return [f"acme station {device.options['station']}: {len(device.tags)} registers"]


class AcmePoll(PollingAdapter):
    async def read(self, group, now_ns):
        mode = self.device.options["mode"]
        ids = np.array([t.id for t in group.tags], np.int32)
        n = len(ids)
        if mode == "slow_read":
            note(ev="read_blocks", device=self.device.name)
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                note(ev="cancelled", device=self.device.name)
                raise
        if mode == "ok":
            return Batch(self.device.name, ids, np.full(n, now_ns, np.int64), np.full(n, 1.5),
                         np.zeros(n, np.uint32))
        return Batch(self.device.name, ids, np.full(n, now_ns, np.int64), np.full(n, np.nan),
                     np.full(n, Quality.BAD_TIMEOUT, np.uint32))

    async def close(self):
        note(ev="close", device=self.device.name)
        await super().close()

    def answer_of(self, group):
        return Answer.YES if self.device.options["mode"] == "bad_answered" else None


class AcmePollProtocol(AcmeProtocol):
    name = "acme_poll"
    device_fields = {"mode": Field("choice", "ok", choices=("ok", "timeout", "bad_answered", "slow_read"))}
    tag_fields = {"kind": Field("choice", "number", choices=("number",))}

    def validate(self, device, path, problems):
        pass

    def create(self, device):
        return AcmePoll(device)


class HoldFilter:
    """Per tag: value -> running sum x gain; with `hold`, each tag's latest sample is held back
    until its next one, or until flush() at a stop."""

    def __init__(self, n_tags, params):
        self.n_tags = n_tags
        self.sum = np.zeros(n_tags)
        self.gain = np.ones(n_tags)
        self.hold = np.ones(n_tags, bool)
        self.held = {}
        self.calls = 0
        self.fail_at = 0
        self.flush_fails = False
        for tag, p in params.items():
            self.gain[tag] = p["gain"]
            self.hold[tag] = p["hold"]
            self.fail_at = max(self.fail_at, p["fail_at"])
            self.flush_fails = self.flush_fails or p["flush_fails"]
        note(ev="filter_create", n_tags=n_tags, ids=sorted(int(k) for k in params))

    def apply(self, batch):
        self.calls += 1
        note(ev="apply", ids=sorted({int(t) for t in batch.tags}), n_tags=self.n_tags)
        if self.fail_at and self.calls == self.fail_at:
            raise ZeroDivisionError("acme_hold bug")
        out = []
        for i in range(len(batch.tags)):
            t = int(batch.tags[i])
            self.sum[t] += batch.values[i]
            row = (t, int(batch.ts[i]), self.sum[t] * self.gain[t], int(batch.quality[i]))
            if not self.hold[t]:
                out.append(row)
                continue
            if t in self.held:
                out.append(self.held[t])
            self.held[t] = row
        return self._batch(batch.device, out)

    def flush(self):
        note(ev="flush", held=len(self.held), fails=self.flush_fails)
        if self.flush_fails:
            raise OSError("acme_hold flush bug")
        out = sorted(self.held.values(), key=lambda r: r[1])
        self.held = {}
        return self._batch("", out)

    @staticmethod
    def _batch(device, rows):
        return Batch(
            device,
            np.array([r[0] for r in rows], np.int32),
            np.array([r[1] for r in rows], np.int64),
            np.array([r[2] for r in rows], np.float64),
            np.array([r[3] for r in rows], np.uint32),
        )


class HoldPlugin:
    name = "acme_hold"
    fields = {
        "gain": Field("float", 1.0, min=0),
        "fail_at": Field("int", 0, min=0),
        "flush_fails": Field("bool", False),
        "hold": Field("bool", True),
    }

    def validate(self, params):
        if params["gain"] == 0:
            return "gain = 0 would zero the signal; use a positive gain"
        return None

    def create(self, n_tags, params):
        return HoldFilter(n_tags, params)


class DupA(AcmeProtocol):
    name = "dup"
    device_fields = {"mode": Field("choice", "hang", choices=("hang",)), "script": Field("str", "")}
    tag_fields = {"alpha": Field("int", 0)}

    def tag_kind(self, options):
        return ValueKind.NUMBER

    def validate(self, device, path, problems):
        pass

    def describe(self, device):
        return [f"dup: {type(self).__name__}"]


plugin = AcmeProtocol()
poll = AcmePollProtocol()
hold = HoldPlugin()
dup = DupA()
'''

BROKEN_SRC = """
raise ImportError("libacmebus.so.3: cannot open shared object file")
"""

BAD_DEFAULT_SRC = """
from edgeos import Field
from acme_edge import AcmeProtocol


class BadDefault(AcmeProtocol):
    name = "acme_baddefault"
    device_fields = {**AcmeProtocol.device_fields, "retries": Field("int", "three")}


plugin = BadDefault()
"""

ZZ_SRC = """
from edgeos import Field
from acme_edge import DupA


class DupZ(DupA):
    tag_fields = {"zulu": Field("int", 0)}


plugin = DupZ()
"""

ACME_EPS = """\
[edgeos.protocols]
acme = acme_edge:plugin
acme_poll = acme_edge:poll
acme_broken = acme_edge.broken:plugin
acme_baddefault = acme_edge.bad_default:plugin
simulated = acme_edge:plugin
dup = acme_edge:dup

[edgeos.filters]
acme_hold = acme_edge:hold
deadband = acme_edge:hold
"""

GW = """\
[gateway]
id = "oem-gw"
data_dir = "data"
shutdown_timeout = "{shutdown}"
queue_batches = {queue}

[store]
time_resolution = "1ns"

[http]
enabled = false
"""

# Quality codes from docs/model.md
GOOD = 0
UNCERTAIN_SENSOR_NOT_ACCURATE = 0x40930000
BAD_COMM_FAILURE = 0x80050000
BAD_NOT_CONNECTED = 0x808A0000
BAD_TIMEOUT = 0x800A0000
BAD_DEVICE_FAILURE = 0x808B0000
BAD_INVALID_ARGUMENT = 0x80AB0000  # an OPC UA server's code, passed through

T0 = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z
# One device's batches: numbers (edge cases of float64), a bool, strings, qualities; ns stamps.
STEPS = [
    {
        "tags": ["temp", "running", "batch_id", "temp", "flow", "flow2"],
        "ts": [T0 + 1, T0 + 2, T0 + 3, T0 + 500_000_000, T0 + 4, T0 + 5],
        "values": [0.1, 1.0, None, 1e300, 1.0, 10.0],
        "quality": [GOOD, GOOD, GOOD, UNCERTAIN_SENSOR_NOT_ACCURATE, GOOD, GOOD],
        "text": [None, None, "LOT-42 ü", None, None, None],
    },
    {
        "tags": ["running", "batch_id", "temp", "temp", "flow", "flow2"],
        "ts": [T0 + 10**9, T0 + 10**9, T0 + 10**9 + 7, T0 + 2 * 10**9, T0 + 10**9 + 1, T0 + 10**9 + 2],
        "values": [0.0, None, -2.5e-310, 2.0**53, 2.0, 20.0],
        "quality": [BAD_INVALID_ARGUMENT, GOOD, 0x000004C0, BAD_DEVICE_FAILURE, GOOD, GOOD],
        "text": [None, 'a,b;"q"', None, None, None, None],
    },
    {
        "tags": ["temp", "flow", "flow2", "batch_id"],
        "ts": [T0 + 3 * 10**9, T0 + 3 * 10**9 + 1, T0 + 3 * 10**9 + 2, T0 + 3 * 10**9 + 3],
        "values": [-0.0, 3.0, 30.0, None],
        "quality": [GOOD, GOOD, GOOD, GOOD],
        "text": [None, None, None, ""],
    },
]

OK_DEVICE = """
[[devices]]
name = "box1"
protocol = "acme"
station = 12
script = "steps.json"
tags = [
  { name = "temp", register = 1 },
  { name = "running", kind = "bool", register = 2, writable = true },
  { name = "batch_id", kind = "string", register = 3 },
  { name = "flow", register = 4, filters = [{ type = "acme_hold", gain = 2.0 }] },
  { name = "flow2", register = 5, filters = [{ type = "acme_hold", gain = 2.0 }] },
]
"""


def dist(site, name, version, modules, entry_points):
    for rel, src in modules.items():
        p = site / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(src))
    di = site / f"{name.replace('-', '_')}-{version}.dist-info"
    di.mkdir(parents=True)
    (di / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (di / "entry_points.txt").write_text(entry_points)


@pytest.fixture(scope="module")
def oem(tmp_path_factory):
    root = tmp_path_factory.mktemp("oem")
    site0, site = root / "site0", root / "site"
    modules = {
        "acme_edge/__init__.py": PLUGIN_SRC,
        "acme_edge/broken.py": BROKEN_SRC,
        "acme_edge/bad_default.py": BAD_DEFAULT_SRC,
    }
    dist(site, "acme-edge", "0.1", modules, ACME_EPS)
    # zz-edge comes first on the path; acme-edge still wins `dup` (first by entry-point value).
    dist(site0, "zz-edge", "0.2", {"zz_edge/__init__.py": ZZ_SRC}, "[edgeos.protocols]\ndup = zz_edge:plugin\n")
    env = {**os.environ, "PYTHONPATH": f"{site0}{os.pathsep}{site}", "ACME_LOG": str(root / "acme.log")}
    env.pop("NOTIFY_SOCKET", None)
    return {"root": root, "paths": [str(site0), str(site)], "env": env, "log": root / "acme.log"}


def write_cfg(d: Path, name: str, body: str, shutdown="2s", queue=256) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text(GW.format(shutdown=shutdown, queue=queue) + textwrap.dedent(body))
    return p


def events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# edgeos check, all configs at once (in parallel, to keep the file fast)

CHECKS = {
    "ok": OK_DEVICE,
    "bad": """
        [[devices]]
        name = "box1"
        protocol = "acme"
        station = 300
        statoin = 3
        tags = [
          { name = "temp", colour = "red", filters = [{ type = "acme_hold", gain = -1.0, gian = 2.0 }] },
          { name = "temp2", filters = [{ type = "acme_hold", gain = 0.0 }] },
          { name = "state", kind = "string", filters = [{ type = "acme_hold" }] },
          { name = "lvl", register = "high" },
        ]

        [[devices]]
        name = "box2"
        protocol = "acme"
        mode = "validate_bug"
        tags = [{ name = "x" }]

        [[devices]]
        name = "box3"
        protocol = "acme"
        tags = [{ name = "y", kind = "boom" }]
    """,
    "overlap": """
        [[devices]]
        name = "box1"
        protocol = "acme"
        tags = [{ name = "a", register = 5 }, { name = "b", register = 5 }]
    """,
    "broken": """
        [[devices]]
        name = "bus1"
        protocol = "acme_broken"
        tags = [{ name = "x" }]
    """,
    "baddefault": """
        [[devices]]
        name = "bus1"
        protocol = "acme_baddefault"
        tags = [{ name = "x" }]
    """,
    "clash": """
        [[devices]]
        name = "sim"
        protocol = "simulated"
        tags = [{ name = "a", signal = "sine", filters = [{ type = "deadband", abs = 0.5 }] }]

        [[devices]]
        name = "d"
        protocol = "dup"
        tags = [{ name = "a", alpha = 3 }]
    """,
}


@pytest.fixture(scope="module")
def checks(oem):
    d = oem["root"] / "checks"
    procs = {}
    for name, body in CHECKS.items():
        cfg = write_cfg(d, f"{name}.toml", body)
        procs[name] = subprocess.Popen(
            [EDGEOS, "check", "-c", str(cfg)],
            cwd=d,
            env=oem["env"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    out = {}
    for name, p in procs.items():
        text, _ = p.communicate(timeout=30)
        out[name] = (p.returncode, text)
    return out


def test_check_lists_oem_plugins_with_versions_and_describe_lines(checks):
    rc, out = checks["ok"]
    assert rc == 0, out
    plugins = next(line for line in out.splitlines() if line.startswith("plugins"))
    assert "acme 0.1" in plugins and "acme_hold 0.1" in plugins, plugins
    # describe(device) lines are printed under the device
    assert "acme station 12: 5 registers" in out, out


def test_config_problems_name_plugin_keys_in_one_pass(checks):
    rc, out = checks["bad"]
    assert rc == 2, out
    lines = out.splitlines()

    def line_with(*parts):
        hits = [ln for ln in lines if all(p in ln for p in parts)]
        assert hits, f"no line with {parts}:\n{out}"
        return hits[0]

    # the plugin's device_fields / tag_fields: bounds, unknown keys (with a suggestion), types
    line_with("devices[0].station", "300", "247")
    line_with("devices[0].statoin", "unknown", "station")
    line_with("devices[0](box1).tags[0](temp).colour", "unknown")
    line_with("devices[0](box1).tags[3](lvl).register", '"high"')
    # the filter plugin's fields and validate(params) at the step's path
    line_with("devices[0](box1).tags[0](temp).filters[0].gain", "-1")
    line_with("devices[0](box1).tags[0](temp).filters[0].gian", "unknown", "gain")
    line_with("devices[0](box1).tags[1](temp2).filters[0]", "gain = 0 would zero the signal")
    # a filter without accepts_text on a string tag: naming tag and filter
    line_with("filter 'acme_hold' needs a numeric tag; tag 'state' is a string")


def test_plugin_validate_adds_problems_under_path(checks):
    rc, out = checks["overlap"]
    assert rc == 2, out
    assert "devices[0](box1).tags[1](b).register: register 5 already used by tag 'a'" in out, out


def test_plugin_bugs_in_validate_and_tag_kind_name_plugin_and_package(checks):
    _, out = checks["bad"]
    v = [ln for ln in out.splitlines() if "devices[1]" in ln]
    k = [ln for ln in out.splitlines() if "devices[2]" in ln]
    assert v and "acme" in v[0] and "acme-edge" in v[0] and "validate" in v[0], out
    assert k and "acme" in k[0] and "acme-edge" in k[0] and "tag_kind" in k[0], out


def test_plugin_that_fails_to_import_is_named_with_distribution_version_and_cause(checks):
    rc, out = checks["broken"]
    assert rc == 2, out
    line = next(ln for ln in out.splitlines() if "devices[0]" in ln)
    for part in ("acme_broken", "acme-edge", "0.1", "libacmebus.so.3: cannot open shared object file"):
        assert part in line, line
    # ... only configs that use it are refused
    assert checks["ok"][0] == 0


def test_field_default_its_kind_refuses_names_plugin_and_package(checks):
    """adapters.md: "a field default its kind refuses, is reported as a config problem naming
    the plugin and its package"."""
    rc, out = checks["baddefault"]
    assert rc == 2, out
    line = next(ln for ln in out.splitlines() if "retries" in ln)
    assert "acme_baddefault" in line and "acme-edge" in line, line


def test_one_name_one_plugin_builtins_never_replaced_and_warned(checks):
    rc, out = checks["clash"]
    # built-in `simulated` (its `signal` key) and `deadband` (its `abs`) are used, not acme's;
    # between two packages, the first by entry-point value (acme_edge:dup < zz_edge:plugin),
    # although zz-edge comes first on the path (so `alpha`, not `zulu`, is a key)
    assert rc == 0, out
    warnings = [ln for ln in out.splitlines() if "not used" in ln or "also registered" in ln]
    assert any("simulated" in w and "acme_edge" in w for w in warnings), out
    assert any("deadband" in w and "acme_edge" in w for w in warnings), out
    assert any("dup" in w and "zz_edge" in w for w in warnings), out


# --------------------------------------------------------------------------------------------
# edgeos run, then export / tags / query


@pytest.fixture(scope="module")
def daemon(oem):
    d = oem["root"] / "daemon"
    cfg = write_cfg(d, "edgeos.toml", OK_DEVICE)
    (d / "steps.json").write_text(json.dumps(STEPS))
    log = oem["log"]
    start = len(events(log))
    p = subprocess.Popen(
        [EDGEOS, "run", "-c", str(cfg)],
        cwd="/",  # a "path" field is resolved against the config's directory, not the cwd
        env=oem["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not any(e["ev"] == "script_done" for e in events(log)[start:]):
            assert p.poll() is None, p.communicate()[0]
            assert time.monotonic() < deadline, "the adapter never finished its script"
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=20)
    ev = events(log)[start:]
    common = {"cwd": d, "env": oem["env"], "capture_output": True, "text": True, "timeout": 20}
    export = subprocess.run([EDGEOS, "export", "--since", "2023-11-01", "-o", "-", "-c", str(cfg)], **common)
    tags = subprocess.run([EDGEOS, "tags", "-f", "json", "-c", str(cfg)], **common)
    return {"rc": p.returncode, "out": out, "events": ev, "export": export, "tags": tags}


def exported(daemon):
    assert daemon["export"].returncode == 0, daemon["export"].stderr
    rows = list(csv.reader(io.StringIO(daemon["export"].stdout)))
    assert rows[0] == ["time", "tag", "value", "quality"], rows[:2]
    by_tag = {}
    for t, tag, v, q in rows[1:]:
        by_tag.setdefault(tag, []).append((t, v, q))
    return by_tag


def test_daemon_runs_oem_adapter_and_stops_cleanly(daemon):
    assert daemon["rc"] == 0, daemon["out"]
    ev = daemon["events"]
    create = [e for e in ev if e["ev"] == "create"]
    # a "path" field is handed to the adapter resolved against the config file's directory
    assert create and create[0]["script"] == str(Path(daemon["export"].args[-1]).parent / "steps.json"), create
    assert any(e["ev"] == "close" for e in ev), ev


def test_export_numbers_bools_and_qualities_exact(daemon):
    by_tag = exported(daemon)
    temp = by_tag["box1/temp"]
    assert [q for _, _, q in temp] == [
        "GOOD",
        "UNCERTAIN_SENSOR_NOT_ACCURATE",
        "GOOD+0x04C0",
        "BAD_DEVICE_FAILURE",
        "GOOD",
    ]
    values = [float(v) for _, v, _ in temp]
    assert values[:4] == [0.1, 1e300, -2.5e-310, 2.0**53], temp
    assert values[4] == 0.0 and math.copysign(1, values[4]) == -1, f"-0.0 stored as {temp[4][1]}"
    running = by_tag["box1/running"]
    assert [(v, q) for _, v, q in running] == [("1.0", "GOOD"), ("0.0", "BAD_INVALID_ARGUMENT")], running


def test_export_string_tags_keep_their_text(daemon):
    by_tag = exported(daemon)
    assert [v for _, v, _ in by_tag["box1/batch_id"]] == ["LOT-42 ü", 'a,b;"q"', ""], by_tag["box1/batch_id"]


def test_filter_plugin_state_across_batches_and_flush_at_stop(daemon):
    by_tag = exported(daemon)
    # running sum x 2 across three batches; each tag's last sample held until the stop's flush
    assert [float(v) for _, v, _ in by_tag["box1/flow"]] == [2.0, 6.0, 12.0], by_tag["box1/flow"]
    assert [float(v) for _, v, _ in by_tag["box1/flow2"]] == [20.0, 60.0, 120.0], by_tag["box1/flow2"]
    ev = daemon["events"]
    creates = [e for e in ev if e["ev"] == "filter_create"]
    assert creates, ev
    for c in creates:  # the chain's own numbering 0..n_tags-1, not the gateway's ids 3 and 4
        assert c["ids"] == list(range(c["n_tags"])), creates
    for a in (e for e in ev if e["ev"] == "apply"):
        assert all(0 <= i < a["n_tags"] for i in a["ids"]), a
    assert any(e["ev"] == "flush" for e in ev), ev


def test_tags_command_shows_last_values(daemon):
    assert daemon["tags"].returncode == 0, daemon["tags"].stderr
    rows = {r["tag"]: r for r in map(json.loads, daemon["tags"].stdout.splitlines())}
    assert rows["box1/running"]["value"] is False and rows["box1/running"]["quality"] == "BAD_INVALID_ARGUMENT"
    assert rows["box1/batch_id"]["value"] == ""
    assert rows["box1/flow"]["value"] == 12


# --------------------------------------------------------------------------------------------
# The embedded Runtime (README "Embedding (OEMs)")


class Sink:
    def __init__(self):
        self.batches = []
        self.flushed = 0

    async def put(self, batch):
        self.batches.append(batch)

    async def flush(self):
        self.flushed += 1

    def samples(self, tag_id):
        out = []
        for b in self.batches:
            for i in np.flatnonzero(b.tags == tag_id):
                text = None if b.text is None else b.text[i]
                out.append((int(b.ts[i]), float(b.values[i]), int(b.quality[i]), text, b.device))
        return out


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def inproc(oem):
    """The OEM's packages importable in this process, as they would be when installed. The
    runtime keeps a plugin once loaded, so the modules stay for the rest of the session."""
    saved = list(sys.path)
    sys.path[:0] = oem["paths"]
    import acme_edge

    logger = logging.getLogger("edgeos")
    cap, level = LogCapture(), logger.level
    logger.addHandler(cap)
    logger.setLevel(logging.DEBUG)
    try:
        yield acme_edge, cap
    finally:
        logger.removeHandler(cap)
        logger.setLevel(level)
        sys.path[:] = saved


def fresh(acme):
    acme.EVENTS.clear()
    acme.QUEUES.clear()
    acme.CONNECTS.clear()


RUNTIME_DEVICES = """
[[devices]]
name = "q1"
protocol = "acme"
mode = "queue"
reconnect_min = "20ms"
reconnect_max = "50ms"
tags = [{ name = "a" }, { name = "b" }]

[[devices]]
name = "ok"
protocol = "acme"
mode = "queue"
tags = [{ name = "s", writable = true }, { name = "r" }]

[[devices]]
name = "cf"
protocol = "acme"
mode = "connect_fails"
reconnect_min = "20ms"
reconnect_max = "50ms"
tags = [{ name = "a" }, { name = "b" }]

[[devices]]
name = "rf"
protocol = "acme"
mode = "run_fails"
reconnect_min = "20ms"
reconnect_max = "50ms"
tags = [{ name = "a" }, { name = "b" }]

[[devices]]
name = "crf"
protocol = "acme"
mode = "create_fails"
reconnect_min = "20ms"
reconnect_max = "50ms"
tags = [{ name = "a" }]

[[devices]]
name = "wd"
protocol = "acme"
mode = "wrong_device"
reconnect_min = "20ms"
reconnect_max = "50ms"
tags = [{ name = "a" }]

[[devices]]
name = "fq"
protocol = "acme"
mode = "queue"
tags = [
  { name = "f1", filters = [{ type = "acme_hold", hold = false, fail_at = 2 }] },
  { name = "f2", filters = [{ type = "range", low = -1e9 }, { type = "acme_hold", hold = false, gain = 3.0 }] },
]

[[devices]]
name = "ff"
protocol = "acme"
mode = "queue"
tags = [
  { name = "h1", filters = [{ type = "acme_hold", flush_fails = true }] },
  { name = "h2", filters = [{ type = "range", low = -1e9 }, { type = "acme_hold" }] },
]

[[devices]]
name = "p_ok"
protocol = "acme_poll"
poll_interval = "20ms"
tags = [{ name = "a" }]

[[devices]]
name = "p_to"
protocol = "acme_poll"
mode = "timeout"
poll_interval = "20ms"
tags = [{ name = "a" }]

[[devices]]
name = "p_ba"
protocol = "acme_poll"
mode = "bad_answered"
poll_interval = "20ms"
tags = [{ name = "a" }]
"""


async def until(cond, timeout=5.0, what=""):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def scenario(oem, inproc):
    """One Runtime with every device above; returns what each step observed."""
    acme, cap = inproc
    fresh(acme)
    cap.lines.clear()
    cfg_path = write_cfg(oem["root"] / "rt1", "edgeos.toml", RUNTIME_DEVICES, shutdown="3s")
    config = edgeos.load_config(cfg_path)
    ids = {f"{d.name}/{t.name}": t.id for d in config.devices for t in d.tags}
    sink = Sink()
    obs = {"ids": ids, "sink": sink, "log": cap.lines, "acme": acme, "up": {}}

    async def main():
        rt = edgeos.Runtime(config, sinks=[sink])
        obs["rt"] = rt
        task = asyncio.create_task(rt.run())
        try:
            async with asyncio.timeout(20):
                await rt.wait_connected("q1", "ok", "fq", "ff")
                await scenario_steps(rt, acme, obs)
        finally:
            rt.stop()
            t0 = time.monotonic()
            await asyncio.wait_for(task, 20)
            obs["stop_s"] = time.monotonic() - t0
        obs["final"] = rt.status()
        try:
            await rt.run()
        except RuntimeError as e:
            obs["rerun"] = e

    asyncio.run(main())
    return obs


async def scenario_steps(rt, acme, obs):
    dev = lambda name: rt.status()["devices"][name]  # noqa: E731
    now = time.time_ns()
    nan = float("nan")

    async def step(device, **s):
        n = sum(1 for e in acme.EVENTS if e["ev"] == "emitted" and e["device"] == device)
        await acme.queue(device).put(s)
        await until(
            lambda: sum(1 for e in acme.EVENTS if e["ev"] == "emitted" and e["device"] == device) > n,
            what=f"{device} to emit {s}",
        )
        await asyncio.sleep(0.03)
        return dev(device)

    # -- answers: YES / NO / UNASKED, inferred or said, per source
    up = obs["up"]
    d = await step("q1", tags=["a"], ts=[now], values=[1.0], quality=[GOOD], source="A")
    up["A yes (inferred)"], ok1 = d["up"], d["last_ok_ns"]
    d = await step("q1", tags=["b"], ts=[now], values=[nan], quality=[BAD_TIMEOUT], answer="NO", source="B")
    up["B no, never answered"], ok2 = d["up"], d["last_ok_ns"]
    d = await step("q1", tags=["a"], ts=[now + 1], values=[nan], quality=[BAD_TIMEOUT], source="A")
    up["A timeout (inferred NO)"], ok3 = d["up"], d["last_ok_ns"]
    obs["last_ok"] = (ok1, ok2, ok3)
    up["A unasked"] = (await step("q1", empty=True, answer="UNASKED", source="A"))["up"]
    up["A yes"] = (await step("q1", tags=["a"], ts=[now + 2], values=[2.0], quality=[GOOD], source="A", answer="YES"))[
        "up"
    ]
    up["B yes"] = (await step("q1", tags=["b"], ts=[now + 3], values=[3.0], quality=[GOOD], source="B"))["up"]
    up["B no"] = (await step("q1", tags=["b"], ts=[now + 4], values=[nan], quality=[BAD_TIMEOUT], source="B"))["up"]
    up["A refusal (inferred YES)"] = (
        await step("q1", tags=["a"], ts=[now + 5], values=[nan], quality=[BAD_DEVICE_FAILURE], source="A")
    )["up"]
    up["B no again"] = (await step("q1", tags=["b"], ts=[now + 6], values=[nan], quality=[BAD_TIMEOUT], source="B"))[
        "up"
    ]
    up["A no"] = (await step("q1", empty=True, answer="NO", source="A"))["up"]
    # a connection that ends with no YES: the next one stays down until its first YES
    connects = dev("q1")["connects"]
    await acme.queue("q1").put("raise")
    await until(lambda: dev("q1")["connects"] > connects and dev("q1")["state"] == "running", what="q1 reconnect")
    up["2nd connection, no answer yet"] = dev("q1")["up"]
    up["2nd connection, NO"] = (await step("q1", empty=True, answer="NO"))["up"]
    connects = dev("q1")["connects"]
    await acme.queue("q1").put("raise")
    await until(lambda: dev("q1")["connects"] > connects and dev("q1")["state"] == "running", what="q1 reconnect")
    await asyncio.sleep(0.05)
    up["3rd connection after a silent one"] = dev("q1")["up"]
    up["3rd connection, YES"] = (await step("q1", empty=True, answer="YES"))["up"]

    # -- a device's samples with exact ns stamps, text and codes; a clock far ahead
    ahead = time.time_ns() + 120 * 10**9
    await step(
        "ok",
        tags=["s", "r", "s"],
        ts=[now + 11, now + 12, ahead],
        values=[-0.0, 5e-324, 1.0],
        quality=[GOOD, 0x81FF0000, GOOD],
    )

    # -- filters: one that raises at its 2nd batch, one whose flush raises at the stop
    for k, v in enumerate([1.0, 10.0, 100.0]):
        await step("fq", tags=["f1", "f2"], ts=[now + 100 + k, now + 100 + k], values=[v, v], quality=[GOOD, GOOD])
    for k, v in enumerate([1.0, 2.0]):
        await step("ff", tags=["h1", "h2"], ts=[now + 200 + k, now + 200 + k], values=[v, v], quality=[GOOD, GOOD])

    # -- write through the adapter
    obs["write"] = await rt.write("ok", "s", 72.5)
    for bad, exc in (("nope", KeyError), ("r", PermissionError)):
        try:
            await rt.write("ok", bad, 1.0)
            obs[f"write_{bad}"] = None
        except Exception as e:
            obs[f"write_{bad}"] = e
        assert isinstance(obs[f"write_{bad}"], exc), (bad, obs[f"write_{bad}"])

    # -- errors: let the failing devices go round their backoff a few times
    def count(ev, device):
        return sum(1 for e in acme.EVENTS if e["ev"] == ev and e["device"] == device)

    await until(lambda: count("connect_failed", "cf") >= 4, what="cf to retry")
    await until(lambda: count("connect_failed", "rf") >= 3, what="rf to retry")
    await until(lambda: count("create_called", "crf") >= 3, what="crf to retry")
    await until(lambda: count("create_called", "wd") >= 2, what="wd to restart")
    await until(lambda: dev("p_ok")["samples"] >= 3 and dev("p_to")["samples"] >= 3, what="polls")
    await until(lambda: dev("p_ba")["samples"] >= 3, what="polls")
    await asyncio.sleep(0.05)
    obs["status"] = rt.status()


def test_runtime_api_runs_once_and_flushes_sinks(scenario):
    assert isinstance(scenario.get("rerun"), RuntimeError), scenario.get("rerun")
    assert scenario["sink"].flushed == 1
    assert scenario["status"]["devices"]["ok"]["health"] == {"acme_requests": 7}


def test_answer_semantics_per_source(scenario):
    expected = {
        "A yes (inferred)": True,
        "B no, never answered": True,  # a request that never answered does not take it down
        "A timeout (inferred NO)": False,  # a working request that stops answering: down at once
        "A unasked": False,  # says nothing either way
        "A yes": True,
        "B yes": True,
        "B no": False,  # a working source starts failing: down at its first NO
        "A refusal (inferred YES)": True,  # Bad answers and refusals are answers: up again
        "B no again": True,  # ... and up from then on
        "A no": False,
    }
    assert {k: scenario["up"][k] for k in expected} == expected


def test_no_records_no_success(scenario):
    ok1, ok2, ok3 = scenario["last_ok"]
    assert ok1 > 0 and ok2 == ok1 and ok3 == ok1, scenario["last_ok"]


def test_connection_without_yes_stays_down_on_reconnect(scenario):
    up = scenario["up"]
    assert up["2nd connection, NO"] is False
    assert up["3rd connection after a silent one"] is False
    assert up["3rd connection, YES"] is True


def test_batches_stored_exactly_with_ns_stamps(scenario):
    s, ids = scenario["sink"], scenario["ids"]
    got = s.samples(ids["ok/s"]) + s.samples(ids["ok/r"])
    got.sort()
    (ts0, v0, q0, _, d0), (ts1, v1, q1, _, d1) = got[:2]
    assert (ts1 - ts0) == 1 and d0 == d1 == "ok"
    assert v0 == 0.0 and math.copysign(1, v0) == -1 and q0 == GOOD
    assert v1 == 5e-324 and q1 == 0x81FF0000  # any StatusCode is valid and passes through
    assert any("clock_ahead" in line or "ahead of" in line for line in scenario["log"]), scenario["log"][-20:]


def test_connect_failure_one_not_connected_sample_per_tag_and_backoff(scenario):
    s, ids, acme = scenario["sink"], scenario["ids"], scenario["acme"]
    for tag in ("cf/a", "cf/b"):
        got = s.samples(ids[tag])
        assert len(got) == 1, got  # not again at each failed reconnect
        assert got[0][2] == BAD_NOT_CONNECTED and math.isnan(got[0][1]), got
    cf = scenario["status"]["devices"]["cf"]
    assert cf["up"] is False and cf["last_error_code"] == "connect", cf
    # each attempt on a new adapter, and every failed one closed
    connects = [e["aid"] for e in acme.EVENTS if e["ev"] == "connect" and e["device"] == "cf"]
    closes = {e["aid"] for e in acme.EVENTS if e["ev"] == "close" and e["device"] == "cf"}
    assert len(set(connects)) == len(connects), connects
    assert set(connects[:-1]) <= closes, (connects, closes)
    # capped backoff: never more than reconnect_max (50 ms) between attempts, plus slack
    t = [e["t"] for e in acme.EVENTS if e["ev"] == "connect" and e["device"] == "cf"]
    assert max(np.diff(t)) < 1.0, np.diff(t)


def test_lost_connection_one_comm_failure_sample_per_tag(scenario):
    s, ids = scenario["sink"], scenario["ids"]
    for tag in ("rf/a", "rf/b"):
        got = sorted(s.samples(ids[tag]))
        assert [g[2] for g in got] == [GOOD, BAD_COMM_FAILURE], got
        assert math.isnan(got[1][1])
    assert scenario["status"]["devices"]["rf"]["failures"] >= 3


def test_create_that_raises_is_retried_with_backoff(scenario):
    acme = scenario["acme"]
    assert sum(1 for e in acme.EVENTS if e["ev"] == "create_called" and e["device"] == "crf") >= 3
    got = scenario["sink"].samples(scenario["ids"]["crf/a"])
    assert [g[2] for g in got] == [BAD_NOT_CONNECTED], got  # as after a failed connect


def test_batch_of_another_device_is_a_contract_error(scenario):
    acme, sink = scenario["acme"], scenario["sink"]
    refused = [e for e in acme.EVENTS if e["ev"] in ("emit_refused", "emit_accepted") and e["device"] == "wd"]
    assert refused and all(e == {"ev": "emit_refused", "device": "wd", "code": "contract"} for e in refused), refused
    assert not any(b.device == "somebody_else" for b in sink.batches)
    assert not [g for g in sink.samples(scenario["ids"]["wd/a"]) if g[2] == GOOD]
    # other devices go on
    assert scenario["status"]["devices"]["p_ok"]["up"] is True


def test_polling_adapter_answers(scenario):
    devs = scenario["status"]["devices"]
    assert devs["p_ok"]["up"] is True
    assert devs["p_to"]["up"] is False, devs["p_to"]  # all BAD_TIMEOUT: no answer (inferred)
    assert devs["p_ba"]["up"] is True, devs["p_ba"]  # answer_of says YES
    got = scenario["sink"].samples(scenario["ids"]["p_ok/a"])
    assert got and all(g[1] == 1.5 and g[2] == GOOD for g in got)


def test_write_goes_through_the_adapter(scenario):
    acme = scenario["acme"]
    writes = [e for e in acme.EVENTS if e["ev"] == "write"]
    assert writes == [{"ev": "write", "device": "ok", "tag": "s", "value": 72.5}], writes


def test_filter_that_raises_stores_its_chain_unfiltered(scenario):
    s, ids = scenario["sink"], scenario["ids"]
    f1 = sorted(s.samples(ids["fq/f1"]))
    f2 = sorted(s.samples(ids["fq/f2"]))
    assert [g[1] for g in f1][:2] == [1.0, 10.0], f1  # 2nd batch raised: stored raw
    assert [g[1] for g in f2] == [3.0, 33.0, 333.0], f2  # the other chain filters as usual
    assert scenario["status"]["counters"]["filter_errors"] == 1, scenario["status"]["counters"]
    assert any("fq: filter 'acme_hold' failed, its tags' samples stored unfiltered" in ln for ln in scenario["log"]), [
        ln for ln in scenario["log"] if "filter" in ln
    ]


def test_flush_that_raises_loses_only_its_chain(scenario):
    s, ids = scenario["sink"], scenario["ids"]
    h1 = sorted(s.samples(ids["ff/h1"]))
    h2 = sorted(s.samples(ids["ff/h2"]))
    assert [g[1] for g in h2] == [1.0, 3.0], h2  # flushed at the stop, under its device
    assert all(g[4] == "ff" for g in h2)
    assert [g[1] for g in h1] == [1.0], h1
    assert any("acme_hold" in ln and "flush" in ln.lower() for ln in scenario["log"]), [
        ln for ln in scenario["log"] if "acme_hold" in ln
    ]


# --------------------------------------------------------------------------------------------
# stop: cancellation of run, close bounded, nothing read is lost

STOP_DEVICES = """
[[devices]]
name = "hang"
protocol = "acme"
mode = "ignores_cancel"
tags = [{ name = "a" }]

[[devices]]
name = "closer"
protocol = "acme"
mode = "close_hangs"
tags = [{ name = "a" }]

[[devices]]
name = "slow"
protocol = "acme_poll"
mode = "slow_read"
poll_interval = "20ms"
tags = [{ name = "a" }]
"""


def test_stop_is_bounded_by_shutdown_timeout(oem):
    """adapters.md: shutdown is cancellation of run; close is bounded by min(5 s,
    shutdown_timeout / 2); config.md: shutdown_timeout bounds an orderly stop."""
    d = oem["root"] / "stop"
    cfg = write_cfg(d, "edgeos.toml", STOP_DEVICES, shutdown="1s")
    log = oem["log"]
    start = len(events(log))
    p = subprocess.Popen(
        [EDGEOS, "run", "-c", str(cfg)],
        cwd=d,
        env=oem["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while {e["device"] for e in events(log)[start:] if e["ev"] in ("run", "read_blocks")} < {
            "hang",
            "closer",
            "slow",
        }:
            assert p.poll() is None, p.communicate()[0]
            assert time.monotonic() < deadline, events(log)[start:]
            time.sleep(0.05)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        try:
            out, _ = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert took < 1.0 + 1.5, f"stop took {took:.2f} s with shutdown_timeout = 1s:\n{out}"
    assert p.returncode == 0, out
    ev = events(log)[start:]
    assert {"hang", "closer", "slow"} <= {e["device"] for e in ev if e["ev"] == "cancelled"}, ev
    assert {"hang", "closer", "slow"} <= {e["device"] for e in ev if e["ev"] == "close"}, ev


FLOOD = """
[[devices]]
name = "flood"
protocol = "acme"
mode = "flood"
tags = [{ name = "a" }, { name = "b" }, { name = "c" }]
"""


def test_backpressure_and_stop_lose_nothing_read(oem, inproc):
    acme, _ = inproc
    fresh(acme)
    config = edgeos.load_config(write_cfg(oem["root"] / "rt3", "edgeos.toml", FLOOD, shutdown="5s", queue=4))
    sink = Sink()

    async def main():
        rt = edgeos.Runtime(config, sinks=[sink])
        task = asyncio.create_task(rt.run())
        async with asyncio.timeout(10):
            await rt.wait_connected()
            await until(lambda: len(acme.EVENTS) > 200, what="a flood of batches")
        rt.stop()
        await asyncio.wait_for(task, 15)
        return rt.status()

    status = asyncio.run(main())
    called = max(e["k"] for e in acme.EVENTS if e["ev"] == "emit_called")
    stored = sum(len(b.tags) for b in sink.batches)
    assert stored == called * 3, (stored, called, status["counters"])
    assert status["counters"]["dropped_at_stop"] == 0


# --------------------------------------------------------------------------------------------
# The public API names the documents give


def test_public_api_names_and_signatures():
    import edgeos.config

    for name in (
        "ProtocolPlugin",
        "Adapter",
        "PollingAdapter",
        "PollGroup",
        "Batch",
        "Emit",
        "Answer",
        "DeviceError",
        "Quality",
        "ValueKind",
        "Field",
        "Problems",
        "FilterPlugin",
        "Runtime",
        "load_config",
        "PluginError",
        "DeviceConfig",
        "TagConfig",
    ):
        assert hasattr(edgeos, name), name
    assert edgeos.config.Field is edgeos.Field and edgeos.config.Problems is edgeos.Problems
    assert {a.name for a in edgeos.Answer} == {"YES", "NO", "UNASKED"}
    assert {"NUMBER", "BOOL", "STRING"} <= {k.name for k in edgeos.ValueKind}
    params = list(inspect.signature(edgeos.Batch).parameters)
    assert params == ["device", "tags", "ts", "values", "quality", "text"], params
    assert inspect.signature(edgeos.Batch).parameters["text"].default is None
    empty = edgeos.Batch.empty("m")
    assert empty.device == "m" and len(empty.tags) == 0
    assert edgeos.DeviceError("m", "x", code="timeout").code == "timeout"
    assert "sinks" in inspect.signature(edgeos.Runtime).parameters
    for m in ("run", "stop", "status", "write", "reload", "wait_connected"):
        assert callable(getattr(edgeos.Runtime, m)), m
    assert list(inspect.signature(edgeos.PollingAdapter.read).parameters) == ["self", "group", "now_ns"]
    assert "group" in inspect.signature(edgeos.PollingAdapter.answer_of).parameters
    q = edgeos.Quality
    codes = {
        "GOOD": 0,
        "GOOD_CLAMPED": 0x00300000,
        "UNCERTAIN_SENSOR_NOT_ACCURATE": 0x40930000,
        "UNCERTAIN_ENGINEERING_UNITS_EXCEEDED": 0x40940000,
        "UNCERTAIN_SUB_NORMAL": 0x40A40000,
        "BAD_COMM_FAILURE": 0x80050000,
        "BAD_NOT_CONNECTED": 0x808A0000,
        "BAD_TIMEOUT": 0x800A0000,
        "BAD_DEVICE_FAILURE": 0x808B0000,
        "BAD_DECODING_ERROR": 0x80070000,
        "BAD_OUT_OF_RANGE": 0x803C0000,
        "BAD_CONFIG_ERROR": 0x80890000,
        "BAD_NODE_ID_UNKNOWN": 0x80340000,
        "BAD_TYPE_MISMATCH": 0x80740000,
    }
    assert {k: int(getattr(q, k)) for k in codes} == codes
