"""Load scorers: how busy each candidate is, from the engine's own numbers (scraped
/metrics, see extproc/load.py) and this replica's decisions since they were read.

- ``queue``: waiting requests; (maxQ - q) / (maxQ - minQ) over the candidates, all equal -> 1.
- ``inFlight``: requests this replica routed whose stream is still open; 1 - c / max.
- ``kvCacheUtilization``: 1 - the engine's KV cache usage.
A pod without a fresh engine reading gets the mean of the others (unknown is not idle).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..pods import Pod, load_of
from .base import Context, Scores


def waiting(pod: Pod) -> float | None:
    """Requests queued at the engine (as last read); None if unknown."""
    if pod.engine is None:
        return None
    return pod.engine.waiting


def ahead(pod: Pod) -> float | None:
    """Requests the engine works on or holds before a new one; None if unknown."""
    if pod.engine is None:
        return None
    return load_of(pod)


def fill_unknown(values: dict[str, float | None]) -> dict[str, float]:
    known = [v for v in values.values() if v is not None]
    mean = sum(known) / len(known) if known else 0.0
    return {pod: mean if v is None else v for pod, v in values.items()}


class QueueScorer:
    name = "queue"

    def score(self, context: Context, pods: Sequence[Pod]) -> Scores:
        raw = fill_unknown({pod.id: waiting(pod) for pod in pods})
        low, high = min(raw.values()), max(raw.values())
        if high == low:
            return Scores({pod: 1.0 for pod in raw}, raw)
        return Scores({pod: (high - q) / (high - low) for pod, q in raw.items()}, raw)


class InFlightScorer:
    name = "inFlight"

    def score(self, context: Context, pods: Sequence[Pod]) -> Scores:
        raw = {pod.id: float(pod.in_flight) for pod in pods}
        most = max(raw.values())
        if most <= 0:
            return Scores({pod: 1.0 for pod in raw}, raw)
        return Scores({pod: (most - c) / most for pod, c in raw.items()}, raw)


class KvUtilizationScorer:
    name = "kvCacheUtilization"

    def score(self, context: Context, pods: Sequence[Pod]) -> Scores:
        raw = fill_unknown({pod.id: pod.engine.kv_usage if pod.engine is not None else None for pod in pods})
        return Scores({pod: 1.0 - kv for pod, kv in raw.items()}, raw)
