"""Redis index: hash ``{keyPrefix}{model}@{key}``, field = pod id, value = unix seconds.

A lookup is one pipelined round trip (HGETALL per block, no MULTI) bounded by
``index.timeout``; any failure surfaces as IndexUnavailable so routing can fall back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..config import IndexConfig
from . import IndexUnavailable, PodTimes, redis_key


class RedisIndex:
    def __init__(self, client: aioredis.Redis, *, key_prefix: str, timeout: float):
        self._client = client
        self._prefix = key_prefix
        self._timeout = timeout

    @classmethod
    def from_config(cls, config: IndexConfig) -> "RedisIndex":
        client = aioredis.from_url(
            config.redis_url,
            socket_connect_timeout=max(config.timeout, 1.0),
            health_check_interval=30,
        )
        return cls(client, key_prefix=config.key_prefix, timeout=config.timeout)

    async def _run(self, pipe: aioredis.client.Pipeline) -> list:
        try:
            async with asyncio.timeout(self._timeout):
                return await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise IndexUnavailable(f"redis: {type(exc).__name__}: {exc}") from None

    async def lookup(self, model: str, keys: Sequence[int]) -> list[PodTimes]:
        if not keys:
            return []
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(redis_key(self._prefix, model, key))
        replies = await self._run(pipe)
        return [{pod.decode(): float(at) for pod, at in reply.items()} for reply in replies]

    async def store(self, model: str, keys: Sequence[int], pod: str, at: float) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.hset(redis_key(self._prefix, model, key), pod, repr(at))
        await self._run(pipe)

    async def remove(self, model: str, keys: Sequence[int], pod: str) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.hdel(redis_key(self._prefix, model, key), pod)
        await self._run(pipe)

    async def ping(self) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.ping()
        await self._run(pipe)

    async def close(self) -> None:
        await self._client.aclose()
