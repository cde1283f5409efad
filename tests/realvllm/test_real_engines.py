"""kv-extproc in front of real vLLM engines, judged by vLLM's own prefix-cache counters.

Everything goes through the real Envoy with the official openai client; engines, tokenizer,
chat template, prefix cache, KV events and metrics are vLLM's own.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request

import openai
import pytest
import redis

from extproc.blocks import block_keys
from extproc.requests import parse
from extproc.tokenization import tokenize_with
from tests.integration.conftest import KEY_PREFIX, LoadLoop, wait_until
from tests.realvllm.conftest import MODEL, reset

pytestmark = pytest.mark.realvllm
ROUTER_BLOCK = 64


def system_prompt(tenant: int) -> str:
    rng = random.Random(tenant)
    words = "cache engine tenant invoice clause shipment record policy route answer".split()
    return f"Tenant {tenant} rules. " + " ".join(rng.choice(words) for _ in range(400))


def chat(tenant: int, question: str) -> list[dict]:
    return [{"role": "system", "content": system_prompt(tenant)}, {"role": "user", "content": question}]


def hits_and_queries(engines) -> tuple[float, float]:
    return (sum(e.counter("vllm:prefix_cache_hits_total") for e in engines.values()),
            sum(e.counter("vllm:prefix_cache_queries_total") for e in engines.values()))


def holders(r: redis.Redis, tokenizer, tenant: int) -> set[str]:
    tokens = list(tokenizer.apply_chat_template(chat(tenant, "x"), tokenize=True, add_generation_prompt=True)["input_ids"])
    key = block_keys(tokens, ROUTER_BLOCK, 1)[0]
    return {k.decode() for k in r.hkeys(f"{KEY_PREFIX}{MODEL}@{key}")}


def ask(client: openai.OpenAI, messages: list[dict]) -> str:
    """Send a chat request; return the address kv-extproc chose (echoed by the test Envoy)."""
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=1)
    return raw.headers.get("x-test-lb-metadata", "")


@pytest.fixture()
def client(stack):
    _, _, proxy = stack
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture()
def index(stack):
    server, _, _ = stack
    r = redis.Redis.from_url(server.url)
    yield r
    r.close()


def reset_all(engines, r, tokenizer, tenants) -> None:
    for engine in engines.values():
        reset(engine)
    wait_until(lambda: all(not holders(r, tokenizer, t) for t in tenants), timeout=20, what="caches cleared")


def test_the_token_ids_vllm_computes_equal_ours(engines, tokenizer):
    engine = next(iter(engines.values()))
    shapes = [
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "What is a KV cache?"}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                                               {"role": "user", "content": "second turn"}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "part one"},
                                                                           {"type": "text", "text": "part two"}]}]}),
        ("/v1/completions", {"prompt": "The quick brown fox jumps over the lazy dog."}),
    ]
    for path, fields in shapes:
        body = {"model": MODEL, **fields}
        ours = tokenize_with(tokenizer, parse(path, json.dumps(body).encode()))
        request = urllib.request.Request(f"{engine.url}/tokenize", data=json.dumps(
            {**body, "add_generation_prompt": True} if "messages" in body else body).encode(),
            headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            theirs = json.load(reply)["tokens"]
        assert ours == theirs, path


def test_a_shared_system_prompt_follows_the_engine_that_served_it_first(engines, stack, client, index, tokenizer):
    by_address = {e.address: e for e in engines.values()}
    first = ask(client, chat(1, "first question"))
    engine = by_address[first]
    wait_until(lambda: holders(index, tokenizer, 1) == {engine.name}, timeout=20, what="its KV events indexed")
    hits_before = engine.counter("vllm:prefix_cache_hits_total")
    later = [ask(client, chat(1, f"question number {i}")) for i in range(4)]
    assert later == [first] * 4
    assert engine.counter("vllm:prefix_cache_hits_total") - hits_before >= 4 * 384, "the engine reports the hits"


def test_multi_tenant_traffic_hits_the_cache_far_more_than_round_robin(engines, stack, client, index, tokenizer):
    tenants = list(range(10, 16))
    rng = random.Random(42)
    traffic = [(t, f"turn {i}") for t in tenants for i in range(3)]
    rng.shuffle(traffic)

    reset_all(engines, index, tokenizer, tenants)
    h0, q0 = hits_and_queries(engines)
    for tenant, question in traffic:
        ask(client, chat(tenant, question))
        time.sleep(0.2)  # the engine's KV events reach the index
    h1, q1 = hits_and_queries(engines)
    routed = (h1 - h0) / (q1 - q0)

    reset_all(engines, index, tokenizer, tenants)
    order = list(engines.values())
    for n, (tenant, question) in enumerate(traffic):
        with openai.OpenAI(base_url=f"{order[n % len(order)].url}/v1", api_key="unused", max_retries=0) as direct:
            direct.chat.completions.create(model=MODEL, messages=chat(tenant, question), max_tokens=1)
    h2, q2 = hits_and_queries(engines)
    round_robin = (h2 - h1) / (q2 - q1)
    print(f"\nreal vLLM fleet prefix-cache hit rate: kv-extproc {routed:.1%}, round-robin {round_robin:.1%}, "
          f"ratio {routed / max(round_robin, 1e-9):.1f}x")
    assert routed >= 0.5
    assert routed >= 2 * round_robin


def test_a_reset_cache_reaches_the_index_and_traffic_spreads_again(engines, stack, client, index, tokenizer):
    _, proc, _ = stack
    by_address = {e.address: e for e in engines.values()}
    engine = by_address[ask(client, chat(2, "q"))]
    wait_until(lambda: holders(index, tokenizer, 2) == {engine.name}, timeout=20, what="indexed")
    reset(engine)
    wait_until(lambda: not holders(index, tokenizer, 2), timeout=20, what="AllBlocksCleared indexed")
    metrics = lambda: proc.metrics()  # noqa: E731
    load = [line for line in metrics().splitlines() if line.startswith('kv_extproc_requests_total{outcome="load"}')]
    before = float(load[0].split()[-1]) if load else 0.0
    ask(client, chat(2, "after the reset"))
    after = float(next(line for line in metrics().splitlines()
                       if line.startswith('kv_extproc_requests_total{outcome="load"}')).split()[-1])
    assert after == before + 1, "routed by load, no longer pinned to the engine that lost the prefix"


def test_a_hot_tenant_under_concurrency_hits_the_cache_more_than_round_robin_and_loses_nothing(
        engines, stack, index, tokenizer):
    """Half the traffic is one tenant's; four clients at once. kv-extproc (default profile: time
    to first token, reading each engine's /metrics) against round-robin on the same requests,
    judged by vLLM's own prefix-cache counters."""
    _, proc, proxy = stack
    rng = random.Random(7)
    tenants = [30 if rng.random() < 0.5 else rng.choice(range(31, 37)) for _ in range(32)]

    def prompt(i: int) -> list[dict]:
        return chat(tenants[(i - 1) % len(tenants)], f"hot {i}")

    reset_all(engines, index, tokenizer, set(tenants))
    h0, q0 = hits_and_queries(engines)
    routed = LoadLoop(proxy.url, total=len(tenants), threads=4, seconds=240, extra={"max_tokens": 1},
                      prompt=prompt).start().join()
    h1, q1 = hits_and_queries(engines)
    kv = (h1 - h0) / (q1 - q0)
    reset_all(engines, index, tokenizer, set(tenants))
    h1, q1 = hits_and_queries(engines)
    order = list(engines.values())
    turn = iter(range(10**6))

    def direct(i: int) -> None:
        with openai.OpenAI(base_url=f"{order[next(turn) % len(order)].url}/v1", api_key="unused",
                           max_retries=0, timeout=120) as c:
            c.chat.completions.create(model=MODEL, messages=prompt(i), max_tokens=1)

    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(direct, range(1, len(tenants) + 1)))
    h2, q2 = hits_and_queries(engines)
    rr = (h2 - h1) / (q2 - q1)
    served = {e.name: sum(1 for _, address in routed.chosen if address == e.address) for e in engines.values()}
    print(f"\nreal vLLM hot tenant, 4 clients: hit rate kv-extproc {kv:.1%} ({served}), round-robin {rr:.1%}")
    assert len(routed.results) == len(tenants) and routed.failures() == []
    assert kv > rr
    assert 'kv_extproc_pod_engine_requests_waiting{pod="engine-0"}' in proc.metrics(), "engine queues are read"


def test_an_engine_killed_mid_traffic_loses_no_request_once_out_of_the_pool(engines, stack, index, tokenizer):
    _, proc, proxy = stack
    victim = list(engines.values())[-1]

    def load(total: int) -> LoadLoop:
        return LoadLoop(proxy.url, total=total, threads=2, seconds=120, extra={"max_tokens": 1},
                        prompt=lambda i: chat(20 + i % 4, f"load {i}"))

    during = load(100).start()
    during.wait_for(30)
    victim.proc.kill()  # the whole engine: API server, engine core and their threads
    killed_at = time.monotonic()
    during.join()
    time.sleep(max(0.0, killed_at + 3.0 - time.monotonic()))  # podHealth.unhealthyAfter plus checks
    after = load(80).start().join()
    assert len(after.results) == 80 and after.failures() == [], "once out of the pool, no request fails"
    assert f'kv_extproc_pod_healthy{{pod="{victim.name}"}} 0.0' in proc.metrics()
    wait_until(lambda: index.scard(f"matrix:kv:pod:{victim.name}") == 0, timeout=15, what="its entries purged")
