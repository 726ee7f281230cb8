"""Bad input on the data topics: counted, parked whole, nothing half-written, the collector runs on."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import aiomqtt
import asyncpg
import msgpack
import numpy as np

from edgeos import wire

_spec = importlib.util.spec_from_file_location("edgeos_test_plant", Path(__file__).with_name("plant.py"))
plant = sys.modules.get("edgeos_test_plant") or importlib.util.module_from_spec(_spec)
if "edgeos_test_plant" not in sys.modules:
    sys.modules["edgeos_test_plant"] = plant
    _spec.loader.exec_module(plant)
free_port = sys.modules["edgeos_test_sync_peers"].free_port


def message(
    seq: int, tags: list[int], *, version: int | None = None, text: list | None = None, unit_of: str = "press1"
) -> bytes:
    n = len(tags)
    u = wire.encode_unit(
        unit_of,
        np.array(tags, np.int32),
        np.full(n, 1_764_000_000_000_000_000 + seq * 10**9, np.int64),
        np.arange(n, dtype=np.float64) + seq,
        np.zeros(n, np.uint32),
        text,
    )
    if version is not None:  # a unit from a future edgeos
        doc = msgpack.unpackb(u)
        doc["v"] = version
        u = msgpack.packb(doc, use_bin_type=True)
    return wire.encode_message("gw9", "press1", [seq], [u], 2)


def parts(seq: int, tags: list[int], unit_of: str = "press1") -> list[bytes]:
    """One unit as two part messages (a unit split for the size cap)."""
    blob = wire.decode_envelope(message(seq, tags, unit_of=unit_of)).units[0]
    half = len(blob) // 2
    return [
        wire.encode_message("gw9", "press1", [seq], [piece], 2, part=(i, 2))
        for i, piece in enumerate([blob[:half], blob[half:]])
    ]


async def test_bad_messages_are_parked_and_a_late_dictionary_releases_them(tmp_path, pg, mosquitto):
    _, dsn = pg
    port = free_port()
    col = plant.collector(plant.collector_config(tmp_path / "c", "col", [mosquitto.port], dsn, port))
    try:
        col.start()
        await plant.healthy(port)
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="fake-gw") as c:
            d = wire.encode_dictionary("gw9", [(0, "press1", "a", "number", "bar"), (1, "press1", "b", "number", "")])
            await c.publish("edgeos/gw9/tags", d, qos=1, retain=True)
            await c.publish("edgeos/gw9/press1/data", message(1, [0, 1]), qos=1)
            await c.publish("edgeos/gw9/press1/data", b"\x00not msgpack at all", qos=1)
            await c.publish("edgeos/gw9/press1/data", message(2, [0, 1], version=99), qos=1)
            await c.publish("edgeos/gw9/press1/data", message(3, [0, 1, 2]), qos=1)  # tag 2 unknown yet
            await c.publish("edgeos/gw9/press1/data", message(4, [1]), qos=1)
            # PostgreSQL refuses a NUL in text: that message alone is parked, its batch written.
            await c.publish("edgeos/gw9/press1/data", message(5, [0, 1], text=["ok", "b\x00d"]), qos=1)
            await c.publish("edgeos/gw9/press1/data", message(6, [0]), qos=1)
            for part in parts(7, [0, 2]):  # a unit in parts, tag 2 unknown yet: parked whole
                await c.publish("edgeos/gw9/press1/data", part, qos=1)
            # Joined from parts, a unit of another device than its message's: parked whole, not
            # acknowledged away with its last part.
            for part in parts(8, [0, 1], unit_of="press2"):
                await c.publish("edgeos/gw9/press1/data", part, qos=1)
            await c.publish("edgeos/gw9/press1/data", message(9, [0, 1], unit_of="press2"), qos=1)  # unsplit
            await asyncio.sleep(1.5)
            conn = await asyncpg.connect(dsn)
            try:
                reasons = [r[0] for r in await conn.fetch("SELECT reason FROM parked ORDER BY id")]
                # (two writer connections: the order of parking is not the order of sending)
                kinds = sorted(
                    "other device"
                    if "a unit of device 'press2' in a message of 'press1'" in r
                    else "newer"
                    if "newer than this edgeos" in r
                    else "undecodable"
                    if r.startswith("undecodable")
                    else "refused"
                    if "refused the data" in r
                    else r
                    for r in reasons
                )
                assert kinds == ["newer", *["other device"] * 2, "refused", "undecodable", *["unknown tags"] * 2]
                # Nothing of a parked message is half-written: units 2, 3 and 5 are not in the ledger.
                assert [r[0] for r in await conn.fetch("SELECT seq FROM units ORDER BY seq")] == [1, 4, 6]
                assert plant.metrics(port)["edgeos_collector_parked_total"] >= 7  # + any released early
                other = await conn.fetch("SELECT payload FROM parked WHERE reason LIKE '%a unit of device%'")
                envs = sorted((wire.decode_envelope(r[0]) for r in other), key=lambda e: e.seqs)
                # The split one parked whole, as one unsplit message; no part of either written.
                assert [(e.device, e.seqs, e.part) for e in envs] == [("press1", [8], None), ("press1", [9], None)]
                assert {wire.decode_unit(e.units[0]).device for e in envs} == {"press2"}
                # The dictionary grows: the parked unit with tag 2 is written, and leaves the park.
                d2 = wire.encode_dictionary(
                    "gw9",
                    [(0, "press1", "a", "number", "bar"), (1, "press1", "b", "number", ""), (2, "press1", "c", "", "")],
                )
                await c.publish("edgeos/gw9/tags", d2, qos=1, retain=True)
                for _ in range(50):
                    await asyncio.sleep(0.1)
                    if await conn.fetchval("SELECT count(*) FROM units") == 5:
                        break
                assert [r[0] for r in await conn.fetch("SELECT seq FROM units ORDER BY seq")] == [1, 3, 4, 6, 7]
                assert await conn.fetchval("SELECT count(*) FROM parked") == 5
                assert await conn.fetchval("SELECT count(*) FROM samples WHERE tag = 'gw9/press1/c'") == 2
                assert await conn.fetchval("SELECT count(*) FROM samples") == 2 + 3 + 1 + 1 + 2
            finally:
                await conn.close()
        assert col.p.poll() is None  # still running
    finally:
        col.stop()
