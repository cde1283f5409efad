"""The time-to-first-token scorer: where this request will start producing soonest.

cost(pod) = (1 + L) x tokens the pod must compute for this prompt (those it does not hold)
          + tokens it must compute for this replica's open requests there (Pod.open_tokens)
          + requests ahead of it x queuedRequestTokens
in prompt-token equivalents. Requests ahead = pods.load_of (this replica's open requests plus
the other replicas' share of the engine's last reading; without any reading, our own): each
costs its decode and the work we cannot see (another replica's prefill). L =
the mean of requests ahead over the candidates: while the fleet has a queue, every token a
pod computes for this request delays the requests queued behind it, so the busier the fleet,
the more a cached prefix is worth (measured: bench/fleet.py, README). score = (min cost + b)
/ (cost + b), 1 for the soonest start (b = one block, so costs near zero compare sensibly).

This is the guard against piling as well: a pod holding the whole prefix but with work
queued ahead loses to one that must prefill part of it but starts now, by exactly as much
as the queue costs; a hot prefix spreads to as many pods as its load needs.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..pods import Pod
from .base import Context, Scores
from .load import ahead, fill_unknown


class TtftScorer:
    name = "ttft"

    def __init__(self, queued_request_tokens: int = 1536):
        self.queued_request_tokens = queued_request_tokens

    def score(self, context: Context, pods: Sequence[Pod]) -> Scores:
        known = {pod.id: ahead(pod) for pod in pods}
        if all(v is None for v in known.values()):
            queue = {pod.id: float(pod.in_flight) for pod in pods}  # no engine readings: our own view
        else:
            queue = {pod.id: max(float(pod.in_flight), q) for pod, q in zip(pods, fill_unknown(known).values())}
        weight = 1.0 + sum(queue.values()) / len(queue)
        cost = {pod.id: weight * context.uncached_tokens(pod.id) + pod.open_tokens + queue[pod.id] * self.queued_request_tokens
                for pod in pods}
        base = min(cost.values()) + max(1, context.block_tokens)
        return Scores({pod: base / (c + max(1, context.block_tokens)) for pod, c in cost.items()}, cost)
