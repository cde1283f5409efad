"""End to end: fake pods keep a prefix cache and publish real KV events; kv-extproc ingests
them (``ingest.enabled`` inside serve) into Redis and routes through the real Envoy."""

from __future__ import annotations

import re
import time
import urllib.request

import openai
import pytest
import redis

from extproc.sim import launcher
from extproc.blocks import block_keys
from extproc.sim.engine import EngineCache, KVEventPublisher
from tests.conftest import MODEL
from tests.integration.conftest import BLOCK_SIZE, KEY_PREFIX, event_fleet, served_by, wait_until

pytestmark = pytest.mark.integration

ENGINE_CAPACITY = 300  # engine blocks of 16 tokens per pod: room for about four long prompts


@pytest.fixture(scope="module")
def fleet(workdir, tokenizer, tokenizer_dir):
    with event_fleet(workdir, tokenizer, tokenizer_dir, capacity_blocks=ENGINE_CAPACITY) as parts:
        yield parts


def system_prompt(tenant: int) -> str:
    return f"Tenant {tenant} handbook. " + " ".join(f"Section {i}: follow procedure {tenant}-{i} exactly." for i in range(90))


def messages(tenant: int, user: str) -> list[dict]:
    return [{"role": "system", "content": system_prompt(tenant)}, {"role": "user", "content": user}]


def first_block_holders(r: redis.Redis, tokenizer, tenant: int) -> set[str]:
    tokens = tokenizer.apply_chat_template(messages(tenant, "x"), tokenize=True, add_generation_prompt=True)["input_ids"]
    key = block_keys(list(tokens), BLOCK_SIZE, 1)[0]
    return {k.decode() for k in r.hkeys(f"{KEY_PREFIX}{MODEL}@{key}")}




def counter(proc, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", proc.metrics(), re.M)
    return float(match.group(1)) if match else 0.0


def test_requests_follow_the_cache_their_pods_report_and_spread_after_a_clear(fleet, tokenizer):
    server, pods, proc, proxy = fleet
    r = redis.Redis.from_url(server.url)
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0, timeout=20) as client:
        first = served_by(client.chat.completions.create(model=MODEL, messages=messages(1, "first question")))
        wait_until(lambda: first_block_holders(r, tokenizer, 1) == {first}, what="the pod's KV events indexed")
        later = [served_by(client.chat.completions.create(model=MODEL, messages=messages(1, f"question {i}")))
                 for i in range(5)]
        assert later == [first] * 5
        assert pods[first].received[-1].headers["x-gateway-destination-endpoint"] == pods[first].address

        load_before = counter(proc, 'kv_extproc_requests_total{outcome="load"}')
        with urllib.request.urlopen(urllib.request.Request(
                f"http://{pods[first].address}/reset_prefix_cache", data=b"", method="POST"), timeout=5):
            pass
        wait_until(lambda: first_block_holders(r, tokenizer, 1) == set(), what="AllBlocksCleared indexed")
        after = served_by(client.chat.completions.create(model=MODEL, messages=messages(1, "after the clear")))
        assert counter(proc, 'kv_extproc_requests_total{outcome="load"}') == load_before + 1, \
            "with the cache gone the request is routed by load, not pinned to the old pod"
        wait_until(lambda: first_block_holders(r, tokenizer, 1) == {after}, what="new holder indexed")
        assert served_by(client.chat.completions.create(model=MODEL, messages=messages(1, "again"))) == after
    r.close()


def test_evicted_blocks_stop_attracting_their_prefix(fleet, tokenizer):
    server, pods, proc, proxy = fleet
    r = redis.Redis.from_url(server.url)
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0, timeout=20) as client:
        holder = served_by(client.chat.completions.create(model=MODEL, messages=messages(2, "q")))
        wait_until(lambda: holder in first_block_holders(r, tokenizer, 2), what="indexed")
        # Other tenants' long prompts, sent to the same pod directly, push tenant 2 out of its LRU.
        direct = openai.OpenAI(base_url=f"http://{pods[holder].address}/v1", api_key="x", max_retries=0)
        for tenant in range(10, 16):
            direct.chat.completions.create(model=MODEL, messages=messages(tenant, "fill"))
        wait_until(lambda: holder not in first_block_holders(r, tokenizer, 2), what="BlockRemoved indexed")
    assert counter(proc, 'kv_extproc_kv_events_total{type="BlockRemoved"}') >= 1
    r.close()


def test_two_ingest_processes_side_by_side_keep_one_true_index(workdir, tokenizer, tokenizer_dir, redis_server, index):
    """``kv-extproc ingest`` runs on its own; two at once write the same truth."""
    publisher = KVEventPublisher("tcp://127.0.0.1:*")
    conf = {
        "index": {"backend": "redis", "redisUrl": redis_server.url},
        "blockSizeToHash": BLOCK_SIZE,
        "models": [{"name": MODEL, "tokenizer": tokenizer_dir}],
        "pods": [{"id": "pod-a", "address": "127.0.0.9:8000", "kvEvents": publisher.endpoint}],
    }
    ingesters = [launcher.start_extproc(conf, workdir, command="ingest") for _ in range(2)]
    try:
        engine = EngineCache(block_size=16)
        tokens = list(tokenizer.apply_chat_template(messages(3, "q"), tokenize=True, add_generation_prompt=True)["input_ids"])
        key = block_keys(tokens, BLOCK_SIZE, 1)[0]
        stored = f"{KEY_PREFIX}{MODEL}@{key}"

        def both_connected():
            publisher.publish([])
            return all(_seen(i) for i in ingesters)

        wait_until(both_connected, what="both ingesters subscribed")
        publisher.publish(engine.admit(tokens)[1])
        wait_until(lambda: index.hexists(stored, "pod-a"), what="stored")
        wait_until(lambda: all(counter(i, 'kv_extproc_kv_events_total{type="BlockStored"}') == 1 for i in ingesters),
                   what="both applied it")
        publisher.publish(engine.clear())
        wait_until(lambda: all(counter(i, 'kv_extproc_kv_events_total{type="AllBlocksCleared"}') == 1 for i in ingesters),
                   what="both cleared")
        assert not index.hexists(stored, "pod-a")
        assert index.smembers("matrix:kv:pod:pod-a") == set()
    finally:
        for ingester in ingesters:
            ingester.proc.stop()
        publisher.close()


def _seen(ingester) -> bool:
    """The ingester applied at least one batch (its lag histogram has a sample)."""
    return counter(ingester, "kv_extproc_kv_event_lag_seconds_count") > 0


def test_metrics_appear_and_move(fleet, tokenizer):
    server, pods, proc, proxy = fleet
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0, timeout=20) as client:
        for i in range(3):
            client.chat.completions.create(model=MODEL, messages=messages(4, f"metrics {i}"))
    text = proc.metrics()
    moved = [
        'kv_extproc_requests_total{outcome="cache"}',
        'kv_extproc_stage_seconds_count{stage="parse"}',
        'kv_extproc_stage_seconds_count{stage="tokenize"}',
        'kv_extproc_stage_seconds_count{stage="lookup"}',
        'kv_extproc_stage_seconds_count{stage="score"}',
        'kv_extproc_stage_seconds_count{stage="decision"}',
        "kv_extproc_matched_prefix_ratio_count",
        'kv_extproc_prefix_cache_lookups_total{outcome="partial"}',
        "kv_extproc_prefix_cache_entries",
        'kv_extproc_kv_events_total{type="BlockStored"}',
        "kv_extproc_router_blocks_written_total",
        "kv_extproc_kv_event_lag_seconds_count",
        "kv_extproc_pods",
    ]
    for name in moved:
        assert counter(proc, name) > 0, f"{name} did not move"
    for family in ("kv_extproc_fallbacks_total", "kv_extproc_index_errors_total", "kv_extproc_kv_event_decode_errors_total",
                   "kv_extproc_kv_event_sequence_gaps_total", "kv_extproc_pod_purges_total",
                   'kv_extproc_pod_index_age_seconds{pod="pod-a"}', 'kv_extproc_pod_in_flight_requests{pod="pod-a"}'):
        assert family.split("{")[0] in text, f"{family} is not exported"
