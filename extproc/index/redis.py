"""Redis index: hash ``{keyPrefix}{model}@{key}``, field = pod id, value = unix seconds.

A lookup is one pipelined round trip (HGETALL per block, no MULTI) bounded by
``index.timeout`` (in a cluster: one per node involved, in parallel; block keys carry no hash
tag, so a model's blocks spread over every shard); any failure surfaces as IndexUnavailable so
routing can fall back. ``index.mode`` (connect.py) says how Redis runs: standalone, cluster or
sentinel.

Write-side keys, beside the blocks (``metaPrefix`` defaults to ``matrix:kv:``):
- ``{meta}pod:{pod}``: set of ``{model}@{key}`` the pod holds (drop a pod without KEYS);
- ``{meta}engine:{pod}``: hash engine block id -> packed engine block (ingester restarts);
  in a cluster both carry the pod as hash tag (``{meta}pod:{<pod>}``), so they share a slot;
- ``{meta}pods``: set of pods with anything above;
- ``{meta}epoch``: a random marker set by the first ingester; a new value means the index
  was lost (a Redis restarted without persistence, a flush) and must be rebuilt. Cluster and
  sentinel modes add a failover count: a primary whose replication history was replaced may
  have lost writes it acknowledged (replication is asynchronous), which is a loss too;
- channel ``{meta}invalidate``: msgpack Invalidation per change, for serve replicas, at most
  invalidation.CHUNK blocks per message so no replica spends long on one (sharded pub/sub in a
  cluster).

Order of writes: a pod's records before its blocks are stored, blocks before records are
removed, announcements last, so a write cut short may leave a record of a block not written
(a purge handles it), never a block a purge cannot find nor an announcement of a write not
yet readable. One connection keeps that order within one pipeline; a cluster runs each step
as its own pipeline (one batch per node, in parallel), one step after the other.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TypeVar

import msgspec
from redis.exceptions import RedisError

from ..config import IndexConfig
from . import invalidation
from . import FEED_LOST, BlockRef, IndexUnavailable, Invalidation, InvalidationListener, PodTimes, Writes
from .connect import Backend, open_backend, redact

__all__ = ["RedisIndex", "redact"]

log = logging.getLogger("extproc.index.redis")

WRITE_TIMEOUT = 10.0
T = TypeVar("T")
CHUNK = 5000
"""Blocks per invalidation message: every replica handles one message in one step of its
event loop, so a purge of a big pod must not arrive as one message."""
FEED_CHECK_INTERVAL = 1.0
"""How often a subscriber checks that its feed still lives where it listens and answers."""
FEED_SILENT_AFTER = 5.0
"""A subscription whose server answered no PING this long is taken as lost."""
JOURNAL_SECONDS = 30.0
JOURNAL_LIMIT = 200_000


class RecentWrites:
    """Cluster mode: the blocks each pod stored lately, kept by the ingester that wrote them.

    A pod's record lives on one shard, its blocks on every shard. If the record's shard fails
    over and loses record updates it had acknowledged, blocks written on other shards in that
    window are named by no record; a purge also drops the blocks listed here, so a failover
    (which purges every pod) leaves none behind. Bounded by age and count.
    """

    def __init__(self, seconds: float = JOURNAL_SECONDS, limit: int = JOURNAL_LIMIT):
        self.seconds = seconds
        self.limit = limit
        self._entries: deque[tuple[float, str, tuple[BlockRef, ...]]] = deque()
        self._count = 0

    def add(self, pod: str, refs: Sequence[BlockRef]) -> None:
        if not refs:
            return
        now = time.monotonic()
        self._entries.append((now, pod, tuple(refs)))
        self._count += len(refs)
        while self._entries and (self._count > self.limit or self._entries[0][0] < now - self.seconds):
            self._count -= len(self._entries.popleft()[2])

    def refs(self, pod: str) -> set[BlockRef]:
        return {ref for _, owner, refs in self._entries if owner == pod for ref in refs}


class RedisIndex:
    local = False
    """Lookups cross the network: worth caching per block."""

    def __init__(self, backend: Backend, *, key_prefix: str, meta_prefix: str, timeout: float):
        self._backend = backend
        self._client = backend.client
        self._prefix = key_prefix
        self._meta = meta_prefix
        self._timeout = timeout
        self._channel = f"{meta_prefix}invalidate"
        self._listeners: list[InvalidationListener] = []
        self._subscriber: asyncio.Task | None = None
        self._tagged = backend.mode == "cluster"
        self._journal = RecentWrites() if self._tagged else None
        self._histories: set[str] | None = None
        self._failovers = 0

    @classmethod
    def from_config(cls, config: IndexConfig) -> "RedisIndex":
        backend = open_backend(config, f"{config.meta_prefix}invalidate")
        return cls(backend, key_prefix=config.key_prefix, meta_prefix=config.meta_prefix, timeout=config.timeout)

    @property
    def where(self) -> str:
        """Mode and servers, passwords redacted: for the start-up log line."""
        return self._backend.where

    @property
    def mode(self) -> str:
        return self._backend.mode

    async def check_credentials(self) -> None:
        """Fail start-up on rejected credentials or servers that are not what index.mode says;
        an unreachable Redis only degrades routing."""
        await self._backend.check()

    def _block(self, model: str, key: int) -> str:
        return f"{self._prefix}{model}@{key}"

    def _held(self, pod: str) -> str:
        return f"{self._meta}pod:{{{pod}}}" if self._tagged else f"{self._meta}pod:{pod}"

    def _engine(self, pod: str) -> str:
        return f"{self._meta}engine:{{{pod}}}" if self._tagged else f"{self._meta}engine:{pod}"

    async def _ask(self, call: Awaitable[T], timeout: float) -> T:
        """Any Redis failure or a reply slower than ``timeout`` is IndexUnavailable."""
        try:
            async with asyncio.timeout(timeout):
                return await call
        except (RedisError, OSError, TimeoutError) as exc:
            self._backend.failed(exc)
            raise IndexUnavailable(f"redis: {type(exc).__name__}: {exc}") from None

    async def _run(self, pipe, timeout: float | None = None) -> list:
        return await self._ask(pipe.execute(), timeout or self._timeout)

    def _steps(self, count: int) -> list:
        """Pipelines for ``count`` ordered steps: one shared pipeline on one connection (it
        keeps the order), one each in a cluster (run one after the other)."""
        if self._backend.ordered_pipelines:
            return [self._backend.pipeline()] * count
        return [self._backend.pipeline() for _ in range(count)]

    async def _run_steps(self, steps: list, timeout: float = WRITE_TIMEOUT) -> None:
        done: list = []
        for pipe in steps:
            if any(pipe is seen for seen in done) or not len(pipe):
                continue
            done.append(pipe)
            await self._run(pipe, timeout)

    # -- read side -------------------------------------------------------------------

    async def lookup(self, model: str, keys: Sequence[int]) -> list[PodTimes]:
        if not keys:
            return []
        pipe = self._backend.pipeline()
        for key in keys:
            pipe.hgetall(self._block(model, key))
        replies = await self._run(pipe)
        return [{pod.decode(): float(at) for pod, at in reply.items()} for reply in replies]

    async def scan_blocks(self, batch: int = 1000) -> AsyncIterator[tuple[str, list[int], list[PodTimes]]]:
        """Every block in the index, a batch at a time: (model, keys, owners). For loading a
        mirror. In a cluster every primary is scanned; slots that moved meanwhile (a failover,
        a migration) raise IndexUnavailable at the end, so the load is tried again."""
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self._prefix) + "*"
        targets, stamp = await self._ask(self._backend.scan_targets(), WRITE_TIMEOUT)
        for target in targets:
            cursor = 0
            while True:
                cursor, names = await self._ask(self._backend.scan(target, cursor, pattern, batch), WRITE_TIMEOUT)
                refs: dict[str, list[int]] = {}
                for name in names:
                    model, _, key = name.decode()[len(self._prefix):].rpartition("@")
                    if model and key.isdigit():
                        refs.setdefault(model, []).append(int(key))
                for model, keys in refs.items():
                    pipe = self._backend.pipeline()
                    for key in keys:
                        pipe.hgetall(self._block(model, key))
                    replies = await self._run(pipe, WRITE_TIMEOUT)
                    yield model, keys, [{pod.decode(): float(at) for pod, at in reply.items()} for reply in replies]
                if cursor == 0:
                    break
        if stamp is not None and (await self._ask(self._backend.scan_targets(), WRITE_TIMEOUT))[1] != stamp:
            raise IndexUnavailable("redis: the cluster's slots moved during the scan")

    async def ping(self) -> None:
        await self._ask(self._backend.ping(), self._timeout)

    # -- write side ------------------------------------------------------------------

    async def apply(self, pod: str, writes: Writes) -> None:
        records, blocks, last = self._steps(3)
        held = self._held(pod)
        if writes.stored or writes.engine_put:
            records.sadd(f"{self._meta}pods", pod)
        if writes.stored:
            records.sadd(held, *(f"{m}@{k}" for m, k in writes.stored))
            if self._journal is not None:
                self._journal.add(pod, list(writes.stored))
        # Engine map before blocks: a restarted ingester must be able to remove what was written.
        if writes.engine_put:
            records.hset(self._engine(pod), mapping=writes.engine_put)
        if writes.engine_del:
            records.hdel(self._engine(pod), *writes.engine_del)
        for (model, key), at in writes.stored.items():
            blocks.hset(self._block(model, key), pod, repr(at))
        for model, key in writes.removed:
            blocks.hdel(self._block(model, key), pod)
        if writes.removed:
            last.srem(held, *(f"{m}@{k}" for m, k in writes.removed))
        for message in writes.invalidations(pod):
            self._backend.publish(last, self._channel, invalidation.encode(message))
        await self._run_steps([records, blocks, last])

    async def _drop(self, pod: str, refs: list[BlockRef], *, cleared: bool = False) -> None:
        for start in range(0, len(refs), CHUNK):
            chunk = refs[start : start + CHUNK]
            blocks, records = self._steps(2)
            for model, key in chunk:
                blocks.hdel(self._block(model, key), pod)
            records.srem(self._held(pod), *(f"{m}@{k}" for m, k in chunk))
            await self._run_steps([blocks, records])
        messages = invalidation.invalidations(pod, refs, [], cleared=cleared)
        for start in range(0, len(messages), CHUNK // invalidation.CHUNK):
            pipe = self._backend.pipeline()
            for message in messages[start : start + CHUNK // invalidation.CHUNK]:
                self._backend.publish(pipe, self._channel, invalidation.encode(message))
            await self._run(pipe, WRITE_TIMEOUT)

    async def _held_refs(self, pod: str) -> list[BlockRef]:
        members = await self._ask(self._client.smembers(self._held(pod)), WRITE_TIMEOUT)
        refs = []
        for member in members:
            model, _, key = member.decode().rpartition("@")
            refs.append((model, int(key)))
        return refs

    async def purge_pod(self, pod: str) -> int:
        refs = await self._held_refs(pod)
        if self._journal is not None:
            known = set(refs)
            refs += sorted(ref for ref in self._journal.refs(pod) if ref not in known)
        await self._drop(pod, refs, cleared=True)
        pipe = self._backend.pipeline()
        pipe.delete(self._held(pod), self._engine(pod))
        pipe.srem(f"{self._meta}pods", pod)
        await self._run(pipe, WRITE_TIMEOUT)
        return len(refs)

    async def expire(self, pod: str, older_than: float) -> int:
        refs = await self._held_refs(pod)
        old: list[BlockRef] = []
        for start in range(0, len(refs), CHUNK):
            chunk = refs[start : start + CHUNK]
            pipe = self._backend.pipeline()
            for model, key in chunk:
                pipe.hget(self._block(model, key), pod)
            for ref, at in zip(chunk, await self._run(pipe, WRITE_TIMEOUT)):
                if at is None or float(at) < older_than:
                    old.append(ref)
        await self._drop(pod, old)
        return len(old)

    async def pods(self) -> set[str]:
        members = await self._ask(self._client.smembers(f"{self._meta}pods"), WRITE_TIMEOUT)
        return {m.decode() for m in members}

    async def epoch(self) -> str:
        """The index's epoch marker, set if missing. A value an ingester has not seen before
        means every entry written before it may be gone: Redis restarted empty or was flushed
        (a new marker), or, in cluster and sentinel modes, a primary's replication history
        was replaced (a replica promoted, a primary restarted empty), which may have lost
        writes it had acknowledged. The ingester rebuilds every pod either way."""
        key = f"{self._meta}epoch"
        pipe = self._backend.pipeline()
        pipe.set(key, uuid.uuid4().hex, nx=True)
        pipe.get(key)
        _, value = await self._run(pipe, WRITE_TIMEOUT)
        histories = await self._ask(self._backend.histories(), WRITE_TIMEOUT)
        if histories:
            gone = (self._histories or set()) - histories
            if gone:
                self._failovers += 1
                log.warning("redis %s: the replication history of a primary was replaced (failover or restart); "
                            "writes it acknowledged may be lost", self._backend.mode)
            self._histories = histories
        marker = value.decode() if isinstance(value, bytes) else str(value)
        return f"{marker}/failover-{self._failovers}" if self._failovers else marker

    async def load_engine_map(self, pod: str) -> dict[str, bytes]:
        raw = await self._ask(self._client.hgetall(self._engine(pod)), WRITE_TIMEOUT)
        return {k.decode(): v for k, v in raw.items()}

    # -- invalidation feed -----------------------------------------------------------

    async def subscribe(self, listener: InvalidationListener, *, supervisor=None) -> None:
        """Deliver every Invalidation published by any ingester; reconnects on its own.

        With a supervisor (extproc.supervise), a failure of the subscriber itself (a bug, a
        listener raising) restarts it, and the listeners first hear that the feed was lost.
        """
        self._listeners.append(listener)
        if self._subscriber is None:
            ready = asyncio.Event()
            if supervisor is not None:
                self._subscriber = supervisor.spawn("invalidation", lambda: self._listen(ready), critical=True,
                                                    on_restart=self._feed_lost)
            else:
                self._subscriber = asyncio.ensure_future(self._listen(ready))
            await ready.wait()

    async def _feed_lost(self) -> None:
        for listener in self._listeners:
            listener(Invalidation(FEED_LOST, cleared=True))

    async def _listen(self, ready: asyncio.Event) -> None:
        """Redis outages are handled here (resubscribe every second): they are no failure of
        the task, and routing falls back by itself meanwhile. The subscription's connection
        never reconnects by itself, and every second the subscriber checks that the feed still
        lives on its node (a failover, a moved slot) and that the node answers a PING: any
        doubt is a lost feed, and listeners hear FEED_LOST once it is back."""
        lost = False
        sharded = self._backend.sharded_feed
        while True:
            client = pubsub = None
            try:
                client, address = await self._backend.feed_client()
                pubsub = client.pubsub()
                if sharded:
                    await pubsub.ssubscribe(self._channel)
                else:
                    await pubsub.subscribe(self._channel)
                await self._confirmed(pubsub, address)
                ready.set()
                if lost:
                    lost = False
                    log.info("invalidation feed back (%s)", address)
                    for listener in self._listeners:
                        listener(Invalidation(FEED_LOST, cleared=True))
                await self._receive(pubsub, address)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                if not lost:
                    log.warning("invalidation feed lost (%s); resubscribing every second", exc)
                lost = True
                ready.set()
                self._backend.failed(exc)
                await asyncio.sleep(1.0)
            finally:
                if pubsub is not None:
                    await _quietly(pubsub.aclose())
                if client is not None:
                    await _quietly(client.aclose())

    async def _confirmed(self, pubsub, address: str) -> None:
        """Wait for the (s)subscribe confirmation: until it arrives nothing is being received."""
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] in ("subscribe", "ssubscribe"):
                return
        raise TimeoutError(f"{address} did not confirm the subscription")

    async def _receive(self, pubsub, address: str) -> None:
        next_check = time.monotonic() + FEED_CHECK_INTERVAL
        answered = time.monotonic()
        while True:
            message = await pubsub.get_message(timeout=FEED_CHECK_INTERVAL)
            if message is not None:
                kind = message["type"]
                if kind in ("message", "smessage"):
                    answered = time.monotonic()
                    try:
                        change = invalidation.decode(message["data"])
                    except (msgspec.DecodeError, UnicodeDecodeError):
                        log.warning("ignoring a malformed invalidation message")
                        continue
                    for listener in self._listeners:
                        listener(change)
                    await asyncio.sleep(0)  # one bounded message per step: requests go first
                elif kind == "pong":
                    answered = time.monotonic()
                elif kind in ("unsubscribe", "sunsubscribe"):
                    # Redis unsubscribes sharded subscribers when their slot leaves the node.
                    raise _FeedMoved(f"{address} ended the subscription (its slot moved or failed over)")
            now = time.monotonic()
            if now >= next_check:
                next_check = now + FEED_CHECK_INTERVAL
                if now - answered > FEED_SILENT_AFTER:
                    raise _FeedMoved(f"{address} answered nothing for {now - answered:.0f}s")
                if await self._backend.feed_moved(address):
                    raise _FeedMoved(f"the feed no longer lives at {address}")
                await pubsub.ping()

    async def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.cancel()
            await asyncio.gather(self._subscriber, return_exceptions=True)
        await self._backend.close()


class _FeedMoved(RedisError):
    """The subscription can no longer vouch for the feed."""


async def _quietly(call: Awaitable) -> None:
    try:
        await call
    except (RedisError, OSError, TimeoutError, RuntimeError):
        pass
