"""Redis index: hash ``{keyPrefix}{model}@{key}``, field = pod id, value = unix seconds.

A lookup is one pipelined round trip (HGETALL per block, no MULTI) bounded by
``index.timeout``; any failure surfaces as IndexUnavailable so routing can fall back.

Write-side keys, beside the blocks (``metaPrefix`` defaults to ``matrix:kv:``):
- ``{meta}pod:{pod}``: set of ``{model}@{key}`` the pod holds (drop a pod without KEYS);
- ``{meta}engine:{pod}``: hash engine block id -> packed engine block (ingester restarts);
- ``{meta}pods``: set of pods with anything above;
- ``{meta}epoch``: a random marker set by the first ingester; a new value means the index
  was lost (a Redis restarted without persistence, a flush) and must be rebuilt;
- channel ``{meta}invalidate``: msgpack Invalidation per change, for serve replicas, at most
  invalidation.CHUNK blocks per message so no replica spends long on one.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    RedisError,
    ResponseError,
)

from ..config import ConfigError, IndexConfig, read_secret
from . import invalidation
from . import FEED_LOST, BlockRef, IndexUnavailable, Invalidation, InvalidationListener, PodTimes, Writes

log = logging.getLogger("extproc.index.redis")

WRITE_TIMEOUT = 10.0
T = TypeVar("T")
CHUNK = 5000
"""Blocks per invalidation message: every replica handles one message in one step of its
event loop, so a purge of a big pod must not arrive as one message."""


def redact(url: str) -> str:
    """The URL without any password in it, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    auth, _, host = rest.rpartition("@")
    user = auth.split(":", 1)[0]
    return f"{scheme}{sep}{user + ':***@' if user else '***@'}{host}"


class RedisIndex:
    local = False
    """Lookups cross the network: worth caching per block."""

    def __init__(self, client: aioredis.Redis, *, key_prefix: str, meta_prefix: str, timeout: float):
        self._client = client
        self._prefix = key_prefix
        self._meta = meta_prefix
        self._timeout = timeout
        self._channel = f"{meta_prefix}invalidate"
        self._listeners: list[InvalidationListener] = []
        self._subscriber: asyncio.Task | None = None

    @classmethod
    def from_config(cls, config: IndexConfig) -> "RedisIndex":
        options: dict = {"socket_connect_timeout": max(config.timeout, 1.0), "health_check_interval": 30}
        password = read_secret(config.password_file, config.password_env)
        if password is not None:
            options["password"] = password
        if config.username:
            options["username"] = config.username
        if config.redis_url.startswith("rediss://"):
            options.update({k: v for k, v in (("ssl_ca_certs", config.tls_ca_file), ("ssl_certfile", config.tls_cert_file),
                                               ("ssl_keyfile", config.tls_key_file)) if v})
        client = aioredis.from_url(config.redis_url, **options)
        index = cls(client, key_prefix=config.key_prefix, meta_prefix=config.meta_prefix, timeout=config.timeout)
        index.where = redact(config.redis_url)
        return index

    where = "redis"

    async def check_credentials(self) -> None:
        """Fail start-up on rejected credentials; an unreachable Redis only degrades routing."""
        try:
            await asyncio.wait_for(self._client.ping(), 5.0)
        except (AuthenticationError, AuthenticationWrongNumberOfArgsError) as exc:
            raise ConfigError(f"redis at {self.where} rejected the credentials: {exc}") from None
        except ResponseError as exc:
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc) or "NOPERM" in str(exc):
                raise ConfigError(f"redis at {self.where} rejected the credentials: {exc}") from None
            raise
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("redis at %s is not reachable yet (%s); routing by load until it is", self.where, exc)

    def _block(self, model: str, key: int) -> str:
        return f"{self._prefix}{model}@{key}"

    def _held(self, pod: str) -> str:
        return f"{self._meta}pod:{pod}"

    def _engine(self, pod: str) -> str:
        return f"{self._meta}engine:{pod}"

    async def _ask(self, call: Awaitable[T], timeout: float) -> T:
        """Any Redis failure or a reply slower than ``timeout`` is IndexUnavailable."""
        try:
            async with asyncio.timeout(timeout):
                return await call
        except (RedisError, OSError, TimeoutError) as exc:
            raise IndexUnavailable(f"redis: {type(exc).__name__}: {exc}") from None

    async def _run(self, pipe: aioredis.client.Pipeline, timeout: float | None = None) -> list:
        return await self._ask(pipe.execute(), timeout or self._timeout)

    # -- read side -------------------------------------------------------------------

    async def lookup(self, model: str, keys: Sequence[int]) -> list[PodTimes]:
        if not keys:
            return []
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(self._block(model, key))
        replies = await self._run(pipe)
        return [{pod.decode(): float(at) for pod, at in reply.items()} for reply in replies]

    async def scan_blocks(self, batch: int = 1000) -> AsyncIterator[tuple[str, list[int], list[PodTimes]]]:
        """Every block in the index, a batch at a time: (model, keys, owners). For loading a mirror."""
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self._prefix) + "*"
        cursor = 0
        while True:
            cursor, names = await self._ask(self._client.scan(cursor, match=pattern, count=batch), WRITE_TIMEOUT)
            refs: dict[str, list[int]] = {}
            for name in names:
                model, _, key = name.decode()[len(self._prefix):].rpartition("@")
                if model and key.isdigit():
                    refs.setdefault(model, []).append(int(key))
            for model, keys in refs.items():
                pipe = self._client.pipeline(transaction=False)
                for key in keys:
                    pipe.hgetall(self._block(model, key))
                replies = await self._run(pipe, WRITE_TIMEOUT)
                yield model, keys, [{pod.decode(): float(at) for pod, at in reply.items()} for reply in replies]
            if cursor == 0:
                return

    async def ping(self) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.ping()
        await self._run(pipe)

    # -- write side ------------------------------------------------------------------

    async def apply(self, pod: str, writes: Writes) -> None:
        pipe = self._client.pipeline(transaction=False)
        held = self._held(pod)
        # The pod's records first: a write cut short (timeout, cancel) may leave a record of a
        # block not written, which a purge handles, never a block a purge cannot find.
        if writes.stored or writes.engine_put:
            pipe.sadd(f"{self._meta}pods", pod)
        if writes.stored:
            pipe.sadd(held, *(f"{m}@{k}" for m, k in writes.stored))
        for (model, key), at in writes.stored.items():
            pipe.hset(self._block(model, key), pod, repr(at))
        for model, key in writes.removed:
            pipe.hdel(self._block(model, key), pod)
        if writes.removed:
            pipe.srem(held, *(f"{m}@{k}" for m, k in writes.removed))
        if writes.engine_put:
            pipe.hset(self._engine(pod), mapping=writes.engine_put)
        if writes.engine_del:
            pipe.hdel(self._engine(pod), *writes.engine_del)
        for message in writes.invalidations(pod):
            pipe.publish(self._channel, invalidation.encode(message))
        await self._run(pipe, WRITE_TIMEOUT)

    async def _drop(self, pod: str, refs: list[BlockRef], *, cleared: bool = False) -> None:
        for start in range(0, len(refs), CHUNK):
            chunk = refs[start : start + CHUNK]
            pipe = self._client.pipeline(transaction=False)
            for model, key in chunk:
                pipe.hdel(self._block(model, key), pod)
            pipe.srem(self._held(pod), *(f"{m}@{k}" for m, k in chunk))
            await self._run(pipe, WRITE_TIMEOUT)
        messages = invalidation.invalidations(pod, refs, [], cleared=cleared)
        for start in range(0, len(messages), CHUNK // invalidation.CHUNK):
            pipe = self._client.pipeline(transaction=False)
            for message in messages[start : start + CHUNK // invalidation.CHUNK]:
                pipe.publish(self._channel, invalidation.encode(message))
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
        await self._drop(pod, refs, cleared=True)
        pipe = self._client.pipeline(transaction=False)
        pipe.delete(self._held(pod), self._engine(pod))
        pipe.srem(f"{self._meta}pods", pod)
        await self._run(pipe, WRITE_TIMEOUT)
        return len(refs)

    async def expire(self, pod: str, older_than: float) -> int:
        refs = await self._held_refs(pod)
        old: list[BlockRef] = []
        for start in range(0, len(refs), CHUNK):
            chunk = refs[start : start + CHUNK]
            pipe = self._client.pipeline(transaction=False)
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
        means every entry written before it is gone (Redis restarted empty, or was flushed)."""
        key = f"{self._meta}epoch"
        pipe = self._client.pipeline(transaction=False)
        pipe.set(key, uuid.uuid4().hex, nx=True)
        pipe.get(key)
        _, value = await self._run(pipe, WRITE_TIMEOUT)
        return value.decode() if isinstance(value, bytes) else str(value)

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
        the task, and routing falls back by itself meanwhile."""
        lost = False
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                ready.set()
                if lost:
                    lost = False
                    log.info("invalidation feed back")
                    for listener in self._listeners:
                        listener(Invalidation(FEED_LOST, cleared=True))
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    try:
                        change = invalidation.decode(message["data"])
                    except (msgspec.DecodeError, UnicodeDecodeError):
                        log.warning("ignoring a malformed invalidation message")
                        continue
                    for listener in self._listeners:
                        listener(change)
                    await asyncio.sleep(0)  # one bounded message per step: requests go first
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if not lost:
                    log.warning("invalidation feed lost (%s); resubscribing every second", exc)
                lost = True
                ready.set()
                await asyncio.sleep(1.0)
            finally:
                await pubsub.aclose()

    async def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.cancel()
            await asyncio.gather(self._subscriber, return_exceptions=True)
        await self._client.aclose()
