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

from .pods import Pod, PodPool

log = logging.getLogger("extproc.podhealth")


async def probe(address: str, path: str, timeout: float) -> bool:
    """One HTTP/1.1 GET; healthy on a 2xx status line."""
    host, _, port = address.rpartition(":")
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            status = await reader.readline()
        parts = status.split()
        return len(parts) >= 2 and parts[1].startswith(b"2")
    except (OSError, TimeoutError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()


@dataclass
class PodHealthChecker:
    pool: PodPool
    _: KW_ONLY
    path: str
    interval: float
    timeout: float
    unhealthy_after: float
    purge_after: float
    purge: Callable[[str], Awaitable[None]] | None = None
    _purged: set[str] = field(default_factory=set, init=False)

    async def run(self) -> None:
        while True:
            pods = self.pool.all()
            results = await asyncio.gather(*(probe(p.address, self.path, self.timeout) for p in pods))
            now = time.monotonic()
            for pod, ok in zip(pods, results):
                await self._record(pod, ok, now)
            await asyncio.sleep(self.interval)

    async def _record(self, pod: Pod, ok: bool, now: float) -> None:
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
            try:
                await self.purge(pod.id)
            except Exception as exc:  # noqa: BLE001 - retried on the next failure run
                self._purged.discard(pod.id)
                log.warning("pod %s: purge failed: %s", pod.id, exc)
