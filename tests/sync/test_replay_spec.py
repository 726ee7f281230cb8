"""Replay on request, checked edge case by edge case against docs/payload.md ("Replay on
request" and the "Data message" table), by a reading of the document alone.

Each scenario: a store file written with plain sqlite3 (units with ids from 1, so seq = id),
a Sync over it against a real mosquitto on loopback, and one MQTT client that hears every
topic under `edgeos/` in arrival order (one subscription: the broker keeps the gateway's
publishing order) and publishes the replay requests. The expectations are the document's
sentences, quoted beside each check."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import msgpack
import numpy as np
import pytest

from edgeos import wire
from edgeos.config import load_config

GW = "gw1"
REPLAY = f"edgeos/{GW}/replay"
GONE = f"edgeos/{GW}/replay/gone"
TAGS = 7  # tag rows a store starts with: the dictionary's version ("`version` is its length")


# --------------------------------------------------------------------------- the gateway


def config(write_config, port: int, upstream: str = "") -> Path:
    return write_config(
        f"""
[gateway]
id = "{GW}"
data_dir = "data"
shutdown_timeout = "5s"
[store]
commit_interval = "50ms"

[[devices]]
name = "d0"
protocol = "simulated"
poll_interval = "1s"
tags = [{{ name = "a" }}]

[upstream]
enabled = true
host = "127.0.0.1"
port = {port}
reconnect_min = "50ms"
reconnect_max = "300ms"
{upstream}
"""
    )


def make_sync(write_config, port: int, upstream: str = ""):
    from edgeos.sync import Sync
    from edgeos.sync.mqtt import MqttTransport

    cfg = load_config(config(write_config, port, upstream))
    transport = MqttTransport(cfg.gateway.id, cfg.upstream.options, cfg.source.parent)
    return cfg, Sync(cfg.gateway.id, cfg.gateway.data_dir, cfg.upstream.options, transport)


# --------------------------------------------------------------------------- the store


def _unit(device: str, k: int, samples: int, rng: np.random.Generator, tag: int | None = None) -> bytes:
    ts = time.time_ns() + k * 10**6 + np.arange(samples, dtype=np.int64) * 1000
    tags = np.full(samples, tag, np.int32) if tag else np.arange(samples, dtype=np.int32) % TAGS + 1
    return wire.encode_unit(device, tags, ts, rng.random(samples), np.zeros(samples, np.uint32))


def build_store(data_dir: Path, devices: list[str], samples: int | dict[int, int] = 1) -> None:
    """Unit k (1-based) of `devices[k - 1]`; `samples` per unit, or {seq: samples} (default 1)."""
    from edgeos.store import schema

    data_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(data_dir / "edgeos.db")
    schema.create(db)
    db.execute("PRAGMA journal_mode=WAL")
    rng = np.random.default_rng(25)
    rows = []
    for k, device in enumerate(devices, 1):
        n = samples.get(k, 1) if isinstance(samples, dict) else samples
        blob = _unit(device, k, n, rng)
        t = time.time_ns() + k * 10**6
        rows.append((k, device, t, t + n * 1000, n, blob))
    with db:
        db.executemany(
            "INSERT INTO tags(id, device, name, kind) VALUES(?, 'd0', ?, 'number')",
            [(i, f"t{i}") for i in range(1, TAGS + 1)],
        )
        db.executemany("INSERT INTO units(id, device, t_min, t_max, n, data) VALUES(?,?,?,?,?,?)", rows)
    db.close()


def alternating(n: int) -> list[str]:
    """d0 at odd seqs, d1 at even ones: each message of a device carries one unit."""
    return [f"d{(k - 1) % 2}" for k in range(1, n + 1)]


def delete(data_dir: Path, seqs, *, top: int | None = None) -> None:
    """Units lost as retention or the budget would lose them. `top`: the highest id ever given,
    recorded as the store records it when the newest units are deleted (docs/store.md I14/I19:
    `meta.top_id`, written in the transaction of any delete of units)."""
    db = sqlite3.connect(data_dir / "edgeos.db")
    with db:
        db.executemany("DELETE FROM units WHERE id = ?", [(s,) for s in seqs])
        if top is not None:
            db.execute("INSERT OR REPLACE INTO meta VALUES('top_id', ?)", (str(top),))
    db.close()


def held(data_dir: Path) -> dict[int, tuple[str, bytes]]:
    db = sqlite3.connect(f"{(data_dir / 'edgeos.db').as_uri()}?mode=ro", uri=True)
    try:
        return {i: (d, bytes(b)) for i, d, b in db.execute("SELECT id, device, data FROM units")}
    finally:
        db.close()


def runs(seqs) -> list[list[int]]:
    """The maximal inclusive runs of a set of ints, ascending."""
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
    t: float
    topic: str
    payload: bytes

    @property
    def kind(self) -> str:
        if self.topic == GONE:
            return "gone"
        if self.topic == REPLAY:
            return "request"
        if self.topic.endswith("/data"):
            return "data"
        if self.topic.endswith("/tags"):
            return "tags"
        return "other"

    @functools.cached_property
    def doc(self) -> dict:
        return msgpack.unpackb(self.payload, raw=False)


class Listener:
    """Hears everything under edgeos/ (one subscription, so in the broker's order) and asks."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.heard: list[Heard] = []
        self._client: aiomqtt.Client | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="spec-listener") as c:
            await c.subscribe("edgeos/#", qos=1)
            self._client = c
            self._ready.set()
            async for msg in c.messages:
                self.heard.append(Heard(time.monotonic(), str(msg.topic), bytes(msg.payload)))

    async def __aenter__(self) -> Listener:
        self._task = asyncio.create_task(self._run())
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait({self._task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if not self._ready.is_set():
            ready.cancel()
            self._task.cancel()
            raise AssertionError("the test's MQTT client did not subscribe")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        for _ in range(10):  # aiomqtt on 3.11 can swallow one cancellation: bounded retries
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=1.0)
            if done:
                break
        assert self._task.done(), "the test's MQTT client did not stop"

    async def ask(self, payload: bytes | str) -> int:
        """Publish a request; returns the index in `heard` from which its answers can come."""
        assert self._client is not None
        mark = len(self.heard)
        await self._client.publish(REPLAY, payload, qos=1)
        return mark

    # What was heard -------------------------------------------------------------------------

    def data(self, since: int = 0) -> list[Heard]:
        return [h for h in self.heard[since:] if h.kind == "data"]

    def replies(self, since: int = 0) -> list[Heard]:
        """Gone messages and replayed (`rp`) data messages, in arrival order."""
        return [h for h in self.heard[since:] if h.kind == "gone" or (h.kind == "data" and h.doc.get("rp"))]

    def gones(self, since: int = 0) -> list[dict]:
        return [h.doc for h in self.heard[since:] if h.kind == "gone"]

    def first_sent(self) -> set[int]:
        return {s for h in self.data() if not h.doc.get("rp") for s in h.doc["seq"]}

    def dictionary_versions(self) -> list[int]:
        return [h.doc["version"] for h in self.heard if h.kind == "tags"]

    def replayed(self, since: int = 0) -> tuple[Counter, dict[int, bytes]]:
        """Replayed units, whole or joined from their parts: how often each seq, and its bytes."""
        count: Counter = Counter()
        units: dict[int, bytes] = {}
        parts: dict[tuple[int, int], dict[int, bytes]] = {}
        for h in self.data(since):
            doc = h.doc
            if not doc.get("rp"):
                continue
            if "pt" in doc:
                (seq,), (index, n) = doc["seq"], doc["pt"]
                got = parts.setdefault((seq, n), {})
                got[index] = bytes(doc["units"][0])
                if len(got) == n:
                    count[seq] += 1
                    units[seq] = b"".join(got[i] for i in range(n))
                    del parts[(seq, n)]
                continue
            for seq, unit in zip(doc["seq"], doc["units"], strict=True):
                count[seq] += 1
                units[seq] = bytes(unit)
        return count, units


async def wait_until(pred, timeout: float = 10.0, what: str = "") -> None:
    try:
        async with asyncio.timeout(timeout):
            while not pred():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what or pred}") from None


async def started(listener: Listener, sync, expect: dict[int, tuple[str, bytes]]) -> None:
    """Every held unit was sent once already, and the gateway listens for requests."""
    await wait_until(lambda: listener.first_sent() >= set(expect), 20, "the first sending of every unit")
    await wait_until(lambda: sync.status.replay_listening, 10, "replay_listening")


def request(first: int, last: int, dev: object = ..., form: str = "msgpack", gw: str = GW) -> bytes:
    """Written here from the document's table, not with edgeos.wire: `...` leaves `dev` out."""
    doc: dict = {"v": 1, "gw": gw, "first": first, "last": last}
    if dev is not ...:
        doc["dev"] = dev
    if form == "json":
        return ("\n  " + json.dumps(doc)).encode()  # "its first byte other than a blank is `{`"
    return msgpack.packb(doc, use_bin_type=True)


def gone_doc(first: int, last: int, dev: str | None, gone: list[list[int]]) -> dict:
    return {"v": 1, "gw": GW, "first": first, "last": last, "dev": dev, "gone": gone}


# A message "carries one or more units of one device" under `max_message`: units of about
# 2.5 KB under a 4 KiB cap (the smallest allowed) go one a message, so messages can be counted.
# max_inflight 64: a backlog at connect is "more than two in-flight windows of units", so 100
# units are none and their first sending is not held by the cap (docs/payload.md, "Outages
# and backlog policy"); the replays are measured after it.
UNIT_SAMPLES = 300
ONE_UNIT_A_MESSAGE = 'max_message = "4KiB"\nmax_inflight = 64\n'

SETTLE = 0.6  # after the expected answer: long enough for anything extra to show up on loopback


# --------------------------------------------------------------------------- the cases


@pytest.mark.parametrize("top", ["newest_held", "newest_deleted"])
async def test_gone_last_is_the_requests_capped_at_the_highest_seq_given(write_config, broker, running, top):
    """ "`last` the request's capped at the highest seq given": the exact inclusive runs of
    [first, min(last, highest seq given)] it no longer holds ... Seqs above the highest it ever
    gave are neither sent nor gone." With `newest_deleted`, 39 and 40 were given, then lost
    (so the highest given, 40, is above the highest held, 38)."""
    cfg, sync = make_sync(write_config, broker.port)
    data = cfg.gateway.data_dir
    build_store(data, alternating(40))
    lost = {35} | ({39, 40} if top == "newest_deleted" else set())
    delete(data, lost, top=40 if top == "newest_deleted" else None)
    have = held(data)
    async with Listener(broker.port) as central, running(sync):
        await started(central, sync, have)
        mark = await central.ask(request(30, 1000))
        want = {s for s in have if s >= 30}
        await wait_until(lambda: set(central.replayed(mark)[0]) >= want and central.gones(mark), 10, "the answer")
        await asyncio.sleep(SETTLE)
    assert central.gones(mark) == [gone_doc(30, 40, None, runs(lost))]
    count, units = central.replayed(mark)
    assert dict(count) == dict.fromkeys(want, 1), "every held unit of the range once, nothing above 40"
    assert all(units[s] == have[s][1] for s in want)
    kinds = [h.kind for h in central.replies(mark)]
    assert kinds[0] == "gone", "gone comes before the units"


@pytest.mark.parametrize("top", ["newest_held", "newest_deleted"])
async def test_a_range_entirely_above_the_highest_seq_given_is_answered_with_nothing(
    write_config, broker, running, top
):
    """ "Seqs above the highest it ever gave are neither sent nor gone (they do not exist yet)",
    and "nothing when it holds them all". With `newest_deleted`, a range from the lost newest
    units up is answered gone for them only, `last` capped at 40."""
    cfg, sync = make_sync(write_config, broker.port)
    data = cfg.gateway.data_dir
    build_store(data, alternating(40))
    if top == "newest_deleted":
        delete(data, {39, 40}, top=40)
    have = held(data)
    async with Listener(broker.port) as central, running(sync):
        await started(central, sync, have)
        mark = await central.ask(request(41, 5000))
        await central.ask(request(2**62 - 10, 2**62))  # the top of the allowed range
        if top == "newest_deleted":
            await central.ask(request(39, 10**6, "d0"))
        # A sentinel behind them: requests are answered one at a time, so once its answer is
        # complete, the earlier ones have been answered too.
        taken = 4 if top == "newest_deleted" else 3
        await central.ask(request(1, 2))
        await wait_until(lambda: sync.status.replay_requests >= taken, 10, "every request taken")
        await wait_until(lambda: set(central.replayed(mark)[0]) >= {1, 2}, 10, "the sentinel's units")
        await asyncio.sleep(SETTLE)
    assert sync.status.replay_malformed == 0
    expect_gone = [gone_doc(39, 40, "d0", [[39, 40]])] if top == "newest_deleted" else []
    assert central.gones(mark) == expect_gone
    count, _ = central.replayed(mark)
    assert dict(count) == {1: 1, 2: 1}, "nothing but the sentinel's two units was sent"


async def test_a_device_without_units_in_the_range_or_unknown_gets_only_gone_runs(write_config, broker, running):
    """`dev`: "only this device's units"; gone runs are "of any device (it cannot know whose a
    deleted seq was)"; "nothing when it holds them all". d0 has units 1..10 only, d1 11..40,
    and 20..22 (d1's) are lost."""
    cfg, sync = make_sync(write_config, broker.port)
    data = cfg.gateway.data_dir
    build_store(data, ["d0"] * 10 + ["d1"] * 30)
    delete(data, range(20, 23))
    have = held(data)
    async with Listener(broker.port) as central, running(sync):
        await started(central, sync, have)
        mark = await central.ask(request(15, 30, "d0"))  # d0 has none there
        await wait_until(lambda: len(central.gones(mark)) >= 1, 10, "d0's gone")
        await central.ask(request(1, 40, "ghost"))  # no such device
        await wait_until(lambda: len(central.gones(mark)) >= 2, 10, "ghost's gone")
        await central.ask(request(1, 15, "ghost"))  # nothing lost there: nothing at all
        await central.ask(request(1, 2, "d0"))  # sentinel
        await wait_until(lambda: sync.status.replay_requests >= 4, 10, "every request taken")
        await wait_until(lambda: set(central.replayed(mark)[0]) >= {1, 2}, 10, "the sentinel's units")
        await asyncio.sleep(SETTLE)
    assert central.gones(mark) == [
        gone_doc(15, 30, "d0", [[20, 22]]),
        gone_doc(1, 40, "ghost", [[20, 22]]),
    ]
    count, _ = central.replayed(mark)
    assert dict(count) == {1: 1, 2: 1}, "no unit of another device, none for a device that has none"


@pytest.mark.parametrize("cap", [None, 4096])
async def test_a_fragmented_range_takes_several_gone_messages_of_at_most_1000_runs(write_config, broker, running, cap):
    """ "A fragmented range takes several messages of at most 1,000 runs each", each with "the
    exact inclusive runs", "before the units". 2,600 units; every even seq of 2..2400 lost
    (1,200 runs of one seq) and 2501..2510 (one run of ten): 1,201 runs.

    With `max_message` 4 KiB (the smallest allowed): messages are "never more than
    `upstream.max_message` bytes ... The one exception is the retained tag dictionary", so the
    gone messages too (a broker refuses a larger packet whatever its topic)."""
    cfg, sync = make_sync(write_config, broker.port, f'max_message = "{cap}B"\n' if cap else "")
    data = cfg.gateway.data_dir
    build_store(data, alternating(2600))
    lost = set(range(2, 2401, 2)) | set(range(2501, 2511))
    delete(data, lost)
    have = held(data)
    expect_runs = runs(lost)
    assert len(expect_runs) == 1201
    async with Listener(broker.port) as central, running(sync):
        await started(central, sync, have)
        mark = await central.ask(request(1, 2600))
        await wait_until(
            lambda: (
                set(central.replayed(mark)[0]) >= set(have)
                and sum(len(g["gone"]) for g in central.gones(mark)) >= len(expect_runs)
            ),
            20,
            "the whole answer",
        )
        await asyncio.sleep(SETTLE)
    gones = central.gones(mark)
    assert len(gones) >= 2, "more than 1,000 runs take several messages"
    for g in gones:
        assert 1 <= len(g["gone"]) <= 1000, len(g["gone"])
        assert {k: v for k, v in g.items() if k != "gone"} == {
            "v": 1,
            "gw": GW,
            "first": 1,  # "`first` the request's"
            "last": 2600,  # "`last` the request's capped at the highest seq given"
            "dev": None,  # "`dev` nil when the request named no device"
        }
    together = [r for g in gones for r in g["gone"]]
    assert together == expect_runs, "exact runs, each once, in order, covering exactly the lost seqs"
    count, units = central.replayed(mark)
    assert dict(count) == dict.fromkeys(have, 1)
    assert all(units[s] == have[s][1] for s in have)
    kinds = [h.kind for h in central.replies(mark)]
    n = len(gones)
    assert kinds[:n] == ["gone"] * n and "gone" not in kinds[n:], "every gone message before the units"
    if cap:
        sizes = {
            h.kind: max(len(x.payload) for x in central.replies(mark) if x.kind == h.kind)
            for h in central.replies(mark)
        }
        assert all(size <= cap for size in sizes.values()), f"largest payloads: {sizes} (max_message {cap})"


async def test_gone_messages_fit_the_brokers_maximum_packet_size(write_config, make_broker, running):
    """The same fragmented answer under an MQTT 5 broker that announces a Maximum Packet Size
    of 6,000 bytes: it "lowers the cap for that session to that size less 1 KiB", and "never
    more than `upstream.max_message` bytes" (docs/config.md: "no message exceeds it") holds
    for the gone answer too, or the broker drops the connection and the answer is lost (at
    every retry of the consumer's request)."""
    broker = make_broker(extra=["max_packet_size 6000"])
    cfg, sync = make_sync(write_config, broker.port)
    data = cfg.gateway.data_dir
    build_store(data, alternating(2600))
    lost = set(range(2, 2401, 2))
    delete(data, lost)
    have = held(data)
    async with Listener(broker.port) as central, running(sync):
        await started(central, sync, have)
        mark = await central.ask(request(1, 2600))
        with contextlib.suppress(AssertionError):
            await wait_until(
                lambda: (
                    sync.status.failures > 0
                    or (
                        set(central.replayed(mark)[0]) >= set(have)
                        and sum(len(g["gone"]) for g in central.gones(mark)) >= len(lost)
                    )
                ),
                10,
            )
        await asyncio.sleep(SETTLE)
    st = sync.status
    assert st.max_message == 6000 - 1024
    assert st.failures == 0 and st.connects == 1, f"the answer cost the connection: {st.last_error}"
    assert [r for g in central.gones(mark) for r in g["gone"]] == runs(lost)
    assert dict(central.replayed(mark)[0]) == dict.fromkeys(have, 1)
    assert max(len(h.payload) for h in central.replies(mark)) <= st.max_message


async def test_seqs_below_the_lowest_held_are_gone(write_config, broker, running):
    """Retention dropped everything before 21: "the exact inclusive runs of [first, min(last,
    highest seq given)] it no longer holds", from the request's `first` on, and "`pv` ... 0:
    the gateway held no earlier unit of the device, because ... retention dropped all before
    it"."""
    cfg, sync = make_sync(write_config, broker.port)
    data = cfg.gateway.data_dir
    build_store(data, alternating(40))
    delete(data, range(1, 21))
    have = held(data)
    async with Listener(broker.port) as central, running(sync):
        await started(central, sync, have)
        mark = await central.ask(request(5, 25, "d0"))
        await wait_until(lambda: set(central.replayed(mark)[0]) >= {21, 23, 25} and central.gones(mark), 10)
        await asyncio.sleep(SETTLE)
    assert central.gones(mark) == [gone_doc(5, 25, "d0", [[5, 20]])]
    count, units = central.replayed(mark)
    assert dict(count) == {21: 1, 23: 1, 25: 1}
    assert all(units[s] == have[s][1] for s in count)
    replays = [h.doc for h in central.data(mark) if h.doc.get("rp")]
    assert replays[0]["seq"][0] == 21 and replays[0]["pv"] == 0
    assert central.replies(mark)[0].kind == "gone"


@pytest.mark.parametrize("dev", [None, "d0"])
async def test_units_deleted_while_a_replay_is_answered_are_answered_gone(write_config, broker, running, dev):
    """ "the exact inclusive runs ... it no longer holds" and "republishes every unit it still
    holds": the budget or retention may delete units after the gone answer and before the
    units are read (an independent tester saw seqs in neither). Here 11..14 are deleted right
    after the first answer is planned: they must be answered gone, before the units above
    them, and every seq of the range is then replayed or gone."""
    cfg, sync = make_sync(write_config, broker.port)
    data = cfg.gateway.data_dir
    build_store(data, alternating(40))
    have = held(data)
    plan = sync._replay_plan

    def plan_then_delete(outbox, req):
        out = plan(outbox, req)
        delete(data, range(11, 15))
        return out

    sync._replay_plan = plan_then_delete
    async with Listener(broker.port) as central, running(sync):
        await started(central, sync, have)
        mark = await central.ask(request(1, 40, dev))
        want = {s for s in range(1, 41) if s not in range(11, 15) and (dev is None or have[s][0] == dev)}
        await wait_until(lambda: set(central.replayed(mark)[0]) >= want and central.gones(mark), 10)
        await asyncio.sleep(SETTLE)
    assert central.gones(mark) == [gone_doc(1, 40, dev, [[11, 14]])]
    count, units = central.replayed(mark)
    assert set(count) == want and all(units[s] == have[s][1] for s in count)
    replies = central.replies(mark)
    first_above = next(i for i, h in enumerate(replies) if h.kind == "data" and max(h.doc["seq"]) > 14)
    assert [h.kind for h in replies].index("gone") < first_above
    assert sync.status.replay_gone == 4


async def test_replayed_messages_are_the_stored_units_marked_rp(write_config, broker, running):
    """ "republishes every unit it still holds in the range ... byte for byte as first sent: the
    same seq, the same unit bytes, in envelopes marked `rp` (their `pv` is the device's previous
    unit held now, and `td` the current dictionary version" and the Data message table; "never
    more than `upstream.max_message` bytes", a larger unit in parts ("Replays of such a unit
    are split the same way, under the same cap"). After the first sending a tag (and a unit
    naming it) is added, so the current dictionary version (8) is above the one the replayed
    units were first sent with (7)."""
    cap = 8 * 1024
    cfg, sync = make_sync(write_config, broker.port, 'max_message = "8KiB"\n')
    data = cfg.gateway.data_dir
    n = 30
    build_store(data, alternating(n), samples={k: (1500 if k in (9, 14) else 700) for k in range(1, n + 1)})
    lost = {5, 7, 12}  # d0 loses 5 and 7 (so 9's previous held d0 unit is 3), d1 loses 12
    delete(data, lost)
    have = held(data)
    assert len(have[9][1]) > cap and len(have[14][1]) > cap  # sent in parts
    async with Listener(broker.port) as central, running(sync):
        await started(central, sync, have)
        db = sqlite3.connect(data / "edgeos.db")
        with db:
            db.execute("INSERT INTO tags(id, device, name, kind) VALUES(8, 'd0', 't8', 'number')")
            blob = _unit("d0", n + 1, 1, np.random.default_rng(1), tag=8)
            t = time.time_ns()
            db.execute(
                "INSERT INTO units(id, device, t_min, t_max, n, data) VALUES(?,?,?,?,?,?)", (n + 1, "d0", t, t, 1, blob)
            )
        db.close()
        have = held(data)
        await wait_until(lambda: n + 1 in central.first_sent() and 8 in central.dictionary_versions(), 10, "seq 31")
        mark = await central.ask(request(1, n + 1))
        await wait_until(lambda: set(central.replayed(mark)[0]) >= set(have) and central.gones(mark), 10, "the answer")
        await asyncio.sleep(SETTLE)
    first = [h.doc for h in central.data() if not h.doc.get("rp")]
    assert {d["td"] for d in first if d["seq"][0] <= n} == {TAGS}, "first sent with version 7"
    assert central.gones(mark) == [gone_doc(1, n + 1, None, runs(lost))]
    count, units = central.replayed(mark)
    assert dict(count) == dict.fromkeys(have, 1)
    assert all(units[s] == have[s][1] for s in have), "the same unit bytes as stored"

    def previous_held(dev: str, seq: int) -> int:
        return max((s for s, (d, _) in have.items() if d == dev and s < seq), default=0)

    replays = [h for h in central.data(mark) if h.doc.get("rp")]
    assert any("pt" in h.doc for h in replays), "the large units went in parts"
    for h in replays:
        doc = h.doc
        assert len(h.payload) <= cap, (len(h.payload), doc["seq"])
        dev = doc["dev"]
        assert h.topic == f"edgeos/{GW}/{dev}/data"
        keys = list(doc)
        assert keys[-1] == "units", "units is the last key"
        assert set(keys) <= {"v", "gw", "dev", "seq", "td", "pv", "rp", "pt", "units"}
        assert doc["v"] == 1 and doc["gw"] == GW and doc["rp"] is True
        assert doc["seq"] == sorted(doc["seq"]) and all(have[s][0] == dev for s in doc["seq"])
        assert doc["td"] == TAGS + 1, "td: the current dictionary version"
        assert doc["pv"] == previous_held(dev, doc["seq"][0]), (doc["seq"], doc["pv"])
        if "pt" in doc:
            assert len(doc["seq"]) == 1 and len(doc["units"]) == 1
        else:
            assert len(doc["seq"]) == len(doc["units"])
            for u in doc["units"]:
                assert msgpack.unpackb(u, raw=False)["d"] == dev
    # The parts of a split unit: one seq, one pv, [index, count] in index order, one count.
    for seq in (9, 14):
        pts = [h.doc["pt"] for h in replays if h.doc["seq"] == [seq]]
        count_ = pts[0][1]
        assert count_ >= 2 and pts == [[i, count_] for i in range(count_)], pts
    # pv of the interesting ones, from the held units (not the ones first sent):
    pv = {h.doc["seq"][0]: h.doc["pv"] for h in replays}
    assert (pv[1], pv[3], pv[9], pv[2], pv[14]) == (0, 1, 3, 0, 10)


async def test_requests_in_a_row_are_answered_one_at_a_time_each_completely(write_config, broker, running):
    """ "one request at a time": three requests published back to back; the answers of one
    (gone first, then its units) are not interleaved with another's, and each is complete. The
    order between requests is not promised, so it is not checked. A mild cap spreads them."""
    cfg, sync = make_sync(write_config, broker.port, ONE_UNIT_A_MESSAGE + "rate_limit_messages = 30\n")
    data = cfg.gateway.data_dir
    build_store(data, alternating(60), samples=UNIT_SAMPLES)
    lost = {10, 15, 45, 46}
    delete(data, lost)
    have = held(data)
    asks = {
        "R1": (
            request(1, 40, "d0"),
            gone_doc(1, 40, "d0", [[10, 10], [15, 15]]),
            {s for s in have if s <= 40 and s % 2},
        ),
        "R2": (
            request(1, 40, "d1"),
            gone_doc(1, 40, "d1", [[10, 10], [15, 15]]),
            {s for s in have if s <= 40 and not s % 2},
        ),
        "R3": (request(41, 60), gone_doc(41, 60, None, [[45, 46]]), {s for s in have if s > 40}),
    }

    def label(h: Heard) -> str:
        doc = h.doc
        if h.kind == "gone":
            return next(k for k, (_, g, _) in asks.items() if g == doc)
        s = doc["seq"][0]
        return "R3" if s > 40 else ("R1" if doc["dev"] == "d0" else "R2")

    async with Listener(broker.port) as central, running(sync):
        await started(central, sync, have)
        await asyncio.sleep(1.2)  # the burst bucket full again, whatever the first sending used
        mark = len(central.heard)
        for payload, _, _ in asks.values():
            await central.ask(payload)
        want = set().union(*(u for _, _, u in asks.values()))
        await wait_until(
            lambda: set(central.replayed(mark)[0]) >= want and len(central.gones(mark)) >= 3, 15, "three answers"
        )
        await asyncio.sleep(SETTLE)
    replies = central.replies(mark)
    labels = [label(h) for h in replies]
    blocks = [labels[0]] + [b for a, b in zip(labels, labels[1:], strict=False) if a != b]
    assert sorted(blocks) == ["R1", "R2", "R3"], f"interleaved answers: {blocks}"
    for name, (_, gone, units) in asks.items():
        mine = [h for h in replies if label(h) == name]
        assert mine[0].kind == "gone" and mine[0].doc == gone, "its gone first"
        assert all(h.kind == "data" for h in mine[1:])
        assert sorted(s for h in mine[1:] for s in h.doc["seq"]) == sorted(units), name


async def test_beyond_16_waiting_requests_new_ones_are_dropped(write_config, broker, running):
    """ "beyond 16 waiting requests, new ones are counted in `replay_dropped` and ignored".
    Request A (80 units) under a cap of 20 messages/s takes about 3 s; once its first unit
    arrived (A is being answered, no longer waiting), 20 one-unit requests follow at once:
    the first 16 wait and are answered, the last 4 are dropped."""
    cfg, sync = make_sync(write_config, broker.port, ONE_UNIT_A_MESSAGE + "rate_limit_messages = 20\n")
    data = cfg.gateway.data_dir
    build_store(data, alternating(100), samples=UNIT_SAMPLES)
    have = held(data)
    async with Listener(broker.port) as central, running(sync):
        await started(central, sync, have)
        mark = await central.ask(request(21, 100))
        await wait_until(lambda: central.replayed(mark)[0], 10, "A under way")
        for s in range(1, 21):
            await central.ask(request(s, s))
        in_flight = sum(central.replayed(mark)[0].values())
        await wait_until(lambda: set(central.replayed(mark)[0]) >= set(range(1, 17)) | set(range(21, 101)), 20, "A+16")
        await asyncio.sleep(1.0)  # four more single units would take 0.2 s at the cap
    assert in_flight < 80, "A was still being answered when the 20 arrived (else the case proves nothing)"
    count, _ = central.replayed(mark)
    assert sync.status.replay_dropped == 4
    assert dict(count) == dict.fromkeys(range(1, 17), 1) | dict.fromkeys(range(21, 101), 1)


@pytest.mark.parametrize("cap", ["messages", "bytes"])
async def test_the_replay_obeys_the_rate_cap(write_config, broker, running, cap):
    """ "sends replays through the backlog lane's rate cap (`rate_limit_bytes`,
    `rate_limit_messages`, ...)" with "one second of burst": a replay of N messages (B bytes)
    under a cap of M/s (C bytes/s) spans at least about (N - M)/M s ((B - C)/C s) between its
    first and last message. Bounds at 70 % of that; uncapped it takes milliseconds. No upper
    bound: speed is for bench/, the 20 s wait is only liveness."""
    if cap == "messages":
        m = 20
        cfg, sync = make_sync(write_config, broker.port, ONE_UNIT_A_MESSAGE + f"rate_limit_messages = {m}\n")
        build_store(cfg.gateway.data_dir, alternating(60), samples=UNIT_SAMPLES)
    else:
        c = 40_000
        cfg, sync = make_sync(write_config, broker.port, ONE_UNIT_A_MESSAGE + f'rate_limit_bytes = "{c}B"\n')
        build_store(cfg.gateway.data_dir, alternating(50), samples=UNIT_SAMPLES)
    have = held(cfg.gateway.data_dir)
    async with Listener(broker.port) as central, running(sync):
        await started(central, sync, have)
        await asyncio.sleep(1.2)  # the bucket refilled after the first sending
        mark = await central.ask(request(1, max(have)))
        await wait_until(lambda: set(central.replayed(mark)[0]) >= set(have), 20, "the whole replay")
        await asyncio.sleep(SETTLE)
    replays = [h for h in central.data(mark) if h.doc.get("rp")]
    span = replays[-1].t - replays[0].t
    if cap == "messages":
        n = len(replays)
        assert n == len(have)  # one unit a message
        floor = (n - m) / m
    else:
        total = sum(len(h.payload) for h in replays)
        assert total > 3 * c
        floor = (total - c) / c
    assert span >= 0.7 * floor, (
        f"{len(replays)} replay messages in {span:.2f} s; the cap allows no less than {floor:.2f} s"
    )


async def test_the_replay_and_the_backlog_drain_share_one_bucket(write_config, broker, running):
    """ "one bucket shared with the backlog drain": 80 units are a backlog at connect (more than
    two windows of the default 16), drained under 40 messages/s; a replay of 80 more messages
    asked for meanwhile draws from the same bucket, so the 160 messages span at least about
    (160 - 40)/40 = 3 s (two buckets side by side: about 1 s; one after the other: 2 s)."""
    m = 40
    cfg, sync = make_sync(write_config, broker.port, f'max_message = "4KiB"\nrate_limit_messages = {m}\n')
    build_store(cfg.gateway.data_dir, alternating(80), samples=UNIT_SAMPLES)
    have = held(cfg.gateway.data_dir)
    async with Listener(broker.port) as central, running(sync):
        await wait_until(lambda: sync.status.replay_listening, 10, "replay_listening")
        mark = await central.ask(request(1, 80))
        await wait_until(
            lambda: central.first_sent() >= set(have) and set(central.replayed(mark)[0]) >= set(have), 20, "both"
        )
        await asyncio.sleep(SETTLE)
    data = central.data()
    assert len(data) == 160, "one unit a message"
    first_backlog_done = max(h.t for h in data if not h.doc.get("rp"))
    first_replay = min(h.t for h in data if h.doc.get("rp"))
    assert first_replay < first_backlog_done, "the replay was asked for and answered during the drain"
    span = data[-1].t - data[0].t
    floor = (len(data) - m) / m
    assert span >= 0.75 * floor, f"{len(data)} messages in {span:.2f} s; one bucket allows no less than {floor:.2f} s"


@pytest.mark.parametrize("form", ["msgpack", "json"])
@pytest.mark.parametrize("dev", ["absent", "d0", "nil"])
async def test_request_forms_and_dev(write_config, broker, running, form, dev):
    """ "a msgpack map, or the same keys as a JSON object (a payload whose first byte other than
    a blank is `{`)"; `dev` "optional: only this device's units"; the gone answer has "`dev` nil
    when the request named no device". A `dev` present as nil (JSON null) is not described: the
    table types `dev` as str, and "other ... types" are malformed, while nil is how the gone
    answer says "no device". Either reading is accepted (answered as without `dev`, or counted
    malformed with no answer); anything else fails."""
    cfg, sync = make_sync(write_config, broker.port)
    data = cfg.gateway.data_dir
    build_store(data, alternating(12))
    delete(data, {4})
    have = held(data)
    payload = request(3, 8, {"absent": ..., "d0": "d0", "nil": None}[dev], form=form)
    if form == "json":
        assert payload.lstrip()[:1] == b"{" and payload[:1] != b"{"
    every = {s for s in have if 3 <= s <= 8}
    async with Listener(broker.port) as central, running(sync):
        await started(central, sync, have)
        mark = await central.ask(payload)
        await wait_until(
            lambda: sync.status.replay_requests + sync.status.replay_malformed >= 1, 10, "the request taken"
        )
        if sync.status.replay_requests:
            want = {s for s in every if dev != "d0" or s % 2}
            await wait_until(lambda: set(central.replayed(mark)[0]) >= want and central.gones(mark), 10, "answer")
        await asyncio.sleep(SETTLE)
    count, units = central.replayed(mark)
    if dev == "nil" and sync.status.replay_malformed:
        assert sync.status.replay_requests == 0 and central.replies(mark) == []
        return
    assert sync.status.replay_malformed == 0 and sync.status.replay_requests == 1
    named = "d0" if dev == "d0" else None
    assert central.gones(mark) == [gone_doc(3, 8, named, [[4, 4]])]
    want = {s for s in every if dev != "d0" or s % 2}
    assert dict(count) == dict.fromkeys(want, 1)
    assert all(units[s] == have[s][1] for s in want)
    assert central.replies(mark)[0].kind == "gone"
