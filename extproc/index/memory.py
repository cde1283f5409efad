"""In-process index for one replica: the same answers as Redis, without the network."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

from . import BlockRef, Invalidation, InvalidationListener, PodTimes, Writes
from .invalidation import invalidations


class MemoryIndex:
    local = True
    """Lookups are dictionary reads: nothing to gain from caching them."""

    def __init__(self) -> None:
        self._blocks: dict[BlockRef, PodTimes] = {}
        self._held: dict[str, set[BlockRef]] = {}
        self._engine: dict[str, dict[str, bytes]] = {}
        self._listeners: list[InvalidationListener] = []
        self._epoch = uuid.uuid4().hex

    async def lookup(self, model: str, keys: Sequence[int]) -> list[PodTimes]:
        blocks = self._blocks
        return [dict(blocks.get((model, key), ())) for key in keys]

    async def scan_blocks(self, batch: int = 1000) -> AsyncIterator[tuple[str, list[int], list[PodTimes]]]:
        by_model: dict[str, list[int]] = {}
        for model, key in list(self._blocks):
            by_model.setdefault(model, []).append(key)
        for model, keys in by_model.items():
            for start in range(0, len(keys), batch):
                chunk = keys[start:start + batch]
                yield model, chunk, await self.lookup(model, chunk)

    async def ping(self) -> None:
        return None

    async def check_credentials(self) -> None:
        return None

    async def apply(self, pod: str, writes: Writes) -> None:
        held = self._held.setdefault(pod, set())
        for ref, at in writes.stored.items():
            self._blocks.setdefault(ref, {})[pod] = at
            held.add(ref)
        for ref in writes.removed:
            self._drop(ref, pod)
            held.discard(ref)
        engine = self._engine.setdefault(pod, {})
        engine.update(writes.engine_put)
        for eid in writes.engine_del:
            engine.pop(eid, None)
        if writes.removed or writes.stored:
            await self._announce(writes.invalidations(pod))

    def _drop(self, ref: BlockRef, pod: str) -> None:
        holders = self._blocks.get(ref)
        if holders is not None:
            holders.pop(pod, None)
            if not holders:
                del self._blocks[ref]

    async def purge_pod(self, pod: str) -> int:
        held = self._held.pop(pod, set())
        for ref in held:
            self._drop(ref, pod)
        self._engine.pop(pod, None)
        await self._announce(invalidations(pod, sorted(held), [], cleared=True))
        return len(held)

    async def expire(self, pod: str, older_than: float) -> int:
        held = self._held.get(pod, set())
        old = [ref for ref in held if self._blocks.get(ref, {}).get(pod, older_than) < older_than]
        for ref in old:
            self._drop(ref, pod)
            held.discard(ref)
        if old:
            await self._announce(invalidations(pod, old, []))
        return len(old)

    async def pods(self) -> set[str]:
        return {pod for pod, held in self._held.items() if held} | {pod for pod, m in self._engine.items() if m}

    async def load_engine_map(self, pod: str) -> dict[str, bytes]:
        return dict(self._engine.get(pod, {}))

    async def epoch(self) -> str:
        """Never lost while the process lives (see RedisIndex.epoch)."""
        return self._epoch

    async def subscribe(self, listener: InvalidationListener, *, supervisor=None) -> None:
        self._listeners.append(listener)

    async def _announce(self, messages: list[Invalidation]) -> None:
        """In bounded messages, yielding between them, as the Redis feed delivers them."""
        for i, message in enumerate(messages):
            if i:
                await asyncio.sleep(0)
            for listener in self._listeners:
                listener(message)

    async def close(self) -> None:
        self._blocks.clear()
        self._held.clear()
        self._engine.clear()
