"""Choosing a pod: filters drop candidates, scorers rate the rest 0..1, a picker chooses.

total(pod) = sum over configured scorers of weight x clamp(score, 0, 1); the picker takes
the pods and their totals. A new policy is a new module here plus an entry below, named by
the config's ``scoring.scorers[].type`` (or ``scoring.picker``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ..config import ConfigError, ScoringConfig
from ..pods import Pod
from ..requests import RoutingRequest
from .base import Context, Decision, Filter, Picker, Scorer, Scores
from .filters import Healthy
from .load import InFlightScorer, KvUtilizationScorer, QueueScorer
from .picker import MaxScorePicker, WeightedRandomPicker
from .prefix import PrefixScorer
from .ttft import TtftScorer

__all__ = ["Context", "Decision", "Filter", "Picker", "Profile", "Scorer", "Scores", "build"]

SCORERS: dict[str, Callable[[ScoringConfig], Scorer]] = {
    "prefix": lambda config: PrefixScorer(),
    "ttft": lambda config: TtftScorer(config.queued_request_tokens, config.request_tokens,
                                         max_start_ratio=config.max_start_ratio,
                                         start_slack_tokens=config.start_slack_tokens,
                                         guard_below_queue=config.guard_below_queue),
    "queue": lambda config: QueueScorer(),
    "inFlight": lambda config: InFlightScorer(),
    "kvCacheUtilization": lambda config: KvUtilizationScorer(),
}
PICKERS: dict[str, Callable[[], Picker]] = {
    "max": MaxScorePicker,
    "weightedRandom": WeightedRandomPicker,
}


class Profile:
    """One routing policy: filters, weighted scorers and a picker, applied in that order."""

    def __init__(self, filters: Sequence[Filter], scorers: Sequence[tuple[Scorer, float]], picker: Picker):
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.picker = picker

    def filter(self, request: RoutingRequest, pods: list[Pod]) -> list[Pod]:
        for stage in self.filters:
            pods = stage.filter(request, pods)
        return pods

    def decide(self, context: Context, pods: Sequence[Pod]) -> Decision:
        totals = {pod.id: 0.0 for pod in pods}
        raw: dict[str, dict[str, float]] = {}
        for scorer, weight in self.scorers:
            scores = scorer.score(context, pods)
            raw[scorer.name] = scores.raw
            for pod_id, value in scores.values.items():
                totals[pod_id] += weight * min(1.0, max(0.0, value))
        pod = self.picker.pick(pods, totals)
        pod.last_pick = time.monotonic_ns()
        alternates = sorted((p for p in pods if p is not pod), key=lambda p: (-totals[p.id], p.in_flight))
        matched, total = context.matched.get(pod.id, 0), context.total_blocks
        return Decision(pod, 100.0 * matched / total if total else 0.0, matched, total, matched > 0, raw,
                        tuple(alternates), context.uncached_tokens(pod.id))


def build(config: ScoringConfig) -> Profile:
    """The configured profile; an unknown type is a one-line config error."""
    scorers = []
    for n, entry in enumerate(config.scorers):
        make = SCORERS.get(entry.type)
        if make is None:
            raise ConfigError(f"invalid config: unknown scorer type {entry.type!r} (known: {', '.join(SCORERS)})"
                              f" - at '$.scoring.scorers[{n}].type'")
        scorers.append((make(config), entry.weight))
    make_picker = PICKERS.get(config.picker)
    if make_picker is None:
        raise ConfigError(f"invalid config: unknown picker {config.picker!r} (known: {', '.join(PICKERS)})"
                          " - at '$.scoring.picker'")
    return Profile([Healthy()], scorers, make_picker())
