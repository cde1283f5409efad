"""Plain, independent statements of a prompt's runs (consecutive blocks from the first that a
candidate holds), written the obvious way: what the decision's walk (endpoints.PrefixRuns) is
held to, and what integration tests read an index answer with."""

from __future__ import annotations

from collections.abc import Sequence

from extproc.endpoints import GPU, endpoint
from extproc.index import PodTimes


def matched_prefix(hits: Sequence[PodTimes], pod_ids: Sequence[str], not_before: float = 0.0) -> dict[str, int]:
    """Consecutive blocks from the first that each pod holds on the GPU, stored at or after
    ``not_before`` (pods with none are absent)."""
    matched: dict[str, int] = {}
    for pod in pod_ids:
        run = 0
        while run < len(hits) and pod in hits[run] and hits[run][pod] >= not_before:
            run += 1
        if run:
            matched[pod] = run
    return matched


def tiered_prefix(hits: Sequence[PodTimes], candidates: Sequence[str], weights: dict[str, float],
                  not_before: float = 0.0) -> tuple[dict[str, int], dict[str, float]]:
    """Per candidate, the run over every weighted medium (a block held on several counts once,
    at its best) and that run's weighted sum; candidates with no run are absent."""
    media = sorted(((w, m) for m, w in {GPU: 1.0, **weights}.items() if w > 0), key=lambda wm: -wm[0])
    matched: dict[str, int] = {}
    weighted: dict[str, float] = {}
    for candidate in candidates:
        total, run = 0.0, 0
        for holders in hits:
            best = [w for w, m in media
                    if endpoint(candidate, m) in holders and holders[endpoint(candidate, m)] >= not_before]
            if not best:
                break
            total += best[0]
            run += 1
        if run:
            matched[candidate], weighted[candidate] = run, total
    return matched, weighted
