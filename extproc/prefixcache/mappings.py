"""Pod-mapping cache: a prompt's index lookup result (its block keys and who holds them), so
a repeated prompt skips the tokenizer and the index.

A result is kept under the hash of the prompt's last text block (prefix store chunks) and of
the candidate pod set, for ``podMappingTTL``. Every index change the ingester announces
(stored or removed) drops the mappings that contain the block, so a cached mapping never
hides a pod that just stored a prefix nor keeps one that lost it; a result whose lookup was
in flight while one of its blocks changed is never cached (epochs).

Thread-safe (its own lock): the event loop, tokenizer threads and the invalidation feed share it.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..config import PrefixStoreConfig
from ..index import PodTimes

_ENTRY_OVERHEAD = 200
"""Bytes per cached mapping besides its keys (dict slots, objects); for the estimate."""

ChunkHash = int


@dataclass(slots=True)
class CachedPodMapping:
    kv_block_keys: list[int]
    hit_keys: frozenset[int]
    key_to_pods: dict[int, PodTimes]
    cached_at: float
    pod_set_hash: int
    total_tokens: int = 0


def pod_set_hash(pod_ids: Iterable[str]) -> int:
    """Deterministic across processes (unlike hash()), independent of order."""
    digest = hashlib.blake2b("\0".join(sorted(pod_ids)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class PodMappingCache:
    def __init__(self, config: PrefixStoreConfig):
        self.config = config
        self._lock = threading.RLock()
        self._mappings: OrderedDict[ChunkHash, OrderedDict[int, CachedPodMapping]] = OrderedDict()
        self._by_key: dict[int, tuple[ChunkHash, ...]] = {}
        """block key -> prompts whose mapping holds it; tuples of ints, which the garbage
        collector stops tracking (a set per key made full collections pause for tens of ms)."""
        self._epoch = 0
        self._invalidated_at: OrderedDict[int, int] = OrderedDict()
        self._forgotten_epoch = -1
        """Newest epoch among changes no longer remembered per key."""
        self.evictions = 0
        self.invalidations = 0

    def epoch(self) -> int:
        """Take before asking the index; cache_pod_mappings refuses results older than a change."""
        return self._epoch

    def get_mapping(self, block_hash: ChunkHash, set_hash: int) -> CachedPodMapping | None:
        if not self.config.enable_pod_mapping_cache:
            return None
        with self._lock:
            by_set = self._mappings.get(block_hash)
            mapping = by_set.get(set_hash) if by_set else None
            if mapping is None:
                return None
            if time.monotonic() - mapping.cached_at > self.config.pod_mapping_ttl:
                self._drop_mapping(block_hash, set_hash)
                return None
            self._mappings.move_to_end(block_hash)
            return mapping

    def cache_pod_mappings(self, block_hash: ChunkHash, pod_ids: Sequence[str], kv_block_keys: Sequence[int],
                           hits: Sequence[PodTimes], *, since_epoch: int, total_tokens: int = 0) -> bool:
        """Keep a lookup result, unless a change to one of its blocks arrived since ``since_epoch``."""
        if not self.config.enable_pod_mapping_cache:
            return False
        set_hash = pod_set_hash(pod_ids)
        key_to_pods = {key: dict(pods) for key, pods in zip(kv_block_keys, hits) if pods}
        mapping = CachedPodMapping(list(kv_block_keys), frozenset(key_to_pods), key_to_pods, time.monotonic(),
                                   set_hash, total_tokens)
        with self._lock:
            if self._forgotten_epoch > since_epoch:
                return False  # too many changes since to tell which blocks they touched
            if any(self._invalidated_at.get(key, -1) > since_epoch for key in kv_block_keys):
                return False
            by_set = self._mappings.setdefault(block_hash, OrderedDict())
            if set_hash in by_set:
                self._drop_mapping(block_hash, set_hash)
                by_set = self._mappings.setdefault(block_hash, OrderedDict())
            by_set[set_hash] = mapping
            for key in kv_block_keys:
                owners = self._by_key.get(key, ())
                if block_hash not in owners:
                    self._by_key[key] = owners + (block_hash,)
            while len(by_set) > self.config.max_pod_sets_per_block:
                self._drop_mapping(block_hash, next(iter(by_set)))
            while len(self._mappings) > self.config.max_pod_mappings:
                oldest = next(iter(self._mappings))
                for s in list(self._mappings[oldest]):
                    self._drop_mapping(oldest, s)
                self.evictions += 1
        return True

    def _drop_mapping(self, block_hash: ChunkHash, set_hash: int) -> None:
        by_set = self._mappings.get(block_hash)
        if not by_set or set_hash not in by_set:
            return
        mapping = by_set.pop(set_hash)
        if not by_set:
            del self._mappings[block_hash]
        still = {k for m in by_set.values() for k in m.kv_block_keys} if by_set else set()
        for key in mapping.kv_block_keys:
            if key in still:
                continue
            owners = self._by_key.get(key)
            if owners is not None and block_hash in owners:
                rest = tuple(h for h in owners if h != block_hash)
                if rest:
                    self._by_key[key] = rest
                else:
                    del self._by_key[key]

    def invalidate_pod_mappings_for_keys(self, keys: Iterable[int]) -> int:
        """Drop every mapping containing one of the keys; returns how many were dropped."""
        dropped = 0
        with self._lock:
            self._epoch += 1
            remembered = max(1024, self.config.max_pod_mappings)
            for key in keys:
                self._invalidated_at[key] = self._epoch
                self._invalidated_at.move_to_end(key)
                for block_hash in list(self._by_key.get(key, ())):
                    for set_hash in list(self._mappings.get(block_hash, {})):
                        self._drop_mapping(block_hash, set_hash)
                        dropped += 1
            while len(self._invalidated_at) > remembered:
                _, epoch = self._invalidated_at.popitem(last=False)
                self._forgotten_epoch = max(self._forgotten_epoch, epoch)
            self.invalidations += dropped
        return dropped

    def invalidate_all(self) -> int:
        with self._lock:
            self._epoch += 1
            count = sum(len(v) for v in self._mappings.values())
            self._mappings.clear()
            self._by_key.clear()
            self._invalidated_at.clear()
            self._forgotten_epoch = self._epoch
            self.invalidations += count
            return count

    def cleanup_expired_mappings(self) -> int:
        now = time.monotonic()
        removed = 0
        with self._lock:
            for block_hash, by_set in list(self._mappings.items()):
                for set_hash, mapping in list(by_set.items()):
                    if now - mapping.cached_at > self.config.pod_mapping_ttl:
                        self._drop_mapping(block_hash, set_hash)
                        removed += 1
        return removed

    def size(self) -> tuple[int, int]:
        """(mappings, estimated bytes)."""
        with self._lock:
            mappings = sum(len(v) for v in self._mappings.values())
            memory = sum(
                sys.getsizeof(m.kv_block_keys) + 8 * len(m.kv_block_keys) + 120 * len(m.key_to_pods) + _ENTRY_OVERHEAD
                for by_set in self._mappings.values() for m in by_set.values()
            )
        return mappings, memory
