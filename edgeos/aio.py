"""Awaiting with a bound, and stopping with one, on Python 3.11.

On 3.11, `asyncio.wait_for` returns the result and drops a cancellation that arrives in the
same loop iteration as the answer (fixed in 3.12). pymodbus, asyncua and aiomqtt all await
with it. A poll loop whose cancellation was dropped polls on; a TaskGroup cancels its
children only once, so the stop then waits on that child forever (CI hung on an OPC UA poll
loop this way). Every await into those libraries goes through `within`, which raises the
dropped cancellation again; stops go through `cancel_and_wait`, which cancels again until
the task ends, within a bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")


def cancelling() -> int:
    """Cancellations requested of the current task and not yet taken back."""
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


async def within(aw: Awaitable[T], timeout_s: float | None) -> T:
    """`await aw`, raising TimeoutError after `timeout_s` (None: no bound) and CancelledError
    if this task was cancelled while a library's `wait_for` dropped that cancellation."""
    before = cancelling()
    try:
        async with asyncio.timeout(timeout_s):
            result = await aw
    except asyncio.CancelledError:
        raise
    except BaseException as e:
        # wait_for drops the cancellation as well when the answer is an error (its
        # `return fut.result()` raises it): the cancellation, not the error, is what counts.
        # Our own timeout has taken its cancellation back by now (asyncio.timeout uncancels).
        if cancelling() > before:
            raise asyncio.CancelledError from e
        raise
    if cancelling() > before:
        raise asyncio.CancelledError
    return result


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task], what: str, log: logging.Logger, *, rounds: int = 10, every_s: float = 1.0
) -> set[asyncio.Task]:
    """Cancel `tasks` and wait until they end, cancelling those still running again every
    `every_s`, for at most `rounds` rounds; then log and return what was left behind.

    A cancellation reaches the task itself: a TaskGroup inside it cancels its children only
    once (Python 3.11), so a child that dropped that one runs on whatever is cancelled again.
    That is why every await into the libraries goes through `within`; this is the bound."""
    tasks = list(tasks)
    left = {t for t in tasks if not t.done()}
    for t in left:
        t.cancel()
    for _ in range(rounds):
        if not left:
            break
        _done, left = await asyncio.wait(left, timeout=every_s)
        for t in left:
            t.cancel()
    if left:
        names = ", ".join(sorted(t.get_name() for t in left))
        log.warning("stop: %s (%s) did not end within %g s of cancellation; left behind", what, names, rounds * every_s)
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved: a failure was logged where it happened
    return left
