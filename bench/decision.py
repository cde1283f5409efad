"""In-process routing decision latency: parse -> tokenize -> hash -> lookup -> score -> answer.

One ~2k-token chat request (and 500 / 8k for scale), against the memory index and a real
local redis-server holding a full match, measured in one run.
"""

from __future__ import annotations

import asyncio
import json
import time

import uvloop

from extproc import scoring
from extproc.config import ScoringConfig
from extproc import responses
from extproc.sim import launcher
from extproc.blocks import block_keys
from extproc.config import IndexConfig, PodConfig
from extproc.index.memory import MemoryIndex
from extproc.index import Writes
from extproc.index.redis import RedisIndex
from extproc.indexer import Indexer
from extproc.metrics import Metrics
from extproc.pods import PodPool
from extproc.requests import parse
from extproc.routing import Router
from extproc.tokenization import TokenizerManager, load_tokenizer, tokenize_with

from .common import summary, text_of_tokens, write

MODEL = "Qwen/Qwen3-0.6B"
SIZES = (500, 2000, 8000)
ROUNDS = 300


async def _measure(router: Router, body: bytes, rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds + 20):
        t0 = time.perf_counter()
        decision = await router.route(parse("/v1/chat/completions", body))
        responses.body_route.__wrapped__("x-gateway-destination-endpoint", decision.pod.address)
        samples.append(time.perf_counter() - t0)
    return samples[20:]


async def run_async(rounds: int = ROUNDS) -> dict:
    tokenizer_dir = launcher.bundled_tokenizer_dir()
    tokenizer = load_tokenizer(tokenizer_dir)
    workdir = launcher.workdir("kv-extproc-bench-")
    redis_server = launcher.start_redis(workdir)
    pods = [PodConfig(id=f"pod-{i}", address=f"10.0.0.{i + 1}:8000") for i in range(8)]
    results: dict = {"model": MODEL, "rounds": rounds, "block_size": 128, "rows": []}
    try:
        indexes = {"memory": MemoryIndex(), "redis": RedisIndex.from_config(
            IndexConfig(backend="redis", redis_url=redis_server.url, timeout=1.0))}
        for size in SIZES:
            system = text_of_tokens(tokenizer, size, seed=size)
            body = json.dumps({"model": MODEL, "messages": [{"role": "system", "content": system},
                                                            {"role": "user", "content": "What next?"}]}).encode()
            tokens = tokenize_with(tokenizer, parse("/v1/chat/completions", body))
            keys = block_keys(tokens, 128, 128)
            for name, index in indexes.items():
                await index.apply("pod-3", Writes(stored={(MODEL, k): time.time() for k in keys}))
                tokenizers = TokenizerManager({MODEL: tokenizer_dir}, workers=2)
                await tokenizers.get(MODEL)
                router = Router(PodPool(pods), Indexer(tokenizers, index, block_size=128, max_blocks=128,
                                                       scheme="chained"), scoring.build(ScoringConfig()), Metrics(), decision_timeout=5.0)
                stats = summary(await _measure(router, body, rounds))
                tokenizers.close()
                row = {"prompt_tokens": len(tokens), "blocks": len(keys), "index": name, **stats}
                results["rows"].append(row)
                print(f"decision  {len(tokens):>6} tokens  {name:<6}  p50 {stats['p50_us']:>8.0f} us"
                      f"  p99 {stats['p99_us']:>8.0f} us")
        for index in indexes.values():
            await index.close()
    finally:
        redis_server.proc.stop()
    write("decision", results)
    return results


def run(rounds: int = ROUNDS) -> dict:
    return uvloop.run(run_async(rounds))


if __name__ == "__main__":
    run()
