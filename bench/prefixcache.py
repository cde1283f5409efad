"""Prefix cache: the in-process routing decision on a full hit, a partial hit, a miss, and
with the cache disabled, for chat prompts of about 1k, 4k and 16k tokens (a shared system
prompt, then a short user turn). Cases alternate within each round, against a real local
Redis holding the system prompt's blocks, so the ratios come from one run. Then a stream of
new turns alone ("turns"): the same partial hit without misses in between, then with the whole
index mirrored in-process ("turns_mirror", ``prefixStoreConfig.mirror``).
"""

from __future__ import annotations

import asyncio
import time

import uvloop

from extproc import scoring
from extproc.config import ScoringConfig
from extproc.sim import launcher
from extproc.config import IndexConfig, PodConfig
from extproc.index import Writes
from extproc.index.redis import RedisIndex
from extproc.indexer import Indexer
from extproc.metrics import Metrics
from extproc.pods import PodPool
from extproc.config import PrefixStoreConfig
from extproc.indexer import build_cache
from extproc.requests import RoutingRequest
from extproc.routing import Router
from extproc.tokenization import TokenizerManager, load_tokenizer, tokenize_with

from .common import Pace, summary, text_of_tokens, write

MODEL = "Qwen/Qwen3-0.6B"
SIZES = (1000, 4000, 16000)
ROUNDS = {1000: 200, 4000: 80, 16000: 30}
PODS = [PodConfig(id=f"pod-{i}", address=f"10.0.0.{i + 1}:8000") for i in range(8)]


def request(system: str, user: str) -> RoutingRequest:
    return RoutingRequest(model=MODEL, kind="chat", messages=[{"role": "system", "content": system},
                                                             {"role": "user", "content": user}])


FILL: list[float] = []


async def _timed(router: Router, req: RoutingRequest) -> float:
    """Decision latency; then waits out the cache fill it left for a worker (timed apart)."""
    t0 = time.perf_counter()
    await router.route(req)
    elapsed = time.perf_counter() - t0
    await router.indexer.tokenizers.settle()
    FILL.append(time.perf_counter() - t0 - elapsed)
    return elapsed


TURN_BATCH = 20
TURN_PAUSE_S = 0.05
STEADY_WITHIN = 10.0
"""Seconds a series of new turns may take to find its batches in the machine's steady pace."""


async def _turns(router: Router, system: str, count: int, pace: Pace) -> tuple[list[float], list[float]]:
    """Decision times of new questions after ``system``, in batches of TURN_BATCH with a pause
    between them (5 warm-up turns first): the first ``count`` as they came, and ``count`` from
    batches the machine ran at its steady pace (``pace`` timed just before and after the batch;
    for at most STEADY_WITHIN seconds). This machine has phases of tenths of a second in which
    the same Python runs 1.4x slower or worse, and a whole series can fall in one."""
    for i in range(5):
        await _timed(router, request(system, f"warm-up question {i}"))
    times: list[float] = []
    steady: list[float] = []
    deadline = time.monotonic() + STEADY_WITHIN
    i = 0
    while len(times) < count or (len(steady) < count and time.monotonic() < deadline):
        before = pace.now()
        batch = []
        for _ in range(TURN_BATCH):
            batch.append(await _timed(router, request(system, f"question {i} of a new conversation")))
            i += 1
        if pace.steady(max(before, pace.now())):
            steady += batch
        times += batch
        await asyncio.sleep(TURN_PAUSE_S)
    return times[:count], steady[:count]


async def run_async() -> dict:
    tokenizer_dir = launcher.bundled_tokenizer_dir()
    tokenizer = load_tokenizer(tokenizer_dir)
    workdir = launcher.workdir("kv-extproc-bench-")
    server = launcher.start_redis(workdir)
    index = RedisIndex.from_config(IndexConfig(backend="redis", redis_url=server.url, timeout=1.0))
    tokenizers = TokenizerManager({MODEL: tokenizer_dir}, workers=2)
    pace = Pace()
    for _ in range(50):  # the machine's fastest pace, to tell its slow phases by
        pace.now()
    await tokenizers.get(MODEL)
    rows = []
    try:
        for size in SIZES:
            system = text_of_tokens(tokenizer, size, seed=size)
            def router(cache):
                indexer = Indexer(tokenizers, index, block_size=128, max_blocks=128, scheme="chained", cache=cache)
                return Router(PodPool(PODS), indexer, scoring.build(ScoringConfig()), Metrics(), decision_timeout=10.0)
            plain = router(None)
            cached = router(build_cache(PrefixStoreConfig(), block_size=128, max_blocks=128, scheme="chained"))
            keys = plain.indexer.keys(tokenize_with(tokenizer, request(system, "warm")))
            await index.apply("pod-3", Writes(stored={(MODEL, k): time.time() for k in keys}))
            await _timed(cached, request(system, "repeat"))  # system prompt now in the prefix store
            samples: dict[str, list[float]] = {"hit": [], "partial": [], "miss": [], "disabled": []}
            fills = []
            for i in range(ROUNDS[size] + 5):
                fresh = request(f"Tenant {size}-{i}. " + system, "new tenant")  # differs from the first characters
                timings = {
                    "hit": await _timed(cached, request(system, "repeat")),
                    "partial": await _timed(cached, request(system, f"follow-up question number {i}")),
                    "miss": await _timed(cached, fresh),
                }
                fills.append(FILL[-1])
                timings["disabled"] = await _timed(plain, fresh)
                if i >= 5:
                    for case, seconds in timings.items():
                        samples[case].append(seconds)
            # A stream of new turns on their own (each after the last one's store fill): what a
            # tenant's traffic costs, without a 4k-token miss between them evicting the CPU caches.
            samples["turns"], samples["turns_steady"] = await _turns(cached, system, ROUNDS[size] * 2, pace)
            # The same with the whole index mirrored in-process (prefixStoreConfig.mirror): the
            # new text's block is answered here, not by Redis.
            mirrored = router(build_cache(PrefixStoreConfig(mirror=True), block_size=128, max_blocks=128,
                                          scheme="chained"))
            await index.subscribe(mirrored.indexer.on_invalidation)
            assert await mirrored.indexer.load_mirror()
            await _timed(mirrored, request(system, "repeat"))
            samples["turns_mirror"], samples["turns_mirror_steady"] = await _turns(mirrored, system, ROUNDS[size] * 2,
                                                                                   pace)
            stats = {case: summary(values) for case, values in samples.items() if values}
            tokens = len(tokenize_with(tokenizer, request(system, "repeat")))
            row = {"prompt_tokens": tokens, **{f"{case}_{k}": v for case, s in stats.items() for k, v in s.items()
                                                if k in ("p50_us", "p99_us")}}
            row["miss_fill_background_p50_us"] = summary(fills[5:])["p50_us"]
            row["miss_over_hit"] = stats["miss"]["p50_us"] / stats["hit"]["p50_us"]
            row["miss_over_disabled"] = stats["miss"]["p50_us"] / stats["disabled"]["p50_us"]
            rows.append(row)
            print(f"prefix    {tokens:>6} tokens  hit {stats['hit']['p50_us']:>7.0f} us  partial "
                  f"{stats['partial']['p50_us']:>7.0f} us  miss {stats['miss']['p50_us']:>7.0f} us  disabled "
                  f"{stats['disabled']['p50_us']:>7.0f} us  (p50)   miss/hit {row['miss_over_hit']:.1f}x  "
                  f"miss/disabled {row['miss_over_disabled']:.3f}  (miss also fills the store in the "
                  f"background: {row['miss_fill_background_p50_us']:.0f} us)  new turns in a row "
                  f"{stats['turns']['p50_us']:.0f} us (index mirrored: {stats['turns_mirror']['p50_us']:.0f} us); at the "
                  f"machine's steady pace {_p50(stats, 'turns_steady')} ({_p50(stats, 'turns_mirror_steady')})")
    finally:
        tokenizers.close()
        await index.close()
        server.proc.stop()
    result = {"model": MODEL, "block_size": 128, "index": "redis", "rows": rows,
              "targets": {"miss_over_hit_at_4k": 10.0, "miss_over_disabled_max": 1.03}}
    write("prefixcache", result)
    return result


def _p50(stats: dict, case: str) -> str:
    found = stats.get(case)
    return f"{found['p50_us']:.0f} us ({found['n']} turns)" if found else "not reached"


def run() -> dict:
    return uvloop.run(run_async())


if __name__ == "__main__":
    run()
