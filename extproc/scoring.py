"""Per-pod prefix scores and the final pick.

score(pod) = 100 * (blocks matched consecutively from the first) / (blocks in the prompt).
Only a run from the start counts: the engine reuses a cached block only when every block
before it is cached too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .index import PodTimes
from .pods import Pod, PodPool


@dataclass(frozen=True, slots=True)
class Decision:
    pod: Pod
    score: float
    matched_blocks: int
    total_blocks: int
    by_cache: bool


def matched_prefix(hits: Sequence[PodTimes], pod_ids: Sequence[str], not_before: float = 0.0) -> dict[str, int]:
    """Consecutive blocks from the first that each pod holds (pods with none are absent).

    Entries stored before ``not_before`` (unix seconds) are treated as absent.
    """
    matched: dict[str, int] = {}
    active = list(pod_ids)
    for depth, holders in enumerate(hits):
        still = [p for p in active if p in holders and holders[p] >= not_before]
        if depth:
            for pod in active:
                if pod not in still:
                    matched[pod] = depth
        active = still
        if not active:
            break
    else:
        for pod in active:
            matched[pod] = len(hits)
    return matched


def choose(candidates: Sequence[Pod], matched: dict[str, int], total_blocks: int, pool: PodPool) -> Decision:
    """Best score wins; ties and an all-zero field go to the least loaded pod."""
    best = max((matched.get(pod.id, 0) for pod in candidates), default=0)
    if best == 0:
        pod = pool.least_loaded(candidates)
        return Decision(pod, 0.0, 0, total_blocks, by_cache=False)
    tied = [pod for pod in candidates if matched.get(pod.id) == best]
    pod = tied[0] if len(tied) == 1 else pool.least_loaded(tied)
    return Decision(pod, 100.0 * best / total_blocks, best, total_blocks, by_cache=True)
