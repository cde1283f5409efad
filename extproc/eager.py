"""Await with a time limit, paying for the timer only when the work really waits.

Most routing decisions never wait on anything: a repeated prompt or a new turn after a cached
prefix is answered from the prefix store and the block-owner cache on the event loop. Yet
``asyncio.timeout`` arms a loop timer and cancels it for every call, a tenth of such a
decision's time when measured. ``within`` runs the coroutine until it
first suspends, like Python 3.12's eager tasks; only then does the timer start, for what is
left of the budget. A coroutine that finishes without suspending cannot be interrupted by an
asyncio timeout anyway: no time check is lost.
"""

from __future__ import annotations

import asyncio
import time
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


async def within(coro: Coroutine[Any, Any, T], seconds: float, *, started: float | None = None) -> T:
    """``coro``'s result; TimeoutError once ``seconds`` have passed since ``started`` (a
    ``time.perf_counter()`` reading, default now) while it waits."""
    started = time.perf_counter() if started is None else started
    try:
        waiting_on = coro.send(None)
    except StopIteration as done:
        return done.value
    try:
        async with asyncio.timeout(max(0.0, seconds - (time.perf_counter() - started))):
            return await _resume(coro, waiting_on)
    finally:
        coro.close()  # a no-op once it has finished; after a failure, its own cleanup runs now


@types.coroutine
def _resume(coro: Coroutine[Any, Any, T], waiting_on: Any) -> Generator[Any, Any, T]:
    """Go on awaiting ``coro``, which ``send`` started and which yielded ``waiting_on`` (a future,
    or None for a bare yield): what ``await coro`` would have done from that point. The task's
    answers go in by ``send``, a cancellation (the timeout's) or a failed future's error by
    ``throw``, from outside the handler that caught it: ``coro`` must not see it as an exception
    being handled (a later error of its own would carry it as its context)."""
    while True:
        error = answer = None
        try:
            answer = yield waiting_on
        except GeneratorExit:
            raise  # closed by its owner; within() closes coro
        except BaseException as exc:  # noqa: BLE001 - a cancellation, or the awaited future's error
            error = exc
        try:
            waiting_on = coro.send(answer) if error is None else coro.throw(error)
        except StopIteration as done:
            return done.value
        finally:
            error = None  # no reference cycle through the traceback
