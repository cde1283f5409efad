"""In-process index for one replica: the same answers as Redis, without the network."""

from __future__ import annotations

from collections.abc import Sequence

from . import PodTimes


class MemoryIndex:
    def __init__(self) -> None:
        self._blocks: dict[tuple[str, int], PodTimes] = {}

    async def lookup(self, model: str, keys: Sequence[int]) -> list[PodTimes]:
        blocks = self._blocks
        return [dict(blocks.get((model, key), ())) for key in keys]

    async def store(self, model: str, keys: Sequence[int], pod: str, at: float) -> None:
        for key in keys:
            self._blocks.setdefault((model, key), {})[pod] = at

    async def remove(self, model: str, keys: Sequence[int], pod: str) -> None:
        for key in keys:
            holders = self._blocks.get((model, key))
            if holders is not None:
                holders.pop(pod, None)
                if not holders:
                    del self._blocks[(model, key)]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._blocks.clear()
