"""The prefix cache: repeated prefixes skip tokenizing and the index.

Two caches with one job each (and a lock each): the prefix store (``store.py``: text chunks
-> tokens) and the pod-mapping cache (``mappings.py``: prompt -> block keys and their
owners). ``PrefixCache`` holds both and the hit counters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import PrefixStoreConfig
from .mappings import CachedPodMapping, PodMappingCache, pod_set_hash
from .store import CachedTokens, PrefixStore, Splitter

__all__ = ["CacheStats", "CachedPodMapping", "CachedTokens", "PodMappingCache", "PrefixCache", "PrefixStore",
           "Splitter", "pod_set_hash"]


@dataclass(slots=True)
class CacheStats:
    entries: int = 0
    mappings: int = 0
    hits: int = 0
    partial_hits: int = 0
    misses: int = 0
    evictions: int = 0
    invalidations: int = 0
    memory_bytes: int = 0


class PrefixCache:
    def __init__(self, config: PrefixStoreConfig | None = None):
        config = config or PrefixStoreConfig()
        self.store = PrefixStore(config)
        self.mappings = PodMappingCache(config)
        self._outcomes = {"hit": 0, "partial": 0, "miss": 0}
        """Decisions by outcome; counted on the event loop only."""

    def find_longest_contained_tokens_with_pod_mappings(
        self, prompt: str, model: str, pod_ids: Sequence[str], *, add_special_tokens: bool = False
    ) -> tuple[CachedTokens, CachedPodMapping | None]:
        """Full hit: tokens and the mapping. Partial: tokens only. Miss: nothing cached."""
        hashes, last = self.store.chunk_hashes(prompt, model, add_special_tokens)
        cached = self.store.find_longest_contained_tokens(prompt, model, hashes=hashes)
        return cached, self.mappings.get_mapping(last, pod_set_hash(pod_ids))

    def record(self, outcome: str) -> None:
        key = outcome if outcome in ("hit", "partial") else "miss"
        self._outcomes[key] += 1

    def get_cache_stats(self) -> CacheStats:
        mappings, mapping_bytes = self.mappings.size()
        return CacheStats(
            entries=len(self.store),
            mappings=mappings,
            hits=self._outcomes["hit"],
            partial_hits=self._outcomes["partial"],
            misses=self._outcomes["miss"],
            evictions=self.store.evictions + self.mappings.evictions,
            invalidations=self.mappings.invalidations,
            memory_bytes=self.store.memory_bytes + mapping_bytes,
        )
