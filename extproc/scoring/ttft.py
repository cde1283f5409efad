"""The time-to-first-token scorer: where this request will start producing soonest, without
making the requests behind it wait for a prefix it could have found cached.

start(pod) = tokens the pod must compute for this prompt (those it does not hold)
           + owed: the work of this replica's open requests there (Pod.owed): each one's
             uncached tokens + requestTokens (its decode), shrinking linearly with its age
             over the pod's typical request lifetime (what ours took there, an EWMA), except
             those the engine still queues (from its last reading: Pod.waiting_ours, our
             newest), which have not started and count whole
           + requests ahead of it x queuedRequestTokens
cost(pod)  = start(pod) + L x tokens the pod must compute for this prompt
in prompt-token equivalents. Requests ahead = pods.load_of (this replica's open requests plus
the other replicas' share of the engine's last reading; without any reading, our own): each
costs the work we cannot see (another replica's prefill and decode, how far ours really
are). L = the mean of requests ahead over the candidates (where engines batch, the median:
below): while the fleet has a queue, every token a pod computes for this request delays the
requests queued behind it, so the busier the fleet, the more a cached prefix is worth.

Where engines batch (as vLLM does: decodes run beside the next prefills; see batches()),
start counts no decodes (requestTokens 0) and, of the requests ahead, only the other
replicas' share of the engine's queue (Pod.waiting_others; the candidates' mean for a pod
without a fresh reading). L there (the guard's too) is the median of requests ahead over the
candidates, the lower of the middle two (of two candidates, their mean would be the mean
again): with the mean, a hot tenant's prefills queued on the one pod holding its prompt
raised L for every candidate, a cold prefill anywhere else looked dearer than that queue,
and all of the tenant's traffic stayed on the one pod (tests/integration/test_load_aware.py).

The tail guard: a pod whose start is later than maxStartRatio x the soonest start +
startSlackTokens ranks below every pod in band, whatever its cache saves the others: it
scores at most GUARDED_SHARE of the lowest in-band score, ordered by cost among the guarded,
so a retry that runs out of pods in band still goes to the cheapest of the rest. L buys hit
rate (the mean TTFT); the guard stops it from buying it with one request's long wait (the p99).
It holds while L is below guardBelowQueue: with a deeper queue everyone waits anyway, and a
prefix recomputed elsewhere costs the requests behind it more than the wait costs this one
(a burst sharing a new prefix then shares one pod's copy instead of each member paying a
cold prefill). In band, score = (min cost + b) / (cost + b), 1 for the cheapest (b = one
block, so costs near zero compare sensibly).

This is the guard against piling as well: a pod holding the whole prefix but with work
queued ahead loses to one that must prefill part of it but starts now, by exactly as much
as the queue costs; a hot prefix spreads to as many pods as its load needs.
Measured on bench/fleet.py; the figures and the values tried are in the README.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import median_low

from ..pods import Pod
from .base import Context, Scores
from .load import ahead, fill_unknown


GUARDED_SHARE = 0.01
"""A guarded pod's best score, as a share of the lowest in-band score: never chosen while a
pod in band is, and near nothing under a weighted-random picker."""


class TtftScorer:
    name = "ttft"

    def __init__(self, queued_request_tokens: int = 512, request_tokens: int = 1536, *,
                 max_start_ratio: float = 1.25, start_slack_tokens: int = 256, guard_below_queue: float = 2.0):
        self.queued_request_tokens = queued_request_tokens
        self.request_tokens = request_tokens
        self.max_start_ratio = max_start_ratio
        self.start_slack_tokens = start_slack_tokens
        self.guard_below_queue = guard_below_queue

    def score(self, context: Context, pods: Sequence[Pod]) -> Scores:
        # One pass per quantity over plain lists: this runs on every request (the arithmetic, and
        # its order, is the formula's above; the fleet simulator's rows hold it to the digit).
        ids = [pod.id for pod in pods]
        aheads = [ahead(pod) for pod in pods]
        known = [a for a in aheads if a is not None]
        if not known:
            queue = [float(pod.in_flight) for pod in pods]  # no engine readings: our own view
        else:
            mean = sum(known) / len(known)  # a pod without a reading: unknown is not idle
            queue = [max(float(pod.in_flight), mean if a is None else a) for pod, a in zip(pods, aheads)]
        uncached = [context.uncached_tokens(pod_id) for pod_id in ids]
        now, request_tokens, per_request = context.now, self.request_tokens, self.queued_request_tokens
        if batches(pods):
            # Engines that batch (batches()): a request decoding there does not hold back a new
            # prefill, so neither our open requests' decodes nor the requests running count,
            # only prefills and the other replicas' share of the queue. Decided for all
            # candidates at once: a pod not yet seen batching must not look busier than one
            # that has. A pod without a fresh reading takes the mean of the others' queues:
            # unknown is not idle.
            others = fill_unknown({pod.id: pod.waiting_others() if pod.engine is not None else None for pod in pods})
            start = [u + pod.owed(now, 0) + others[pod.id] * per_request for pod, u in zip(pods, uncached)]
            # L from the median pod (the lower of two), not the mean: a hot prefix queued on the
            # one pod holding it must not make every pod's cache worth more, or it keeps drawing
            # the prefix there.
            busy = median_low(queue)
        else:
            start = [u + pod.owed(now, request_tokens) + q * per_request for pod, u, q in zip(pods, uncached, queue)]
            busy = sum(queue) / len(queue)
        cost = {pod_id: s + busy * u for pod_id, s, u in zip(ids, start, uncached)}
        soonest = min(start)
        guarded = self.max_start_ratio and busy < self.guard_below_queue
        latest = max(soonest, self.max_start_ratio * soonest + self.start_slack_tokens) if guarded else float("inf")
        block = max(1, context.block_tokens)
        values = _relative({pod_id: cost[pod_id] for pod_id, s in zip(ids, start) if s <= latest}, block)
        if len(values) < len(cost):
            out = {pod_id: c for pod_id, c in cost.items() if pod_id not in values}
            share = GUARDED_SHARE * min(values.values())
            values.update({pod_id: share * v for pod_id, v in _relative(out, block).items()})
        return Scores(values, cost)


def batches(pods: Sequence[Pod]) -> bool:
    """Whether to score the candidates as engines that batch: vLLM does, so they are taken to
    batch unless one has shown a queue beside a single running request (a serial engine) and
    none has shown two running at once (which settles it: a fleet runs one engine release, so
    one decides for all); and only while some candidate has a fresh reading. Without one, our
    open requests are all that shows a pod's load, and each one's decode must count, or a
    cached prefix would draw every request however many already wait there. A fleet at light
    load may never show two running, and waiting for it cost cache hits there."""
    if not any(pod.engine is not None for pod in pods):
        return False
    return any(pod.batching for pod in pods) or not any(pod.serial for pod in pods)


def _relative(costs: dict[str, float], block: int) -> dict[str, float]:
    """(min cost + block) / (cost + block): 1 for the cheapest."""
    base = min(costs.values()) + block
    return {pod: base / (c + block) for pod, c in costs.items()}
