"""The supervisor: a failing task is logged with its traceback, counted and restarted with
backoff; critical tasks that keep failing are what readiness reports."""

from __future__ import annotations

import asyncio
import logging

from extproc.metrics import Metrics
from extproc.supervise import Supervisor


def restarts(metrics: Metrics, kind: str) -> float:
    return metrics.task_restarts.labels(kind)._value.get()


async def test_a_failing_task_is_logged_counted_and_restarted_after_its_hook(caplog):
    metrics = Metrics()
    sup = Supervisor(metrics, backoff=0.01)
    runs, hooks = [], []
    done = asyncio.Event()

    async def run():
        runs.append(len(hooks))
        if len(runs) < 3:
            raise RuntimeError(f"boom {len(runs)}")
        done.set()
        await asyncio.Event().wait()

    async def hook():
        hooks.append(len(runs))

    with caplog.at_level(logging.ERROR, "extproc.supervise"):
        sup.spawn("feed pod-a", run, on_restart=hook)
        await asyncio.wait_for(done.wait(), 5)
    assert runs == [0, 1, 2], "the hook ran before every restart, not before the first run"
    assert restarts(metrics, "feed") == 2
    failures = [r for r in caplog.records if "task feed pod-a failed" in r.getMessage()]
    assert len(failures) == 2 and all(r.exc_info for r in failures), "logged with the traceback"
    await sup.stop_all()
    assert len(sup) == 0


async def test_backoff_doubles_up_to_its_cap():
    sup = Supervisor(Metrics(), backoff=0.02, max_backoff=0.08)
    times: list[float] = []
    loop = asyncio.get_running_loop()

    async def run():
        times.append(loop.time())
        raise ValueError("again")

    sup.spawn("janitor", run)
    await asyncio.sleep(0.5)
    await sup.stop_all()
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[0] < 0.05 and all(g < 0.15 for g in gaps), gaps
    assert gaps[2] >= 0.075, "the delay grew to the cap"


async def test_only_critical_tasks_that_keep_failing_are_reported():
    sup = Supervisor(Metrics(), backoff=0.01, failing_after=3)

    async def fails():
        raise OSError("down")

    sup.spawn("feed pod-a", fails, critical=True)
    sup.spawn("janitor", fails)
    await asyncio.sleep(0.02)
    assert sup.failing() == [], "one failure is not 'keeps failing'"
    await asyncio.sleep(0.3)
    assert [s.name for s in sup.failing()] == ["feed pod-a"]
    assert sup.failing_by_kind() == {"feed": 1}
    await sup.stop_all()


async def test_a_task_that_recovers_is_no_longer_reported():
    sup = Supervisor(Metrics(), backoff=0.01, failing_after=2, healthy_after=0.2)
    failures = 0

    async def flaky():
        nonlocal failures
        if failures < 3:
            failures += 1
            raise RuntimeError("flaky")
        await asyncio.Event().wait()

    sup.spawn("feed pod-b", flaky, critical=True)
    await asyncio.sleep(0.1)
    assert sup.failing(), "three failures in a row"
    await asyncio.sleep(0.3)
    assert sup.failing() == [], "running well for healthy_after clears it"
    await sup.stop_all()


async def test_finished_tasks_are_forgotten_and_a_name_is_replaced_not_duplicated():
    sup = Supervisor(Metrics())
    for i in range(50):
        sup.spawn(f"preload m{i % 3}", lambda: asyncio.sleep(0))
    await asyncio.sleep(0.05)
    assert len(sup) == 0, "one-shot tasks leave nothing behind"

    first = sup.spawn("reload", lambda: asyncio.Event().wait())
    second = sup.spawn("reload", lambda: asyncio.Event().wait())
    await asyncio.sleep(0)
    assert first.cancelled() or first.done()
    assert sup.names() == ["reload"] and not second.done()
    await sup.stop("reload")
    assert second.done() and len(sup) == 0


async def test_readiness_reports_a_critical_task_that_keeps_failing_and_not_a_quiet_one():
    import grpc

    from extproc.health import Readiness
    from extproc.index.memory import MemoryIndex
    from extproc.tokenization import TokenizerManager

    sup = Supervisor(Metrics(), backoff=0.01, failing_after=3, healthy_after=1.0)
    readiness = Readiness(grpc.aio.server())
    tokenizers = TokenizerManager({})
    watcher = asyncio.ensure_future(readiness.become_ready(tokenizers, [], MemoryIndex(), interval=0.1, supervisor=sup))
    try:
        await asyncio.sleep(0.2)
        assert readiness.ready
        sup.spawn("janitor", lambda: (_ for _ in ()).throw(RuntimeError("not critical")))
        await asyncio.sleep(0.3)
        assert readiness.ready, "a task routing does not depend on"

        async def dead_feed():
            raise RuntimeError("feed broken")

        sup.spawn("feed pod-a", dead_feed, critical=True)
        await asyncio.sleep(0.4)
        assert not readiness.ready, "a dead feed leaves routing wrong"
        await sup.stop("feed pod-a")
        await asyncio.sleep(1.3)
        assert readiness.ready, "back once it stopped failing"
        await readiness.close()
        await asyncio.sleep(0.3)
        assert not readiness.ready, "shutting down stays NOT_SERVING"
    finally:
        watcher.cancel()
        await sup.stop_all()
        tokenizers.close()
