"""The consumer examples of docs/payload.md, read from the doc at test time and run as written
against a real mosquitto and a real gateway. Only the broker's address and the `...`
placeholder are replaced (the second example's top-level awaits are wrapped in a main()), each
substitution checked to have matched, so a doc that drifts fails here."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiomqtt

from edgeos import wire
from edgeos.config import load_config
from edgeos.runtime import Runtime

DOC = Path(__file__).parents[2] / "docs" / "payload.md"
DEVICES = ("press", "oven")


def doc_block(marker: str) -> str:
    """The one python code block of docs/payload.md that contains `marker`."""
    blocks = re.findall(r"^```python\n(.*?)^```$", DOC.read_text(), re.M | re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"{DOC}: expected one python block with {marker!r}, found {len(found)}"
    return found[0]


def replace(code: str, pattern: str, new: str) -> str:
    """`pattern` (a regex) replaced by `new`; it must match exactly once."""
    out, n = re.subn(pattern, new, code, flags=re.M)
    assert n == 1, f"docs/payload.md example: {pattern!r} matched {n} times, expected once"
    return out


def at_test_broker(code: str, port: int) -> str:
    return replace(code, r'"broker\.plant\.local"', f'"127.0.0.1", port={port}')


def helper_example(port: int) -> str:
    """The consumer-helper example (wire.Consumer), printing what it delivers."""
    code = at_test_broker(doc_block("consumer.requests()"), port)
    out = r'\1print("DELIVERED", d.gateway, d.device, d.seq, d.replay, len(d.unit.ts))'
    return replace(code, r"^( *)\.\.\.  # d\.gateway, d\.device, d\.seq\b.*$", out)


def session_example(port: int) -> str:
    """The "Consumer example" (a persistent session), its top-level awaits run by a main()."""
    code = at_test_broker(doc_block("SessionExpiryInterval"), port)
    out = r'\1print("FIRST", d.gateway, d.device, d.seq, d.replay, len(d.unit.ts))'
    code = replace(code, r"^( *)\.\.\.  # d\.gateway, d\.seq, d\.unit\.tags\b.*$", out)
    head, sep, body = code.partition("\nasync with aiomqtt.Client(")
    assert sep, "docs/payload.md Consumer example: no top-level `async with aiomqtt.Client(`"
    body = "\n".join("    " + ln if ln else ln for ln in (sep.lstrip("\n") + body).splitlines())
    return f"import asyncio\n{head}\n\nasync def main() -> None:\n{body}\n\n\nasyncio.run(main())\n"


class Example:
    """A doc example run as a script by this interpreter, in its own process; keeps the lines
    it prints that start with `tag`."""

    def __init__(self, code: str, directory: Path, tag: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.script = directory / "example.py"
        self.script.write_text(code)
        self.stderr = directory / "stderr.txt"
        self.tag = tag
        self.lines: list[list[str]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.Task | None = None

    async def __aenter__(self) -> Example:
        with self.stderr.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(self.script),
                cwd=self.script.parent,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.lines.append(line.decode().split())

    def alive(self) -> None:
        assert self.proc is not None
        assert self.proc.returncode is None, f"{self.script} ended:\n{self.stderr.read_text()}"

    def units(self) -> list[tuple[str, int, bool, int]]:
        """(device, seq, replay, samples) of each unit it printed, in order."""
        out = []
        for words in self.lines:
            if words and words[0] == self.tag:
                assert words[1] == "gw1", words
                out.append((words[2], int(words[3]), words[4] == "True", int(words[5])))
        return out

    def seqs(self) -> list[int]:
        return [seq for _, seq, _, _ in self.units()]

    def first_seen(self) -> dict[str, int]:
        first: dict[str, int] = {}
        for dev, seq, _, _ in self.units():
            first.setdefault(dev, seq)
        return first

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None and self.reader is not None
        if self.proc.returncode is None:
            self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        await asyncio.wait_for(self.reader, 10)


def config(write_config, port: int, name: str = "edgeos.toml", *, devices_on: bool = True, split: bool = False) -> Path:
    """`split`: press's units (1,000 random walks a poll) are larger than `max_message`, so
    they go as parts (docs/payload.md, "Continuation")."""
    press = '[{ name = "a" }, { name = "c", signal = "random_walk" }]'
    poll, cap = "20ms", ""
    if split:
        press = "[" + ", ".join(f'{{ name = "w{i}", signal = "random_walk" }}' for i in range(1000)) + "]"
        poll, cap = "100ms", 'max_message = "4KiB"'
    return write_config(
        f"""
[gateway]
id = "gw1"
data_dir = "data"
shutdown_timeout = "5s"
[store]
commit_interval = "50ms"

[[devices]]
name = "press"
protocol = "simulated"
enabled = {str(devices_on).lower()}
poll_interval = "{poll}"
tags = {press}

[[devices]]
name = "oven"
protocol = "simulated"
enabled = {str(devices_on).lower()}
poll_interval = "30ms"
tags = [{{ name = "z1", signal = "sine" }}]

[upstream]
enabled = true
host = "127.0.0.1"
port = {port}
reconnect_min = "50ms"
reconnect_max = "300ms"
{cap}
""",
        name=name,
    )


def stored(data_dir: Path) -> dict[int, str]:
    """seq -> device of every unit the gateway holds."""
    db = sqlite3.connect(f"{(data_dir / 'edgeos.db').as_uri()}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT id, device FROM units"))
    finally:
        db.close()


@contextlib.asynccontextmanager
async def gateway(path: Path) -> AsyncIterator[Runtime]:
    rt = Runtime(load_config(path))
    task = asyncio.create_task(rt.run(), name="gateway-under-test")
    try:
        async with asyncio.timeout(15):
            await rt.running.wait()
        yield rt
    finally:
        rt.stop()
        await asyncio.wait_for(task, 20)


async def wait_until(pred: Callable[[], bool], timeout: float, *examples: Example, what: str = "") -> None:
    """Until `pred()`, at most `timeout` seconds; fails at once if an example's process ended."""
    try:
        async with asyncio.timeout(timeout):
            while not pred():
                for e in examples:
                    e.alive()
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what or pred}") from None


def expected(data_dir: Path, first_seen: dict[str, int]) -> set[int]:
    """What a consumer that started mid-stream must get: each device's units from the first
    one it saw (docs/payload.md: it asks nothing before)."""
    assert set(first_seen) == set(DEVICES), first_seen
    return {seq for seq, dev in stored(data_dir).items() if seq >= first_seen[dev]}


async def test_the_consumer_helper_example_asks_for_a_gap_and_ends_with_every_seq_once(
    write_config, make_broker, tmp_path
):
    # The gateway sends to the plant's broker, then for a while to another one (acknowledged
    # there, so sent: lost to the plant), then to the plant's broker again: its next units
    # name predecessors the example never got; the example's own ask() loop requests them.
    plant, elsewhere = make_broker(persistence=False), make_broker(persistence=False)
    path = config(write_config, plant.port)
    data_dir = load_config(path).gateway.data_dir
    async with Example(helper_example(plant.port), tmp_path / "helper", "DELIVERED") as ex:
        async with gateway(path):
            await wait_until(lambda: {d for d, *_ in ex.units()} == set(DEVICES), 15, ex, what="units of both devices")
        async with gateway(config(write_config, elsewhere.port, "elsewhere.toml")) as rt:
            await wait_until(lambda: rt.sync.status.published_messages >= 20, 15, ex)
        # Units up to the cursor were acknowledged by a broker; those of each device from the
        # first the example saw that it did not get are what the other broker got.
        sent, start = rt.sync.status.cursor, ex.first_seen()
        lost = {s: d for s, d in stored(data_dir).items() if start[d] <= s <= sent and s not in ex.seqs()}
        assert set(lost.values()) == set(DEVICES), "both devices lost units"
        async with gateway(path) as rt:  # reorder_wait is 5 s in the example, then one ask a second
            await wait_until(lambda: set(lost) <= set(ex.seqs()), 30, ex, what="the gap asked for and filled")
        assert rt.sync.status.replay_requests >= 1, "the example asked"
        expect = expected(data_dir, ex.first_seen())
        # The rest of what the gateway stored, and the answer to any gap its stop made.
        async with gateway(config(write_config, plant.port, "replay-only.toml", devices_on=False)):
            await wait_until(lambda: expect <= set(ex.seqs()), 30, ex, what="every unit the gateway stored")
        ex.alive()
    seqs = ex.seqs()
    assert len(seqs) == len(set(seqs)), "a seq delivered twice"
    assert set(seqs) == expect
    replayed = {seq for _, seq, replay, _ in ex.units() if replay}
    assert set(lost) <= replayed, "what the other broker got came to the plant by replay only"
    assert all(n > 0 for *_, n in ex.units())
    assert not any(w and w[0].endswith(":") for w in ex.lines), f"a gone answer: {ex.lines}"


@contextlib.asynccontextmanager
async def observer(port: int) -> AsyncIterator[list[wire.Envelope]]:
    """Every data message on the broker, in arrival order (a clean session of its own)."""
    seen: list[wire.Envelope] = []
    ready = asyncio.Event()

    async def listen() -> None:
        async with aiomqtt.Client("127.0.0.1", port) as client:
            await client.subscribe("edgeos/+/+/data", qos=1)
            ready.set()
            async for msg in client.messages:
                seen.append(wire.decode_envelope(msg.payload))

    task = asyncio.create_task(listen())
    try:
        await wait_until(lambda: ready.is_set() or task.done(), 10)
        assert ready.is_set(), task.exception()
        yield seen
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_consumer_example_drops_repeats_and_keeps_its_session(write_config, make_broker, tmp_path):
    b = make_broker()
    path = config(write_config, b.port, split=True)
    data_dir = load_config(path).gateway.data_dir
    code = session_example(b.port)
    first = Example(code, tmp_path / "first", "FIRST")
    second = Example(code, tmp_path / "second", "FIRST")  # the same process, restarted
    enough = lambda e: all(sum(d == dev for d, *_ in e.units()) >= 5 for dev in DEVICES)  # noqa: E731
    async with observer(b.port) as seen, contextlib.AsyncExitStack() as stack:
        async with gateway(path) as rt:
            async with first:
                await wait_until(lambda: enough(first), 15, first)
                # Another consumer asks for press's units the example already has: the gateway
                # sends them again on the data topic, and the example must not take them twice.
                again = {s for d, s, *_ in first.units() if d == "press"}
                request = wire.encode_replay_request("gw1", min(again), max(again), "press")
                async with aiomqtt.Client("127.0.0.1", b.port) as asker:
                    await asker.publish("edgeos/gw1/replay", request, qos=1)
                replayed = lambda: {s for e in seen if e.replay for s in e.seqs}  # noqa: E731
                await wait_until(lambda: again <= replayed(), 15, first, what="the replay of press's units")
                # A live press unit forwarded after the replay reaches the example only after
                # the replay did (one topic, in order): once it is printed, the repeats came.
                last = max(i for i, e in enumerate(seen) if e.replay)
                live = lambda: [s for e in seen[last:] if not e.replay and e.device == "press" for s in e.seqs]  # noqa: E731
                await wait_until(lambda: bool(live()), 15, first)
                await wait_until(lambda: live()[0] in first.seqs(), 15, first)
                first.alive()
            # Offline: the broker keeps what arrives for the example's session.
            before = rt.sync.status.published_messages
            await wait_until(lambda: rt.sync.status.published_messages >= before + 10, 15)
            await stack.enter_async_context(second)
            await wait_until(lambda: enough(second), 15, second)
        expect = expected(data_dir, first.first_seen())
        async with gateway(config(write_config, b.port, "replay-only.toml", devices_on=False, split=True)):
            await wait_until(
                lambda: expect <= set(first.seqs()) | set(second.seqs()), 30, second, what="what came while offline"
            )
        second.alive()
    assert any(e.part for e in seen if e.device == "press"), "press's units went whole: nothing was split"
    for run in (first, second):
        seqs = run.seqs()
        assert seqs and len(seqs) == len(set(seqs)), "a repeat taken as new"
        assert all(n > 0 for *_, n in run.units())
    assert again <= set(first.seqs())
    assert set(first.seqs()) | set(second.seqs()) == expect, "units lost while the example was offline"
