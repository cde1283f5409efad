"""Where blocks live: block key -> {pod id: unix seconds it was stored}.

Two backends share one interface: ``memory`` for a single replica and the quickstart,
``redis`` for fleets where many replicas and the ingester share one index.

Besides the blocks, the write side keeps per pod:
- a record of the blocks it holds, so a pod can be dropped without scanning the keyspace;
- its engine-block map (engine hash -> what our keys were built from), so a restarted
  ingester can still apply the pod's removals and extend its chains.
Every write that removes or adds a pod to a block is announced on an invalidation feed,
so serve replicas can drop cached mappings that are no longer true.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..config import IndexConfig
from .invalidation import FEED_LOST, Invalidation, InvalidationListener, invalidations

__all__ = ["FEED_LOST", "BlockIndex", "BlockRef", "IndexUnavailable", "Invalidation", "InvalidationListener",
           "PodTimes", "Writes", "open_index"]

PodTimes = dict[str, float]
"""pod id -> unix seconds at which it stored the block."""

BlockRef = tuple[str, int]
"""(model, block key)."""


class IndexUnavailable(Exception):
    """The index could not answer (down, timed out); routing falls back to load."""


@dataclass(slots=True)
class Writes:
    """One pod's index changes from a run of KV events, applied in one round trip.

    A later event wins over an earlier one for the same block (stored then removed is
    removed; removed then stored again is stored), so runs can be merged safely.
    """

    at: float = 0.0
    """Timestamp of the batch being applied (the engine's clock), given to what it stores."""
    stored: dict[BlockRef, float] = field(default_factory=dict)
    removed: set[BlockRef] = field(default_factory=set)
    engine_put: dict[str, bytes] = field(default_factory=dict)
    engine_del: set[str] = field(default_factory=set)

    def store(self, ref: BlockRef) -> None:
        self.removed.discard(ref)
        self.stored[ref] = self.at

    def remove(self, ref: BlockRef) -> None:
        self.stored.pop(ref, None)
        self.removed.add(ref)

    def put_engine(self, eid: str, packed: bytes) -> None:
        self.engine_del.discard(eid)
        self.engine_put[eid] = packed

    def del_engine(self, eid: str) -> None:
        self.engine_put.pop(eid, None)
        self.engine_del.add(eid)

    def __bool__(self) -> bool:
        return bool(self.stored or self.removed or self.engine_put or self.engine_del)

    def invalidations(self, pod: str) -> list[Invalidation]:
        """The announcement of these writes, in bounded messages."""
        stored = sorted(self.stored)
        return invalidations(pod, sorted(self.removed), stored, [self.stored[ref] for ref in stored])


class BlockIndex(Protocol):
    local: bool
    """True when lookups are in-process reads (nothing to gain from caching them)."""

    # Read side (the request path).
    async def lookup(self, model: str, keys: Sequence[int]) -> list[PodTimes]:
        """For each key in order, the pods holding that block (empty dict when none)."""
        ...

    def scan_blocks(self, batch: int = 1000) -> AsyncIterator[tuple[str, list[int], list[PodTimes]]]:
        """Every block, a batch at a time: (model, keys, owners); loads a replica's mirror."""
        ...

    async def ping(self) -> None: ...

    async def check_credentials(self) -> None:
        """Raise ConfigError if the index refuses our credentials (a start-up error)."""
        ...

    # Write side (the ingester).
    async def apply(self, pod: str, writes: Writes) -> None: ...

    async def purge_pod(self, pod: str) -> int:
        """Drop every block of the pod and its engine map; returns blocks dropped."""
        ...

    async def expire(self, pod: str, older_than: float) -> int:
        """Drop the pod's blocks stored before ``older_than`` (unix seconds)."""
        ...

    async def pods(self) -> set[str]:
        """Pods that have blocks or an engine map in the index."""
        ...

    async def load_engine_map(self, pod: str) -> dict[str, bytes]: ...

    # Invalidation feed (serve replicas).
    async def epoch(self) -> str:
        """The index's identity; it changes when the index is lost (an empty Redis after a
        restart), so the ingester knows to rebuild every pod."""
        ...

    async def subscribe(self, listener: InvalidationListener, *, supervisor=None) -> None:
        """Deliver every Invalidation (FEED_LOST after the feed was down); the listening task
        runs under ``supervisor`` when given."""
        ...

    async def close(self) -> None: ...


def open_index(config: IndexConfig) -> BlockIndex:
    if config.backend == "redis":
        from .redis import RedisIndex

        return RedisIndex.from_config(config)
    from .memory import MemoryIndex

    return MemoryIndex()
