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

from ..config import Config, PodConfig
from ..endpoints import candidates_of, rank_endpoint, split
from ..index import BlockIndex, IndexUnavailable
from ..metrics import Metrics
from ..supervise import Supervisor
from .janitor import Janitor
from .sequencing import Feed, Sequencer, pod_model
from .transport import Transport, fetch_replay

log = logging.getLogger("extproc.events")

def feeds_of(config: Config) -> dict[str, tuple[PodConfig, str, str, int | None]]:
    """candidate id -> (pod, KV events endpoint, replay endpoint, rank): one feed per pod,
    or per data-parallel rank (each publishes on its own port, as vLLM offsets it)."""
    wanted = {}
    for pod in config.pods:
        if not (pod.kv_events or config.ingest.bind):
            continue
        for candidate, rank in candidates_of(pod.id, pod.data_parallel_size):
            wanted[candidate] = (pod, rank_endpoint(pod.kv_events, rank or 0), rank_endpoint(pod.kv_replay, rank or 0),
                                 rank)
    return wanted


INDEX_WATCH_INTERVAL = 1.0
"""How often the index's epoch marker is checked (a Redis restarted empty is rebuilt within
about this long) and failed purges are retried."""


class Ingester:
    def __init__(self, index: BlockIndex, config: Config, metrics: Metrics, *, ctx: zmq.asyncio.Context | None = None,
                 supervisor: Supervisor | None = None):
        self.index = index
        self.config = config
        self.metrics = metrics
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.supervisor = supervisor or Supervisor(metrics)
        self.sequencer = Sequencer(index, config, metrics, self._fetch_replay)
        self.transport = Transport(self.sequencer, self.ctx, metrics, topic=config.ingest.topic)
        self.janitor = Janitor(self.sequencer, index, config, metrics)
        self._tasks: set[str] = set()
        """Names of our supervised tasks (the supervisor may be shared with serve)."""
        self._orphans: set[str] = set()
        """Pods removed from the config whose purge could not reach the index yet."""
        self._epoch: str | None = None
        for candidate, (pod, events, replay, rank) in feeds_of(config).items():
            self.sequencer.new_feed(candidate, pod_model(pod, config), events, replay, rank)

    @property
    def feeds(self) -> dict[str, Feed]:
        return self.sequencer.feeds

    def _fetch_replay(self, feed: Feed, start: int):
        return fetch_replay(self.ctx, self.config.ingest.replay_timeout, feed, start)

    def _spawn(self, name: str, run, **kw) -> None:
        self._tasks.add(name)
        self.supervisor.spawn(name, run, **kw)

    async def start(self) -> None:
        """Adopt persisted engine maps, drop pods no longer configured, start listening."""
        configured = {c for pod in self.config.pods for c, _ in candidates_of(pod.id, pod.data_parallel_size)}
        self._epoch = await self._read_epoch()
        # Endpoint ids in the index are candidates (a pod or one rank of it) and their tiers.
        for candidate in sorted({split(e)[0] for e in await self._pods_in_index()}):
            if candidate not in configured:
                await self._drop_removed(candidate)
        for feed in self.feeds.values():
            await self._start_feed(feed)
        if self.config.ingest.bind:
            bind = self.config.ingest.bind
            self._spawn("central", lambda: self.transport.listen_central(bind), critical=True)
        self._spawn("janitor", self.janitor.run)
        self._spawn("index_watch", self._watch_index)

    async def _start_feed(self, feed: Feed) -> None:
        await self.sequencer.load(feed)
        catch_up = bool(feed.replay)
        if feed.endpoint:
            def run():
                return self.transport.listen_pod(feed, catch_up=catch_up)
        else:
            self.transport.open_inbox(feed.pod)

            def run():
                return self.transport.consume(feed, catch_up=catch_up)

        async def resync() -> None:
            # Events in flight when the task failed are lost: start the pod over, as on a
            # gap; the restarted task then rebuilds it from the replay buffer if it can.
            async with self.sequencer.lock(feed.pod):
                await self.sequencer.resync(feed, "task_restart", rebuild=False)

        self._spawn(f"feed {feed.pod}", run, kind="feed", critical=True, on_restart=resync)

    async def _stop_feed(self, pod: str) -> None:
        feed = self.sequencer.remove(pod)  # fenced first: a write still in flight is dropped
        name = f"feed {pod}"
        self._tasks.discard(name)
        await self.supervisor.stop(name)
        self.transport.close(pod)
        if feed is not None:
            feed.clear()

    async def reconfigure(self, config: Config) -> None:
        """Adopt a reloaded config: new pods are subscribed, removed pods dropped from the index;
        the sequencer, janitor and replay settings follow at once."""
        self.config = self.sequencer.config = config
        self.janitor.reconfigure(config)
        wanted = feeds_of(config)
        for pod_id in list(self.feeds):
            want = wanted.get(pod_id)
            feed = self.feeds[pod_id]
            if want is None or want[1:3] != (feed.endpoint, feed.replay):
                await self._stop_feed(pod_id)
                if want is None:
                    await self._drop_removed(pod_id)
        for pod_id, (pod, events, replay, rank) in wanted.items():
            if pod_id not in self.feeds:
                self._orphans.discard(pod_id)
                await self._start_feed(self.sequencer.new_feed(pod_id, pod_model(pod, config), events, replay, rank))

    async def _drop_removed(self, pod: str) -> None:
        async with self.sequencer.lock(pod):
            ok = await self.sequencer.purge(pod, "unconfigured")
        self.sequencer.forget_lock(pod)
        if ok:
            self._orphans.discard(pod)
        else:
            self._orphans.add(pod)

    async def stop(self) -> None:
        for name in list(self._tasks):
            await self.supervisor.stop(name)
        self._tasks.clear()
        self.transport.close_all()

    async def purge(self, pod: str, reason: str) -> None:
        async with self.sequencer.lock(pod):
            await self.sequencer.purge(pod, reason)

    async def _pods_in_index(self) -> set[str]:
        try:
            return await self.index.pods()
        except IndexUnavailable as exc:
            log.warning("cannot list pods in the index: %s", exc)
            return set()

    # -- keeping the index whole -----------------------------------------------------

    async def _read_epoch(self) -> str | None:
        try:
            return await self.index.epoch()
        except IndexUnavailable:
            return None

    async def _watch_index(self) -> None:
        while True:
            await asyncio.sleep(INDEX_WATCH_INTERVAL)
            await self.check_index()

    async def check_index(self) -> None:
        """Rebuild every pod if the index was lost (its epoch marker is new: a Redis restarted
        without persistence, a flush); retry purges and resyncs that could not reach it."""
        epoch = await self._read_epoch()
        if epoch is None:
            return
        if self._epoch is not None and epoch != self._epoch:
            self.metrics.index_lost.inc()
            log.warning("the index was lost (new epoch marker): rebuilding %d pod(s) from their replay buffers",
                        len(self.feeds))
            self._epoch = epoch
            await asyncio.gather(*(self._resync(feed, "index_lost") for feed in list(self.feeds.values())))
        self._epoch = epoch
        for pod in list(self._orphans):
            await self._drop_removed(pod)
        pending = [feed for feed in self.feeds.values() if feed.unsynced is not None]
        await asyncio.gather(*(self._resync(feed, feed.unsynced or "retry") for feed in pending))

    async def _resync(self, feed: Feed, reason: str) -> None:
        async with self.sequencer.lock(feed.pod):
            if reason == "index_lost" or feed.unsynced is not None:
                await self.sequencer.resync(feed, reason)
