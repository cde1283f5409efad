"""eager.within: a coroutine that never waits is answered with no timer; one that waits has what
is left of its budget, and cancellations and errors reach it exactly as with a plain await."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from extproc.eager import within


async def immediate(value):
    return value


async def test_a_coroutine_that_never_waits_is_answered_without_arming_a_timer(monkeypatch):
    def no_timer(*args, **kwargs):
        raise AssertionError("a timer was armed for a coroutine that never waited")

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "call_at", no_timer)
    monkeypatch.setattr(loop, "call_later", no_timer)

    async def nested():
        return await immediate(1) + await immediate(2)

    assert await within(nested(), 0.001) == 3


async def test_an_error_before_any_wait_propagates_as_it_is():
    async def fails():
        raise ValueError("bad prompt")

    with pytest.raises(ValueError, match="bad prompt"):
        await within(fails(), 1.0)


async def test_a_coroutine_that_waits_several_times_gets_every_answer():
    loop = asyncio.get_running_loop()

    async def waits():
        total = 0
        for i in range(3):
            future = loop.create_future()
            loop.call_soon(future.set_result, i + 1)
            total += await future
            await asyncio.sleep(0)  # a bare yield to the loop as well
        return total

    assert await within(waits(), 1.0) == 6


async def test_an_error_after_a_wait_propagates_as_it_is():
    loop = asyncio.get_running_loop()

    async def fails_later():
        future = loop.create_future()
        loop.call_soon(future.set_exception, ConnectionError("index down"))
        await future

    with pytest.raises(ConnectionError, match="index down"):
        await within(fails_later(), 1.0)


async def test_an_error_the_coroutine_handles_after_a_wait_stays_handled():
    """The index failed, the lookup carried on degraded: that error is over for it."""
    loop = asyncio.get_running_loop()

    async def recovers():
        future = loop.create_future()
        loop.call_soon(future.set_exception, ConnectionError("index down"))
        try:
            await future
        except ConnectionError:
            pass
        assert sys.exc_info()[1] is None, "the handled error is still being handled"
        raise KeyError("a later bug")

    with pytest.raises(KeyError) as raised:
        await within(recovers(), 1.0)
    assert raised.value.__context__ is None


async def test_waiting_past_the_budget_is_a_timeout_and_the_coroutine_is_cancelled():
    seen = []

    async def slow():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("cleaned up")

    began = time.perf_counter()
    with pytest.raises(TimeoutError):
        await within(slow(), 0.05)
    assert 0.04 <= time.perf_counter() - began < 2.0
    assert seen == ["cancelled", "cleaned up"]


async def test_the_budget_counts_from_started_not_from_the_first_wait():
    async def slow():
        await asyncio.sleep(10)

    began = time.perf_counter()
    with pytest.raises(TimeoutError):
        await within(slow(), 5.0, started=time.perf_counter() - 4.95)  # 50 ms left
    assert time.perf_counter() - began < 2.0


async def test_work_done_within_the_budget_is_not_a_timeout():
    async def quick():
        await asyncio.sleep(0.01)
        return "routed"

    assert await within(quick(), 1.0) == "routed"


async def test_cancelling_the_caller_cancels_the_coroutine_and_is_not_a_timeout():
    seen = []
    started = asyncio.Event()

    async def slow():
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    task = asyncio.create_task(within(slow(), 5.0))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"]


async def test_closing_the_waiting_caller_closes_the_coroutine():
    seen = []

    async def slow():
        try:
            await asyncio.sleep(10)
        finally:
            seen.append("closed")

    work = slow()  # held here: only an explicit close may end it, not its last reference going
    caller = within(work, 5.0)
    caller.send(None)  # waiting in sleep, under the timer
    caller.close()
    assert seen == ["closed"]


async def test_a_coroutine_may_answer_its_own_timeout():
    async def fallback_on_cancel():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "load"  # swallowing it: asyncio.timeout then returns the value, as with a plain await
        return "cache"

    assert await within(fallback_on_cancel(), 0.02) == "load"
