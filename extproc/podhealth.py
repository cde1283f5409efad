"""Pod health: a pod that stops answering is no candidate within ``unhealthyAfter``, and its
index entries are dropped after ``purgeAfter``, so a dead engine stops attracting traffic.

Each serve replica checks every pod itself (``GET /health``, vLLM's own endpoint): a replica
must not route to a pod it cannot reach, whatever another replica sees.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import KW_ONLY, dataclass, field
from collections.abc import Awaitable, Callable

from . import httpget
from .index import IndexUnavailable
from .pods import Pod, PodPool

log = logging.getLogger("extproc.podhealth")


async def probe(address: str, path: str, timeout: float) -> bool:
    """Healthy on a 2xx status line."""
    try:
        status, _ = await httpget.get(address, path, timeout)
    except (OSError, TimeoutError, ValueError):
        return False
    return 200 <= status < 300


@dataclass
class PodHealthChecker:
    """One check loop per pod, so a pod that answers slowly (or not at all, up to ``timeout``)
    delays nobody else's checks; purges run as their own tasks, off the checking path, so a
    slow index never holds a verdict back."""

    pool: PodPool
    _: KW_ONLY
    path: str
    interval: float
    timeout: float
    unhealthy_after: float
    purge_after: float
    purge: Callable[[str], Awaitable[None]] | None = None
    _purged: set[str] = field(default_factory=set, init=False)
    _checks: dict[str, asyncio.Task] = field(default_factory=dict, init=False)
    _purges: dict[str, asyncio.Task] = field(default_factory=dict, init=False)

    def reconfigure(self, *, path: str, interval: float, timeout: float, unhealthy_after: float,
                    purge_after: float) -> None:
        """Reloaded settings, used from each loop's next check on."""
        self.path, self.interval, self.timeout = path, interval, timeout
        self.unhealthy_after, self.purge_after = unhealthy_after, purge_after

    async def run(self) -> None:
        """Keep one check loop per configured pod as reloads add and remove pods. A loop that
        died of an exception is re-raised here, so the supervisor logs, counts and restarts."""
        try:
            while True:
                pods = {pod.id for pod in self.pool.all()}
                for pod_id, task in list(self._checks.items()):
                    if task.done():
                        del self._checks[pod_id]
                        if not task.cancelled() and task.exception() is not None:
                            raise task.exception()
                    elif pod_id not in pods:
                        task.cancel()
                        del self._checks[pod_id]
                for pod_id in pods - self._checks.keys():
                    self._checks[pod_id] = asyncio.ensure_future(self._check_loop(pod_id))
                await asyncio.sleep(min(self.interval, 1.0))
        finally:
            for task in [*self._checks.values(), *self._purges.values()]:
                task.cancel()
            self._checks.clear()
            self._purges.clear()

    async def _check_loop(self, pod_id: str) -> None:
        while True:
            pod = self.pool.get(pod_id)
            if pod is None:
                return
            ok = await probe(pod.address, self.path, self.timeout)
            if self.pool.get(pod_id) is pod:  # not removed (or replaced) by a reload meanwhile
                self._record(pod, ok, time.monotonic())
            await asyncio.sleep(self.interval)

    def _record(self, pod: Pod, ok: bool, now: float) -> None:
        if ok:
            if not pod.healthy:
                log.warning("pod %s answers its health checks again: back in the candidate set", pod.id)
            pod.healthy, pod.failing_since = True, None
            self._purged.discard(pod.id)
            return
        if pod.failing_since is None:
            pod.failing_since = now
        down_for = now - pod.failing_since
        if pod.healthy and down_for >= self.unhealthy_after:
            pod.healthy = False
            log.warning("pod %s failed its health checks for %.1fs: out of the candidate set", pod.id, down_for)
        if (not pod.healthy and self.purge is not None and self.purge_after and down_for >= self.purge_after
                and pod.id not in self._purged):
            self._purged.add(pod.id)
            log.warning("pod %s down for %.1fs: dropping its index entries", pod.id, down_for)
            task = asyncio.ensure_future(self._purge(pod.id))
            self._purges[pod.id] = task
            task.add_done_callback(lambda t, pod_id=pod.id: self._purges.pop(pod_id, None) if self._purges.get(pod_id) is t else None)

    async def _purge(self, pod_id: str) -> None:
        assert self.purge is not None
        try:
            await self.purge(pod_id)
        except IndexUnavailable as exc:
            self._purged.discard(pod_id)  # retried on the next failed check
            log.warning("pod %s: purge failed: %s", pod_id, exc)
        except Exception:  # noqa: BLE001 - a bug: logged in full, retried like an outage
            self._purged.discard(pod_id)
            log.exception("pod %s: purge failed", pod_id)
