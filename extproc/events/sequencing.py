"""Per-pod sequencing: one publisher's messages -> index writes, strictly in order.

Sequence numbers guard the truth of the index: a gap is filled from the pod's replay
endpoint when it has one; otherwise (or if the replay cannot cover it) the pod's entries
are dropped and rebuilt from new events, never left half true. A sequence that starts
again means the engine restarted with an empty cache: its old entries are dropped first.

Tiers: a BlockStored or BlockRemoved naming a medium other than the GPU (vLLM's offloading
connector) updates that tier's presence only, under the endpoint ``{pod}|{medium}``
(endpoints.py); AllBlocksCleared, emitted by the engine's GPU block pool, clears the GPU's.
A restart, a gap nothing fills or a purge drops every tier of the pod.

No sockets here: frames come in from the transport, replays are fetched through a
function it provides, so every rule can be tested with plain lists of frames.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..config import Config, PodConfig
from ..endpoints import GPU, belongs_to, endpoint, split
from ..index import BlockIndex, IndexUnavailable, Writes
from ..metrics import Metrics
from ..logs import ThrottledLog
from .decode import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodeError,
    EventBatch,
    RejectedEvent,
    decode_frames,
    decode_payload,
)
from .tracker import PodTracker

log = logging.getLogger("extproc.events")

PREFIX_KINDS = frozenset({None, "full_attention", "mla_attention", "sink_full_attention"})
"""KV cache groups whose blocks make a prefix (kv_cache_spec_kind; None: a release that does
not say, or a model with one group). Sliding-window, chunked-local and mamba groups keep only
the last blocks of a window or a state at a few points: their blocks never extend a cached
prefix, and their removals must not shorten one (see README, Hybrid models)."""

ReplayFetcher = Callable[["Feed", int], Awaitable["list[tuple[int, bytes]] | None"]]
"""(feed, first seq) -> every buffered (seq, payload) from there on, sorted; None if the pod did not answer."""


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
    closed: bool = False
    """Removed by a reload: anything of it still running (a replay, a catch-up) must not
    write, or a purged pod would come back (a fence)."""
    unsynced: str | None = None
    """Its entries must be dropped but the index could not be reached (the reason): no event
    is applied until a resync succeeds (retried by the ingester's index watch)."""
    tiers: dict[str, PodTracker] = field(default_factory=dict)
    """medium -> the tracker of the blocks offloaded there (CPU, STORAGE, ...)."""
    rank: int | None = None
    """The data-parallel rank this feed is (its batches name it), None for a pod without ranks."""
    group_kinds: dict[int, str] = field(default_factory=dict)
    """group_idx -> kv_cache_spec_kind, as BlockStored events announce them (removals name the
    group only)."""

    def prefix_group(self, group_idx: int | None, kind: str | None = None) -> bool:
        """Whether blocks of this KV cache group make the prefix the index keeps."""
        if kind is not None and group_idx is not None:
            self.group_kinds[group_idx] = kind
        elif group_idx is not None:
            kind = self.group_kinds.get(group_idx)
        return kind in PREFIX_KINDS

    def tier(self, medium: str) -> PodTracker:
        tracker = self.tiers.get(medium)
        if tracker is None:
            gpu = self.tracker
            tracker = self.tiers[medium] = PodTracker(endpoint(self.pod, medium), gpu.model, gpu.router_block,
                                                      gpu.max_blocks, gpu.scheme, fallback=gpu, refcounted=True)
        return tracker

    def clear(self) -> None:
        """Forget every tier's blocks (the index entries are dropped by the caller)."""
        self.tracker.clear()
        for tracker in self.tiers.values():
            tracker.clear()


class FeedWrites:
    """One feed's index changes, per endpoint: the GPU's (the pod id) and each tier's."""

    __slots__ = ("by_endpoint", "_at")

    def __init__(self) -> None:
        self.by_endpoint: dict[str, Writes] = {}
        self._at = 0.0

    @property
    def at(self) -> float:
        return self._at

    @at.setter
    def at(self, value: float) -> None:
        self._at = value
        for writes in self.by_endpoint.values():
            writes.at = value

    def of(self, tracker: PodTracker) -> Writes:
        writes = self.by_endpoint.get(tracker.pod)
        if writes is None:
            writes = self.by_endpoint[tracker.pod] = Writes(at=self._at)
        return writes

    def __bool__(self) -> bool:
        return any(self.by_endpoint.values())


def pod_model(pod: PodConfig, config: Config) -> str:
    """The base model a pod's events belong to (LoRA blocks name their adapter)."""
    if pod.models:
        return pod.models[0]
    return config.models[0].name if config.models else ""


class Sequencer:
    """Every pod's feed, applied under a per-pod lock (live messages, replays and purges of
    one pod never interleave)."""

    def __init__(self, index: BlockIndex, config: Config, metrics: Metrics, fetch_replay: ReplayFetcher):
        self.index = index
        self.config = config
        self.metrics = metrics
        self.fetch_replay = fetch_replay
        self.feeds: dict[str, Feed] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._warn = ThrottledLog(log, 10.0)

    def new_feed(self, pod: str, model: str, endpoint: str = "", replay: str = "", rank: int | None = None) -> Feed:
        tracker = PodTracker(
            pod, model, self.config.block_size_to_hash, self.config.max_blocks_to_match, self.config.hash_scheme
        )
        feed = self.feeds[pod] = Feed(pod, tracker, endpoint, replay, rank=rank)
        return feed

    def lock(self, pod: str) -> asyncio.Lock:
        return self._locks.setdefault(pod, asyncio.Lock())

    def remove(self, pod: str) -> Feed | None:
        """Forget a pod's feed (a reload removed it) and fence whatever of it still runs."""
        feed = self.feeds.pop(pod, None)
        if feed is not None:
            feed.closed = True
        return feed

    def forget_lock(self, pod: str) -> None:
        lock = self._locks.get(pod)
        if lock is not None and not lock.locked() and pod not in self.feeds:
            del self._locks[pod]

    async def load(self, feed: Feed) -> None:
        """Adopt the pod's persisted engine map, so removals of blocks stored before we started apply."""
        try:
            feed.tracker.load(await self.index.load_engine_map(feed.pod))
            for endpoint_id in sorted(await self.index.pods()):
                candidate, medium = split(endpoint_id)
                if candidate == feed.pod and medium != GPU:
                    feed.tier(medium).load(await self.index.load_engine_map(endpoint_id))
        except IndexUnavailable as exc:
            log.warning("pod %s: engine map not loaded (%s); its old blocks cannot be removed", feed.pod, exc)

    # -- applying events -------------------------------------------------------------

    async def process(self, feed: Feed, frames_list: list[list[bytes]]) -> None:
        """Apply a run of one publisher's messages; never raises for bad input."""
        async with self.lock(feed.pod):
            if feed.closed:
                return
            feed.last_seen = time.monotonic()
            feed.silent_purged = False
            if feed.unsynced is not None:
                self.metrics.events_dropped.inc(len(frames_list))
                return  # nothing applies before the pending resync (index watch) succeeds
            writes = FeedWrites()
            block_size = self.config.ingest.engine_block_size
            for frames in frames_list:
                try:
                    message = decode_frames(frames, block_size=block_size)
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
                if feed.unsynced is not None:
                    return
                feed.reconnected = False
                writes = await self._apply(feed, message.batch, writes)
                feed.last_seq = message.seq
            await self._flush(feed, writes)

    def _tracker(self, feed: Feed, medium: str | None) -> PodTracker:
        return feed.tracker if medium is None or medium == GPU else feed.tier(medium)

    async def _apply(self, feed: Feed, batch: EventBatch, writes: FeedWrites) -> FeedWrites:
        writes.at = batch.ts
        self.metrics.ingest_lag.observe(max(0.0, time.time() - batch.ts))
        if feed.rank is not None and batch.data_parallel_rank not in (None, feed.rank):
            # Another rank's events on this rank's port: the pod's ports are not what its
            # config says; applying them would pull requests to the wrong rank.
            self._rejected(feed, RejectedEvent("EventBatch", "rank",
                                               f"events of rank {batch.data_parallel_rank} on the feed of rank {feed.rank}"))
            return writes
        for event in batch.events:
            if isinstance(event, BlockStored):
                self.metrics.events.labels("BlockStored").inc()
                if not feed.prefix_group(event.group_idx, event.kv_cache_spec_kind):
                    continue  # a sliding window's or a mamba state's blocks: no prefix of their own
                tracker = self._tracker(feed, event.medium)
                if event.placeholder:
                    # An offloaded chunk named by its last block: its blocks are the GPU's.
                    chunk = self.config.ingest.offload_chunk_blocks
                    for block_hash in event.block_hashes:
                        if not tracker.stored_chunk(block_hash, event.group_idx, chunk, writes.of(tracker)):
                            self._rejected(feed, RejectedEvent("BlockStored", "unknown_chunk",
                                                               "an offloaded chunk whose blocks the GPU never announced"))
                    continue
                try:
                    tracker.stored(event, writes.of(tracker))
                except ValueError as exc:
                    self._rejected(feed, RejectedEvent("BlockStored", "block_size", str(exc)))
            elif isinstance(event, BlockRemoved):
                self.metrics.events.labels("BlockRemoved").inc()
                if not feed.prefix_group(event.group_idx):
                    continue
                tracker = self._tracker(feed, event.medium)
                tracker.removed(event, writes.of(tracker))
            elif isinstance(event, AllBlocksCleared):
                # Emitted by the engine's GPU block pool: what is offloaded stays (a connector
                # reset is announced by no event at all; see README, KV tiers).
                self.metrics.events.labels("AllBlocksCleared").inc()
                writes = await self._flush(feed, writes)
                await self._purge_feed(feed, "cleared", gpu_only=True)
                writes.at = batch.ts
            else:
                self._rejected(feed, event)
                if event.lossy:
                    # An unreadable removal: what it removed is unknown, so nothing of the pod is trusted.
                    writes = await self._flush(feed, writes)
                    await self._purge_feed(feed, "bad_event")
                    writes.at = batch.ts
        return writes

    def _rejected(self, feed: Feed, event: RejectedEvent) -> None:
        self.metrics.events_rejected.labels(event.reason).inc()
        self._warn.warning(f"{feed.pod}/{event.reason}",
                           f"pod {feed.pod}: skipping a {event.kind} event ({event.reason}: {event.detail})")

    async def _flush(self, feed: Feed, writes: FeedWrites) -> FeedWrites:
        if writes and not feed.closed:
            try:
                for endpoint_id, changes in writes.by_endpoint.items():
                    if changes:
                        await self.index.apply(endpoint_id, changes)
                        self.metrics.router_blocks_written.inc(len(changes.stored))
            except IndexUnavailable as exc:
                # Writes lost: the pod's entries would be half true, so start it over.
                log.warning("pod %s: index write failed (%s); its entries will be dropped and rebuilt", feed.pod, exc)
                self._unsynced(feed, "index_error")
        return FeedWrites()

    def _unsynced(self, feed: Feed, reason: str) -> None:
        feed.clear()
        feed.last_seq = feed.skip_upto = None
        feed.unsynced = reason

    # -- gaps, restarts, replays -----------------------------------------------------

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
        await self._purge_feed(feed, "gap")

    async def _restarted(self, feed: Feed, seq: int) -> None:
        """Drop everything of the old process; take what the new one sent before ``seq`` from
        its replay buffer when it has one (we may have joined after its first batches)."""
        if not await self._purge_feed(feed, "restart"):
            return
        feed.last_seq = None
        if feed.replay and seq > 0:
            replies = await self.fetch_replay(feed, 0)
            replies = [(s, p) for s, p in replies or () if s < seq]
            if [s for s, _ in replies] == list(range(seq)):
                await self._apply_replies(feed, replies)
                feed.skip_upto = None

    async def _replay(self, feed: Feed, start: int, upto: int) -> bool:
        """Fill the gap start..upto-1 from the pod's replay buffer; False if it cannot."""
        replies = await self.fetch_replay(feed, start)
        replies = [(seq, payload) for seq, payload in replies or () if seq < upto]
        if [seq for seq, _ in replies] != list(range(start, upto)):
            self.metrics.replays.labels("incomplete" if replies is not None else "failed").inc()
            log.warning("pod %s: replay could not cover %d..%d", feed.pod, start, upto - 1)
            return False
        await self._apply_replies(feed, replies)
        return True

    async def _apply_replies(self, feed: Feed, replies: list[tuple[int, bytes]]) -> None:
        writes = FeedWrites()
        block_size = self.config.ingest.engine_block_size
        for seq, payload in replies:
            if feed.closed or feed.unsynced is not None:
                return
            try:
                writes = await self._apply(feed, decode_payload(payload, block_size=block_size), writes)
            except DecodeError:
                self.metrics.event_decode_errors.inc()
            feed.last_seq = seq
        await self._flush(feed, writes)
        if feed.unsynced is not None:
            return
        # Live messages queued while we replayed repeat what we just applied.
        feed.skip_upto = feed.last_seq
        self.metrics.replays.labels("ok").inc()

    async def catch_up(self, feed: Feed) -> None:
        """On start, rebuild the pod's entries from its replay buffer if it holds the whole history."""
        async with self.lock(feed.pod):
            if feed.closed or feed.last_seq is not None or not feed.replay:
                return
            await self._rebuild(feed, purge=True)

    async def _rebuild(self, feed: Feed, *, purge: bool) -> bool:
        """Replay the pod's whole history, if its buffer still holds it from seq 0."""
        replies = await self.fetch_replay(feed, 0)
        if feed.closed:
            return False  # removed while we waited: it must not be written back
        if not replies or replies[0][0] != 0 or [s for s, _ in replies] != list(range(len(replies))):
            log.info("pod %s: replay buffer does not start at 0; new events rebuild its entries", feed.pod)
            return False
        if purge and not await self._purge_feed(feed, "catch_up", quiet=True):
            return False
        await self._apply_replies(feed, replies)
        if feed.unsynced is None and not feed.closed:
            log.info("pod %s: rebuilt from its replay buffer up to seq %d", feed.pod, feed.last_seq)
            return True
        return False

    async def resync(self, feed: Feed, reason: str, *, rebuild: bool = True) -> bool:
        """Start the pod over, as after a gap nothing can fill: drop its entries, then (with
        ``rebuild``) replay its whole history when the buffer holds it. Call under its lock.
        False if the index could not be reached (``feed.unsynced`` says so; retried later)."""
        if feed.closed:
            return True
        feed.last_seq = feed.skip_upto = None
        feed.reconnected = False
        if not await self._purge_feed(feed, reason):
            return False
        if rebuild and feed.replay:
            await self._rebuild(feed, purge=False)
        return feed.unsynced is None

    # -- dropping a pod --------------------------------------------------------------

    async def _purge_feed(self, feed: Feed, reason: str, *, quiet: bool = False, gpu_only: bool = False) -> bool:
        """Drop a live feed's entries (``gpu_only``: its GPU's, the tiers stay); a closed
        feed's are someone else's business now."""
        if feed.closed:
            return False
        ok = await self.purge(feed.pod, reason, quiet=quiet, gpu_only=gpu_only)
        if ok:
            feed.unsynced = None
        return ok

    async def purge(self, pod: str, reason: str, *, quiet: bool = False, gpu_only: bool = False) -> bool:
        """Drop every entry of the pod, every tier (``gpu_only``: the GPU's); False if the index
        could not be reached (the feed, if any, is then marked unsynced so the purge is retried)."""
        self.metrics.pod_purges.labels(reason).inc()
        feed = self.feeds.get(pod)
        if feed is not None:
            if gpu_only:
                feed.tracker.clear()
            else:
                feed.clear()
        try:
            endpoints = {pod}
            if not gpu_only:
                endpoints |= {e for e in await self.index.pods() if belongs_to(e, pod)}
                if feed is not None:
                    endpoints |= {tracker.pod for tracker in feed.tiers.values()}
            dropped = 0
            for endpoint_id in sorted(endpoints):
                dropped += await self.index.purge_pod(endpoint_id)
        except IndexUnavailable as exc:
            log.warning("pod %s: purge failed (%s); retrying", pod, exc)
            if feed is not None and not feed.closed:
                self._unsynced(feed, reason)
            return False
        if not quiet:
            log.info("pod %s: dropped %d index entries (%s)", pod, dropped, reason)
        return True
