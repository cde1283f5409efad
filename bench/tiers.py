"""Fleet simulator, offloading tier: what tier awareness buys, and what a CPU block is worth.

The fleet of bench/fleet.py (8 pods, simulated time, the real Router, Indexer, tokenizer,
prefix cache and ingester fed by real vLLM KV events over ZMQ), with engines that also keep
blocks in CPU memory (sim.engine.OffloadingEngineCache: every block of a prompt is written to a
CPU LRU, the events name the medium, as vLLM's OffloadingConnector with
self_describing_kv_events). A prompt's run continues from the GPU into CPU memory; those blocks
are loaded back, at LOAD tokens/s, instead of computed at PREFILL tokens/s.

Policies: least-loaded; kv-extproc weighing only GPU blocks (``tiers.mediumWeights: {GPU: 1}``,
tier-unaware: a block only in CPU memory is no presence); kv-extproc with CPU blocks weighted
0.5, 0.8, 0.9 and 1.0. Each at two reload speeds (5x and 2x the prefill rate, so a reloaded
block costs 20% or 50% of computing it) and two arrival rates.

Two ways of deciding: ``prefix`` (the shipped prefix scorer alone: a prefix stays on the pods
that hold it) and ``spill`` (the same, but a request whose chosen pod already has SPILL
requests outstanding goes to the least-loaded pod instead, a stand-in for load-aware scoring:
prefixes then spread, and a pod holding a long run in CPU memory competes with one holding a
shorter run on its GPU, which is where the CPU weight decides).

``python -m bench.tiers`` writes bench/results/tiers.json.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field

import uvloop

from extproc import config as config_mod
from extproc import scoring
from extproc.config import PodConfig, ScoringConfig
from extproc.events.ingest import Ingester
from extproc.index.memory import MemoryIndex
from extproc.indexer import Indexer, build_cache
from extproc.metrics import Metrics
from extproc.pods import PodPool
from extproc.requests import RoutingRequest
from extproc.routing import Router
from extproc.sim.engine import KVEventPublisher, OffloadingEngineCache
from extproc.tokenization import TokenizerManager, load_tokenizer, tokenize_with

from .common import write
from .fleet import DECODE_S, MODEL, PODS, PREFILL_TOKENS_PER_S, capacity, workload

GPU_BLOCKS = 160
"""16-token blocks per pod on the GPU: 2.5k tokens, under two of the long prompts."""
CPU_BLOCKS = 600
"""Under four times as many in CPU memory: about six long prompts per pod, a third of the
tenants (the fleet holds them all only if each prompt stays on few pods)."""
LOADS = {"reload-5x": 5 * PREFILL_TOKENS_PER_S, "reload-2x": 2 * PREFILL_TOKENS_PER_S}
RATES = {"busy": 0.7, "overload": 1.2}
POLICIES: dict[str, dict[str, float] | None] = {
    "least-loaded": None,
    "gpu-only": {"GPU": 1.0},
    "cpu-0.5": {"GPU": 1.0, "CPU": 0.5},
    "cpu-0.8": {"GPU": 1.0, "CPU": 0.8},
    "cpu-0.9": {"GPU": 1.0, "CPU": 0.9},
    "cpu-1.0": {"GPU": 1.0, "CPU": 1.0},
}
WORKLOADS = ("tenants", "conversations", "skewed")
MODES = ("prefix", "spill")
SPILL = 3


@dataclass
class SimPod:
    id: str
    cache: OffloadingEngineCache
    publisher: KVEventPublisher | None
    busy_until: float = 0.0
    finishing: list[float] = field(default_factory=list)

    def outstanding(self, now: float) -> int:
        self.finishing = [t for t in self.finishing if t > now]
        return len(self.finishing)


@dataclass
class Outcome:
    prompt_tokens: int = 0
    gpu_tokens: int = 0
    cpu_tokens: int = 0
    ttft: list[float] = field(default_factory=list)


async def _applied(ingester: Ingester, pod: SimPod) -> None:
    feed = ingester.feeds[pod.id]
    target = pod.publisher.seq - 1
    deadline = time.monotonic() + 5
    while (feed.last_seq is None or feed.last_seq < target) and time.monotonic() < deadline:
        await asyncio.sleep(0.0002)
    async with ingester.sequencer.lock(pod.id):
        pass


async def simulate(weights: dict[str, float] | None, requests: list[list[dict]], tokens: list[list[int]],
                   rate: float, load_tokens_per_s: float, tokenizer_dir: str, seed: int = 11,
                   mode: str = "prefix") -> Outcome:
    rng = random.Random(seed)
    kv = weights is not None
    pods = [SimPod(f"pod-{i}", OffloadingEngineCache(GPU_BLOCKS, 16, seed=i, cpu_blocks=CPU_BLOCKS),
                   KVEventPublisher("tcp://127.0.0.1:*") if kv else None) for i in range(PODS)]
    by_id = {p.id: p for p in pods}
    pool = PodPool([PodConfig(id=p.id, address=f"10.0.0.{i + 1}:8000") for i, p in enumerate(pods)])
    outcome = Outcome()
    ingester = router = tokenizers = None
    if kv:
        conf = config_mod.from_dict({
            "index": {"backend": "memory"}, "models": [{"name": MODEL}],
            "pods": [{"id": p.id, "address": f"10.0.0.{i + 1}:8000", "kvEvents": p.publisher.endpoint}
                     for i, p in enumerate(pods)],
        })
        index = MemoryIndex()
        ingester = Ingester(index, conf, Metrics())
        await ingester.start()
        for pod in pods:
            while ingester.feeds[pod.id].last_seq is None:
                pod.publisher.publish([])
                await asyncio.sleep(0.01)
        tokenizers = TokenizerManager({MODEL: tokenizer_dir})
        cache = build_cache(conf.prefix_store_config, block_size=conf.block_size_to_hash,
                            max_blocks=conf.max_blocks_to_match, scheme="chained")
        indexer = Indexer(tokenizers, index, block_size=conf.block_size_to_hash, max_blocks=conf.max_blocks_to_match,
                          scheme="chained", cache=cache, medium_weights=weights)
        await index.subscribe(indexer.on_invalidation)
        router = Router(pool, indexer, scoring.build(ScoringConfig()), Metrics(), decision_timeout=10.0)
    now, turn = 0.0, 0
    try:
        for messages, prompt in zip(requests, tokens):
            now += rng.expovariate(rate)
            if router is None:
                fewest = min(p.outstanding(now) for p in pods)
                tied = [p for p in pods if p.outstanding(now) == fewest]
                pod, turn = tied[turn % len(tied)], turn + 1
            else:
                for p in pool.all():
                    p.in_flight = by_id[p.id].outstanding(now)
                decision = await router.route(RoutingRequest(model=MODEL, kind="chat", messages=messages))
                pod = by_id[decision.pod.id]
                if mode == "spill" and pod.outstanding(now) >= SPILL:
                    fewest = min(p.outstanding(now) for p in pods)
                    tied = [p for p in pods if p.outstanding(now) == fewest]
                    pod, turn = tied[turn % len(tied)], turn + 1
            gpu, cpu, events = pod.cache.admit_tiered(prompt)
            if pod.publisher is not None and events:
                pod.publisher.publish(events)
                await _applied(ingester, pod)
            start = max(now, pod.busy_until)
            prefill = (len(prompt) - gpu - cpu) / PREFILL_TOKENS_PER_S + cpu / load_tokens_per_s
            pod.busy_until = start + prefill + DECODE_S
            pod.finishing.append(pod.busy_until)
            outcome.ttft.append(start - now + prefill)
            outcome.prompt_tokens += len(prompt)
            outcome.gpu_tokens += gpu
            outcome.cpu_tokens += cpu
        if tokenizers is not None:
            await tokenizers.settle()
    finally:
        if ingester is not None:
            await ingester.stop()
        if tokenizers is not None:
            tokenizers.close()
        for pod in pods:
            if pod.publisher is not None:
                pod.publisher.close()
    return outcome


async def run_async(workloads=WORKLOADS, loads=tuple(LOADS), rates=tuple(RATES), modes=MODES) -> dict:
    from extproc.sim import launcher

    tokenizer_dir = launcher.bundled_tokenizer_dir()
    tokenizer = load_tokenizer(tokenizer_dir)
    rows = []
    for name in workloads:
        requests = workload(name)
        tokens = [tokenize_with(tokenizer, RoutingRequest(model=MODEL, kind="chat", messages=m)) for m in requests]
        base = capacity(tokens)
        for mode, load, rate in ((m, lo, r) for m in modes for lo in loads for r in rates):
                for policy, weights in POLICIES.items():
                    if mode == "spill" and weights is None:
                        continue  # least-loaded does not change
                    out = await simulate(weights, requests, tokens, base * RATES[rate], LOADS[load], tokenizer_dir,
                                         mode=mode)
                    ttft = sorted(out.ttft)
                    row = {"workload": name, "mode": mode, "reload": load, "rate": rate, "policy": policy,
                           "gpu_hit": out.gpu_tokens / out.prompt_tokens, "cpu_hit": out.cpu_tokens / out.prompt_tokens,
                           "ttft_mean_ms": statistics.fmean(ttft) * 1e3,
                           "ttft_p99_ms": ttft[int(len(ttft) * 0.99) - 1] * 1e3}
                    rows.append(row)
                    print(f"tiers  {name:<13} {mode:<6} {load:<9} {rate:<8} {policy:<12} GPU hit {row['gpu_hit']:6.1%}  "
                          f"CPU hit {row['cpu_hit']:6.1%}  TTFT mean {row['ttft_mean_ms']:8.1f} ms  "
                          f"p99 {row['ttft_p99_ms']:8.1f} ms", flush=True)
    result = {"pods": PODS, "spill": SPILL, "gpu_blocks": GPU_BLOCKS, "cpu_blocks": CPU_BLOCKS, "prefill_tokens_per_s": PREFILL_TOKENS_PER_S,
              "loads": LOADS, "decode_s": DECODE_S, "rows": rows}
    write("tiers", result)
    return result


def run() -> dict:
    return uvloop.run(run_async())


if __name__ == "__main__":
    run()
