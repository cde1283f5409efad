"""Block owners: who holds each block, remembered per block and kept true by the invalidation feed.

A prompt whose prefix was seen asks the index only for blocks this replica cannot answer for.
Entries come from index answers (including "nobody holds it"); every change the ingester
announces (a pod stored or lost a block) updates the entry in place, so a cached answer
never hides a pod that just stored a block nor keeps one that lost it. A lookup whose index
answer was in flight while one of its blocks changed is not kept (per-key epochs), and a lost
feed drops everything.

Mirror mode (``prefixStoreConfig.mirror``): the whole index is loaded at start (and again after
a lost feed), so a block missing here is held by nobody and the index is never asked on the
request path. It stays *complete* while the entry bound is not reached; at the bound the
least recently used blocks are dropped and the cache answers for what it still holds, asking
the index for the rest (like a plain per-block cache).

Cost of every operation: O(blocks it names). Thread-safe (its own lock).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

from ..config import PrefixStoreConfig
from ..index import FEED_LOST, Invalidation, PodTimes

log = logging.getLogger("extproc.prefixcache")

BlockRef = tuple[str, int]
_Owners = dict  # pod -> stored_at, never changed once stored: lookups hand it out as is (a new
# one replaces it on a change), saving a copy per block; str -> float dicts are untracked by the GC

_ENTRY_BYTES = 300
"""Estimated bytes per entry (ordered-dict slot, key tuple, owners dict); for the memory gauge."""

NEVER = float("inf")


class BlockOwners:
    def __init__(self, config: PrefixStoreConfig):
        self.config = config
        self._lock = threading.Lock()
        self._entries: OrderedDict[BlockRef, tuple[float, _Owners]] = OrderedDict()
        """block -> (monotonic time the answer expires, owners)."""
        self._epoch = 0
        self._changed_at: OrderedDict[BlockRef, int] = OrderedDict()
        """block -> epoch of its last announced change (bounded; see _forgotten)."""
        self._forgotten = -1
        """Newest epoch among changes no longer remembered per block."""
        self.complete = False
        """Every block of the index is here (mirror loaded, nothing evicted since, feed intact)."""
        self._loading: set[BlockRef] | None = None
        """While a mirror load runs: blocks announced meanwhile, read again once it ends."""
        self.evictions = 0
        self._evictions_at_load = 0
        self.updates = 0

    @property
    def enabled(self) -> bool:
        return self.config.enable_pod_mapping_cache

    def epoch(self) -> int:
        """Take before asking the index; ``learn`` refuses answers older than a change."""
        return self._epoch

    def get(self, model: str, keys: Sequence[int]) -> list[PodTimes | None]:
        """For each key, its owners (shared: read them, never change them), or None when this
        cache cannot answer for it."""
        if not self.enabled:
            return [None] * len(keys)
        now = time.monotonic()
        found: list[PodTimes | None] = []
        entries = self._entries
        with self._lock:
            complete = self.complete
            for key in keys:
                ref = (model, key)
                entry = entries.get(ref)
                if entry is None:
                    found.append({} if complete else None)
                elif entry[0] < now:
                    del entries[ref]
                    found.append(None)
                else:
                    entries.move_to_end(ref)
                    found.append(entry[1])
        return found

    def learn(self, model: str, keys: Sequence[int], answers: Sequence[PodTimes], *, since_epoch: int,
              ttl: float | None = None) -> list[int]:
        """Keep index answers read after ``since_epoch``; returns the keys refused because a change
        to them was announced meanwhile (their answers may be stale)."""
        if not self.enabled:
            return []
        expires = time.monotonic() + (self.config.pod_mapping_ttl if ttl is None else ttl)
        refused = []
        with self._lock:
            if self._forgotten > since_epoch:
                return list(keys)  # too many changes since to tell which blocks they touched
            for key, owners in zip(keys, answers):
                ref = (model, key)
                if self._changed_at.get(ref, -1) > since_epoch:
                    refused.append(key)
                    continue
                self._entries[ref] = (expires, dict(owners))
                self._entries.move_to_end(ref)
            self._evict()
        return refused

    def _evict(self) -> None:
        while len(self._entries) > self.config.max_pod_mappings:
            self._entries.popitem(last=False)
            self.evictions += 1
            if self.complete:
                self.complete = False
                log.warning("block owner mirror reached maxPodMappings (%d): dropping the least recently used "
                            "blocks; lookups ask the index for what is not cached", self.config.max_pod_mappings)

    def apply(self, message: Invalidation) -> None:
        """An announced change (any pod, any replica's ingester): update the blocks it names."""
        if message.pod == FEED_LOST:
            self.clear()
            return
        stored_at = message.stored_at or [time.time()] * len(message.stored)
        with self._lock:
            self._epoch += 1
            epoch = self._epoch
            remembered = max(1024, self.config.max_pod_mappings)
            for ref in message.removed:
                self._mark(ref, epoch)
                entry = self._entries.get(ref)
                if entry is not None:
                    self._entries[ref] = (entry[0], {p: at for p, at in entry[1].items() if p != message.pod})
            for ref, at in zip(message.stored, stored_at):
                self._mark(ref, epoch)
                entry = self._entries.get(ref)
                if entry is not None:
                    self._entries[ref] = (entry[0], {**entry[1], message.pod: at})
                elif self.complete:
                    self._entries[ref] = (NEVER, {message.pod: at})
            while len(self._changed_at) > remembered:
                _, old = self._changed_at.popitem(last=False)
                self._forgotten = max(self._forgotten, old)
            self.updates += len(message.removed) + len(message.stored)
            self._evict()

    def _mark(self, ref: BlockRef, epoch: int) -> None:
        self._changed_at[ref] = epoch
        self._changed_at.move_to_end(ref)
        if self._loading is not None:
            self._loading.add(ref)

    def clear(self) -> int:
        """Trust nothing cached (the feed was lost: changes may have been missed)."""
        with self._lock:
            self._epoch += 1
            count = len(self._entries)
            self._entries.clear()
            self._changed_at.clear()
            self._forgotten = self._epoch
            self.complete = False
            if self._loading is not None:
                self._loading = None  # a load in progress can no longer finish complete
            return count

    # -- mirror -------------------------------------------------------------------------

    def begin_load(self) -> int:
        """Start a mirror load; returns the epoch to pass to ``learn``."""
        with self._lock:
            self._loading = set()
            self._evictions_at_load = self.evictions
            return self._epoch

    def end_load(self) -> list[BlockRef] | None:
        """Blocks announced during the load, to read again; None if the load cannot complete."""
        with self._lock:
            changed, self._loading = self._loading, set() if self._loading is not None else None
            return None if changed is None else sorted(changed)

    def finish_load(self) -> bool:
        with self._lock:
            ok = self._loading is not None and self.evictions == self._evictions_at_load
            self._loading = None
            self.complete = ok
            return ok

    def mirror_learn(self, model: str, keys: Sequence[int], answers: Sequence[PodTimes], since_epoch: int) -> list[int]:
        return self.learn(model, keys, answers, since_epoch=since_epoch, ttl=NEVER)

    def sweep(self, limit: int = 1000) -> int:
        """Drop expired answers among the ``limit`` least recently used (bounded work per call)."""
        now = time.monotonic()
        dropped = 0
        with self._lock:
            for ref in list(itertools.islice(self._entries, limit)):
                if self._entries[ref][0] < now:
                    del self._entries[ref]
                    dropped += 1
        return dropped

    def size(self) -> tuple[int, int]:
        """(entries, estimated bytes)."""
        with self._lock:
            entries = len(self._entries)
        return entries, entries * _ENTRY_BYTES
