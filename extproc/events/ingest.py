"""Subscribers -> index writes: keep the index true to what every pod reports.

One ZMQ SUB socket per pod (``pods[].kvEvents``), or one bound socket that every pod
connects to with topic ``kv@<pod-id>@<model>`` (central mode). Messages of one publisher
are applied strictly in order; what arrives together is written in one pipeline.

Sequence numbers guard the truth of the index: a gap is filled from the pod's replay
endpoint when it has one; otherwise (or if the replay cannot cover it) the pod's entries
are dropped and rebuilt from new events, never left half true. A sequence that starts
again means the engine restarted with an empty cache: its old entries are dropped first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from ..config import Config, PodConfig
from ..index import BlockIndex, IndexUnavailable, Writes
from ..metrics import Metrics
from .decode import (
    END_OF_REPLAY,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodeError,
    EventBatch,
    Message,
    decode_frames,
    decode_payload,
    decode_replay,
)
from .tracker import PodTracker

log = logging.getLogger("extproc.events")

DRAIN_MAX = 512
"""Messages taken from a socket before one write; bounds the write size and the delay."""

CENTRAL_TOPIC_PREFIX = b"kv@"


@dataclass
class Feed:
    """One publisher: a pod's engine (its KV events, in sequence)."""

    pod: str
    tracker: PodTracker
    endpoint: str = ""
    replay: str = ""
    last_seq: int | None = None
    skip_upto: int | None = None
    reconnected: bool = False
    """The connection dropped and came back: the next message must continue the sequence
    exactly, or the publisher is taken to have restarted."""
    last_seen: float = field(default_factory=time.monotonic)
    silent_purged: bool = False


def pod_model(pod: PodConfig, config: Config) -> str:
    """The base model a pod's events belong to (LoRA blocks name their adapter)."""
    if pod.models:
        return pod.models[0]
    return config.models[0].name if config.models else ""


class Ingester:
    def __init__(self, index: BlockIndex, config: Config, metrics: Metrics, *, ctx: zmq.asyncio.Context | None = None):
        self.index = index
        self.config = config
        self.metrics = metrics
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.feeds: dict[str, Feed] = {}
        self._tasks: list[asyncio.Task] = []
        self._pod_tasks: dict[str, asyncio.Task] = {}
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        for pod in config.pods:
            if pod.kv_events or config.ingest.bind:
                self.feeds[pod.id] = self._feed(pod.id, pod_model(pod, config), pod.kv_events, pod.kv_replay)

    def _feed(self, pod: str, model: str, endpoint: str = "", replay: str = "") -> Feed:
        tracker = PodTracker(
            pod, model, self.config.block_size_to_hash, self.config.max_blocks_to_match, self.config.hash_scheme
        )
        return Feed(pod, tracker, endpoint, replay)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt persisted engine maps, drop pods no longer configured, start listening."""
        configured = {pod.id for pod in self.config.pods}
        for pod in await self._pods_in_index():
            if pod not in configured and not self.config.ingest.bind:
                await self.purge(pod, "unconfigured")
        for feed in self.feeds.values():
            await self._start_feed(feed)
        if self.config.ingest.bind:
            self._tasks.append(asyncio.ensure_future(self._listen_central(self.config.ingest.bind)))
        self._tasks.append(asyncio.ensure_future(self._janitor()))

    async def _start_feed(self, feed: Feed) -> None:
        try:
            feed.tracker.load(await self.index.load_engine_map(feed.pod))
        except IndexUnavailable as exc:
            log.warning("pod %s: engine map not loaded (%s); its old blocks cannot be removed", feed.pod, exc)
        if feed.endpoint:
            self._pod_tasks[feed.pod] = asyncio.ensure_future(self._listen_pod(feed))
        if feed.replay:
            self._tasks.append(asyncio.ensure_future(self._catch_up(feed)))

    async def _stop_feed(self, pod: str) -> None:
        task = self._pod_tasks.pop(pod, None)
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=5)  # shutdown must never hang on one feed
        sock = self._sockets.pop(pod, None)
        if sock is not None:
            sock.close(linger=0)

    async def reconfigure(self, config: Config) -> None:
        """Adopt a reloaded config: new pods are subscribed, removed pods dropped from the index."""
        self.config = config
        wanted = {pod.id: pod for pod in config.pods if pod.kv_events or config.ingest.bind}
        for pod_id in list(self.feeds):
            pod = wanted.get(pod_id)
            feed = self.feeds[pod_id]
            if pod is None or (pod.kv_events, pod.kv_replay) != (feed.endpoint, feed.replay):
                await self._stop_feed(pod_id)
                del self.feeds[pod_id]
                if pod is None:
                    async with self._locks.setdefault(pod_id, asyncio.Lock()):
                        await self.purge(pod_id, "unconfigured")
        for pod_id, pod in wanted.items():
            if pod_id not in self.feeds:
                feed = self.feeds[pod_id] = self._feed(pod_id, pod_model(pod, config), pod.kv_events, pod.kv_replay)
                await self._start_feed(feed)

    async def stop(self) -> None:
        for pod in list(self._pod_tasks):
            await self._stop_feed(pod)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        self._tasks.clear()
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets.clear()

    async def _pods_in_index(self) -> set[str]:
        try:
            return await self.index.pods()
        except IndexUnavailable as exc:
            log.warning("cannot list pods in the index: %s", exc)
            return set()

    # -- sockets ---------------------------------------------------------------------

    def _sub(self, name: str) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        self._sockets[name] = sock
        return sock

    async def _listen_pod(self, feed: Feed) -> None:
        sock = self._sub(feed.pod)
        sock.setsockopt(zmq.SUBSCRIBE, self.config.ingest.topic.encode())
        watcher = asyncio.ensure_future(self._watch_connection(sock, feed))
        sock.connect(feed.endpoint)
        log.info("pod %s: subscribed to KV events at %s", feed.pod, feed.endpoint)
        try:
            while True:
                batch = await self._drain(sock)
                await self.process(feed, batch)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)  # its cleanup needs the socket open

    async def _watch_connection(self, sock: zmq.asyncio.Socket, feed: Feed) -> None:
        """Notice a publisher that went away and came back (a restarted engine, usually)."""
        from zmq.utils.monitor import parse_monitor_message

        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        dropped = False
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event == zmq.EVENT_DISCONNECTED:
                    dropped = True
                elif event == zmq.EVENT_CONNECTED and dropped:
                    dropped = False
                    feed.reconnected = True
                    log.info("pod %s: KV event publisher reconnected", feed.pod)
        finally:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            monitor.close(linger=0)

    async def _listen_central(self, endpoint: str) -> None:
        sock = self._sub("central")
        sock.setsockopt(zmq.SUBSCRIBE, CENTRAL_TOPIC_PREFIX)
        sock.bind(endpoint)
        log.info("listening for KV events from pods at %s (topic kv@<pod>@<model>)", endpoint)
        while True:
            by_feed: dict[str, list[list[bytes]]] = {}
            for frames in await self._drain(sock):
                feed = self._feed_for_topic(frames[0]) if frames else None
                if feed is None:
                    self.metrics.event_decode_errors.inc()
                    continue
                by_feed.setdefault(feed.pod, []).append(frames)
            for pod, frames_list in by_feed.items():
                await self.process(self.feeds[pod], frames_list)

    def _feed_for_topic(self, topic: bytes) -> Feed | None:
        parts = topic.decode(errors="replace").split("@", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            return None
        _, pod, model = parts
        feed = self.feeds.get(pod)
        if feed is None:
            feed = self.feeds[pod] = self._feed(pod, model)
        return feed

    async def _drain(self, sock: zmq.asyncio.Socket) -> list[list[bytes]]:
        frames = [await sock.recv_multipart()]
        while len(frames) < DRAIN_MAX:
            try:
                frames.append(await sock.recv_multipart(flags=zmq.NOBLOCK))
            except zmq.Again:
                break
        return frames

    # -- applying events -------------------------------------------------------------

    async def process(self, feed: Feed, frames_list: list[list[bytes]]) -> None:
        """Apply a run of one publisher's messages; never raises for bad input."""
        async with self._locks.setdefault(feed.pod, asyncio.Lock()):
            feed.last_seen = time.monotonic()
            feed.silent_purged = False
            writes = Writes()
            for frames in frames_list:
                try:
                    message = decode_frames(frames)
                except DecodeError as exc:
                    self.metrics.event_decode_errors.inc()
                    log.debug("pod %s: skipping a malformed frame: %s", feed.pod, exc)
                    continue
                if feed.skip_upto is not None:
                    if message.seq <= feed.skip_upto:
                        continue
                    feed.skip_upto = None
                if feed.reconnected and feed.last_seq is not None and message.seq != feed.last_seq + 1:
                    # Back after a drop and not where it left off: a new engine process.
                    writes = await self._flush(feed, writes)
                    await self._restarted(feed, message.seq)
                elif feed.last_seq is not None and message.seq != feed.last_seq + 1:
                    writes = await self._flush(feed, writes)
                    await self._resync(feed, message.seq)
                feed.reconnected = False
                writes = await self._apply(feed, message.batch, writes)
                feed.last_seq = message.seq
            await self._flush(feed, writes)

    async def _apply(self, feed: Feed, batch: EventBatch, writes: Writes) -> Writes:
        writes.at = batch.ts
        self.metrics.ingest_lag.observe(max(0.0, time.time() - batch.ts))
        for event in batch.events:
            if isinstance(event, BlockStored):
                self.metrics.events.labels("BlockStored").inc()
                if event.kv_cache_spec_kind == "sliding_window":
                    continue  # evicted as the window slides: never a prefix hit
                try:
                    feed.tracker.stored(event, writes)
                except ValueError as exc:
                    self.metrics.event_decode_errors.inc()
                    log.warning("pod %s: %s", feed.pod, exc)
            elif isinstance(event, BlockRemoved):
                self.metrics.events.labels("BlockRemoved").inc()
                feed.tracker.removed(event, writes)
            elif isinstance(event, AllBlocksCleared):
                self.metrics.events.labels("AllBlocksCleared").inc()
                writes = await self._flush(feed, writes)
                await self.purge(feed.pod, "cleared")
                writes.at = batch.ts
        return writes

    async def _flush(self, feed: Feed, writes: Writes) -> Writes:
        if writes:
            try:
                await self.index.apply(feed.pod, writes)
                self.metrics.router_blocks_written.inc(len(writes.stored))
            except IndexUnavailable as exc:
                # Writes lost: the pod's entries would be half true, so start it over.
                log.warning("pod %s: index write failed (%s); dropping its entries", feed.pod, exc)
                await self._purge_quietly(feed.pod, "index_error")
        return Writes()

    async def _resync(self, feed: Feed, seq: int) -> None:
        last = feed.last_seq
        assert last is not None
        if seq <= last:
            log.warning("pod %s: sequence went back from %d to %d: engine restarted", feed.pod, last, seq)
            await self._restarted(feed, seq)
            return
        self.metrics.sequence_gaps.labels(feed.pod).inc()
        log.warning("pod %s: lost events %d..%d", feed.pod, last + 1, seq - 1)
        if feed.replay and await self._replay(feed, last + 1, seq):
            return
        await self.purge(feed.pod, "gap")

    async def _restarted(self, feed: Feed, seq: int) -> None:
        """Drop everything of the old process; take what the new one sent before ``seq`` from
        its replay buffer when it has one (we may have joined after its first batches)."""
        await self.purge(feed.pod, "restart")
        feed.last_seq = None
        if feed.replay and seq > 0:
            replies = await self._fetch_replay(feed, 0)
            replies = [(s, p) for s, p in replies or () if s < seq]
            if [s for s, _ in replies] == list(range(seq)):
                await self._apply_replies(feed, replies)
                feed.skip_upto = None

    async def _replay(self, feed: Feed, start: int, upto: int) -> bool:
        """Fill the gap start..upto-1 from the pod's replay buffer; False if it cannot."""
        replies = await self._fetch_replay(feed, start)
        replies = [(seq, payload) for seq, payload in replies or () if seq < upto]
        if [seq for seq, _ in replies] != list(range(start, upto)):
            self.metrics.replays.labels("incomplete" if replies is not None else "failed").inc()
            log.warning("pod %s: replay could not cover %d..%d", feed.pod, start, upto - 1)
            return False
        await self._apply_replies(feed, replies)
        return True

    async def _fetch_replay(self, feed: Feed, start: int) -> list[tuple[int, bytes]] | None:
        """Every buffered batch from ``start`` on, in order; None if the pod did not answer."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        replies: list[tuple[int, bytes]] = []
        try:
            sock.connect(feed.replay)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            async with asyncio.timeout(self.config.ingest.replay_timeout):
                while True:
                    seq, payload = decode_replay(await sock.recv_multipart())
                    if seq == END_OF_REPLAY:
                        break
                    if seq >= start:
                        replies.append((seq, payload))
        except (TimeoutError, DecodeError, zmq.ZMQError) as exc:
            log.warning("pod %s: replay from %d failed: %s", feed.pod, start, exc or type(exc).__name__)
            return None
        finally:
            sock.close()
        return sorted(replies)

    async def _apply_replies(self, feed: Feed, replies: list[tuple[int, bytes]]) -> None:
        writes = Writes()
        for seq, payload in replies:
            try:
                writes = await self._apply(feed, decode_payload(payload), writes)
            except DecodeError:
                self.metrics.event_decode_errors.inc()
            feed.last_seq = seq
        await self._flush(feed, writes)
        # Live messages queued while we replayed repeat what we just applied.
        feed.skip_upto = feed.last_seq
        self.metrics.replays.labels("ok").inc()

    async def _catch_up(self, feed: Feed) -> None:
        """On start, rebuild the pod's entries from its replay buffer if it holds the whole history."""
        async with self._locks.setdefault(feed.pod, asyncio.Lock()):
            if feed.last_seq is not None:
                return
            replies = await self._fetch_replay(feed, 0)
            if not replies or replies[0][0] != 0 or [s for s, _ in replies] != list(range(len(replies))):
                log.info("pod %s: replay buffer does not start at 0; keeping the index as it is", feed.pod)
                return
            await self._purge_quietly(feed.pod, "catch_up")
            await self._apply_replies(feed, replies)
            log.info("pod %s: rebuilt from its replay buffer up to seq %d", feed.pod, feed.last_seq)

    # -- dropping a pod --------------------------------------------------------------

    async def purge(self, pod: str, reason: str) -> None:
        dropped = await self._purge_quietly(pod, reason)
        log.info("pod %s: dropped %d index entries (%s)", pod, dropped, reason)

    async def _purge_quietly(self, pod: str, reason: str) -> int:
        self.metrics.pod_purges.labels(reason).inc()
        feed = self.feeds.get(pod)
        if feed is not None:
            feed.tracker.clear()
        try:
            return await self.index.purge_pod(pod)
        except IndexUnavailable as exc:
            log.warning("pod %s: purge failed (%s)", pod, exc)
            return 0

    async def _janitor(self) -> None:
        ingest = self.config.ingest
        max_age = self.config.index.max_entry_age
        while True:
            await asyncio.sleep(ingest.janitor_interval)
            now = time.monotonic()
            for feed in list(self.feeds.values()):
                if ingest.pod_silence_timeout and not feed.silent_purged and now - feed.last_seen > ingest.pod_silence_timeout:
                    async with self._locks.setdefault(feed.pod, asyncio.Lock()):
                        feed.silent_purged = True
                        await self.purge(feed.pod, "silent")
            if max_age:
                for pod in await self._pods_in_index():
                    try:
                        expired = await self.index.expire(pod, time.time() - max_age)
                    except IndexUnavailable as exc:
                        log.warning("janitor: %s", exc)
                        break
                    if expired:
                        self.metrics.expired_entries.inc(expired)
