"""Endpoint ids: who holds a block, as the index's field names spell it.

An endpoint is one KV cache that can serve a prefix: a pod's engine, one data-parallel rank
of it, and, beside each, the tiers its blocks are offloaded to. The layout keeps the Kthena
convention for GPU presence, so other readers of the index see what they expect:

- ``pod-a``            GPU blocks of pod ``pod-a`` (a pod without data-parallel ranks);
- ``pod-a#1``          GPU blocks of data-parallel rank 1 of ``pod-a`` (``dataParallelSize`` > 1);
- ``pod-a|CPU``        blocks ``pod-a`` holds in CPU memory (vLLM's offloading connector);
- ``pod-a#1|STORAGE``  rank 1's blocks on the storage tier.

``#`` and ``|`` are therefore not allowed in pod ids. A candidate (what the router scores and
picks) is the part before ``|``: a pod, or one rank of a pod.
"""

from __future__ import annotations

import re
import time
from functools import lru_cache

GPU = "GPU"
"""vLLM's medium for the engine's own KV cache (``None`` in events from older releases)."""

RANK_SEP = "#"
TIER_SEP = "|"
MEDIUM_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
"""Media are part of endpoint ids and Redis fields: short, no separators."""


def medium_of(raw: str | None) -> str:
    """The medium as the index names it: upper case, GPU when the event names none."""
    return GPU if raw is None else raw.upper()


def endpoint(candidate: str, medium: str = GPU) -> str:
    """The endpoint id of ``candidate``'s blocks on ``medium``."""
    return candidate if medium == GPU else f"{candidate}{TIER_SEP}{medium}"


def split(endpoint_id: str) -> tuple[str, str]:
    """(candidate, medium) of an endpoint id."""
    candidate, sep, medium = endpoint_id.partition(TIER_SEP)
    return candidate, (medium if sep else GPU)


def rank_id(pod: str, rank: int) -> str:
    return f"{pod}{RANK_SEP}{rank}"


def pod_of(endpoint_id: str) -> str:
    """The configured pod an endpoint belongs to (rank and tier dropped)."""
    return split(endpoint_id)[0].partition(RANK_SEP)[0]


def belongs_to(endpoint_id: str, candidate: str) -> bool:
    """``endpoint_id`` is ``candidate``'s own (its GPU blocks or one of its tiers)."""
    return endpoint_id == candidate or endpoint_id.startswith(candidate + TIER_SEP)


def rank_endpoint(endpoint: str, rank: int) -> str:
    """The ZMQ endpoint data-parallel rank ``rank`` publishes on, as vLLM derives it
    (``ZmqEventPublisher.offset_endpoint_port``): tcp port + rank (a port of 0 is left alone),
    ``_dp{rank}`` appended to an inproc/ipc name; rank 0 keeps the endpoint."""
    if not endpoint or rank == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        base, sep, port = endpoint.rpartition(":")
        if sep and port.isdigit() and int(port):
            return f"{base}:{int(port) + rank}"
        return endpoint
    return f"{endpoint}_dp{rank}"


def candidates_of(pod_id: str, data_parallel_size: int) -> list[tuple[str, int | None]]:
    """(candidate id, rank) of a configured pod: the pod itself, or one per data-parallel rank."""
    if data_parallel_size <= 1:
        return [(pod_id, None)]
    return [(rank_id(pod_id, rank), rank) for rank in range(data_parallel_size)]


@lru_cache(maxsize=64)
def _run_media(weights: tuple[tuple[str, float], ...] | None) -> tuple[float, tuple[tuple[float, str], ...]]:
    """(the GPU's weight, when no other medium is worth more, else 0; the other media to look
    at, best first): a run looks for the GPU first, on its own, as the candidate's id itself."""
    media = sorted(((w, m) for m, w in {GPU: 1.0, **dict(weights or ())}.items() if w > 0), key=lambda wm: -wm[0])
    if not media:  # nothing weighs anything: no block counts
        return 0.0, ()
    gpu = media[0][0] if media[0][1] == GPU else 0.0
    return gpu, tuple(media[1:] if gpu else media)


@lru_cache(maxsize=4096)
def _tier_keys(candidate: str, media: tuple[tuple[float, str], ...]) -> tuple[tuple[str, float], ...]:
    return tuple((endpoint(candidate, medium), weight) for weight, medium in media)


class PrefixRuns:
    """Each candidate's run of blocks from the first, walked once, candidate by candidate, over
    owners some of which may not be known yet (None: the index must be asked).

    A run is the consecutive blocks from the first a candidate holds on any weighted medium (it
    continues across tiers; a block held on several counts once, at its best); its weighted sum
    counts a GPU block ``weights["GPU"]``, a CPU block ``weights["CPU"]``, ...; candidates with
    no run are absent. ``weights`` None: GPU presence only, no weighted sums. tests/harness/runs.py
    states the same runs the plain way, and the tests hold this walk to it. There is no pass per
    block over every candidate: a GPU hit, the common case, is one dict lookup (a 125-block
    prompt held by three pods, in a loop: 183 -> 33 us against the two passes before).

    ``walk`` goes as far as the known blocks let it; while it returns True, the candidates still
    running all wait at ``depth``, the first unknown block their runs reach."""

    __slots__ = ("matched", "weighted", "depth", "seconds", "_pending", "_total", "_gpu", "_look", "_not_before")

    def __init__(self, candidates, weights: dict[str, float] | None, not_before: float = 0.0):
        self.matched: dict[str, int] = {}
        self.weighted: dict[str, float] | None = None if weights is None else {}
        self.depth = 0
        self.seconds = 0.0
        """Time spent walking (the decision's score stage)."""
        self._pending = list(dict.fromkeys(candidates))  # a candidate listed twice is one run
        self._total = dict.fromkeys(self._pending, 0.0)
        self._gpu, rest = _run_media(None if weights is None else tuple(weights.items()))
        self._look = {c: _tier_keys(c, rest) for c in self._pending}
        self._not_before = not_before

    def walk(self, hits) -> bool:
        began = time.perf_counter()
        n, start, not_before, gpu = len(hits), self.depth, self._not_before, self._gpu
        waiting: list[str] = []
        stop = n
        for c in self._pending:
            d, total, look = start, self._total[c], self._look[c]
            while d < n:
                holders = hits[d]
                if holders is None:
                    break
                if gpu:
                    at = holders.get(c)
                    if at is not None and at >= not_before:
                        total += gpu
                        d += 1
                        continue
                for key, weight in look:  # held on another medium, best first
                    at = holders.get(key)
                    if at is not None and at >= not_before:
                        total += weight
                        break
                else:
                    break
                d += 1
            self._total[c] = total
            if d < n and hits[d] is None:
                waiting.append(c)
                stop = d
            else:
                self._end(c, d)
        self._pending, self.depth = waiting, stop
        self.seconds += time.perf_counter() - began
        return bool(waiting)

    def stop(self) -> None:
        """The blocks past ``depth`` stay unknown: the runs still going end there."""
        for c in self._pending:
            self._end(c, self.depth)
        self._pending = []

    def _end(self, candidate: str, run: int) -> None:
        if run:
            self.matched[candidate] = run
            if self.weighted is not None:
                self.weighted[candidate] = self._total[candidate]
