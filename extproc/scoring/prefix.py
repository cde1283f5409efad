"""Prefix scorer: the share of the prompt's blocks a pod holds, as a run from the first.

Only a run from the start counts: the engine reuses a cached block only when every block
before it is cached too. With KV tiers, each block of the run counts by where the pod holds
it (tiers.mediumWeights: a block in CPU memory is reloaded, not recomputed, but not free).
Raw value: the blocks matched (weighted, with tiers).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..pods import Pod
from .base import Context, Scores


class PrefixScorer:
    name = "prefix"

    def score(self, context: Context, pods: Sequence[Pod]) -> Scores:
        total = context.total_blocks
        runs = context.matched if context.weighted is None else context.weighted
        raw = {pod.id: float(runs.get(pod.id, 0)) for pod in pods}
        return Scores({pod: (n / total if total else 0.0) for pod, n in raw.items()}, raw)
