"""``tokenizer: remote`` against real vLLM engines: the token ids their /tokenize returns key the
same blocks the engine reports storing (its own BlockStored events), and a model with no tokenizer
files in the router is routed by cache through the real Envoy, judged by vLLM's own counters."""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request

import openai
import pytest
import redis
import zmq

from extproc.blocks import block_keys
from extproc.config import PodConfig
from extproc.events.decode import BlockStored, decode_frames
from extproc.pods import PodPool
from extproc.remotetok import RemoteTokenizer
from extproc.requests import parse
from tests.integration.conftest import KEY_PREFIX, stack as integration_stack, wait_until
from tests.realvllm.conftest import ENGINE_BLOCK, MODEL

pytestmark = pytest.mark.realvllm
ROUTER_BLOCK = 64
TOOLS = [{"type": "function", "function": {"name": "lookup_invoice", "description": "Find an invoice by number",
                                           "parameters": {"type": "object",
                                                          "properties": {"number": {"type": "string"}}}}}]


def system_prompt(seed: int) -> str:
    rng = random.Random(seed)
    words = "ledger invoice tenant clause shipment record policy route answer audit".split()
    return f"Tenant {seed} handbook. " + " ".join(rng.choice(words) for _ in range(400))


def chat(seed: int, question: str) -> list[dict]:
    return [{"role": "system", "content": system_prompt(seed)}, {"role": "user", "content": question}]


def live(engines) -> dict:
    """Engines still running (an earlier test kills one on purpose)."""
    return {name: e for name, e in engines.items() if e.proc.alive()}


def engine_tokens(engine, body: dict) -> list[int]:
    """The engine's own /tokenize, as the remote tokenizer asks it (for the test's expectations)."""
    request = urllib.request.Request(f"{engine.url}/tokenize", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.load(reply)["tokens"]


@pytest.fixture(scope="module")
def remote_stack(workdir, engines, tokenizer_dir):
    """kv-extproc with the model's tokenizer: remote (no tokenizer files for it), its ingester, Redis
    and Envoy, in front of the live engines."""
    with integration_stack(workdir, live(engines), tokenizer_dir, models=[{"name": MODEL, "tokenizer": "remote"}],
                           ingest={"enabled": True, "engineBlockSize": ENGINE_BLOCK},
                           tokenization={"remote": {"timeout": "250ms"}}, decisionTimeout="400ms",
                           podHealth={"interval": "500ms", "timeout": "2s", "unhealthyAfter": "1.5s"}) as parts:
        yield parts


def test_remote_tokens_key_the_blocks_the_engine_reports_storing(engines):
    engine = next(iter(live(engines).values()))
    body = {"model": MODEL, "messages": chat(random.randrange(10**9), "Which clause covers late shipments?"),
            "tools": TOOLS, "chat_template_kwargs": {"enable_thinking": False}}
    request = parse("/v1/chat/completions", json.dumps(body).encode())
    client = RemoteTokenizer(PodPool([PodConfig(id=engine.name, address=engine.address, models=[MODEL])], [MODEL]),
                             timeout=10.0)
    remote = asyncio.run(_tokenize(client, request))
    assert len(remote) > 4 * ROUTER_BLOCK

    context = zmq.Context.instance()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(engine.kv_events)
    try:
        time.sleep(1.0)  # the subscription reaches the publisher before the request runs
        with openai.OpenAI(base_url=f"{engine.url}/v1", api_key="unused", max_retries=0, timeout=60) as direct:
            direct.chat.completions.create(model=MODEL, max_tokens=1, messages=body["messages"], tools=body["tools"],
                                           tool_choice="none",  # "auto" needs --enable-auto-tool-choice
                                           extra_body={"chat_template_kwargs": body["chat_template_kwargs"]})
        stored = _stored_chain(sub, covering=len(remote) // ENGINE_BLOCK * ENGINE_BLOCK)
    finally:
        sub.close(linger=0)
    assert stored == remote[:len(stored)], "the engine cached exactly the tokens its /tokenize returned"
    ours = block_keys(remote, ROUTER_BLOCK, 128)
    theirs = block_keys(stored, ROUTER_BLOCK, 128)
    assert len(ours) == len(remote) // ROUTER_BLOCK and ours == theirs


async def _tokenize(client: RemoteTokenizer, request) -> list[int]:
    try:
        return await client.tokenize(request)
    finally:
        await client.close()


def _stored_chain(sub, *, covering: int, timeout: float = 20.0) -> list[int]:
    """Token ids of the BlockStored chain that starts at the prompt start (parent None), in order,
    once it covers ``covering`` tokens."""
    tokens: list[int] = []
    last = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(tokens) < covering:
        if not sub.poll(200):
            continue
        message = decode_frames(sub.recv_multipart(), block_size=ENGINE_BLOCK)
        for event in message.batch.events:
            if not isinstance(event, BlockStored):
                continue
            if (not tokens and event.parent_block_hash is None) or (tokens and event.parent_block_hash == last):
                tokens += event.token_ids
                last = event.block_hashes[-1]
    assert len(tokens) >= covering, f"BlockStored events covered {len(tokens)} of {covering} prompt tokens"
    return tokens


def test_a_remote_model_is_routed_by_cache_through_envoy(engines, remote_stack):
    server, proc, proxy = remote_stack
    by_address = {e.address: e for e in live(engines).values()}
    r = redis.Redis.from_url(server.url)
    seed = random.randrange(10**9)
    prefix = engine_tokens(next(iter(by_address.values())),
                           {"model": MODEL, "messages": chat(seed, "x"), "add_generation_prompt": True})
    first_key = block_keys(prefix, ROUTER_BLOCK, 1)[0]

    def ask(client, question: str) -> str:
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=chat(seed, question),
                                                               max_tokens=1)
        return raw.headers.get("x-test-lb-metadata", "").split(",")[0]

    def metric(line: str) -> float:
        rows = [row for row in proc.metrics().splitlines() if row.startswith(line + " ")]
        return float(rows[0].split()[-1]) if rows else 0.0

    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        first = ask(client, "first question")
        engine = by_address[first]
        wait_until(lambda: {k.decode() for k in r.hkeys(f"{KEY_PREFIX}{MODEL}@{first_key}")} == {engine.name},
                   timeout=20, what="its KV events indexed")
        hits_before = engine.counter("vllm:prefix_cache_hits_total")
        cache_before, ok_before = metric('kv_extproc_requests_total{outcome="cache"}'), \
            metric('kv_extproc_remote_tokenize_total{result="ok"}')
        later = [ask(client, f"question number {i}") for i in range(4)]
        assert later == [first] * 4, "every follow-up went to the engine holding the system prompt"
        assert engine.counter("vllm:prefix_cache_hits_total") - hits_before >= 4 * 384, "the engine reports the hits"
        assert metric('kv_extproc_requests_total{outcome="cache"}') - cache_before == 4
        assert metric('kv_extproc_remote_tokenize_total{result="ok"}') - ok_before == 4, "one engine call per new prompt"
        assert ask(client, "question number 3") == first
        assert metric('kv_extproc_remote_tokenize_total{result="ok"}') - ok_before == 4, "a repeat needs none"
    assert metric('kv_extproc_fallbacks_total{reason="remote_tokenizer"}') == 0
    r.close()
