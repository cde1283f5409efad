"""The fleet simulator's two pod models: serial pods make a request wait for each queued
request's prefill and decode; batching pods (BENCH_FLEET_PODS=batching) only for the prefills,
their decodes running beside the next prefill as in vLLM's continuous batching."""

from __future__ import annotations

import asyncio

from bench import fleet


def two_at_once(batching: bool) -> list[float]:
    """Two requests with the same 1,600-token prompt at the same instant; the cache oracle sends
    both to the pod that holds it after the first."""
    prompt = list(range(1, 1601))
    out = asyncio.run(fleet.simulate("cache-oracle", [[], []], [1.0, 0.0], [prompt, prompt], 1e6, "",
                                     batching=batching))
    return out.ttft


def test_a_serial_pod_makes_the_second_request_wait_for_the_first_ones_decode():
    first, second = two_at_once(batching=False)
    prefill = 1600 / fleet.PREFILL_TOKENS_PER_S
    assert abs(first - prefill) < 1e-9
    assert abs(second - (prefill + fleet.DECODE_S)) < 1e-9, "the whole prompt cached: only the wait"


def test_a_batching_pod_starts_the_second_prefill_once_the_first_prefill_ends():
    first, second = two_at_once(batching=True)
    prefill = 1600 / fleet.PREFILL_TOKENS_PER_S
    assert abs(first - prefill) < 1e-9
    assert abs(second - prefill) < 1e-9, "the first one's decode runs beside it"
