"""Where blocks live: block key -> {pod id: unix seconds it was stored}.

Two backends share one interface: ``memory`` for a single replica and the quickstart,
``redis`` for fleets where many replicas and the ingester share one index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..config import IndexConfig

PodTimes = dict[str, float]
"""pod id -> unix seconds at which it stored the block."""


class IndexUnavailable(Exception):
    """The index could not answer (down, timed out); routing falls back to load."""


class BlockIndex(Protocol):
    async def lookup(self, model: str, keys: Sequence[int]) -> list[PodTimes]:
        """For each key in order, the pods holding that block (empty dict when none)."""
        ...

    async def store(self, model: str, keys: Sequence[int], pod: str, at: float) -> None: ...

    async def remove(self, model: str, keys: Sequence[int], pod: str) -> None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def redis_key(prefix: str, model: str, key: int) -> str:
    return f"{prefix}{model}@{key}"


def open_index(config: IndexConfig) -> BlockIndex:
    if config.backend == "redis":
        from .redis import RedisIndex

        return RedisIndex.from_config(config)
    from .memory import MemoryIndex

    return MemoryIndex()
