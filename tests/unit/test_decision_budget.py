"""decisionTimeout bounds what a decision waits on, from the moment routing starts: a lookup
that waits past it, or that spends it before waiting, is routed by load and counted as a
timeout; a failure after a wait keeps its own reason; a lookup that never waits is decided
and observed like any other."""

from __future__ import annotations

import asyncio
import time

from extproc import scoring
from extproc.config import PodConfig, ScoringConfig
from extproc.index import IndexUnavailable
from extproc.indexer import PrefixMatch
from extproc.metrics import Metrics
from extproc.pods import PodPool
from extproc.requests import RoutingRequest
from extproc.routing import Router


class ScriptedIndexer:
    """The lookup as a given coroutine: what it waits on and how long is the test's to say."""

    block_size = 16

    def __init__(self, lookup):
        self.lookup = lookup

    async def get_pod_scores(self, request, pod_ids):
        return await self.lookup()

    def routed(self, *args) -> None:
        pass


def router(lookup, *, timeout: float) -> tuple[Router, Metrics]:
    metrics = Metrics()
    pool = PodPool([PodConfig(id=name, address=f"10.0.0.{n}:8000") for n, name in enumerate(("a", "b"), 1)])
    return Router(pool, ScriptedIndexer(lookup), scoring.build(ScoringConfig()), metrics,
                  decision_timeout=timeout), metrics


REQUEST = RoutingRequest(model="m", kind="completion", prompt="x")
HELD_BY_B = PrefixMatch({"b": 4}, 4, {"lookup": 1e-5}, prompt_tokens=64)


def fallbacks(metrics: Metrics, reason: str) -> float:
    return metrics.fallbacks.labels(reason)._value.get()


async def test_a_lookup_waiting_past_the_budget_is_routed_by_load_as_a_timeout():
    async def slow_index():
        await asyncio.sleep(1.0)
        return HELD_BY_B

    route, metrics = router(slow_index, timeout=0.02)
    began = time.perf_counter()
    decision = await route.route(REQUEST)
    assert time.perf_counter() - began < 0.5
    assert not decision.by_cache
    assert fallbacks(metrics, "timeout") == 1


async def test_a_budget_spent_before_the_first_wait_is_a_timeout_at_that_wait():
    async def busy_then_waits():
        time.sleep(0.05)  # the event loop held, past the budget, before anything was awaited
        await asyncio.sleep(0.01)
        return HELD_BY_B

    route, metrics = router(busy_then_waits, timeout=0.02)
    decision = await route.route(REQUEST)
    assert not decision.by_cache
    assert fallbacks(metrics, "timeout") == 1


async def test_an_index_failure_after_a_wait_keeps_its_reason():
    async def index_down():
        await asyncio.sleep(0)
        raise IndexUnavailable("redis down")

    route, metrics = router(index_down, timeout=1.0)
    decision = await route.route(REQUEST)
    assert not decision.by_cache
    assert fallbacks(metrics, "index") == 1
    assert fallbacks(metrics, "timeout") == 0


async def test_a_lookup_that_never_waits_is_decided_and_observed():
    async def known_here():
        return HELD_BY_B

    route, metrics = router(known_here, timeout=1.0)
    decision = await route.route(REQUEST)
    assert decision.pod.id == "b" and decision.by_cache
    assert metrics.registry.get_sample_value("kv_extproc_stage_seconds_count", {"stage": "lookup"}) == 1
    assert metrics.registry.get_sample_value("kv_extproc_stage_seconds_count", {"stage": "decision"}) == 1
    assert metrics.registry.get_sample_value("kv_extproc_matched_prefix_ratio_count") == 1


async def test_a_lookup_that_waits_within_the_budget_is_decided_by_its_answer():
    async def index_answers():
        await asyncio.sleep(0.01)
        return HELD_BY_B

    route, metrics = router(index_answers, timeout=1.0)
    decision = await route.route(REQUEST)
    assert decision.pod.id == "b" and decision.by_cache
    assert fallbacks(metrics, "timeout") == 0
