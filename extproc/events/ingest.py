"""The ingester: keeps the index true to what every pod reports.

Three parts with one-way ties: the transport (transport.py: ZMQ sockets) hands each pod's
frames to the sequencer (sequencing.py: order, gaps, replays, restarts), which writes the
index; the janitor (janitor.py) drops what no event will correct. This module starts,
reconfigures and stops them.
"""

from __future__ import annotations

import asyncio
import logging

import zmq.asyncio

from ..config import Config
from ..index import BlockIndex, IndexUnavailable
from ..metrics import Metrics
from .janitor import Janitor
from .sequencing import Feed, Sequencer, pod_model
from .transport import Transport, fetch_replay

log = logging.getLogger("extproc.events")


class Ingester:
    def __init__(self, index: BlockIndex, config: Config, metrics: Metrics, *, ctx: zmq.asyncio.Context | None = None):
        self.index = index
        self.config = config
        self.metrics = metrics
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.sequencer = Sequencer(index, config, metrics, self._fetch_replay)
        self.transport = Transport(self.sequencer, self.ctx, metrics, topic=config.ingest.topic)
        self.janitor = Janitor(self.sequencer, index, config, metrics)
        self._tasks: list[asyncio.Task] = []
        self._pod_tasks: dict[str, asyncio.Task] = {}
        for pod in config.pods:
            if pod.kv_events or config.ingest.bind:
                self.sequencer.new_feed(pod.id, pod_model(pod, config), pod.kv_events, pod.kv_replay)

    @property
    def feeds(self) -> dict[str, Feed]:
        return self.sequencer.feeds

    def _fetch_replay(self, feed: Feed, start: int):
        return fetch_replay(self.ctx, self.config.ingest.replay_timeout, feed, start)

    async def start(self) -> None:
        """Adopt persisted engine maps, drop pods no longer configured, start listening."""
        configured = {pod.id for pod in self.config.pods}
        for pod in await self._pods_in_index():
            if pod not in configured and not self.config.ingest.bind:
                await self.purge(pod, "unconfigured")
        for feed in self.feeds.values():
            await self._start_feed(feed)
        if self.config.ingest.bind:
            self._tasks.append(asyncio.ensure_future(self.transport.listen_central(self.config.ingest.bind)))
        self._tasks.append(asyncio.ensure_future(self.janitor.run()))

    async def _start_feed(self, feed: Feed) -> None:
        await self.sequencer.load(feed)
        if feed.endpoint:
            self._pod_tasks[feed.pod] = asyncio.ensure_future(self.transport.listen_pod(feed))
        if feed.replay:
            self._tasks.append(asyncio.ensure_future(self.sequencer.catch_up(feed)))

    async def _stop_feed(self, pod: str) -> None:
        task = self._pod_tasks.pop(pod, None)
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=5)  # shutdown must never hang on one feed
        self.transport.close(pod)

    async def reconfigure(self, config: Config) -> None:
        """Adopt a reloaded config: new pods are subscribed, removed pods dropped from the index."""
        self.config = self.sequencer.config = self.janitor.config = config
        wanted = {pod.id: pod for pod in config.pods if pod.kv_events or config.ingest.bind}
        for pod_id in list(self.feeds):
            pod = wanted.get(pod_id)
            feed = self.feeds[pod_id]
            if pod is None or (pod.kv_events, pod.kv_replay) != (feed.endpoint, feed.replay):
                await self._stop_feed(pod_id)
                del self.feeds[pod_id]
                if pod is None:
                    async with self.sequencer.lock(pod_id):
                        await self.purge(pod_id, "unconfigured")
        for pod_id, pod in wanted.items():
            if pod_id not in self.feeds:
                await self._start_feed(self.sequencer.new_feed(pod_id, pod_model(pod, config), pod.kv_events,
                                                               pod.kv_replay))

    async def stop(self) -> None:
        for pod in list(self._pod_tasks):
            await self._stop_feed(pod)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        self._tasks.clear()
        self.transport.close_all()

    async def purge(self, pod: str, reason: str) -> None:
        await self.sequencer.purge(pod, reason)

    async def _pods_in_index(self) -> set[str]:
        try:
            return await self.index.pods()
        except IndexUnavailable as exc:
            log.warning("cannot list pods in the index: %s", exc)
            return set()
