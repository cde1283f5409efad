"""Pod health checks against real TCP listeners on loopback: each pod is checked on its own,
so a pod that answers slowly delays no verdict on another, and a slow purge holds nothing up."""

from __future__ import annotations

import asyncio
import time

from extproc import config as config_mod
from extproc.podhealth import PodHealthChecker
from extproc.pods import PodPool


class Listener:
    """A pod's /health: answers 200, never answers (slow), or is closed (dead)."""

    def __init__(self, mode: str = "ok"):
        self.mode = mode
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.handlers: set[asyncio.Task] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.handlers.add(task)
        try:
            await reader.readline()
            if self.mode == "slow":
                await asyncio.sleep(30)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self.handlers.discard(task)

    async def start(self) -> "Listener":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.handlers):
            task.cancel()
        await self.server.wait_closed()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def pool_of(listeners: dict[str, Listener]) -> PodPool:
    return PodPool([config_mod.PodConfig(id=name, address=listener.address) for name, listener in listeners.items()])


async def wait_for(predicate, timeout: float) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {timeout}s")


async def test_a_slow_pod_does_not_delay_the_verdict_on_a_dead_one():
    pods = {"ok": await Listener().start(), "slow": await Listener("slow").start(), "dead": await Listener().start()}
    pool = pool_of(pods)
    checker = PodHealthChecker(pool, path="/health", interval=0.1, timeout=3.0, unhealthy_after=0.3, purge_after=0)
    task = asyncio.ensure_future(checker.run())
    try:
        await asyncio.sleep(0.3)
        await pods["dead"].stop()
        # One round of all pods at once would wait 3 s for the slow pod before judging again.
        took = await wait_for(lambda: not pool.get("dead").healthy, timeout=2.0)
        assert took < 1.5
        assert pool.get("ok").healthy
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for name in ("ok", "slow"):
            await pods[name].stop()


async def test_a_purge_that_hangs_holds_no_check_back():
    pods = {"a": await Listener().start(), "b": await Listener().start(), "c": await Listener().start()}
    pool = pool_of(pods)
    purging: list[str] = []

    async def hanging_purge(pod_id: str) -> None:
        purging.append(pod_id)
        await asyncio.sleep(3600)  # an index that does not answer

    checker = PodHealthChecker(pool, path="/health", interval=0.05, timeout=0.5, unhealthy_after=0.2,
                               purge_after=0.3, purge=hanging_purge)
    task = asyncio.ensure_future(checker.run())
    try:
        await asyncio.sleep(0.2)
        await pods["a"].stop()
        await wait_for(lambda: purging == ["a"], timeout=2.0)
        await pods["b"].stop()
        await wait_for(lambda: not pool.get("b").healthy, timeout=1.0)
        await wait_for(lambda: purging == ["a", "b"], timeout=1.0)
        assert pool.get("c").healthy
        assert len(checker._purges) == 2, "one purge per pod, never stacked"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pods["c"].stop()


async def test_pods_added_and_removed_by_a_reload_get_and_lose_their_checks():
    pods = {"a": await Listener().start(), "b": await Listener().start()}
    pool = pool_of({"a": pods["a"]})
    checker = PodHealthChecker(pool, path="/health", interval=0.05, timeout=0.5, unhealthy_after=0.1, purge_after=0)
    task = asyncio.ensure_future(checker.run())
    try:
        await wait_for(lambda: set(checker._checks) == {"a"}, timeout=1.0)
        pool.update([config_mod.PodConfig(id="b", address=pods["b"].address)])
        await wait_for(lambda: set(checker._checks) == {"b"}, timeout=2.0)
        await pods["b"].stop()
        await wait_for(lambda: not pool.get("b").healthy, timeout=2.0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pods["a"].stop()
