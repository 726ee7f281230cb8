"""edgeos.aio: a cancellation that a library's wait_for dropped is raised again; a stop ends
within its bound even when a task ignores its first cancellation."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from edgeos.aio import cancel_and_wait, within


async def _answered_as_cancelled(wrap: bool, error: bool = False) -> asyncio.Task:
    """A task awaiting `wait_for(fut)` whose answer (a result, or an error) and cancellation
    come in the same loop iteration: the case Python 3.11's wait_for resolves by returning the
    answer (raising the error)."""
    fut = asyncio.get_running_loop().create_future()

    async def body() -> str:
        aw = asyncio.wait_for(fut, 10)
        try:
            await (within(aw, None) if wrap else aw)
        except OSError:
            return "took the error and polled on"  # as a poll loop retries a failed request
        return "polled on"

    task = asyncio.create_task(body())
    for _ in range(3):
        await asyncio.sleep(0)  # the task now waits inside wait_for
    if error:
        fut.set_exception(OSError("connection reset"))
    else:
        fut.set_result(1)
    task.cancel()
    await asyncio.wait([task], timeout=5)
    return task


@pytest.mark.parametrize("error", [False, True], ids=["answer", "error"])
async def test_within_raises_a_cancellation_wait_for_dropped(error):
    plain = await _answered_as_cancelled(wrap=False, error=error)
    if sys.version_info < (3, 12):
        # The defect itself, so this test can fail: without `within` the task goes on.
        assert not plain.cancelled() and plain.result().endswith("polled on")
    task = await _answered_as_cancelled(wrap=True, error=error)
    assert task.cancelled()


async def test_within_bounds_and_returns():
    assert await within(asyncio.sleep(0, "x"), 1) == "x"
    with pytest.raises(TimeoutError):
        await within(asyncio.sleep(5), 0.05)
    # A timeout is not a cancellation of the caller: later awaits go on.
    assert asyncio.current_task().cancelling() == 0
    assert await within(asyncio.sleep(0, "y"), None) == "y"


async def test_cancel_and_wait_cancels_again(caplog):
    rounds = {"stubborn": 0}

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                rounds["stubborn"] += 1
                if rounds["stubborn"] >= 2:
                    raise  # the second cancellation ends it

    async def failing() -> None:
        raise ValueError("logged where it happened")

    ended = asyncio.Event()

    async def forever() -> None:
        while not ended.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass

    log = logging.getLogger("test.aio")
    a, b = asyncio.create_task(stubborn()), asyncio.create_task(failing())
    await asyncio.sleep(0)
    await cancel_and_wait([a, b], "the test tasks", log, rounds=5, every_s=0.05)
    assert a.cancelled() and rounds["stubborn"] == 2
    assert isinstance(b.exception(), ValueError)

    c = asyncio.create_task(forever(), name="forever")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, "test.aio"):
        t0 = asyncio.get_running_loop().time()
        await cancel_and_wait([c], "the test task", log, rounds=3, every_s=0.05)
        assert asyncio.get_running_loop().time() - t0 < 5
    assert not c.done() and "forever" in caplog.text and "left behind" in caplog.text
    ended.set()  # end it for good: the test leaves no task behind
    c.cancel()
    await asyncio.wait([c], timeout=5)
    assert c.done()
