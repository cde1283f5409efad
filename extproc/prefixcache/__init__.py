"""The prefix cache: what this replica remembers so a prompt it has seen a prefix of is cheap.

Two caches with one job each (and a lock each):
- the prefix store (``store.py``): prompt text -> tokens and block keys, per chunk of a
  prefix and per whole prompt, so known text is neither tokenized nor hashed again;
- block owners (``mappings.py``): block -> the pods holding it, kept true by the index's
  invalidation feed, so the index is asked only for blocks this replica cannot answer for.
``PrefixCache`` holds both and the outcome counters.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PrefixStoreConfig
from .mappings import BlockOwners
from .store import Keyer, PrefixStore, Run, Splitter, Tokenized

__all__ = ["BlockOwners", "CacheStats", "PrefixCache", "PrefixStore", "Run", "Splitter", "Tokenized"]


@dataclass(slots=True)
class CacheStats:
    entries: int = 0
    """Text chunks in the prefix store."""
    prompts: int = 0
    owners: int = 0
    """Blocks whose owners are cached."""
    hits: int = 0
    partial_hits: int = 0
    misses: int = 0
    evictions: int = 0
    updates: int = 0
    """Cached block entries changed by the invalidation feed."""
    memory_bytes: int = 0
    mirror_complete: bool = False


class PrefixCache:
    def __init__(self, config: PrefixStoreConfig, *, block_size: int, max_blocks: int, keyer: Keyer):
        self.store = PrefixStore(config, block_size=block_size, max_blocks=max_blocks, keyer=keyer)
        self.owners = BlockOwners(config)
        self._outcomes = {"hit": 0, "partial": 0, "miss": 0}
        """Decisions by outcome; counted on the event loop only."""

    def record(self, outcome: str) -> None:
        key = outcome if outcome in ("hit", "partial") else "miss"
        self._outcomes[key] += 1

    def get_cache_stats(self) -> CacheStats:
        """O(1): read at every Prometheus scrape."""
        owners, owner_bytes = self.owners.size()
        return CacheStats(
            entries=len(self.store),
            prompts=self.store.prompts,
            owners=owners,
            hits=self._outcomes["hit"],
            partial_hits=self._outcomes["partial"],
            misses=self._outcomes["miss"],
            evictions=self.store.evictions + self.owners.evictions,
            updates=self.owners.updates,
            memory_bytes=self.store.memory_bytes + owner_bytes,
            mirror_complete=self.owners.complete,
        )
