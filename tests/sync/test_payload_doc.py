"""docs/payload.md is enough to read what the gateway sends: a consumer-side decoder written
from the document alone (msgpack, zlib, numpy) by someone who never read edgeos/wire.py,
checked against the real gateway's messages (edgeos.runtime with simulated devices, a
mosquitto of the test's own) and against edgeos.wire, the reference, for every unit,
envelope, dictionary and gone answer."""

from __future__ import annotations

import asyncio
import math
import time
import zlib
from collections import defaultdict
from pathlib import Path

import aiomqtt
import msgpack
import numpy as np
import pytest

from edgeos import wire
from edgeos.config import load_config
from edgeos.runtime import Runtime

# --------------------------------------------------------------------------------------------
# The decoder, from docs/payload.md only.

INT_TYPES = {"<i1", "<i2", "<i4", "<i8"}
UNIT_VERSION = 3  # the newest version this decoder was built for


def unshuffle(blob: bytes, n: int, dtype: str) -> np.ndarray:
    """'Shuffled and deflated': n × w bytes regrouped by significance (all first bytes, then all
    second bytes, ...), then zlib. MUST refuse anything but n × w bytes; stops inflating there."""
    w = np.dtype(dtype).itemsize
    d = zlib.decompressobj()
    raw = d.decompress(bytes(blob), n * w + 1)  # never more than one byte past the bound
    if len(raw) != n * w or not d.eof or d.unconsumed_tail or d.unused_data:
        raise ValueError(f"column inflates to {len(raw)}{'+' if not d.eof else ''} bytes, not {n} × {w}")
    return np.frombuffer(raw, np.uint8).reshape(w, n).T.copy().view(dtype).reshape(n)


def plain(blob: bytes, n: int, dtype: str) -> np.ndarray:
    if len(blob) != n * np.dtype(dtype).itemsize:
        raise ValueError(f"plain column of {len(blob)} bytes for {n} × {dtype}")
    return np.frombuffer(bytes(blob), dtype).copy()


def text_column(u: dict, values: np.ndarray, n: int) -> list | None:
    if "txt" not in u:
        return None
    txt = u["txt"]
    if not isinstance(txt, list) or len(txt) != n or not all(t is None or isinstance(t, str) for t in txt):
        raise ValueError("txt is not n entries of str or nil")
    # "" beside a value that is not NaN is nil (edgeos before 2026-12-04).
    return [None if t == "" and not math.isnan(v) else t for t, v in zip(txt, values.tolist(), strict=True)]


def doc_unit(blob: bytes) -> dict:
    u = msgpack.unpackb(blob, raw=False)
    v, n = u["v"], u["n"]
    if not isinstance(v, int) or v < 1 or v > UNIT_VERSION:
        raise ValueError(f"unit version {v} is not one this decoder reads (1..{UNIT_VERSION})")
    if v == 3:
        if u["tgd"] not in INT_TYPES:
            raise ValueError(f"tgd {u['tgd']}")
        tags = np.cumsum(unshuffle(u["tag"], n, u["tgd"]).astype(np.int64))
        k = unshuffle(u["ts"], n, u["tsd"])
        if k.dtype.kind not in "iu":
            raise ValueError(f"tsd {u['tsd']}")
        ts = np.int64(u["t0"]) + k.astype(np.int64) * np.int64(u["tst"])
        if "vs" in u:
            if u["vd"] not in INT_TYPES or not 0 <= u["vs"] <= 6:
                raise ValueError(f"vd {u['vd']} with vs {u['vs']}")
            values = plain(u["val"], n, u["vd"]).astype(np.float64) / np.float64(10.0 ** u["vs"])
        else:
            if u["vd"] != "<f8":
                raise ValueError(f"vd {u['vd']} without vs")
            values = unshuffle(u["val"], n, "<f8")
        quality = unshuffle(u["q"], n, "<u4") if "q" in u else np.zeros(n, np.uint32)
    else:
        tw = u["tw"] if v == 2 else 4
        if tw not in (2, 4):
            raise ValueError(f"tw {tw}")
        tags = plain(u["tag"], n, {2: "<u2", 4: "<i4"}[tw]).astype(np.int64)
        ts = plain(u["ts"], n, "<i8")
        values = plain(u["val"], n, "<f8")
        quality = plain(u["q"], n, "<u4") if v == 1 or "q" in u else np.zeros(n, np.uint32)
    return {
        "v": v,
        "device": u["d"],
        "tags": tags,
        "ts": ts,
        "values": values,
        "quality": quality,
        "text": text_column(u, values, n),
        "keys": set(u),
    }


ENVELOPE = {"v", "gw", "dev", "seq", "td", "pv", "rp", "pt", "units"}


def doc_envelope(payload: bytes) -> dict:
    m = msgpack.unpackb(payload, raw=False)
    assert set(m) <= ENVELOPE, set(m) - ENVELOPE
    assert m["v"] == 1 and list(m)[-1] == "units"  # "the last key"
    seqs = m["seq"]
    assert len(seqs) == len(m["units"]) and seqs == sorted(set(seqs))
    if "pt" in m:
        index, count = m["pt"]
        assert len(seqs) == 1 and 0 <= index < count
    assert m.get("rp", True) is True  # present (true) or absent
    return m


def doc_dictionary(payload: bytes) -> dict:
    d = msgpack.unpackb(payload, raw=False)
    assert set(d) == {"v", "gw", "version", "tags"} and d["v"] == 1
    assert d["version"] == len(d["tags"])  # "`version` is its length"
    out = {}
    for tag_id, device, name, kind, unit in d["tags"]:
        assert tag_id not in out and kind in ("number", "bool", "string")
        out[tag_id] = (device, name, kind, unit)
    return {"gw": d["gw"], "version": d["version"], "tags": out}


def doc_gone(payload: bytes) -> dict:
    g = msgpack.unpackb(payload, raw=False)
    assert set(g) == {"v", "gw", "first", "last", "dev", "gone"} and g["v"] == 1
    runs = [tuple(r) for r in g["gone"]]
    assert 1 <= len(runs) <= 1000
    for a, b in runs:
        assert g["first"] <= a <= b <= g["last"]
    return {**g, "gone": runs}


def join_parts(parts: dict[int, bytes], count: int) -> bytes | None:
    """Parts of one seq and one count; the unit once every index 0..count-1 is held."""
    if sorted(parts) != list(range(count)):
        return None
    return b"".join(parts[i] for i in range(count))


# --------------------------------------------------------------------------------------------
# Comparison with the reference.


def same_unit(mine: dict, ref: wire.Unit) -> None:
    assert mine["device"] == ref.device
    assert mine["tags"].tolist() == ref.tags.tolist()
    assert mine["ts"].tolist() == ref.ts.tolist()
    assert mine["values"].dtype == np.float64 and ref.values.dtype == np.float64
    assert mine["values"].view(np.uint64).tolist() == ref.values.view(np.uint64).tolist()  # NaN, -0.0
    assert mine["quality"].tolist() == ref.quality.tolist()
    assert mine["text"] == (None if ref.text is None else list(ref.text))


def test_doc_decoder_refuses_what_the_doc_says_a_decoder_must_refuse():
    rng = np.random.default_rng(1)
    n = 50
    blob = wire.encode_unit(
        "d",
        np.arange(n, dtype=np.int32) % 5 + 1,
        1_700_000_000_000_000_000 + np.arange(n, dtype=np.int64) * 10**6,
        rng.random(n),
        np.where(np.arange(n) % 7 == 0, 0x80000000, 0).astype(np.uint32),
    )
    u = msgpack.unpackb(blob)
    assert u["v"] == 3 and "q" in u and "vs" not in u
    same_unit(doc_unit(blob), wire.decode_unit(blob))
    w = np.dtype(u["tsd"]).itemsize
    for bad_len in (n * w - 1, n * w + 1, 0):
        bad = msgpack.packb({**u, "ts": zlib.compress(bytes(bad_len))})
        with pytest.raises(ValueError):
            doc_unit(bad)
        with pytest.raises(ValueError):
            wire.decode_unit(bad)
    bomb = msgpack.packb({**u, "q": zlib.compress(bytes(64 << 20))})  # 64 MiB of zeros, ~64 KB
    with pytest.raises(ValueError):
        doc_unit(bomb)
    with pytest.raises(ValueError):
        wire.decode_unit(bomb)
    # value = int / 10^vs as a float64 division: 3 / 10 is 0.3, where 3 × 0.1 is 0.30000000000000004.
    ints = np.arange(-300, 300, dtype=np.int64)
    tenths = wire.encode_unit(
        "d", np.ones(600, np.int32), np.arange(600, dtype=np.int64), ints / 10.0, np.zeros(600, np.uint32)
    )
    assert msgpack.unpackb(tenths)["vs"] == 1
    mine = doc_unit(tenths)
    same_unit(mine, wire.decode_unit(tenths))
    assert mine["values"].tolist() == (ints / 10.0).tolist() != (ints * 0.1).tolist()
    newer = msgpack.packb({**u, "v": 4})
    with pytest.raises(ValueError):
        doc_unit(newer)
    with pytest.raises(ValueError):
        wire.decode_unit(newer)


# --------------------------------------------------------------------------------------------
# The real gateway.


BIG_TAGS = 2500  # one device, a unit of about 20 KB (v3) or 45 KB (v2): parts under 16 KiB


def gateway_config(path: Path, port: int, unit_version: int) -> Path:
    big = ", ".join(f'{{ name = "b{i}", signal = "sine", period = "7s", noise = 0.1 }}' for i in range(BIG_TAGS))
    path.write_text(
        f"""
[gateway]
id = "gw1"
data_dir = "data"
shutdown_timeout = "5s"
[store]
commit_interval = "50ms"
unit_version = {unit_version}

[[devices]]
name = "floats"
protocol = "simulated"
poll_interval = "20ms"
tags = [{{ name = "s", signal = "sine", period = "3s", unit = "bar" }}, {{ name = "w", signal = "random_walk" }}]

[[devices]]
name = "ints"
protocol = "simulated"
poll_interval = "20ms"
tags = [{{ name = "count", signal = "counter", period = "100ms" }},
        {{ name = "on", signal = "bool", period = "300ms" }}]

[[devices]]
name = "regs"
protocol = "simulated"
poll_interval = "20ms"
[[devices.tags]]
name = "level"
signal = "ramp"
amplitude = 100.0
resolution = 0.5
period = "2s"
[[devices.tags]]
name = "temp"
signal = "step"
amplitude = 10.0
offset = -3.0
resolution = 0.25
period = "1s"

[[devices]]
name = "text"
protocol = "simulated"
poll_interval = "20ms"
tags = [{{ name = "mode", signal = "text", period = "400ms" }}, {{ name = "x", signal = "sine", period = "2s" }}]

[[devices]]
name = "limits"
protocol = "simulated"
poll_interval = "20ms"
fail_after = "700ms"
reconnect_min = "50ms"
reconnect_max = "100ms"
[[devices.tags]]
name = "p"
signal = "sine"
period = "1s"
filters = [{{ type = "range", low = -0.5, high = 0.5, mode = "bad" }}]

[[devices]]
name = "big"
protocol = "simulated"
poll_interval = "300ms"
tags = [{big}]

[upstream]
enabled = true
host = "127.0.0.1"
port = {port}
reconnect_min = "50ms"
reconnect_max = "300ms"
max_message = "16KiB"
"""
    )
    return path


class Seen:
    """Every payload the central side got, in arrival order, with the run it came in."""

    def __init__(self) -> None:
        self.payloads: list[tuple[int, str, bytes]] = []
        self.run = 0


async def listen(port: int, seen: Seen, ready: asyncio.Event) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier="doc-reader") as c:
        await c.subscribe("edgeos/+/+/data", qos=1)
        await c.subscribe("edgeos/+/tags", qos=1)
        await c.subscribe("edgeos/+/replay/gone", qos=1)
        ready.set()
        async for msg in c.messages:
            seen.payloads.append((seen.run, str(msg.topic), bytes(msg.payload)))


def unit_kinds(blob: bytes) -> set[str]:
    u = msgpack.unpackb(blob)
    kinds = {f"v{u['v']}"}
    if u["v"] == 3:
        kinds |= {"vs" if "vs" in u else "float"}
    kinds |= {k for k in ("q", "txt") if k in u}
    # The column types in use: "tsd <i2", "vs 1", "tw 2", ...
    kinds |= {f"{k} {u[k]}" for k in ("tgd", "tsd", "vd", "vs", "tw") if k in u}
    return kinds


async def run_gateway(path: Path, seen: Seen, until, timeout: float = 20.0, after=None) -> Runtime:
    rt = Runtime(load_config(path))
    task = asyncio.create_task(rt.run())
    try:
        async with asyncio.timeout(timeout):
            await asyncio.sleep(1.5)
            while not until(rt):
                assert not task.done(), task
                await asyncio.sleep(0.05)
            if after is not None:
                await after(rt)
    finally:
        rt.stop()
        await asyncio.wait_for(task, 15)
    return rt


async def test_doc_decoder_matches_the_gateway(tmp_path, broker):
    port = broker.port
    seen = Seen()
    ready = asyncio.Event()
    listener = asyncio.create_task(listen(port, seen, ready))
    await asyncio.wait_for(ready.wait(), 10)
    counts: dict[str, int] = defaultdict(int)

    def count_units(run: int) -> dict[str, int]:
        c: dict[str, int] = defaultdict(int)
        for r, topic, p in seen.payloads:
            if r == run and topic.endswith("/data"):
                m = msgpack.unpackb(p)
                c["part"] += "pt" in m
                if "pt" not in m:
                    for blob in m["units"]:
                        for k in unit_kinds(blob):
                            c[k] += 1
        return c

    def enough(keys):
        return lambda rt: all(count_units(seen.run)[k] >= 3 for k in keys)

    try:
        # Run 1: version 3 units.
        path = gateway_config(tmp_path / "edgeos.toml", port, 3)
        await run_gateway(path, seen, enough(["vs", "float", "q", "txt", "part"]))
        run1_seqs = sorted(
            {s for r, t, p in seen.payloads if r == 0 and t.endswith("/data") for s in msgpack.unpackb(p)["seq"]}
        )
        assert run1_seqs
        # Retention drops everything run 1 stored: a replay request for it is answered gone.
        from edgeos.store import StoreSettings, StoreWriter

        w = StoreWriter(tmp_path / "data", (), StoreSettings(retention_ns=60 * 10**9))
        try:
            w.trim(time.time_ns() + 86_400 * 10**9)
        finally:
            w.close()

        # Run 2: version 2 units, same store; then a replay request from seq 1.
        seen.run = 1
        path = gateway_config(tmp_path / "edgeos.toml", port, 2)
        request_last = 5_000_000

        async def ask(rt: Runtime) -> None:
            async with aiomqtt.Client("127.0.0.1", port) as c:
                await c.publish("edgeos/gw1/replay", wire.encode_replay_request("gw1", 1, request_last), qos=1)
            async with asyncio.timeout(10):
                while not any(r == 1 and t.endswith("/gone") for r, t, _ in seen.payloads) or not any(
                    r == 1 and t.endswith("/data") and "rp" in msgpack.unpackb(p) for r, t, p in seen.payloads
                ):
                    await asyncio.sleep(0.05)

        await run_gateway(
            path,
            seen,
            lambda rt: enough(["v2", "q", "txt", "part"])(rt) and rt.sync.status.replay_listening,
            after=ask,
        )
        await asyncio.sleep(0.3)
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)

    # ---- every payload, decoded both ways
    consumer = wire.Consumer()
    joined_ref: dict[int, wire.Unit] = {}
    parts: dict[tuple[int, int], dict[int, bytes]] = defaultdict(dict)
    dictionary: dict | None = None
    chain: list[tuple[int, int, str, int, int]] = []
    gones = []
    replayed: dict[int, int] = {}  # seq: index of its first replay message in arrival order
    for i, (run, topic, p) in enumerate(seen.payloads):
        if topic.endswith("/tags"):
            mine = doc_dictionary(p)
            ref = wire.decode_dictionary(p)
            assert mine["gw"] == "gw1" and topic == "edgeos/gw1/tags"
            assert {i: (e.device, e.name, e.kind, e.unit) for i, e in ref.items()} == mine["tags"]
            if dictionary is not None:  # only grows; ids never reused or renamed
                assert mine["version"] >= dictionary["version"]
                assert all(mine["tags"][i] == e for i, e in dictionary["tags"].items())
            dictionary = mine
            counts["dictionary"] += 1
            continue
        if topic.endswith("/gone"):
            gones.append((i, doc_gone(p), wire.decode_gone(p)))
            continue
        m = doc_envelope(p)
        env = wire.decode_envelope(p)
        assert topic == f"edgeos/{m['gw']}/{m['dev']}/data"
        assert (env.gateway, env.device, list(env.seqs)) == (m["gw"], m["dev"], m["seq"])
        assert (env.dictionary, env.prev, env.replay) == (m["td"], m["pv"], m.get("rp", False))
        assert (tuple(env.part) if env.part else None) == (tuple(m["pt"]) if "pt" in m else None)
        assert len(p) <= 16 * 1024
        # The dictionary came first, at least of version td, and names every tag used.
        assert dictionary is not None and dictionary["version"] >= m["td"]
        if not m.get("rp"):
            chain.append((m["seq"][0], m["seq"][-1], m["dev"], m["pv"], run))
        for d in consumer.feed(p):
            joined_ref[d.seq] = d.unit
        if "pt" in m:
            index, count = m["pt"]
            (seq,) = m["seq"]
            parts[(seq, count)][index] = m["units"][0]
            with pytest.raises(ValueError):
                wire.decode(p)  # a part is not a unit
            blob = join_parts(parts[(seq, count)], count)
            if blob is None:
                continue
            counts["joined"] += 1
            counts[f"joined v{msgpack.unpackb(blob)['v']}"] += 1
            mine_units, blobs = [doc_unit(blob)], [blob]
            ref_units = [joined_ref[seq]]
            sizes = [len(parts[(seq, count)][i]) for i in range(count)]
            assert len({*sizes[:-1]}) == 1 and sizes[-1] <= sizes[0] and sizes[0] & (sizes[0] - 1) == 0
        else:
            blobs = list(m["units"])
            mine_units = [doc_unit(b) for b in blobs]
            ref_units = list(wire.decode(p).units)
        for mine, ref, blob in zip(mine_units, ref_units, blobs, strict=True):
            same_unit(mine, ref)
            if mine["text"] is not None:  # as edgeos before 2026-12-04 wrote it: "" for nil
                old = msgpack.unpackb(blob)
                old["txt"] = ["" if t is None else t for t in old["txt"]]
                old = msgpack.packb(old)
                same_unit(doc_unit(old), wire.decode_unit(old))
                assert doc_unit(old)["text"] == mine["text"]
                counts["legacy txt"] += 1
            assert mine["device"] == m["dev"]
            assert set(mine["tags"].tolist()) <= set(dictionary["tags"])
            assert all(dictionary["tags"][t][0] == m["dev"] for t in set(mine["tags"].tolist()))
            for kind in unit_kinds(blob):
                counts[kind] += 1
            counts[f"run{run}"] += 1
            if mine["text"] is not None:
                kinds = [dictionary["tags"][t][2] for t in mine["tags"].tolist()]
                assert all((t is not None) == (k == "string") for t, k in zip(mine["text"], kinds, strict=True))
                assert all(math.isnan(v) for v, k in zip(mine["values"].tolist(), kinds, strict=True) if k == "string")
            if (mine["quality"] != 0).any():
                counts["bad"] += 1
            if np.isnan(mine["values"]).any():
                counts["nan"] += 1
            for t in set(mine["tags"].tolist()):  # per tag, in time order
                assert (np.diff(mine["ts"][mine["tags"] == t]) >= 0).all()
        if m.get("rp"):
            counts["replayed"] += 1
            for seq in m["seq"]:
                replayed.setdefault(seq, i)

    # pv: the seq of this device's unit before the first one here (0: none), however many other
    # devices' units lie between; seqs are shared by the devices, never reused. Run 2 holds
    # nothing of run 1 (retention dropped it): its first unit of each device has none before it.
    last_seq_of: dict[str, int] = {}
    above = 0
    for first, last, dev, pv, run in sorted(set(chain)):  # parts of one seq (and resends) collapse
        assert first > above, ("seqs reused or messages overlapping", first, above)
        if run == 1 and first > run1_seqs[-1] and above <= run1_seqs[-1]:
            last_seq_of = {}
        assert pv == last_seq_of.get(dev, 0), (dev, first, pv)
        last_seq_of[dev], above = last, last

    # ---- the gone answer to "replay 1..5,000,000" after retention dropped all of run 1: the exact
    # runs of 1..min(5,000,000, highest seq given) no longer held, before the units still held,
    # which come again (rp), so together they are that range, each seq once.
    assert len(gones) == 1
    at, g, ref = gones[0]
    assert (ref.gateway, ref.first, ref.last, ref.device) == (g["gw"], g["first"], g["last"], g["dev"])
    assert [tuple(r) for r in ref.ranges] == g["gone"]
    assert g["gw"] == "gw1" and g["first"] == 1 and g["dev"] is None and run1_seqs[-1] <= g["last"] < request_last
    gone = [s for a, b in g["gone"] for s in range(a, b + 1)]
    assert set(run1_seqs) <= set(gone) and gone == sorted(set(gone))
    assert not set(gone) & set(replayed) and set(gone) | set(replayed) == set(range(1, g["last"] + 1))
    assert all(i > at for i in replayed.values())  # the gone answer came first

    # The dictionary names the configured tags with their kinds and units.
    assert dictionary is not None
    by_name = {(dev, name): (kind, unit) for dev, name, kind, unit in dictionary["tags"].values()}
    assert by_name[("floats", "s")] == ("number", "bar") and by_name[("ints", "on")][0] == "bool"
    assert by_name[("text", "mode")][0] == "string" and len(by_name) == 9 + BIG_TAGS
    assert by_name[("floats", "w")][1] == ""  # no unit: "" (the document does not say; seen so)

    # Nothing above could pass vacuously.
    print(dict(sorted(counts.items())))
    for kind in (
        "v3",
        "vs",
        "vs 0",
        "float",
        "q",
        "txt",
        "legacy txt",
        "v2",
        "tw 2",
        "joined v2",
        "joined v3",
        "bad",
        "nan",
    ):
        assert counts[kind] >= 1, (kind, dict(counts))
    assert counts["dictionary"] >= 2 and counts["replayed"] >= 1
    assert any(counts[f"vs {k}"] for k in range(1, 7))
    assert counts["run0"] >= 10 and counts["run1"] >= 10
    assert not any(u.startswith("v1") for u in counts)
