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


def best_weights(holders: dict[str, float], weights: dict[str, float], not_before: float = 0.0) -> dict[str, float]:
    """candidate -> the weight of the best medium it holds this block on (absent: none)."""
    best: dict[str, float] = {}
    gpu = weights.get(GPU, 1.0)
    for endpoint_id, at in holders.items():
        if at < not_before:
            continue
        if TIER_SEP not in endpoint_id:  # the GPU: most holders, no parsing
            if gpu > best.get(endpoint_id, 0.0):
                best[endpoint_id] = gpu
            continue
        candidate, _, medium = endpoint_id.partition(TIER_SEP)
        weight = weights.get(medium, 0.0)
        if weight > best.get(candidate, 0.0):
            best[candidate] = weight
    return best


def tiered_prefix(hits, candidates, weights: dict[str, float], not_before: float = 0.0
                  ) -> tuple[dict[str, int], dict[str, float]]:
    """Per candidate: the run of consecutive blocks from the first it holds on any weighted
    medium (the run continues across tiers), and that run's weighted sum (a GPU block counts
    ``weights["GPU"]``, a CPU block ``weights["CPU"]``, ...). Candidates with no run are absent.
    """
    if not hits:  # as matched_prefix answers an empty prompt
        return dict.fromkeys(candidates, 0), dict.fromkeys(candidates, 0.0)
    media = sorted(((w, m) for m, w in {GPU: 1.0, **weights}.items() if w > 0), key=lambda wm: -wm[0])
    matched: dict[str, int] = {}
    weighted: dict[str, float] = {}
    for candidate in candidates:
        # Where to look, best medium first: a block held on several counts once, at its best.
        keys = [(endpoint(candidate, medium), weight) for weight, medium in media]
        total, run = 0.0, 0
        for holders in hits:
            for key, weight in keys:
                at = holders.get(key)
                if at is not None and at >= not_before:
                    total += weight
                    break
            else:
                break
            run += 1
        if run:
            matched[candidate], weighted[candidate] = run, total
    return matched, weighted
