"""Speculative owners: a pod a request was just routed to will hold its blocks in a moment.

The engine publishes a prompt's blocks only after computing them, so the requests decided
in between would not see them, and a burst sharing a new prefix would each pay a cold
prefill on a different pod. Each routing decision is remembered here for ``ttl`` seconds
(until the engine's own events take over); lookups count the pod as holding those blocks.
Bounded (LRU over blocks); every operation is O(blocks it names).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from ..index import Invalidation, PodTimes

MAX_BLOCKS = 200_000


class Speculation:
    def __init__(self, ttl: float, max_blocks: int = MAX_BLOCKS, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.max_blocks = max_blocks
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, int], tuple[tuple[str, float], ...]] = OrderedDict()
        """block -> ((pod, clock time it was routed there), ...)"""
        self._cleared: dict[str, float] = {}
        """pod -> when its engine last dropped everything: guesses made before are void."""
        self._newest = float("-inf")
        """Clock time of the newest guess: once it is ``ttl`` old, every guess is, and lookups skip them all."""

    def __len__(self) -> int:
        return len(self._entries)

    def routed(self, model: str, keys: Sequence[int], pod: str) -> None:
        if not self.ttl or not keys:
            return
        now = self.clock()
        oldest = now - self.ttl
        with self._lock:
            self._newest = max(self._newest, now)
            for key in keys:
                ref = (model, key)
                old = self._entries.pop(ref, ())
                self._entries[ref] = tuple(p for p in old if p[0] != pod and p[1] > oldest) + ((pod, now),)
            while len(self._entries) > self.max_blocks:
                self._entries.popitem(last=False)

    def apply(self, message: Invalidation) -> None:
        """The engines' own word replaces a guess: a stored block is in the index now, a removed
        one is gone, and a cleared pod holds nothing it was guessed to hold before."""
        if message.cleared:
            self._cleared[message.pod] = self.clock()
        if not self._entries:
            return
        with self._lock:
            for ref in (*message.removed, *message.stored):
                guessed = self._entries.get(ref)
                if guessed and any(p == message.pod for p, _ in guessed):
                    kept = tuple(p for p in guessed if p[0] != message.pod)
                    if kept:
                        self._entries[ref] = kept
                    else:
                        del self._entries[ref]

    def overlay(self, model: str, keys: Sequence[int], hits: list[PodTimes | None], start: int = 0) -> None:
        """Add the pods expected to hold each block to ``hits`` (in place, from ``start``). An
        unknown entry (None) stays unknown: the index must still say who else holds it. The
        answers put in may be shared between blocks: read them, never change them."""
        oldest = self.clock() - self.ttl
        if not self._entries or self._newest <= oldest:
            return
        wall = time.time()
        entries, cleared = self._entries, self._cleared
        # guess -> its answer for a block nobody else holds: one dict for all such blocks of the
        # prompt (a new prefix's blocks were routed together), not one copy per block.
        alone: dict[tuple[tuple[str, float], ...], PodTimes] = {}
        for i in range(start, len(keys)):
            holders = hits[i]
            if holders is None:
                continue
            guessed = entries.get((model, keys[i]))
            if not guessed:
                continue
            if not holders:
                shared = alone.get(guessed)
                if shared is None:
                    shared = alone[guessed] = {pod: wall for pod, at in guessed
                                               if at > oldest and at > cleared.get(pod, oldest)}
                if shared:
                    hits[i] = shared
                continue
            added = None
            for pod, at in guessed:
                if pod not in holders and at > oldest and at > cleared.get(pod, oldest):
                    if added is None:
                        added = dict(holders)  # shared with the owner cache: never changed in place
                    added[pod] = wall
            if added is not None:
                hits[i] = added
