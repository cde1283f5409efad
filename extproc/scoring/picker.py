"""Pickers: the weighted scores in, one pod out."""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..pods import Pod, least_in_flight

TIE = 1e-9


class MaxScorePicker:
    """The highest total wins; ties go to the least loaded pod, then to the one chosen longest
    ago, so a burst of equal requests spreads instead of landing on one pod."""

    def pick(self, pods: Sequence[Pod], totals: dict[str, float]) -> Pod:
        best = max(totals[pod.id] for pod in pods)
        tied = [pod for pod in pods if totals[pod.id] >= best - TIE]
        if len(tied) == 1:
            return tied[0]
        return least_in_flight(tied)


class WeightedRandomPicker:
    """At random in proportion to the totals (A-Res: the largest U ** (1 / total) wins), so
    near-equal pods share a burst instead of all of it landing on one."""

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def pick(self, pods: Sequence[Pod], totals: dict[str, float]) -> Pod:
        def key(pod: Pod) -> float:
            weight = totals[pod.id]
            return self._random.random() ** (1.0 / weight) if weight > 0 else -1.0 + self._random.random() * 1e-9
        return max(pods, key=key)
