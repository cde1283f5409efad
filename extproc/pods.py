"""The candidate pods: who serves which model, where to send it, what is in flight, and
whether it answers its health checks.

In-flight counts are this process's own view (requests it routed whose ext_proc stream
is still open); they break ties between equally good caches and spread cold traffic.
A pod that fails its health checks (podhealth.py) is no candidate until it answers again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import PodConfig
from .endpoints import candidates_of

if TYPE_CHECKING:
    from .load import EngineLoad


LIFETIME_WEIGHT = 0.1
"""How much one finished request moves a pod's typical request lifetime (an EWMA)."""

WAITING_SCAN = 256
"""At most this many of the newest open requests count whole as queued (OpenLedger.owed), found
among at most twice as many records."""


@dataclass(eq=False, slots=True)
class OpenRequest:
    """One of this replica's requests on a pod, from its routing to the end of its stream."""

    at: float
    """When it was routed (the clock of the ``Pod.opened`` call)."""
    tokens: int
    """Prompt tokens the pod had to compute for it, as the decision estimated them."""
    counted: bool = True
    """Still in the ledger's sums (not ended, not older than the typical lifetime)."""
    ended: bool = False

    @property
    def ns(self) -> int:
        return round(self.at * 1e9)


@dataclass(slots=True)
class OpenLedger:
    """This replica's open requests on one pod, and how much of their work is likely left.

    Each counts its work (its uncached tokens + a decode's worth) shrinking linearly over the
    pod's typical request lifetime. Kept as sums over the counted requests, so a decision
    costs O(1) however many are open; the oldest leave from the front once a lifetime old.
    The sums are Python integers over nanoseconds: exact, however long the process runs.

    A request's end is its ext_proc stream's end: the response's end with the default BUFFERED
    config; with the full-duplex one (response headers sent to us), the response headers, which
    for a streamed answer come before its first token. The lifetime is then that short, our
    requests drop out early, and the engine's scraped queue (pods.load_of) carries the rest
    (tests/integration/test_stream_end.py)."""

    lifetime: float | None = None
    """A typical request's time here, routing to stream end (an EWMA of ours; None: none ended yet)."""
    _queue: deque = field(default_factory=deque)
    """OpenRequests in routing order (ended ones leave lazily, from the front)."""
    _count: int = 0
    _at: int = 0
    """Sum of at, in ns."""
    _tokens: int = 0
    _tokens_at: int = 0
    """Sum of tokens x at, in ns."""

    def add(self, entry: OpenRequest) -> None:
        self._queue.append(entry)
        self._count_in(entry, 1)

    def remove(self, entry: OpenRequest, now: float) -> None:
        if entry.counted:
            entry.counted = False
            self._count_in(entry, -1)
        took = max(0.0, now - entry.at)
        self.lifetime = took if self.lifetime is None else self.lifetime + LIFETIME_WEIGHT * (took - self.lifetime)

    def owed(self, now: float, request_tokens: int, waiting: int = 0) -> float:
        """Sum of (tokens + request_tokens) x (1 - age / lifetime) over the counted requests;
        without a lifetime yet, nothing shrinks. Requests a lifetime old leave the sums.
        The newest ``waiting`` requests (the engine's queue is first come, first served) have
        not started: they count whole however old, and stay (at most WAITING_SCAN of them)."""
        newest = self._newest(min(waiting, WAITING_SCAN)) if waiting > 0 else []
        queue, life = self._queue, self.lifetime
        while queue and (not queue[0].counted
                         or (life is not None and now - queue[0].at >= life and self._count > len(newest))):
            entry = queue.popleft()
            if entry.counted:
                entry.counted = False
                self._count_in(entry, -1)
        if not self._count:
            return 0.0
        work = self._tokens + request_tokens * self._count
        if life is None:
            return float(work)
        if life <= 0:  # ours end at once here: only those still queued are owed
            return float(sum(entry.tokens + request_tokens for entry in newest))
        now_ns, life_ns = round(now * 1e9), life * 1e9
        owed = work - (now_ns * work - (self._tokens_at + request_tokens * self._at)) / life_ns
        for entry in newest:  # the shrinking each got, back: (1 - age / life) + age / life = whole
            owed += (entry.tokens + request_tokens) * (now_ns - entry.ns) / life_ns
        return max(0.0, owed)

    def _newest(self, count: int) -> list[OpenRequest]:
        """Up to ``count`` of the newest counted requests (reading at most 2 x WAITING_SCAN)."""
        found: list[OpenRequest] = []
        for read, entry in enumerate(reversed(self._queue)):
            if len(found) >= count or read >= 2 * WAITING_SCAN:
                break
            if entry.counted:
                found.append(entry)
        return found

    def held(self) -> int:
        """Records held (counted, or ended and waiting to leave from the front)."""
        return len(self._queue)

    def _count_in(self, entry: OpenRequest, sign: int) -> None:
        at = entry.ns
        self._count += sign
        self._at += sign * at
        self._tokens += sign * entry.tokens
        self._tokens_at += sign * entry.tokens * at


@dataclass(eq=False, slots=True)
class Pod:
    id: str
    address: str
    models: frozenset[str] = field(default_factory=frozenset)
    in_flight: int = 0
    healthy: bool = True
    failing_since: float | None = None
    """Monotonic time of the first failed health check in the current run of failures."""
    engine: "EngineLoad | None" = None
    """The engine's own load, last scraped (load.py); None while unknown or stale."""
    routed: int = 0
    """Requests this replica has sent here, ever (to tell which of ours a scrape may count)."""
    in_flight_at_scrape: int = 0
    """This replica's own requests open here when the engine was read (its reading counts them)."""
    in_flight_at_record: int = 0
    """This replica's own requests open here when that reading was recorded (waiting_ours)."""
    batching: bool = False
    """The engine has reported two or more requests running at once: it batches, so a request
    decoding there does not hold back a new one's prefill (the ttft scorer reads this)."""
    serial: bool = False
    """The engine has reported requests waiting beside a single one running: it may serve one
    at a time, decode included (unless it has also been seen batching, which wins)."""
    last_pick: int = 0
    """When this replica last chose it (monotonic ns): of equally loaded pods, the one
    chosen longest ago has done the most of its work, so it goes first (as round-robin would)."""
    open_tokens: int = 0
    """Prompt tokens this replica's open requests here had to compute (uncached, as estimated
    when each was routed), whole until each stream ends: exported per pod; the ttft scorer
    reads the ledger's shrinking view (owed)."""
    ledger: OpenLedger = field(default_factory=OpenLedger)
    """Our open requests here, for what they still owe (OpenLedger)."""
    rank: int | None = None
    """The data-parallel rank this candidate is, behind its pod's one address (vLLM
    --data-parallel-size): requests are pinned to it with vLLM's X-data-parallel-rank header."""

    def opened(self, tokens: int, now: float) -> OpenRequest:
        """This replica routed a request here that must compute ``tokens``."""
        entry = OpenRequest(now, tokens)
        self.in_flight += 1
        self.routed += 1
        self.open_tokens += tokens
        self.ledger.add(entry)
        return entry

    def closed(self, entry: OpenRequest, now: float) -> None:
        """Its stream ended: it no longer holds the pod, and its time teaches the lifetime.
        A second call for the same request changes nothing."""
        if entry.ended:
            return
        entry.ended = True
        self.in_flight -= 1
        self.open_tokens -= entry.tokens
        self.ledger.remove(entry, now)

    def owed(self, now: float, request_tokens: int) -> float:
        """The work our open requests still bring here, in prompt tokens (OpenLedger.owed)."""
        return self.ledger.owed(now, request_tokens, self.waiting_ours())

    def _ours_of_queue(self) -> float | None:
        """Our part of what the engine held at its last reading (ours / all it held, at most
        1), which is our part of its queue too; None when that reading showed no queue."""
        engine = self.engine
        if engine is None or engine.waiting <= 0:
            return None
        return min(1.0, self.in_flight_at_scrape / (engine.waiting + engine.running))

    def waiting_others(self) -> float:
        """The other replicas' requests in the engine's queue at its last reading: the queue
        less our share of it; 0 without a reading."""
        ours = self._ours_of_queue()
        return 0.0 if ours is None else self.engine.waiting * (1.0 - ours)  # type: ignore[union-attr]

    def waiting_ours(self) -> int:
        """How many of our open requests the engine has not started, if its last reading showed
        a queue (none otherwise: an engine batching requests starts a new one at once). Then
        it held our share of its queue (waiting x ours / all it held) and ran the rest of
        ours; those it ran are first in line and first to end, and each end lets the next
        start, so the ones waiting now are all ours open but those it ran then. With other
        replicas' requests in the queue too, that is true on average."""
        ours = self._ours_of_queue()
        if ours is None:
            return 0
        share = self.engine.waiting * ours  # type: ignore[union-attr]
        queued = min(self.in_flight_at_record, int(share + 0.5))
        return max(0, self.in_flight - (self.in_flight_at_record - queued))

    def serves(self, model: str, known: frozenset[str] = frozenset()) -> bool:
        """Listed models, or (none listed) every configured model; any model when none is configured."""
        if self.models:
            return model in self.models
        return not known or model in known


class PodPool:
    def __init__(self, pods: Iterable[PodConfig] = (), models: Iterable[str] = ()):
        self._pods: dict[str, Pod] = {}
        self.models: frozenset[str] = frozenset(models)
        """The configured model names: a pod listing none serves each of them."""
        self.update(pods)

    def update(self, pods: Iterable[PodConfig], models: Iterable[str] | None = None) -> None:
        """Adopt a new pod list (from the config or discovery); pods that stay keep their
        in-flight counts and health."""
        if models is not None:
            self.models = frozenset(models)
        fresh: dict[str, Pod] = {}
        for conf in pods:
            # A pod with data-parallel ranks is one candidate per rank (pod-a#0, pod-a#1, ...).
            for candidate, rank in candidates_of(conf.id, conf.data_parallel_size):
                pod = self._pods.get(candidate) or Pod(candidate, conf.address)
                pod.address = conf.address
                pod.models = frozenset(conf.models)
                pod.rank = rank
                fresh[candidate] = pod
        self._pods = fresh

    def __len__(self) -> int:
        return len(self._pods)

    def get(self, pod_id: str) -> Pod | None:
        return self._pods.get(pod_id)

    def all(self) -> list[Pod]:
        return list(self._pods.values())

    def serving(self, model: str) -> list[Pod]:
        """Every configured pod serving the model, healthy or not."""
        return [pod for pod in self._pods.values() if pod.serves(model, self.models)]

    def healthy(self) -> list[Pod]:
        return [pod for pod in self._pods.values() if pod.healthy]

    def least_loaded(self, pods: Sequence[Pod]) -> Pod:
        """Fewest in flight; of equals, the one chosen longest ago, so cold traffic spreads evenly."""
        pod = least_in_flight(pods)
        pod.last_pick = time.monotonic_ns()
        return pod


def load_of(pod: Pod) -> float:
    """Requests on the pod as far as this replica can tell: its own open streams now (it sees
    each decision and each end at once) plus the other replicas' share of the engine's last
    reading (the engine's waiting and running less ours it counted then)."""
    engine = pod.engine
    if engine is None:
        return float(pod.in_flight)
    return pod.in_flight + max(0.0, engine.waiting + engine.running - pod.in_flight_at_scrape)


def least_in_flight(pods: Sequence[Pod]) -> Pod:
    """The least loaded pod (load_of); of equals, the one chosen longest ago."""
    return min(pods, key=lambda pod: (load_of(pod), pod.last_pick))
