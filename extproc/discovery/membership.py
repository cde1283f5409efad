"""Applies each discovered pod set: routing at once, KV subscriptions and purges in time.

A pod that leaves the set (deleted, unready, no longer resolved) is no candidate from the
next decision on. Its KV feed and index entries are kept for ``purgeAfter``, so a pod that
comes back (a restarted StatefulSet pod, a readiness blip) is cache-aware at once; after
that its entries are dropped (the ingester purges a pod no longer configured). A new pod is
subscribed to and routed to as soon as it is published.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec

from ..config import Config, DiscoveryConfig, PodConfig
from ..pods import PodPool

log = logging.getLogger("extproc.discovery")


@dataclass
class Membership:
    config: Config
    """The running config; its ``pods`` are replaced by what discovery publishes."""
    pool: PodPool | None = None
    """The routing candidates (None in ``kv-extproc ingest``)."""
    reconfigure: Callable[[Config], Awaitable[None]] | None = None
    """The ingester's reconfigure: subscribes new pods, purges pods no longer listed."""
    purge: Callable[[str], Awaitable[None]] | None = None
    """Without an ingester in this process: drop a departed pod's index entries directly."""
    purge_after: float = 30.0
    ready: dict[str, PodConfig] = field(default_factory=dict)
    gone: dict[str, tuple[PodConfig, float]] = field(default_factory=dict)
    """Pods that left: id -> (their last config, monotonic time they left)."""
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the first pod set arrived (readiness waits for it)."""
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def apply(self, pods: list[PodConfig]) -> None:
        async with self._lock:
            now = time.monotonic()
            fresh = {p.id: p for p in pods}
            if self.pool is not None:
                self.pool.update(pods)  # routing follows at once
            for pod_id, conf in self.ready.items():
                if pod_id not in fresh:
                    self.gone[pod_id] = (conf, now)
                    log.info("pod %s left the pod set: no traffic from now on, index entries kept %.0fs",
                             pod_id, self.purge_after)
            for pod_id in fresh:
                if self.gone.pop(pod_id, None) is not None:
                    log.info("pod %s is back within purgeAfter: its index entries still count", pod_id)
            self.ready = fresh
            await self._expire(now)
            await self._subscribe()
            self.synced.set()

    async def expire(self) -> None:
        """Purge pods gone longer than ``purgeAfter``; called every second by ``run``."""
        async with self._lock:
            if await self._expire(time.monotonic()):
                await self._subscribe()

    async def _expire(self, now: float) -> bool:
        due = [pod_id for pod_id, (_, left) in self.gone.items() if now - left >= self.purge_after]
        for pod_id in due:
            del self.gone[pod_id]
            log.info("pod %s gone for %.0fs: dropping its index entries", pod_id, self.purge_after)
            if self.reconfigure is None and self.purge is not None:
                try:
                    await self.purge(pod_id)
                except Exception as exc:  # noqa: BLE001 - the janitor or the next start drops it
                    log.warning("pod %s: purge failed: %s", pod_id, exc)
        return bool(due)

    async def _subscribe(self) -> None:
        """The ingester follows ready pods plus those still within purgeAfter."""
        if self.reconfigure is None:
            return
        await self.reconfigure(self.ingest_config())

    async def attach(self, reconfigure: Callable[[Config], Awaitable[None]]) -> None:
        """Hand subscriptions to an ingester started from ``ingest_config()``; pod sets published
        while it started are applied now."""
        async with self._lock:
            self.reconfigure = reconfigure
            await self._subscribe()

    def ingest_config(self) -> Config:
        """The config an ingester starts from: ready pods plus those still within purgeAfter."""
        return with_pods(self.config, self._listed())

    def _listed(self) -> list[PodConfig]:
        return list(self.ready.values()) + [conf for conf, _ in self.gone.values()]

    async def reload(self, config: Config) -> None:
        """A reloaded config file: new models or settings, same discovered pods."""
        async with self._lock:
            self.config = config
            if self.pool is not None:
                self.pool.update(list(self.ready.values()), [m.name for m in config.models])
            await self._subscribe()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, max(self.purge_after / 4, 0.05)))
            try:
                await self.expire()
            except Exception:  # noqa: BLE001 - logged; tried again next tick
                log.exception("discovery: expiring departed pods failed")


def with_pods(config: Config, pods: list[PodConfig]) -> Config:
    """The config as if these pods were listed statically (what the ingester reads)."""
    return msgspec.structs.replace(config, pods=pods, discovery=DiscoveryConfig())
