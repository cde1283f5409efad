"""Remote tokenization: token ids from an engine's /tokenize, against a real HTTP server that speaks
vLLM 0.32's request and response shapes with the real Qwen3 tokenizer and chat template
(tests/harness/vllm_tokenize.py). Bounds (timeout, per-pod concurrency, circuit breaker), the
choice of pod, the whole-request cache and the routing fallback, each observed on the wire."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from types import SimpleNamespace

import pytest

from extproc import config as config_mod
from extproc import scoring
from extproc.__main__ import ConfigWatcher, _awaited_tokenizers
from extproc.config import ConfigError, PodConfig, PrefixStoreConfig, ScoringConfig, from_dict
from extproc.index import Writes
from extproc.index.memory import MemoryIndex
from extproc.indexer import Indexer, build_cache
from extproc.metrics import Metrics
from extproc.pods import PodPool
from extproc.remotetok import RemoteTokenizer, RemoteTokenizerMetrics, RemoteTokenizerUnavailable, tokenize_body
from extproc.requests import RoutingRequest, parse
from extproc.routing import Router
from extproc.sim import launcher
from extproc.tokenization import TokenizerManager, TokenizerUnavailable, tokenize_with
from tests.harness.vllm_tokenize import TokenizeServer

MODEL = "Qwen/Qwen3-0.6B"
BLOCK = 16
TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "the time now",
                                           "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}]


@pytest.fixture()
def servers(tokenizer):
    started = [TokenizeServer(tokenizer, MODEL).start() for _ in range(2)]
    yield started
    for server in started:
        server.stop()


def pool_of(*servers, models=(MODEL,)) -> PodPool:
    return PodPool([PodConfig(id=f"pod-{i}", address=s.address, models=list(models)) for i, s in enumerate(servers)],
                   [MODEL])


def remote(pool: PodPool, **kw) -> RemoteTokenizer:
    return RemoteTokenizer(pool, **{"timeout": 2.0, **kw})


def chat(*turns: str, **kw) -> RoutingRequest:
    messages = [{"role": "system", "content": "You are terse."}] + [{"role": "user", "content": t} for t in turns]
    return RoutingRequest(model=MODEL, kind="chat", messages=messages, **kw)


def calls(metrics: RemoteTokenizerMetrics, result: str) -> float:
    return metrics.calls.labels(result)._value.get()


# -- shapes and tokens ------------------------------------------------------------------------


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "What is a KV cache?"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "what time is it?"}], "tools": TOOLS}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "chat_template_kwargs": {"enable_thinking": False}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}],
                              "continue_final_message": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "part one"},
                                                                       {"type": "text", "text": "part two"}]}]}),
    ("/v1/completions", {"prompt": "The quick brown fox jumps over the lazy dog."}),
], ids=["chat", "tools", "template-kwargs", "continue-final", "content-parts", "completion"])
async def test_remote_tokens_equal_the_local_tokenization_and_only_vllm_fields_are_sent(servers, tokenizer, path, body):
    request = parse(path, __import__("json").dumps({"model": MODEL, **body}).encode())
    client = remote(pool_of(servers[0]))
    tokens = await client.tokenize(request)
    assert tokens == tokenize_with(tokenizer, request)
    sent = servers[0].requests[-1]
    assert servers[0].ignored[-1] == set(), "every field we send is one vLLM's TokenizeRequest reads"
    if request.kind == "chat":
        assert sent["add_special_tokens"] is False and sent["messages"] == request.messages
        assert sent.get("tools") == body.get("tools")
        assert sent.get("chat_template_kwargs") == body.get("chat_template_kwargs")
        assert not (sent["add_generation_prompt"] and sent["continue_final_message"]), "vLLM refuses both"
    else:
        assert sent == {"model": MODEL, "prompt": body["prompt"], "add_special_tokens": True}
    await client.close()


async def test_one_keep_alive_connection_serves_sequential_calls_and_chunked_answers(servers, tokenizer):
    client = remote(pool_of(servers[0]))
    request = chat("hello")
    for _ in range(5):
        await client.tokenize(request)
    servers[0].chunked = True
    assert await client.tokenize(request) == tokenize_with(tokenizer, request)
    assert servers[0].connections == 1
    await client.close()


async def test_a_connection_the_server_closed_while_idle_is_replaced(tokenizer):
    server = TokenizeServer(tokenizer, MODEL, keepalive_timeout=0.2).start()
    try:
        client = remote(pool_of(server))
        await client.tokenize(chat("one"))
        await asyncio.sleep(0.5)  # the server closes the idle connection
        assert await client.tokenize(chat("two")) == tokenize_with(tokenizer, chat("two"))
        assert server.connections == 2
        assert calls(client.metrics, "error") == 0, "a closed idle connection is no failure of the pod"
        await client.close()
    finally:
        server.stop()


async def test_a_reused_connection_found_closed_is_retried_once_on_a_fresh_one(tokenizer, monkeypatch):
    server = TokenizeServer(tokenizer, MODEL, keepalive_timeout=0.1).start()
    try:
        client = remote(pool_of(server))
        await client.tokenize(chat("one"))
        await asyncio.sleep(0.3)  # closed by the server; the client takes it for usable (a FIN still on its way)
        monkeypatch.setattr("extproc.remotetok._Connection.usable", lambda self, now: True)
        assert await client.tokenize(chat("two")) == tokenize_with(tokenizer, chat("two"))
        assert server.connections == 2 and calls(client.metrics, "error") == 0
        await client.close()
    finally:
        server.stop()


# -- bounds -----------------------------------------------------------------------------------


async def test_a_slow_engine_times_out_within_the_budget(servers):
    servers[0].delay = 1.0
    client = remote(pool_of(servers[0]), timeout=0.1)
    started = time.perf_counter()
    with pytest.raises(RemoteTokenizerUnavailable, match="did not tokenize within 100 ms"):
        await client.tokenize(chat("slow"))
    assert time.perf_counter() - started < 0.3
    assert calls(client.metrics, "timeout") == 1


async def test_calls_per_pod_are_bounded_and_the_excess_falls_back_at_once(servers):
    servers[0].delay = 0.4
    client = remote(pool_of(servers[0]), max_in_flight_per_pod=2)
    results = await asyncio.gather(*(client.tokenize(chat(f"q{i}")) for i in range(2)),
                                   _timed(client.tokenize(chat("third"))), return_exceptions=True)
    assert isinstance(results[0], list) and isinstance(results[1], list)
    error, elapsed = results[2]
    assert isinstance(error, RemoteTokenizerUnavailable) and "already has 2 tokenize calls in flight" in str(error)
    assert elapsed < 0.1, "no queueing behind a busy engine"
    assert servers[0].max_in_flight == 2
    assert calls(client.metrics, "busy") == 1


async def _timed(coro):
    started = time.perf_counter()
    try:
        await coro
        return None, time.perf_counter() - started
    except Exception as exc:  # noqa: BLE001 - returned for the test to judge
        return exc, time.perf_counter() - started


async def test_the_breaker_opens_after_failures_in_a_row_and_one_trial_closes_it(servers):
    servers[0].status = 500
    client = remote(pool_of(servers[0]), attempts=1, breaker_failures=3, breaker_open_for=0.3)
    for _ in range(3):
        with pytest.raises(RemoteTokenizerUnavailable, match="answered 500"):
            await client.tokenize(chat("x"))
    assert client.open_breakers() == 1
    seen = servers[0].connections, len(servers[0].requests)
    with pytest.raises(RemoteTokenizerUnavailable, match="circuit breakers open"):
        await client.tokenize(chat("x"))
    assert (servers[0].connections, len(servers[0].requests)) == seen, "an open breaker sends nothing"
    assert calls(client.metrics, "open") == 1
    await asyncio.sleep(0.35)
    servers[0].status, servers[0].delay = None, 0.2
    trial = asyncio.ensure_future(client.tokenize(chat("trial")))
    await asyncio.sleep(0.05)
    with pytest.raises(RemoteTokenizerUnavailable, match="circuit breakers open"):
        await client.tokenize(chat("during the trial"))  # half-open: one trial at a time
    assert isinstance(await trial, list)
    assert client.open_breakers() == 0
    servers[0].delay = 0
    await client.tokenize(chat("closed again"))


async def test_a_refused_request_is_no_pod_failure(servers):
    client = remote(pool_of(servers[0]), breaker_failures=1)
    bad = RoutingRequest(model="not-served", kind="completion", prompt="x")
    client.pool = PodPool([PodConfig(id="pod-0", address=servers[0].address)], [])
    with pytest.raises(RemoteTokenizerUnavailable, match="answered 404: The model `not-served` does not exist"):
        await client.tokenize(bad)
    assert client.open_breakers() == 0 and calls(client.metrics, "refused") == 1
    assert await client.tokenize(RoutingRequest(model=MODEL, kind="completion", prompt="fine"))


async def test_an_answer_that_is_not_vllms_shape_is_an_error(servers):
    servers[0].bad_answer = True
    client = remote(pool_of(servers[0]), attempts=1)
    with pytest.raises(RemoteTokenizerUnavailable, match="not a /tokenize answer"):
        await client.tokenize(chat("x"))
    assert calls(client.metrics, "error") == 1


# -- which pod ----------------------------------------------------------------------------------


async def test_the_least_loaded_healthy_pod_serving_the_model_tokenizes(servers, tokenizer):
    other = TokenizeServer(tokenizer, MODEL).start()
    try:
        pool = PodPool([PodConfig(id="busy", address=servers[0].address, models=[MODEL]),
                        PodConfig(id="idle", address=servers[1].address, models=[MODEL]),
                        PodConfig(id="elsewhere", address=other.address, models=["other-model"])], [MODEL, "other-model"])
        pool.get("busy").in_flight = 3
        client = remote(pool)
        for _ in range(4):
            await client.tokenize(chat("q"))
        assert (len(servers[0].requests), len(servers[1].requests), len(other.requests)) == (0, 4, 0)
        pool.get("idle").healthy = False
        await client.tokenize(chat("q"))
        assert len(servers[0].requests) == 1, "an unhealthy pod is never asked"
        pool.get("busy").healthy = False
        with pytest.raises(RemoteTokenizerUnavailable, match="no healthy pod serves"):
            await client.tokenize(chat("q"))
        assert calls(client.metrics, "no_pod") == 1
    finally:
        other.stop()


async def test_a_pod_that_refuses_connections_is_skipped_for_the_next(servers):
    dead = f"127.0.0.1:{launcher.free_port()}"
    pool = PodPool([PodConfig(id="dead", address=dead, models=[MODEL]),
                    PodConfig(id="live", address=servers[0].address, models=[MODEL])], [MODEL])
    pool.get("live").in_flight = 1  # the dead pod looks least loaded
    client = remote(pool)
    assert await client.tokenize(chat("q"))
    assert calls(client.metrics, "error") == 1 and len(servers[0].requests) == 1


# -- routing ------------------------------------------------------------------------------------


def router_for(pool: PodPool, tokenizers: TokenizerManager, index: MemoryIndex, client: RemoteTokenizer, *,
               cache: bool = True) -> Router:
    indexer = Indexer(tokenizers, index, block_size=BLOCK, max_blocks=64, scheme="chained", remote=client,
                      cache=build_cache(PrefixStoreConfig(), block_size=BLOCK, max_blocks=64, scheme="chained")
                      if cache else None, max_prompt_tokens=4000)
    return Router(pool, indexer, scoring.build(ScoringConfig()), Metrics(), decision_timeout=5)


def fallbacks(router: Router, reason: str) -> float:
    return router.metrics.fallbacks.labels(reason)._value.get()


async def store_on(index: MemoryIndex, router: Router, pod: str, tokens: list[int]) -> None:
    await index.apply(pod, Writes(stored={(MODEL, key): time.time() for key in router.indexer.keys(tokens)}))


async def test_a_remote_model_is_routed_by_cache_and_a_repeat_needs_no_remote_call(servers, tokenizer):
    pool = pool_of(*servers)
    index = MemoryIndex()
    tokenizers = TokenizerManager({MODEL: "remote"})
    router = router_for(pool, tokenizers, index, remote(pool))
    request = chat("a long shared question " * 20)
    await store_on(index, router, "pod-1", tokenize_with(tokenizer, request))
    for _ in range(3):
        decision = await router.route(request)
        assert decision.pod.id == "pod-1" and decision.by_cache
    assert len(servers[0].requests) + len(servers[1].requests) == 1, "repeats come from the whole-request cache"
    assert router.metrics.cache_lookups.labels("hit")._value.get() == 2
    assert not tokenizers.loaded(MODEL)
    # A different request (tools change the rendering) is a new remote call.
    await router.route(chat("a long shared question " * 20, tools=TOOLS))
    assert len(servers[0].requests) + len(servers[1].requests) == 2
    tokenizers.close()


async def test_without_the_cache_every_request_asks_an_engine(servers, tokenizer):
    pool = pool_of(servers[0])
    index = MemoryIndex()
    router = router_for(pool, TokenizerManager({MODEL: "remote"}), index, remote(pool), cache=False)
    request = chat("no cache " * 20)
    await store_on(index, router, "pod-0", tokenize_with(tokenizer, request))
    for _ in range(3):
        assert (await router.route(request)).by_cache
    assert len(servers[0].requests) == 3


async def test_every_remote_failure_routes_by_load_counted_as_remote_tokenizer(servers):
    pool = pool_of(*servers)
    client = remote(pool, timeout=0.1, attempts=1, breaker_failures=2, breaker_open_for=30)
    router = router_for(pool, TokenizerManager({MODEL: "remote"}), MemoryIndex(), client)
    for server in servers:
        server.status = 503
    picked = [await router.route(chat(f"failing {i}")) for i in range(6)]  # errors, then open breakers
    assert all(d is not None and not d.by_cache for d in picked)
    assert fallbacks(router, "remote_tokenizer") == 6
    assert calls(client.metrics, "error") == 4 and calls(client.metrics, "open") == 2


async def test_a_remote_prompt_over_max_prompt_tokens_goes_by_load(servers):
    pool = pool_of(servers[0])
    router = router_for(pool, TokenizerManager({MODEL: "remote"}), MemoryIndex(), remote(pool))
    long = RoutingRequest(model=MODEL, kind="completion", prompt="word " * 5000)
    for _ in range(2):
        await router.route(long)
    assert fallbacks(router, "prompt_too_long") == 2
    assert len(servers[0].requests) == 1, "the count is cached with the keys"


async def test_token_ids_need_no_tokenizer_at_all(servers):
    pool = pool_of(servers[0])
    index = MemoryIndex()
    router = router_for(pool, TokenizerManager({MODEL: "remote"}), index, remote(pool))
    ids = list(range(100, 100 + 4 * BLOCK))
    await store_on(index, router, "pod-0", ids)
    decision = await router.route(RoutingRequest(model=MODEL, kind="completion", token_ids=ids))
    assert decision.by_cache and servers[0].requests == []


async def test_remote_fallback_covers_a_missing_local_tokenizer_only_when_enabled(servers, tokenizer, tmp_path):
    pool = pool_of(servers[0])
    request = chat("fallback question " * 20)
    for fallback in (False, True):
        index = MemoryIndex()
        tokenizers = TokenizerManager({MODEL: str(tmp_path / "missing")})
        router = router_for(pool, tokenizers, index, remote(pool, fallback=fallback))
        await store_on(index, router, "pod-0", tokenize_with(tokenizer, request))
        decision = await router.route(request)
        if fallback:
            assert decision.by_cache and len(servers[0].requests) == 1
        else:
            assert not decision.by_cache and fallbacks(router, "tokenizer") == 1 and not servers[0].requests
        tokenizers.close()


async def test_with_remote_fallback_the_local_tokenizer_takes_over_once_loaded(servers, tokenizer, tokenizer_dir):
    pool = pool_of(servers[0])
    index = MemoryIndex()
    tokenizers = TokenizerManager({MODEL: tokenizer_dir})
    router = router_for(pool, tokenizers, index, remote(pool, fallback=True))
    request = chat("takeover " * 20)
    await store_on(index, router, "pod-0", tokenize_with(tokenizer, request))
    assert (await router.route(request)).by_cache  # remote while the local one loads
    assert len(servers[0].requests) == 1
    await tokenizers.get(MODEL)
    for i in range(3):
        assert (await router.route(chat("takeover " * 20, chat_template_kwargs={"n": i}))).pod.id == "pod-0"
    assert len(servers[0].requests) == 1, "loaded: tokenized locally"
    tokenizers.close()


# -- config -------------------------------------------------------------------------------------


def test_config_takes_tokenizer_remote_and_bounds_the_remote_timeout_by_the_decision():
    config = from_dict({"models": [{"name": MODEL, "tokenizer": "remote"}, {"name": "b", "tokenizer": "/t"}],
                        "tokenization": {"remoteFallback": True, "remote": {"timeout": "80ms", "maxInFlightPerPod": 2}}})
    assert [m.remote for m in config.models] == [True, False]
    assert config.tokenization.remote_fallback and config.tokenization.remote.max_in_flight_per_pod == 2
    remote_model = [{"name": MODEL, "tokenizer": "remote"}]
    with pytest.raises(ConfigError, match=r"tokenization.remote.timeout \(300ms\) must be below decisionTimeout \(300ms\)"):
        from_dict({"models": remote_model, "tokenization": {"remote": {"timeout": "300ms"}}})
    with pytest.raises(ConfigError, match=r"remote.timeout \(150ms\) must be below decisionTimeout \(100ms\)"):
        from_dict({"decisionTimeout": "100ms", "tokenization": {"remoteFallback": True}})
    # No model asks an engine: a decisionTimeout below the default remote timeout stays valid.
    assert from_dict({"decisionTimeout": "100ms", "models": [{"name": MODEL, "tokenizer": "/t"}]}).decision_timeout == 0.1
    with pytest.raises(ConfigError, match=r"breakerFailures must be greater than 0.*\$.tokenization.remote"):
        from_dict({"tokenization": {"remote": {"breakerFailures": 0}}})


def test_the_tokenize_body_resolves_the_generation_flags_as_vllm_accepts_them():
    body = tokenize_body(chat("x", continue_final_message=True))
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False


def test_a_reload_can_turn_a_model_remote_and_back():
    tokenizers = TokenizerManager({MODEL: "/models/qwen"})
    assert not tokenizers.use_remote(MODEL, fallback=False)
    tokenizers.set_sources({MODEL: "remote"})
    assert tokenizers.use_remote(MODEL, fallback=False)
    with pytest.raises(TokenizerUnavailable, match="tokenized by its engines"):
        asyncio.run(tokenizers.get(MODEL))
    tokenizers.set_sources({MODEL: "/models/qwen"})
    assert not tokenizers.use_remote(MODEL, fallback=False)
    tokenizers.close()


async def test_a_reload_that_makes_a_model_remote_must_fit_the_running_remote_timeout(tmp_path, caplog):
    path = tmp_path / "kv.json"
    base = {"pods": [{"id": "pod-a", "address": "10.0.0.1:8000"}], "decisionTimeout": "100ms",
            "models": [{"name": MODEL, "tokenizer": "/t"}]}

    def write(**changes) -> None:
        path.write_text(json.dumps({**base, **changes}))

    write()
    process = SimpleNamespace(config=config_mod.load(path), applied=[])

    async def apply(new) -> None:
        process.applied.append(new)
        process.config = new

    watcher = ConfigWatcher(str(path), SimpleNamespace(reload=asyncio.Event()), lambda: process.config, apply)
    remote_model = [{"name": MODEL, "tokenizer": "remote"}]
    with caplog.at_level(logging.ERROR):
        write(models=remote_model)  # the default remote timeout (150 ms) does not fit 100 ms
        await watcher.reload()
        # remote.timeout needs a restart: the running 150 ms stays, so 50 ms in the file does not help.
        write(models=remote_model, tokenization={"remote": {"timeout": "50ms"}})
        await watcher.reload()
    assert process.applied == [] and not process.config.models[0].remote
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all("must be below decisionTimeout (100ms)" in e for e in errors)
    write(models=remote_model, decisionTimeout="300ms")  # a budget the running remote timeout fits
    await watcher.reload()
    assert process.config.models[0].remote and process.config.decision_timeout == 0.3


def test_readiness_waits_for_no_remote_tokenizer_and_with_remote_fallback_for_none():
    models = [{"name": "remote-model", "tokenizer": "remote"}, {"name": "local-model", "tokenizer": "/t"}]
    assert _awaited_tokenizers(from_dict({"models": models})) == ["local-model"]
    assert _awaited_tokenizers(from_dict({"models": models, "tokenization": {"remoteFallback": True}})) == []
