"""The three stages every routing policy is made of, as small interfaces.

Filters drop candidates (health, a proxy's subset hint, guards), scorers rate each
remaining pod 0..1 for one request, and a picker combines the weighted scores and chooses.
Raw values (blocks matched, requests in flight, ...) travel with the scores, for the
decision log and metrics.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..pods import Pod
from ..requests import RoutingRequest


@dataclass(slots=True)
class Context:
    """What a scorer may read about one request, once its prefix has been looked up."""

    request: RoutingRequest
    matched: dict[str, int]
    """pod id -> blocks of the prompt it holds consecutively from the first."""
    total_blocks: int
    block_tokens: int = 0
    """Tokens per block."""
    prompt_tokens: int = 0
    """The prompt's tokens (estimated past the blocks that can match)."""
    weighted: dict[str, float] | None = None
    """pod id -> its run weighted by tier (GPU 1, CPU less, ...); None: every block counts 1."""
    now: float = field(default_factory=time.monotonic)
    """The decision's time, on the clock the pods' open requests were stamped with."""

    def uncached_tokens(self, pod_id: str) -> int:
        """Prompt tokens the pod would have to compute (prefill) for this request; a block held
        in a slower tier counts as its weight of a cached one."""
        held = self.weighted.get(pod_id, 0.0) if self.weighted is not None else self.matched.get(pod_id, 0)
        return max(0, round(self.prompt_tokens - held * self.block_tokens))


@dataclass(slots=True)
class Scores:
    values: dict[str, float]
    """pod id -> 0..1, higher is better."""
    raw: dict[str, float]
    """pod id -> the measurement behind the score, for logs and metrics."""


class Filter(Protocol):
    name: str

    def filter(self, request: RoutingRequest, pods: list[Pod]) -> list[Pod]: ...


class Scorer(Protocol):
    name: str

    def score(self, context: Context, pods: Sequence[Pod]) -> Scores: ...


class Picker(Protocol):
    def pick(self, pods: Sequence[Pod], totals: dict[str, float]) -> Pod: ...


@dataclass(frozen=True, slots=True)
class Decision:
    pod: Pod
    score: float
    """100 x blocks the chosen pod holds from the first / blocks in the prompt."""
    matched_blocks: int
    total_blocks: int
    by_cache: bool
    raw: dict[str, dict[str, float]] = field(default_factory=dict)
    """scorer -> pod id -> raw value (empty for a fallback)."""
    alternates: tuple[Pod, ...] = ()
    """The other candidates, best total first: where a retry should go next."""
    uncached_tokens: int = 0
    """Prompt tokens the chosen pod must compute (0 when unknown, as for a fallback)."""
