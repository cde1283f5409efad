"""``tokenizer: remote`` end to end without vLLM: ``kv-extproc serve`` (no tokenizer files for the
model), Redis and the real Envoy in front of two pods that answer /tokenize as vLLM 0.32 does
(tests/harness/vllm_tokenize.py) and serve completions. The real-vLLM suite repeats the routing
claim against real engines."""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from extproc.sim import launcher
from tests.conftest import MODEL
from tests.harness.vllm_tokenize import TokenizeServer
from tests.integration.conftest import BLOCK_SIZE, Cache, envoy_for, wait_until


@pytest.fixture(scope="module")
def fleet(workdir, tokenizer):
    pods = {f"tok-{i}": TokenizeServer(tokenizer, MODEL, host=f"127.0.0.{40 + i}", name=f"tok-{i}").start()
            for i in range(2)}
    for name, pod in pods.items():
        pod.pod_id = name
    server = launcher.start_redis(workdir)
    config = {
        "index": {"backend": "redis", "redisUrl": server.url, "timeout": "100ms"},
        "blockSizeToHash": BLOCK_SIZE,
        "models": [{"name": MODEL, "tokenizer": "remote"}],
        "tokenization": {"remote": {"timeout": "150ms", "breakerFailures": 2, "breakerOpenFor": "1s"}},
        "pods": [{"id": name, "address": pod.address, "models": [MODEL]} for name, pod in pods.items()],
        "podHealth": {"interval": "200ms"},
        "endpointPicker": {"fallbackEndpoints": 1},
    }
    proc = launcher.start_extproc(config, workdir)  # SERVING with no tokenizer loaded: the model is remote
    proxy = envoy_for("envoy.yaml", [proc.listen], pods, workdir)
    try:
        yield pods, server, proc, proxy
    finally:
        proxy.proc.stop()
        proc.proc.stop()
        server.proc.stop()
        for pod in pods.values():
            pod.stop()


def metric(proc, line: str) -> float:
    found = [row for row in proc.metrics().splitlines() if row.startswith(line + " ")]
    return float(found[0].split()[-1]) if found else 0.0


def chat(tenant: str, question: str) -> list[dict]:
    return [{"role": "system", "content": f"Tenant {tenant}. " + "Keep every answer short and exact. " * 30},
            {"role": "user", "content": question}]


def test_a_remote_model_is_routed_by_cache_through_envoy(fleet, tokenizer):
    pods, server, proc, proxy = fleet
    r = redis.Redis.from_url(server.url)
    cache = Cache(r, tokenizer)
    keys = cache.keys(cache.chat_tokens(chat("a", "q")))
    assert len(keys) >= 3
    cache.store("tok-1", keys)
    asked = lambda: sum(len(p.requests) for p in pods.values())  # noqa: E731
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        served = []
        for i in range(3):
            reply = http.post("/v1/chat/completions", json={"model": MODEL, "messages": chat("a", "q")})
            assert reply.status_code == 200
            served.append((reply.json()["choices"][0]["message"]["content"], reply.headers["x-test-lb-metadata"]))
    assert [s[0] for s in served] == ["tok-1"] * 3
    assert all(s[1].startswith(pods["tok-1"].address) for s in served), "kv-extproc chose it, Envoy sent it there"
    assert asked() == 1, "the repeats were answered from the whole-request cache"
    assert metric(proc, 'kv_extproc_requests_total{outcome="cache"}') >= 3
    r.close()


def test_engines_that_fail_to_tokenize_cost_no_request(fleet):
    pods, _, proc, proxy = fleet
    before = metric(proc, 'kv_extproc_fallbacks_total{reason="remote_tokenizer"}')
    for pod in pods.values():
        pod.status = 500
    try:
        with httpx.Client(base_url=proxy.url, timeout=10) as http:
            codes = [http.post("/v1/chat/completions",
                               json={"model": MODEL, "messages": chat("b", f"new question {i}")}).status_code
                     for i in range(8)]
    finally:
        for pod in pods.values():
            pod.status = None
    assert codes == [200] * 8
    assert metric(proc, 'kv_extproc_fallbacks_total{reason="remote_tokenizer"}') == before + 8
    # Errors opened both breakers (2 failures each): the last requests were not even sent.
    assert metric(proc, 'kv_extproc_remote_tokenize_total{result="open"}') >= 4
    time.sleep(1.1)  # breakerOpenFor: a trial call closes them again
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        assert http.post("/v1/chat/completions", json={"model": MODEL, "messages": chat("b", "later")}).status_code == 200
    wait_until(lambda: metric(proc, "kv_extproc_remote_tokenizer_open_breakers") < 2, timeout=5,
               what="a trial call closed a breaker")
    assert any(p.requests[-1]["messages"][-1]["content"] == "later" for p in pods.values())
