"""Load-aware routing through the real Envoy: simulated engines that take time to prefill
what they do not hold (one prompt at a time, as an engine's prefill budget does), publish KV
events after the prefill and report vLLM's queue metrics, which kv-extproc scrapes.

A hot tenant sends every request with the same long system prompt and a new question; eight
clients at once. The seed's policy (longest prefix wins) piles all of it onto the first pod
that cached the prompt; the default (time to first token) spreads it to as many pods as the
queue needs, each paying one cold prefill, and answers sooner.
"""

from __future__ import annotations

import collections
import random
import statistics
import time

import pytest

from tests.integration.conftest import LoadLoop, event_fleet, wait_until

pytestmark = pytest.mark.integration

# 2,000 tokens/s: the ~1,000-token system prompt costs 0.5 s cold, each ~150-token question
# ~75 ms; the decode (in parallel with other requests, as in a batch) 50 ms. Sleeps, so the
# comparison holds on a busy machine.
ENGINE = {"prefill_tokens_per_s": 2000.0, "decode_s": 0.05}
REQUESTS = 48


def hot_tenant(seed: int):
    rng = random.Random(seed)
    words = "cache prefix router engine token block policy tenant latency queue answer source".split()
    system = "Hot tenant handbook. " + " ".join(rng.choice(words) for _ in range(700))

    def prompt(i: int) -> list[dict]:
        question = f"Question {i}: " + " ".join(rng.choice(words) for _ in range(110))
        return [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return prompt


def run_hot_tenant(workdir, tokenizer, tokenizer_dir, hosts_from: int, *, warm_up: bool = False, **config) -> dict:
    with event_fleet(workdir, tokenizer, tokenizer_dir, capacity_blocks=2000, hosts_from=hosts_from,
                     timing=ENGINE, **config) as (_, pods, proc, proxy):
        if warm_up:  # other traffic first, eight at once: each engine runs decodes side by side
            other = LoadLoop(proxy.url, total=60, threads=8,
                             prompt=lambda i: [{"role": "user", "content": f"other tenant {i} " * 20}]).start().join()
            assert not other.failures()
            assert all(pod.engine.peak_running >= 2 for pod in pods.values()), "every engine ran two at once"
            wait_until(lambda: all(f'kv_extproc_pod_engine_batching{{pod="{name}"}} 1.0' in proc.metrics()
                                   for name in pods), what="kv-extproc to see every engine batching")
        prompt = hot_tenant(1)
        warm = LoadLoop(proxy.url, total=1, threads=1, prompt=prompt).start().join()  # one pod caches it
        assert not warm.failures()
        first = warm.results[0][2]
        wait_until(lambda: pods[first].engine.prompt_tokens > 0, what="the first prompt's prefill")
        time.sleep(0.3)  # its KV events reach the index
        before = {name: (pod.engine.prompt_tokens, pod.engine.cached_tokens) for name, pod in pods.items()}
        loop = LoadLoop(proxy.url, total=REQUESTS, threads=8, prompt=lambda i: prompt(i + 1)).start().join()
        served = collections.Counter(r[2] for r in loop.results)
        prompt_tokens = sum(pod.engine.prompt_tokens - before[n][0] for n, pod in pods.items())
        cached = sum(pod.engine.cached_tokens - before[n][1] for n, pod in pods.items())
        return {"failures": loop.failures(), "served": served, "first": first,
                "latency": [done - sent for sent, done, _ in loop.timeline],
                "hit_rate": cached / prompt_tokens, "metrics": proc.metrics()}


def assert_spread_and_sooner(ttft: dict, seed: dict) -> None:
    """No request failed; the seed's policy piled the hot tenant onto one pod, the default spread
    it, paying one cold prefill per pod, not one per request, and answered sooner."""
    assert not ttft["failures"] and not seed["failures"]
    assert seed["served"][seed["first"]] == REQUESTS, "the seed's policy piles the hot tenant onto one pod"
    assert len(ttft["served"]) >= 2 and max(ttft["served"].values()) < REQUESTS * 0.85, ttft["served"]
    assert ttft["hit_rate"] > 0.6, ttft["hit_rate"]
    mean_ttft, mean_seed = statistics.fmean(ttft["latency"]), statistics.fmean(seed["latency"])
    assert mean_ttft < 0.8 * mean_seed, (mean_ttft, mean_seed, ttft["served"])


def test_a_hot_tenant_spreads_over_pods_and_answers_sooner_than_longest_prefix(workdir, tokenizer, tokenizer_dir):
    ttft = run_hot_tenant(workdir, tokenizer, tokenizer_dir, hosts_from=40)
    seed = run_hot_tenant(workdir, tokenizer, tokenizer_dir, hosts_from=44, scoring={"scorers": [{"type": "prefix"}]})
    for pod in ("pod-a", "pod-b", "pod-c"):  # every engine's queue was read and is exported
        assert f'kv_extproc_pod_engine_requests_waiting{{pod="{pod}"}}' in ttft["metrics"]
        assert f'kv_extproc_pod_engine_serial{{pod="{pod}"}}' in ttft["metrics"]
    assert_spread_and_sooner(ttft, seed)


def test_a_hot_tenant_arriving_where_engines_are_seen_batching_spreads_too(workdir, tokenizer, tokenizer_dir):
    """Engines that batch run decodes beside a new prefill, so only queued prefills count
    ahead of a request there; the hot tenant's prefills queue on the pod that cached its
    prompt all the same, and the queue must still send it to other pods. (With L the
    candidates' mean, all 48 requests stayed on that pod: its own queue raised L for all.)"""
    ttft = run_hot_tenant(workdir, tokenizer, tokenizer_dir, hosts_from=48, warm_up=True)
    seed = run_hot_tenant(workdir, tokenizer, tokenizer_dir, hosts_from=52, warm_up=True,
                          scoring={"scorers": [{"type": "prefix"}]})
    assert_spread_and_sooner(ttft, seed)
