"""Long-lived tasks under one supervisor, so nothing dies silently.

Every background task of the process (KV feeds, the central listener, the janitor, pod
health, the invalidation subscriber, the reload watcher, cache cleanup) runs here. An
unexpected exception is logged with its traceback, counted in
``kv_extproc_task_restarts_total{task}`` and the task starts again after a backoff that
doubles up to a cap. A task may ask for a hook before each restart: a KV feed resyncs its
pod as on a gap, since the events in flight when it failed are lost.

Readiness asks ``failing()``: tasks marked critical (their failure makes routing wrong,
like a dead feed) that failed several times in a row recently. Tasks whose failure routing
already survives by design are not critical, and outages that a task handles itself (the
invalidation subscriber resubscribing while Redis is down) are not failures at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .metrics import Metrics

log = logging.getLogger("extproc.supervise")

Hook = Callable[[], Awaitable[None]]


@dataclass
class TaskState:
    """One supervised task: what readiness and the metrics need to know about it."""

    name: str
    """Unique, e.g. ``feed pod-a``; used in logs."""
    kind: str
    """The metric label (bounded: ``feed``, ``janitor``, ...), never a pod id."""
    critical: bool
    task: asyncio.Task | None = None
    restarts: int = 0
    consecutive: int = 0
    """Failures since the task last ran for ``healthy_after`` seconds."""
    last_failure: float = 0.0
    last_error: str = ""


@dataclass
class Supervisor:
    metrics: Metrics | None = None
    backoff: float = 0.1
    """First restart delay; doubles per consecutive failure."""
    max_backoff: float = 10.0
    healthy_after: float = 30.0
    """A run this long (or this long since the last failure) clears the failure streak."""
    failing_after: int = 3
    """Consecutive failures before a critical task is reported by readiness."""
    _tasks: dict[str, TaskState] = field(default_factory=dict, init=False)

    def spawn(self, name: str, run: Callable[[], Awaitable[None]], *, kind: str | None = None,
              critical: bool = False, on_restart: Hook | None = None) -> asyncio.Task:
        """Run ``run()`` under supervision; a task of the same name is cancelled first.

        A task whose ``run()`` returns is done and forgotten (one-shot work such as a
        tokenizer preload), so the registry never grows beyond the live tasks.
        """
        old = self._tasks.pop(name, None)
        if old is not None and old.task is not None:
            old.task.cancel()
        state = TaskState(name, kind or name.split(" ", 1)[0], critical)
        state.task = asyncio.ensure_future(self._supervise(state, run, on_restart))
        state.task.add_done_callback(lambda _t, s=state: self._forget(s))
        self._tasks[name] = state
        return state.task

    def _forget(self, state: TaskState) -> None:
        if self._tasks.get(state.name) is state:
            del self._tasks[state.name]

    async def _supervise(self, state: TaskState, run: Callable[[], Awaitable[None]], on_restart: Hook | None) -> None:
        delay = self.backoff
        restarting = False
        while True:
            started = time.monotonic()
            try:
                if restarting and on_restart is not None:
                    await on_restart()
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the point of a supervisor
                now = time.monotonic()
                if now - started >= self.healthy_after or now - state.last_failure >= self.healthy_after:
                    state.consecutive, delay = 0, self.backoff
                state.consecutive += 1
                state.restarts += 1
                state.last_failure = now
                state.last_error = f"{type(exc).__name__}: {exc}"
                if self.metrics is not None:
                    self.metrics.task_restarts.labels(state.kind).inc()
                log.error("task %s failed (%s, %d in a row); restarting in %.1fs", state.name, state.last_error,
                          state.consecutive, delay, exc_info=True)
                restarting = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)

    def failing(self) -> list[TaskState]:
        """Critical tasks that keep failing (``failing_after`` in a row, the last one recent)."""
        now = time.monotonic()
        return [s for s in self._tasks.values() if s.critical and s.consecutive >= self.failing_after
                and now - s.last_failure < self.healthy_after]

    def failing_by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for state in self.failing():
            counts[state.kind] = counts.get(state.kind, 0) + 1
        return counts

    def get(self, name: str) -> TaskState | None:
        return self._tasks.get(name)

    def names(self) -> list[str]:
        return list(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    async def stop(self, name: str, timeout: float = 5.0) -> None:
        """Cancel one task and wait for it (bounded: shutdown must never hang on one task)."""
        state = self._tasks.pop(name, None)
        if state is not None and state.task is not None:
            state.task.cancel()
            await asyncio.wait([state.task], timeout=timeout)

    async def stop_all(self, timeout: float = 5.0) -> None:
        tasks = [s.task for s in self._tasks.values() if s.task is not None]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
