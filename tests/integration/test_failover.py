"""When kv-extproc or an engine dies or restarts: nothing lost, nothing stale, nothing spoofed.

Real Envoy (the shipped configs), real Redis, bounded load loops on loopback.
"""

from __future__ import annotations

import collections
import json
import time

import httpx
import pytest
import redis

from extproc.sim import launcher
from extproc.blocks import block_keys
from tests.conftest import MODEL
from tests.integration.conftest import (
    BLOCK_SIZE,
    KEY_PREFIX,
    LoadLoop,
    envoy_for,
    event_fleet,
    extproc_config,
    wait_until,
)

pytestmark = pytest.mark.integration

SYSTEM = "You are the tenant-7 assistant. " + " ".join(f"Rule {i}: always cite document {i}." for i in range(80))


def tenant_messages(i: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"question {i}"}]


def store_tenant(r: redis.Redis, tokenizer, pod: str) -> None:
    tokens = list(tokenizer.apply_chat_template(tenant_messages(0), tokenize=True, add_generation_prompt=True)["input_ids"])
    shared = len(tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}], tokenize=True)["input_ids"])
    for key in block_keys(tokens[:shared], BLOCK_SIZE, 128):
        r.hset(f"{KEY_PREFIX}{MODEL}@{key}", pod, str(time.time()))


def metric(proc, name: str) -> float:
    for line in proc.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0




FAIL_OPEN = ["envoy.yaml", "envoy-original-dst.yaml"]


@pytest.mark.parametrize("name", FAIL_OPEN)
def test_kv_extproc_killed_mid_loop_loses_no_request_and_cache_routing_resumes(name, workdir, pods, tokenizer,
                                                                              tokenizer_dir, redis_server, index):
    store_tenant(index, tokenizer, "pod-b")
    conf = extproc_config(redis_server.url, pods, tokenizer_dir,
                          endpointPicker={"fallbackEndpoints": launcher.paired_fallback_endpoints(name)})
    proc = launcher.start_extproc(conf, workdir)
    proxy = envoy_for(name, [proc.listen], pods, workdir)
    try:
        loop = LoadLoop(proxy.url, total=300, threads=4, prompt=tenant_messages).start()
        loop.wait_for(60)
        proc.proc.kill()  # no goodbye: SIGKILL
        loop.join()
        assert len(loop.results) == 300 and loop.failures() == []
        served = collections.Counter(s for _, _, s in loop.results)
        assert served["pod-b"] >= 60 and len(served) > 1, "by cache before the kill, by Envoy's pool after"

        back = launcher.start_extproc({**conf, "listen": proc.listen, "metricsListen": proc.config["metricsListen"]},
                                      workdir)
        try:
            time.sleep(1.5)  # Envoy's health check (1 s interval) sees the replica again
            with httpx.Client(base_url=proxy.url, timeout=20) as client:
                again = [client.post("/v1/chat/completions", json={"model": MODEL, "messages": tenant_messages(i)})
                         for i in range(10)]
            assert [r.headers["x-served-by"] for r in again] == ["pod-b"] * 10
            assert metric(back, 'kv_extproc_requests_total{outcome="cache"}') == 10
        finally:
            back.proc.stop()
    finally:
        proxy.proc.stop()
        proc.proc.stop()


def test_full_duplex_mode_does_not_fail_open_on_this_envoy(workdir, pods, tokenizer_dir, redis_server):
    """Envoy 1.40 ignores failure_mode_allow once a full-duplex body is in flight (GAIE #1266):
    this is why BUFFERED is the default. If this starts failing, Envoy fixed it: update the README."""
    proc = launcher.start_extproc(extproc_config(redis_server.url, pods, tokenizer_dir), workdir)
    proxy = envoy_for("envoy-full-duplex.yaml", [proc.listen], pods, workdir)
    try:
        loop = LoadLoop(proxy.url, total=200, threads=4).start()
        loop.wait_for(40)
        proc.proc.kill()
        loop.join()
        assert len(loop.failures()) > 0, "full duplex failed open: Envoy changed, revisit the default"
        assert {status for _, status, _ in loop.failures()} <= {500, 502, 503, 504}
    finally:
        proxy.proc.stop()
        proc.proc.stop()


@pytest.mark.parametrize("name", FAIL_OPEN)
def test_a_spoofed_routing_header_with_kv_extproc_down_does_not_pick_the_upstream(name, workdir, pods, tokenizer_dir,
                                                                                 redis_server):
    proc = launcher.start_extproc(extproc_config(redis_server.url, pods, tokenizer_dir), workdir)
    proxy = envoy_for(name, [proc.listen], pods, workdir)
    try:
        proc.proc.kill()
        with httpx.Client(base_url=proxy.url, timeout=20) as client:
            nowhere = [client.post("/v1/completions", json={"model": MODEL, "prompt": "x"},
                                   headers={"x-gateway-destination-endpoint": "127.0.0.1:9"}) for _ in range(6)]
            pinned = [client.post("/v1/completions", json={"model": MODEL, "prompt": "x"},
                                  headers={"x-gateway-destination-endpoint": pods["pod-c"].address}) for _ in range(9)]
        assert [r.status_code for r in nowhere + pinned] == [200] * 15, "a header naming nowhere changes nothing"
        assert len({r.headers["x-served-by"] for r in pinned}) > 1, "Envoy's own pool chose, not the client"
    finally:
        proxy.proc.stop()
        proc.proc.stop()


def test_one_of_two_replicas_killed_under_load_loses_no_request(workdir, pods, tokenizer, tokenizer_dir,
                                                               redis_server, index):
    store_tenant(index, tokenizer, "pod-a")
    # The cache decides alone (the seed's scorer): these pods answer at once, so their load is
    # noise, and what is judged is that the surviving replica still routes by the index.
    replicas = [launcher.start_extproc(extproc_config(redis_server.url, pods, tokenizer_dir, shutdownDelay="1.5s",
                                                      scoring={"scorers": [{"type": "prefix"}]}),
                                       workdir) for _ in range(2)]
    proxy = envoy_for("envoy.yaml", [r.listen for r in replicas], pods, workdir)
    try:
        loop = LoadLoop(proxy.url, total=400, threads=4, prompt=tenant_messages).start()
        loop.wait_for(80)
        replicas[0].proc.kill()
        loop.join()
        assert len(loop.results) == 400 and loop.failures() == []
        late = [served for _, _, served in loop.results[-150:]]
        assert late.count("pod-a") == len(late), "the surviving replica keeps routing by cache"
        assert metric(replicas[1], 'kv_extproc_requests_total{outcome="cache"}') > 0
    finally:
        proxy.proc.stop()
        for r in replicas:
            r.proc.stop()


def test_an_engine_restarting_its_sequence_at_zero_is_no_longer_routed_to_for_what_it_lost(workdir, tokenizer,
                                                                                         tokenizer_dir):
    with event_fleet(workdir, tokenizer, tokenizer_dir, hosts_from=8) as (server, pods, proc, proxy):
        r = redis.Redis.from_url(server.url)
        tokens = list(tokenizer.apply_chat_template(tenant_messages(0), tokenize=True, add_generation_prompt=True)["input_ids"])
        first_key = f"{KEY_PREFIX}{MODEL}@{block_keys(tokens, BLOCK_SIZE, 1)[0]}"
        with httpx.Client(base_url=proxy.url, timeout=20) as client:
            def ask(i):
                return client.post("/v1/chat/completions", json={"model": MODEL, "messages": tenant_messages(i)})
            holder = ask(0).headers["x-served-by"]
            wait_until(lambda: r.hexists(first_key, holder), what="indexed")
            assert ask(1).headers["x-served-by"] == holder
            # The engine crashes and comes back empty: no AllBlocksCleared, its sequence restarts at 0.
            engine = pods[holder].engine
            engine.cache.blocks.clear()
            engine.publisher.restart()
            direct = httpx.post(f"http://{pods[holder].address}/v1/completions",
                                json={"model": MODEL, "prompt": "warm-up after the restart " * 20}, timeout=10)
            assert direct.status_code == 200
            wait_until(lambda: not r.hexists(first_key, holder), what="old entries dropped")
            load_before = metric(proc, 'kv_extproc_requests_total{outcome="load"}')
            assert ask(2).status_code == 200
            assert metric(proc, 'kv_extproc_requests_total{outcome="load"}') == load_before + 1, \
                "not routed by a cache the engine no longer has"
        assert metric(proc, 'kv_extproc_pod_purges_total{reason="restart"}') >= 1
        r.close()


def test_a_silent_dead_pod_gets_no_request_after_the_configured_time(workdir, tokenizer, tokenizer_dir):
    health = {"interval": "200ms", "timeout": "200ms", "unhealthyAfter": "600ms", "purgeAfter": "1s"}
    with event_fleet(workdir, tokenizer, tokenizer_dir, hosts_from=11, podHealth=health) as (server, pods, proc, proxy):
        r = redis.Redis.from_url(server.url)
        tokens = list(tokenizer.apply_chat_template(tenant_messages(0), tokenize=True, add_generation_prompt=True)["input_ids"])
        first_key = f"{KEY_PREFIX}{MODEL}@{block_keys(tokens, BLOCK_SIZE, 1)[0]}"
        with httpx.Client(base_url=proxy.url, timeout=20) as client:
            holder = client.post("/v1/chat/completions", json={"model": MODEL, "messages": tenant_messages(0)}).headers["x-served-by"]
            wait_until(lambda: r.hexists(first_key, holder), what="indexed")
            pods[holder].stop()  # stops answering and stops publishing, without a word
            time.sleep(1.0)  # unhealthyAfter plus a check interval
            replies = [client.post("/v1/chat/completions", json={"model": MODEL, "messages": tenant_messages(i)})
                       for i in range(1, 20)]
        assert [x.status_code for x in replies] == [200] * 19
        assert holder not in {x.headers["x-served-by"] for x in replies}
        wait_until(lambda: not r.hexists(first_key, holder), timeout=5, what="its entries purged")
        assert f'kv_extproc_pod_healthy{{pod="{holder}"}} 0.0' in proc.metrics()
        r.close()
