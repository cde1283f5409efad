"""Cache-aware routing through the real Envoy, with the real tokenizer and a real Redis.

Every test runs in both body modes (BUFFERED and FULL_DUPLEX_STREAMED) through the
shipped Envoy configs; requests are sent with the official openai client.
"""

from __future__ import annotations

import hashlib
import json
import random
import re

import httpx
import openai
import pytest

from extproc.sim import launcher
from tests.conftest import MODEL
from tests.integration.conftest import BODY_LIMIT, MODE_IDS, MODES, served_by, stack, wait_until

pytestmark = pytest.mark.integration


def system_prompt(seed: int, words: int = 700) -> str:
    rng = random.Random(seed)
    vocab = ["cache", "prefix", "router", "engine", "token", "block", "policy", "tenant", "latency", "queue",
             "the", "of", "answers", "carefully", "with", "sources", "never", "invent", "facts", "and"]
    return f"Tenant {seed} instructions. " + " ".join(rng.choice(vocab) for _ in range(words))


def chat(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def shared_prefix_keys(cache, system: str, users: list[str]) -> list[int]:
    """Keys of the blocks every one of these conversations shares."""
    key_lists = [cache.keys(cache.chat_tokens(chat(system, u))) for u in users]
    shared = []
    for column in zip(*key_lists):
        if len(set(column)) != 1:
            break
        shared.append(column[0])
    return shared


def ask(client: openai.OpenAI, system: str, user: str, **kw) -> str:
    return served_by(client.chat.completions.create(model=MODEL, messages=chat(system, user), **kw))


def test_a_long_shared_system_prompt_lands_on_the_pod_holding_it(client, cache):
    system = system_prompt(1)
    users = ["What is a KV cache?", "Summarise the policy.", "Give me three facts about engines, please.", "hi"]
    keys = shared_prefix_keys(cache, system, users)
    assert len(keys) >= 8, "the system prompt should span many blocks"
    cache.store("pod-b", keys)
    assert [ask(client, system, u) for u in users] == ["pod-b"] * len(users)


def test_a_longer_match_beats_a_shorter_one(client, cache):
    system = system_prompt(2)
    keys = cache.keys(cache.chat_tokens(chat(system, "question")))
    cache.store("pod-b", keys[:2])
    cache.store("pod-c", keys[:5])
    cache.store("pod-a", keys[1:9])  # not from the first block: worth nothing
    assert ask(client, system, "question") == "pod-c"


def test_without_any_match_requests_spread_over_all_pods(client, cache):
    served = {ask(client, system_prompt(100 + i, words=50), "hello") for i in range(6)}
    assert served == {"pod-a", "pod-b", "pod-c"}


def test_completions_route_by_prompt_text_and_by_token_ids(client, cache, tokenizer):
    prompt = system_prompt(3)
    tokens = tokenizer(prompt)["input_ids"]
    cache.store("pod-a", cache.keys(tokens))
    text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1).choices[0].text
    by_ids = client.completions.create(model=MODEL, prompt=tokens, max_tokens=1).choices[0].text
    as_list = client.completions.create(model=MODEL, prompt=[prompt, "other"], max_tokens=1).choices[0].text
    assert (text, by_ids, as_list) == ("pod-a", "pod-a", "pod-a")


def test_the_chosen_pod_is_also_set_as_envoy_lb_dynamic_metadata(http, pods):
    reply = http.post("/v1/completions", json={"model": MODEL, "prompt": "metadata check"})
    assert reply.status_code == 200
    assert reply.headers["x-test-lb-metadata"] == pods[reply.headers["x-served-by"]].address


def test_a_client_supplied_routing_header_is_ignored(client, cache, pods):
    system = system_prompt(4)
    cache.store("pod-b", cache.keys(cache.chat_tokens(chat(system, "q"))))
    spoof = {"x-gateway-destination-endpoint": pods["pod-c"].address}
    assert ask(client, system, "q", extra_headers=spoof) == "pod-b"
    # A header naming a host we never route to cannot redirect the request there either.
    nowhere = {"x-gateway-destination-endpoint": "127.0.0.1:9"}
    assert ask(client, system_prompt(5, words=30), "q", extra_headers=nowhere) in pods
    assert pods["pod-b"].received[-1].headers["x-gateway-destination-endpoint"] == pods["pod-b"].address


def test_bodies_reach_the_pod_byte_for_byte(http, pods):
    raw = ('{ "model" : "%s",\n  "messages": [{"role":"user","content":"caf\\u00e9 \u2603 %s"}],'
           '  "temperature": 0.25 }' % (MODEL, "x" * 3000)).encode()
    reply = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 200
    assert reply.headers["x-body-sha256"] == hashlib.sha256(raw).hexdigest()
    pod = pods[reply.headers["x-served-by"]]
    assert pod.received[-1].body == raw


def test_large_bodies_are_forwarded_whole(http):
    raw = json.dumps({"model": MODEL, "prompt": "word " * 150_000}).encode()  # ~750 KB, > one 62 KB chunk
    reply = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 200
    assert reply.headers["x-body-sha256"] == hashlib.sha256(raw).hexdigest()


def test_other_endpoints_pass_through_with_default_routing(http, pods):
    reply = http.get("/v1/models")
    assert reply.status_code == 200
    assert reply.json()["data"][0]["id"] == MODEL
    assert reply.headers["x-served-by"] in pods


def test_malformed_json_is_a_400_json_error_from_envoy(http, pods):
    before = sum(p.count() for p in pods.values())
    reply = http.post("/v1/chat/completions", content=b'{"model": "m", "messages": [', headers={"content-type": "application/json"})
    assert reply.status_code == 400
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and "not valid JSON" in error["message"]
    assert sum(p.count() for p in pods.values()) == before, "a rejected request must not reach a pod"


def test_missing_messages_is_a_400_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[])
    assert err.value.status_code == 400
    assert err.value.body["param"] == "messages"


def test_a_body_over_the_limit_is_a_413_json_error(http):
    raw = json.dumps({"model": MODEL, "prompt": "x" * (BODY_LIMIT + 10)}).encode()
    reply = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "request_too_large"


def test_a_model_no_pod_serves_is_a_404_model_not_found(client, http, pods, extproc):
    """The endpoint-picker protocol's answer: the client's mistake, said at once (no pod is tried)."""
    before = sum(p.count() for p in pods.values())
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="not-configured", prompt="hello", max_tokens=1)
    assert err.value.status_code == 404 and err.value.body["code"] == "model_not_found"
    reply = http.post("/v1/chat/completions", json={"model": "not-configured", "messages": [{"role": "user", "content": "x"}]})
    assert reply.status_code == 404 and reply.headers["content-type"] == "application/json"
    assert sum(p.count() for p in pods.values()) == before
    assert re.search(r'kv_extproc_requests_total\{outcome="rejected"\} [1-9]', extproc.metrics())


def test_routing_outcomes_are_counted(client, cache, extproc):
    system = system_prompt(6)
    cache.store("pod-a", cache.keys(cache.chat_tokens(chat(system, "q"))))
    before = _counter(extproc.metrics(), 'kv_extproc_requests_total{outcome="cache"}')
    assert ask(client, system, "q") == "pod-a"
    assert _counter(extproc.metrics(), 'kv_extproc_requests_total{outcome="cache"}') == before + 1


def _counter(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_redis_stopped_mid_test_requests_still_succeed(mode, workdir, pods, tokenizer_dir, tokenizer):
    with stack(workdir, pods, tokenizer_dir, mode) as (server, proc, proxy):
        import redis as redis_py

        from extproc.blocks import block_keys

        system = system_prompt(7)
        r = redis_py.Redis.from_url(server.url)
        messages = chat(system, "q")
        tokens = list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])
        for key in block_keys(tokens, 64, 128):
            r.hset(f"matrix:kv:block:{MODEL}@{key}", "pod-c", "1700000000")
        r.close()
        with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0, timeout=20) as client:
            assert served_by(client.chat.completions.create(model=MODEL, messages=messages)) == "pod-c"
            server.proc.kill()
            # The exact prompt seen before is still routed by the block owners this replica knows.
            assert served_by(client.chat.completions.create(model=MODEL, messages=messages)) == "pod-c"
            # New user turns after it: the new blocks need the index, which is gone; the known
            # system prompt still decides, and the outage is counted.
            turns = [served_by(client.chat.completions.create(model=MODEL, messages=chat(system, f"new {i}")))
                     for i in range(4)]
            # Prompts nothing is known of are spread by load.
            served = [served_by(client.chat.completions.create(model=MODEL, messages=chat(system_prompt(100 + i), "q")))
                      for i in range(6)]
        assert turns == ["pod-c"] * 4
        assert len(served) == 6 and set(served) <= set(pods)
        assert len(set(served)) > 1, "without the index the requests are spread by load"
        metrics = proc.metrics()
        assert _counter(metrics, 'kv_extproc_fallbacks_total{reason="index"}') >= 6
        assert _counter(metrics, "kv_extproc_index_errors_total") >= 6


def test_a_redis_slower_than_the_index_timeout_does_not_hold_requests(workdir, pods, tokenizer_dir):
    with stack(workdir, pods, tokenizer_dir) as (server, proc, proxy):
        import redis as redis_py

        admin = redis_py.Redis.from_url(server.url)
        with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0, timeout=20) as client:
            admin.execute_command("CLIENT", "PAUSE", "3000", "ALL")  # every Redis reply now waits 3 s
            system = system_prompt(8)
            served = [served_by(client.chat.completions.create(model=MODEL, messages=chat(system, f"q{i}"))) for i in range(3)]
        admin.close()
        assert set(served) <= set(pods)
        assert _counter(proc.metrics(), 'kv_extproc_fallbacks_total{reason="index"}') >= 3


def test_a_missing_tokenizer_does_not_lose_requests(workdir, pods, tokenizer_dir, tmp_path):
    server = launcher.start_redis(workdir)
    from tests.integration.conftest import envoy_for, extproc_config

    conf = extproc_config(server.url, pods, tokenizer_dir)
    conf["models"] = [{"name": MODEL, "tokenizer": str(tmp_path / "no-such-tokenizer")}]
    proc = launcher.start_extproc(conf, workdir, wait_ready=False)
    proxy = envoy_for("envoy.yaml", [proc.listen], pods, workdir)
    try:
        with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0, timeout=20) as client:
            # While the load is being tried (importing transformers takes seconds), requests
            # wait up to decisionTimeout and go by load (reason "timeout").
            early = served_by(client.chat.completions.create(model=MODEL, messages=chat("s", "q")))
            wait_until(lambda: "cannot load tokenizer" in proc.proc.log(), 30, "the tokenizer load to fail")
            before = _counter(proc.metrics(), 'kv_extproc_fallbacks_total{reason="tokenizer"}')
            # Once it has failed, requests fall back at once, for the tokenizer.
            served = [served_by(client.chat.completions.create(model=MODEL, messages=chat("s", f"q{i}"))) for i in range(3)]
        assert set(served + [early]) <= set(pods)
        metrics = proc.metrics()
        assert _counter(metrics, 'kv_extproc_requests_total{outcome="fallback"}') == 4
        assert _counter(metrics, 'kv_extproc_fallbacks_total{reason="tokenizer"}') == before + 3
    finally:
        proxy.proc.stop()
        proc.proc.stop()
        server.proc.stop()


def test_a_repeated_prompt_is_a_prefix_cache_hit_and_the_cache_is_in_metrics(client, cache, extproc, envoy):
    system = f"Proxy {envoy.listen}. " + system_prompt(9)  # one prompt per body mode: kv-extproc is shared
    cache.store("pod-b", cache.keys(cache.chat_tokens(chat(system, "same question"))))
    hits = _counter(extproc.metrics(), 'kv_extproc_prefix_cache_lookups_total{outcome="hit"}')
    assert ask(client, system, "same question") == "pod-b"
    assert ask(client, system, "same question") == "pod-b"
    metrics = extproc.metrics()
    assert _counter(metrics, 'kv_extproc_prefix_cache_lookups_total{outcome="hit"}') == hits + 1
    assert _counter(metrics, "kv_extproc_prefix_cache_entries") > 0
    assert _counter(metrics, "kv_extproc_prefix_cache_memory_bytes") > 0
