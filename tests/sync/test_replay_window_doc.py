"""How long forwarded units stay replayable, checked against the documents alone (an
independent tester): docs/store.md I20 and I6, docs/config.md (`[upstream] replay_window`,
`[store]`), docs/payload.md ("Replay on request", "What is held").

Each test runs the real daemon (`Runtime`) against a real mosquitto on loopback, with one MQTT
client that hears everything under `edgeos/` and publishes replay requests. The scenario is in
two runs on one data directory: the first run's device `old` commits and forwards units; the
second run has `old` disabled (so its units only age) and a device `new` that keeps the cursor
moving (the cursor is saved "when it moved, at most every 10 s", I19). So the seqs of `old` are
a fixed, known range, all forwarded, all compacted (`compact_after = "1s"`)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import msgpack
import numpy as np
import pytest

from edgeos import wire
from edgeos.config import load_config
from edgeos.runtime import Runtime
from edgeos.store import StoreReader
from edgeos.store.outbox import Outbox

GW = "gw1"
REPLAY = f"edgeos/{GW}/replay"
GONE = f"edgeos/{GW}/replay/gone"
SETTLE = 0.8  # after the expected answer: anything extra shows up within this on loopback


# --------------------------------------------------------------------------- the gateway


def write(
    write_config, port: int, *, old_on: bool, new_on: bool, upstream: str = "", store: str = "", sync: bool = True
) -> Path:
    path = write_config(
        f"""
[gateway]
id = "{GW}"
data_dir = "data"
run_dir = "run"
shutdown_timeout = "5s"

[store]
commit_interval = "50ms"
compact_after = "1s"
{store}

[[devices]]
name = "old"
protocol = "simulated"
enabled = {"true" if old_on else "false"}
poll_interval = "100ms"
tags = [
  {{ name = "a", signal = "sine", period = "3s", noise = 0.5 }},
  {{ name = "s", signal = "text", states = ["idle", "run", "stop"], period = "1s" }},
]

[[devices]]
name = "new"
protocol = "simulated"
enabled = {"true" if new_on else "false"}
poll_interval = "100ms"
tags = [{{ name = "x", signal = "ramp" }}]

[upstream]
enabled = {"true" if sync else "false"}
host = "127.0.0.1"
port = {port}
reconnect_min = "50ms"
reconnect_max = "300ms"
{upstream}
""",
        name=f"edgeos-{'old' if old_on else 'new'}{'' if sync else '-nosync'}.toml",
    )
    (path.parent / "run").mkdir(exist_ok=True)  # the status file's directory (gateway.run_dir)
    return path


class Daemon:
    def __init__(self, path: Path) -> None:
        self.cfg = load_config(path)
        self.rt = Runtime(self.cfg)
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> Daemon:
        self.task = asyncio.create_task(self.rt.run())
        async with asyncio.timeout(15):
            await self.rt.running.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.rt.stop()
        await asyncio.wait_for(self.task, 20)


async def wait_until(pred, timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not pred():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


# --------------------------------------------------------------------------- the store, read only


def units_table(data_dir: Path) -> dict[int, tuple[str, int, int, bytes]]:
    """docs/store.md "Layout": `units(id, device, t_min, t_max, n, compacted, data)`."""
    db = sqlite3.connect(f"{(data_dir / 'edgeos.db').as_uri()}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT id, device, compacted, t_max, data FROM units").fetchall()
    finally:
        db.close()
    return {i: (d, c, t, bytes(b)) for i, d, c, t, b in rows}


def saved_cursor(data_dir: Path) -> int:
    """docs/store.md "The outbox": `cursor()`, the cursor the writer saved."""
    ob = Outbox(data_dir)
    try:
        return int(ob.cursor())
    finally:
        ob.close()


def status(path: Path) -> dict:
    """`edgeos status --json` (docs/store.md, docs/metrics.md)."""
    exe = Path(sys.executable).with_name("edgeos")
    out = subprocess.run([str(exe), "status", "-c", str(path), "--json"], capture_output=True, timeout=30, text=True)
    assert out.stdout, out.stderr
    return json.loads(out.stdout)


async def status_when(path: Path, pred, timeout: float = 4.0) -> dict:
    """The status once `pred` holds of it (the file is rewritten once a second), else the last."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(path)
        if pred(st) or time.monotonic() > deadline:
            return st
        await asyncio.sleep(0.3)


def runs(seqs) -> list[list[int]]:
    out: list[list[int]] = []
    for s in sorted(seqs):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


# --------------------------------------------------------------------------- the consumer side


@dataclass
class Heard:
    topic: str
    payload: bytes

    @property
    def doc(self) -> dict:
        return msgpack.unpackb(self.payload, raw=False)


class Central:
    """Hears every topic under edgeos/ (one subscription: the broker keeps the gateway's order)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.heard: list[Heard] = []
        self.client: aiomqtt.Client | None = None
        self.ready = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def _run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="window-central") as c:
            await c.subscribe("edgeos/#", qos=1)
            self.client = c
            self.ready.set()
            async for msg in c.messages:
                self.heard.append(Heard(str(msg.topic), bytes(msg.payload)))

    async def __aenter__(self) -> Central:
        self.task = asyncio.create_task(self._run())
        ready = asyncio.create_task(self.ready.wait())
        await asyncio.wait({self.task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        assert self.ready.is_set(), "the test's MQTT client did not subscribe"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for _ in range(10):
            self.task.cancel()
            done, _ = await asyncio.wait({self.task}, timeout=1.0)
            if done:
                break

    async def ask(self, first: int, last: int, dev: str | None = None) -> int:
        doc: dict = {"v": 1, "gw": GW, "first": first, "last": last}
        if dev is not None:
            doc["dev"] = dev
        mark = len(self.heard)
        await self.client.publish(REPLAY, msgpack.packb(doc, use_bin_type=True), qos=1)
        return mark

    def data(self, since: int = 0) -> list[dict]:
        return [h.doc for h in self.heard[since:] if h.topic.endswith("/data")]

    def first_sent(self, device: str) -> dict[int, bytes]:
        """seq -> unit bytes of the device's first sendings (not `rp`; parts joined are not
        expected: units of a few samples are far below `max_message`)."""
        out: dict[int, bytes] = {}
        for d in self.data():
            if d["dev"] != device or d.get("rp"):
                continue
            assert "pt" not in d
            for s, u in zip(d["seq"], d["units"], strict=True):
                out.setdefault(s, bytes(u))
        return out

    def replayed(self, since: int) -> list[tuple[int, bytes, dict]]:
        return [
            (s, bytes(u), d) for d in self.data(since) if d.get("rp") for s, u in zip(d["seq"], d["units"], strict=True)
        ]

    def gones(self, since: int) -> list[dict]:
        return [h.doc for h in self.heard[since:] if h.topic == GONE]

    def dictionary(self) -> dict:
        docs = [h.doc for h in self.heard if h.topic == f"edgeos/{GW}/tags"]
        assert docs, "no tag dictionary heard"
        return docs[-1]


async def first_run(write_config, broker, central: Central, upstream: str, store: str = "") -> Path:
    """The run that produces: `old` commits and forwards at least 8 units; returns the data directory."""
    path = write(write_config, broker.port, old_on=True, new_on=False, upstream=upstream, store=store)
    async with Daemon(path) as d:
        await wait_until(lambda: len(central.first_sent("old")) >= 8, 15, "8 units of `old` forwarded")
        data_dir = d.cfg.gateway.data_dir
    return data_dir


async def second_run_ready(d: Daemon, central: Central, old: list[int]) -> None:
    """Every unit of `old` first sent, the gateway listening."""
    await wait_until(lambda: set(central.first_sent("old")) >= set(old), 15, "every unit of `old` forwarded")
    await wait_until(lambda: d.rt.sync.status.replay_listening, 10, "replay_listening")


def old_seqs(data_dir: Path) -> list[int]:
    seqs = sorted(i for i, row in units_table(data_dir).items() if row[0] == "old")
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), f"`old`'s units are not one run of seqs: {seqs}"
    return seqs


def all_compacted_or_gone(data_dir: Path, seqs: list[int]) -> bool:
    table = units_table(data_dir)
    return all(s not in table or table[s][1] == 1 for s in seqs)


async def next_cursor_save(data_dir: Path, past: int, timeout: float = 15) -> None:
    """A save of the cursor that happens after now (the cursor moves with `new`'s units), at or
    above `past`."""
    c0 = saved_cursor(data_dir)
    await wait_until(lambda: saved_cursor(data_dir) > max(c0, past - 1), timeout, "a cursor save")


# --------------------------------------------------------------------------- the cases


async def test_within_the_window_a_compacted_forwarded_unit_is_replayed_as_first_sent(write_config, broker):
    """docs/store.md I20: "With upstream enabled, compaction marks units `compacted=1` instead of
    deleting them ... **Kept, not rebuilt**: a replay sends the unit's bytes as they were
    committed and first sent". docs/payload.md: "republishes every unit it still holds in the
    range ... **byte for byte as first sent: the same seq, the same unit bytes**, in envelopes
    marked `rp` (their `pv` is the device's previous unit held now ...)"; "nothing when it holds
    them all". Default window (24 h)."""
    async with Central(broker.port) as central:
        data_dir = await first_run(write_config, broker, central, "")
        old = old_seqs(data_dir)
        committed = {s: units_table(data_dir)[s][3] for s in old}
        path = write(write_config, broker.port, old_on=False, new_on=True)
        async with Daemon(path) as d:
            await second_run_ready(d, central, old)
            await wait_until(lambda: all_compacted_or_gone(data_dir, old), 10, "`old` compacted")
            await next_cursor_save(data_dir, old[-1])  # a save after the compaction: nothing expired
            table = units_table(data_dir)
            assert {s: table[s][1] for s in old if s in table} == dict.fromkeys(old, 1), (
                "compaction marks the units compacted=1 instead of deleting them"
            )
            mark = await central.ask(old[0], old[-1])
            await wait_until(lambda: len(central.replayed(mark)) >= len(old), 10, "the replays")
            await asyncio.sleep(SETTLE)
            st = await status_when(path, lambda st: st["sync"]["replay_units"] > 0)
    assert st["sync"]["replay_units"] == len(old) and st["sync"]["replay_gone"] == 0
    first = central.first_sent("old")
    assert {s: first[s] for s in old} == committed, "first sent as the store committed them"
    got = central.replayed(mark)
    assert central.gones(mark) == [], "nothing on /gone when it holds them all"
    assert sorted(s for s, _, _ in got) == old, "every unit of the range once"
    for s, blob, env in got:
        assert blob == first[s], f"seq {s}: replay bytes differ from the first sending"
        assert env["rp"] is True and env["dev"] == "old"
    for env in {id(e): e for _, _, e in got}.values():
        before = [s for s in old if s < env["seq"][0]]
        assert env["pv"] == (before[-1] if before else 0), f"pv of replay {env['seq']}"


async def test_after_the_window_a_replay_is_answered_gone_with_exactly_those_ranges(write_config, broker):
    """docs/store.md I20: "the raw copy of a forwarded unit (id at or below the saved cursor) is
    deleted only once its newest sample (`t_max`) is older than the window: at the cursor's
    save when the cursor moves ..."; "what either dropped is answered "gone" to a replay
    request". docs/payload.md: "publishes on `edgeos/{gateway}/replay/gone` a msgpack map
    `{"v": 1, "gw", "first", "last", "dev", "gone": [[a, b], ...]}` ... the exact inclusive runs
    ... it no longer holds, of any device". Window 8 s: inside it the units come back, after
    it and a cursor save they are gone."""
    window_s = 8
    upstream = f'replay_window = "{window_s}s"\n'
    async with Central(broker.port) as central:
        data_dir = await first_run(write_config, broker, central, upstream)
        old = old_seqs(data_dir)
        newest = max(units_table(data_dir)[s][2] for s in old)  # t_max, ns
        path = write(write_config, broker.port, old_on=False, new_on=True, upstream=upstream)
        async with Daemon(path) as d:
            await second_run_ready(d, central, old)
            await wait_until(lambda: all_compacted_or_gone(data_dir, old), 10, "`old` compacted")
            inside = time.time_ns() < newest + (window_s - 1) * 10**9
            assert inside, "the setup took too long to ask inside the window"
            mark_in = await central.ask(old[0], old[-1], "old")
            await wait_until(lambda: len(central.replayed(mark_in)) >= len(old), 10, "the replays")
            await asyncio.sleep(SETTLE)
            replayed_in = central.replayed(mark_in)
            gone_in = central.gones(mark_in)
            # Past the window, then a save of the cursor.
            wait_s = (newest + window_s * 10**9 - time.time_ns()) / 1e9 + 0.2
            await asyncio.sleep(max(0.0, wait_s))
            await next_cursor_save(data_dir, old[-1])
            mark_all = await central.ask(old[0], old[-1])
            await wait_until(lambda: central.gones(mark_all), 10, "a gone answer")
            mark_dev = await central.ask(old[0], old[-1], "old")
            await wait_until(lambda: central.gones(mark_dev), 10, "a gone answer for dev")
            await asyncio.sleep(SETTLE)
    first = central.first_sent("old")
    assert gone_in == [] and sorted(s for s, _, _ in replayed_in) == old, "inside the window: held"
    assert all(blob == first[s] for s, blob, _ in replayed_in)
    assert central.gones(mark_all)[:1] == [
        {"v": 1, "gw": GW, "first": old[0], "last": old[-1], "dev": None, "gone": [[old[0], old[-1]]]}
    ]
    assert central.gones(mark_dev) == [
        {"v": 1, "gw": GW, "first": old[0], "last": old[-1], "dev": "old", "gone": [[old[0], old[-1]]]}
    ]
    assert central.replayed(mark_all) == [], "nothing of the gone range is sent"


async def test_window_zero_drops_forwarded_compacted_units_and_the_history_keeps_them(write_config, broker):
    """docs/config.md: "`"0s"` drops them once forwarded and compacted". docs/store.md I20:
    "`replay_window = 0` deletes forwarded raw copies at the cursor's save ... These deletions are
    not counted in I12 (the samples stay in the chunks)"; I6: "Their samples stay queryable in
    the chunks". Queried with `StoreReader.history` (docs/store.md "Queries")."""
    upstream = 'replay_window = "0s"\n'
    async with Central(broker.port) as central:
        data_dir = await first_run(write_config, broker, central, upstream)
        old = old_seqs(data_dir)
        path = write(write_config, broker.port, old_on=False, new_on=True, upstream=upstream)
        async with Daemon(path) as d:
            await second_run_ready(d, central, old)
            await wait_until(lambda: all_compacted_or_gone(data_dir, old), 10, "`old` compacted")
            await next_cursor_save(data_dir, old[-1])
            mark = await central.ask(old[0], old[-1])
            await wait_until(lambda: central.gones(mark), 10, "a gone answer")
            await asyncio.sleep(SETTLE)
            st = await status_when(path, lambda st: st["sync"]["replay_gone"] > 0)
    assert central.gones(mark) == [
        {"v": 1, "gw": GW, "first": old[0], "last": old[-1], "dev": None, "gone": [[old[0], old[-1]]]}
    ]
    assert central.replayed(mark) == []
    assert st["sync"]["replay_gone"] == len(old) and st["sync"]["replay_units"] == 0, st["sync"]
    assert st["store"]["dropped_unsent"] == 0 and st["store"]["dropped_budget"] == 0
    assert st["store"]["dropped_retention"] == 0
    # The samples first sent are in the history, bit for bit.
    first = central.first_sent("old")
    names = {row[0]: row[2] for row in central.dictionary()["tags"] if row[1] == "old"}
    units = [wire.decode_unit(first[s]) for s in old]
    for name in ("a", "s"):
        ts = np.concatenate([u.ts[np.array([names.get(int(t)) == name for t in u.tags], bool)] for u in units])
        val = np.concatenate([u.values[np.array([names.get(int(t)) == name for t in u.tags], bool)] for u in units])
        assert len(ts) >= 8
        with StoreReader(data_dir) as reader:
            h = reader.history(f"old/{name}", int(ts.min()), int(ts.max()) + 1)
        assert h.ts.tolist() == ts.tolist(), f"old/{name}: the history's timestamps are the units'"
        assert h.values.tobytes() == val.tobytes(), f"old/{name}: the history's values are the units'"


async def test_over_the_budget_kept_raw_copies_go_first_and_are_answered_gone(write_config, broker):
    """docs/store.md I6: "Over the budget, in this order: 1. **hidden raw copies first**:
    compacted units kept only for upstream (`compacted=1` ...), oldest first. Their samples stay
    queryable in the chunks; ... 2. **then the oldest history**". I20: "The window is bounded by
    the store's budget (I6: raw copies are the first thing dropped over `max_size`) ...; what
    either dropped is answered "gone" to a replay request". docs/payload.md ("What is held"):
    "The budget drops these kept copies first when the store is full".

    Raw copies are made large against their chunks: text tags with long, repeating states
    (a unit's `txt` is a plain array of strings; a chunk holds a tag's text compressed)."""
    long = ["A" * 600, "B" * 600, "C" * 600]
    tag = '{{ name = "t{}", signal = "text", states = {}, period = "1s" }}'
    tags = ", ".join(tag.format(i, json.dumps(long)) for i in range(40))
    path = write_config(
        f"""
[gateway]
id = "{GW}"
data_dir = "data"
run_dir = "run"
shutdown_timeout = "5s"

[store]
commit_interval = "50ms"
compact_after = "1s"
max_size = "1MiB"

[[devices]]
name = "big"
protocol = "simulated"
poll_interval = "50ms"
tags = [{tags}]

[upstream]
enabled = true
host = "127.0.0.1"
port = {broker.port}
reconnect_min = "50ms"
reconnect_max = "300ms"
""",
        name="edgeos-big.toml",
    )
    (path.parent / "run").mkdir(exist_ok=True)
    async with Central(broker.port) as central, Daemon(path) as d:
        data_dir = d.cfg.gateway.data_dir
        await wait_until(lambda: central.first_sent("big"), 10, "a first unit")
        lowest = min(central.first_sent("big"))
        await wait_until(lambda: lowest not in units_table(data_dir), 25, "the oldest raw copy dropped")
        await wait_until(lambda: d.rt.sync.status.replay_listening, 10, "replay_listening")
        top = max(central.first_sent("big"))
        mark = await central.ask(lowest, top)
        await wait_until(lambda: central.gones(mark), 10, "a gone answer")
        await asyncio.sleep(SETTLE + 1.0)
        st = status(path)
    first = central.first_sent("big")
    gones = central.gones(mark)
    assert gones and all(g["first"] == lowest and g["dev"] is None for g in gones)
    gone = gones[0]["gone"]
    assert len(gone) == 1 and gone[0][0] == lowest, f"oldest first: one run from the oldest, got {gone}"
    # Ingest goes on, and so does the budget: copies it drops after the first answer are named
    # in further gone messages of the request, before the units above them (payload.md, "Answer").
    gone_seqs = {s for g in gones for a, b in g["gone"] for s in range(a, b + 1)}
    assert gone_seqs == set(range(lowest, lowest + len(gone_seqs))), f"the oldest, one run: {gones}"
    replayed = central.replayed(mark)
    sent = sorted(s for s, _, _ in replayed)
    missing = [s for s in range(lowest, top + 1) if s not in gone_seqs and s not in sent]
    assert missing == [], f"neither gone nor sent: {missing}"
    assert sent == [s for s in range(lowest, top + 1) if s not in gone_seqs]
    assert all(blob == first[s] for s, blob, _ in replayed), "what is held comes back as first sent"
    assert st["store"]["dropped_budget"] == 0, "the raw copies went first, no history"
    assert st["store"]["dropped_unsent"] == 0, "every dropped copy had been forwarded"
    # The samples of the dropped copies stay queryable in the chunks.
    names = {row[0]: row[2] for row in central.dictionary()["tags"] if row[1] == "big"}
    dropped = [wire.decode_unit(first[s]) for s in sorted(gone_seqs) if s in first]
    assert dropped
    with StoreReader(data_dir) as reader:
        for name in ("t0", "t39"):
            ts = np.concatenate([u.ts[np.array([names.get(int(t)) == name for t in u.tags], bool)] for u in dropped])
            h = reader.history(f"big/{name}", int(ts.min()), int(ts.max()) + 1)
            assert h.ts.tolist() == ts.tolist(), f"big/{name}: the dropped copies' samples are in the history"


@pytest.mark.parametrize("forwarded", [True, False], ids=["forwarded", "never_forwarded"])
async def test_with_upstream_disabled_kept_raw_copies_go_at_the_next_maintenance_round(
    write_config, broker, dead_port, forwarded
):
    """docs/store.md I6: "With upstream disabled, raw copies kept from when it was enabled are
    deleted at the next maintenance round (logged once; those upstream had not yet received
    count in `dropped_unsent` ...)" (the round runs "every second"); I12: `dropped_unsent`
    "measures what upstream will never get". Copies already forwarded count 0; copies never
    forwarded (the broker was never reachable) count their samples (docs/metrics.md: "samples
    upstream never got")."""
    async with Central(broker.port) as central:
        path = write(write_config, broker.port if forwarded else dead_port, old_on=True, new_on=False)
        async with Daemon(path) as d:
            data_dir = d.cfg.gateway.data_dir

            def copies() -> dict[int, int]:
                db = sqlite3.connect(f"{(data_dir / 'edgeos.db').as_uri()}?mode=ro", uri=True)
                try:
                    return dict(db.execute("SELECT id, n FROM units WHERE compacted = 1").fetchall())
                finally:
                    db.close()

            await wait_until(lambda: len(copies()) >= 3, 15, "three raw copies kept for upstream")
            if forwarded:
                await wait_until(lambda: set(central.first_sent("old")) >= set(copies()), 10, "copies forwarded")
        kept = copies()
        assert kept
        blobs = {i: units_table(data_dir)[i][3] for i in kept}
        if not forwarded:
            assert central.first_sent("old") == {}
        path2 = write(write_config, broker.port, old_on=False, new_on=True, sync=False)
        async with Daemon(path2):
            await wait_until(lambda: copies() == {}, 5, "the raw copies deleted")
            want = 0 if forwarded else sum(kept.values())
            st = await status_when(path2, lambda st: st["store"]["dropped_unsent"] == want)
    assert st["store"]["dropped_unsent"] == want
    assert st["store"]["dropped_budget"] == 0 and st["store"]["dropped_retention"] == 0
    ts = np.concatenate([wire.decode_unit(b).ts for b in blobs.values()])
    with StoreReader(data_dir) as reader:
        hist = np.concatenate([reader.history(f"old/{n}", int(ts.min()), int(ts.max()) + 1).ts for n in ("a", "s")])
    assert sorted(ts.tolist()) == sorted(hist.tolist()), "the copies' samples stay in the history, once each"
