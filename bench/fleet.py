"""Fleet simulator: routing quality of kv-extproc against the alternatives, on the same traffic.

N simulated vLLM pods, each with a finite prefix cache (LRU over 16-token blocks), a prefill
cost proportional to the prompt tokens it does not have cached, a decode time and a FIFO
queue. Time is simulated; routing is real: the kv-extproc policies run the real Router,
Indexer, tokenizer and prefix cache, and the pods publish real vLLM KV events over ZMQ that
the real ingester writes into the index (each decision waits until the previous request's
events are applied, as they would be within a millisecond in a live fleet).

Workloads (seeded): (a) tenants with long system prompts and short user turns; (b) multi-turn
conversations that grow turn by turn; (c) a few very popular prefixes (Zipf skew); (d) no
sharing at all. Arrival rates from light to overload, as fractions of the fleet's capacity.

Policies: random, round-robin, least-loaded (fewest requests outstanding, as Envoy's
LEAST_REQUEST), kv-extproc (default settings), kv-extproc with the prefix/pod-mapping cache
off, and an oracle that reads every pod's cache directly (ties to the pod free soonest).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field

import uvloop

from extproc import scoring
from extproc.config import ScoringConfig
from extproc import config as config_mod
from extproc.config import PodConfig
from extproc.events.ingest import Ingester
from extproc.sim.engine import EngineCache, KVEventPublisher
from extproc.index.memory import MemoryIndex
from extproc.indexer import Indexer, build_cache
from extproc.metrics import Metrics
from extproc.pods import PodPool
from extproc.requests import RoutingRequest
from extproc.routing import Router
from extproc.tokenization import TokenizerManager, load_tokenizer, tokenize_with

from .common import RESULTS, write

MODEL = "Qwen/Qwen3-0.6B"
PODS = 8
CAPACITY_BLOCKS = 400  # 16-token blocks per pod: 6.4k tokens, room for about five of the long prompts
PREFILL_TOKENS_PER_S = 20_000.0
DECODE_S = 0.08
REQUESTS = 320
RATES = {"light": 0.3, "busy": 0.7, "overload": 1.2}
POLICIES = ("random", "round-robin", "least-loaded", "kv-extproc", "kv-extproc-nocache", "oracle")

_WORDS = ("cache route engine token block tenant policy latency queue answer source invoice shipment "
          "contract clause patient record ticket build deploy metric alert schema query").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def workload(name: str, seed: int = 7) -> list[list[dict]]:
    """The message lists of REQUESTS requests, in arrival order."""
    rng = random.Random(f"{name}-{seed}")
    out: list[list[dict]] = []
    if name == "tenants":
        systems = [f"Tenant {t} handbook. " + _text(rng, 1100) for t in range(20)]
        for _ in range(REQUESTS):
            out.append([{"role": "system", "content": rng.choice(systems)},
                        {"role": "user", "content": _text(rng, 30)}])
    elif name == "conversations":
        chats = [[{"role": "system", "content": f"Assistant {c}. " + _text(rng, 300)}] for c in range(28)]
        for _ in range(REQUESTS):
            chat = rng.choice(chats)
            chat.append({"role": "user", "content": _text(rng, 60)})
            out.append([dict(m) for m in chat])
            chat.append({"role": "assistant", "content": _text(rng, 80)})
            if len(chat) > 17:  # a finished conversation is replaced by a new one
                chat[:] = [{"role": "system", "content": f"Assistant {rng.random():.6f}. " + _text(rng, 300)}]
    elif name == "skewed":
        systems = [f"Popular prefix {p}. " + _text(rng, 1100) for p in range(24)]
        weights = [1.0 / (rank + 1) ** 1.3 for rank in range(len(systems))]
        for _ in range(REQUESTS):
            out.append([{"role": "system", "content": rng.choices(systems, weights)[0]},
                        {"role": "user", "content": _text(rng, 30)}])
    elif name == "unshared":
        for i in range(REQUESTS):
            out.append([{"role": "system", "content": f"Unique {i}. " + _text(rng, 1100)},
                        {"role": "user", "content": _text(rng, 30)}])
    else:
        raise ValueError(name)
    return out


@dataclass
class SimPod:
    id: str
    cache: EngineCache
    publisher: KVEventPublisher | None = None
    busy_until: float = 0.0
    finishing: list[float] = field(default_factory=list)
    served: int = 0

    def outstanding(self, now: float) -> int:
        self.finishing = [t for t in self.finishing if t > now]
        return len(self.finishing)


@dataclass
class Outcome:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    decide_s: float = 0.0


class Fleet:
    def __init__(self, *, events: bool):
        self.pods = [SimPod(f"pod-{i}", EngineCache(CAPACITY_BLOCKS, 16, seed=i),
                            KVEventPublisher("tcp://127.0.0.1:*") if events else None) for i in range(PODS)]

    def close(self) -> None:
        for pod in self.pods:
            if pod.publisher is not None:
                pod.publisher.close()


async def _applied(ingester: Ingester, pod: SimPod) -> None:
    feed = ingester.feeds[pod.id]
    target = pod.publisher.seq - 1
    deadline = time.monotonic() + 5
    while (feed.last_seq is None or feed.last_seq < target) and time.monotonic() < deadline:
        await asyncio.sleep(0.0002)
    async with ingester.sequencer.lock(pod.id):
        pass  # its write is done


async def simulate(policy: str, requests: list[list[dict]], tokens: list[list[int]], rate: float,
                   tokenizer_dir: str, seed: int = 11) -> Outcome:
    rng = random.Random(seed)
    kv = policy.startswith("kv-extproc")
    fleet = Fleet(events=kv)
    outcome = Outcome()
    ingester = router = tokenizers = None
    pool = PodPool([PodConfig(id=p.id, address=f"10.0.0.{i + 1}:8000") for i, p in enumerate(fleet.pods)])
    by_id = {p.id: p for p in fleet.pods}
    if kv:
        conf = config_mod.from_dict({
            "index": {"backend": "memory"}, "models": [{"name": MODEL}],
            "pods": [{"id": p.id, "address": f"10.0.0.{i + 1}:8000", "kvEvents": p.publisher.endpoint}
                     for i, p in enumerate(fleet.pods)],
        })
        index = MemoryIndex()
        ingester = Ingester(index, conf, Metrics())
        await ingester.start()
        for pod in fleet.pods:  # let every subscription land
            while ingester.feeds[pod.id].last_seq is None:
                pod.publisher.publish([])
                await asyncio.sleep(0.01)
        tokenizers = TokenizerManager({MODEL: tokenizer_dir})
        cache = build_cache(conf.prefix_store_config, block_size=conf.block_size_to_hash,
                            max_blocks=conf.max_blocks_to_match, scheme="chained") if policy == "kv-extproc" else None
        indexer = Indexer(tokenizers, index, block_size=conf.block_size_to_hash, max_blocks=conf.max_blocks_to_match,
                          scheme="chained", cache=cache)
        await index.subscribe(indexer.on_invalidation)
        router = Router(pool, indexer, scoring.build(ScoringConfig()), Metrics(), decision_timeout=10.0)
    now, turn = 0.0, 0
    try:
        for messages, prompt in zip(requests, tokens):
            now += rng.expovariate(rate)
            t0 = time.perf_counter()
            if policy == "random":
                pod = rng.choice(fleet.pods)
            elif policy == "round-robin":
                pod, turn = fleet.pods[turn % PODS], turn + 1
            elif policy == "least-loaded":  # as Envoy's LEAST_REQUEST: fewest requests outstanding, then in turn
                fewest = min(p.outstanding(now) for p in fleet.pods)
                tied = [p for p in fleet.pods if p.outstanding(now) == fewest]
                pod, turn = tied[turn % len(tied)], turn + 1
            elif policy == "oracle":
                def cached(p: SimPod) -> int:
                    hashes = p.cache.hashes(prompt)
                    n = 0
                    while n < len(hashes) and hashes[n] in p.cache.blocks:
                        n += 1
                    return n
                pod = max(fleet.pods, key=lambda p: (cached(p), -p.busy_until))
            else:
                for p in pool.all():  # the router's in-flight view: requests still running on each pod
                    p.in_flight = by_id[p.id].outstanding(now)
                decision = await router.route(RoutingRequest(model=MODEL, kind="chat", messages=messages))
                pod = by_id[decision.pod.id]
            outcome.decide_s += time.perf_counter() - t0
            hit, events = pod.cache.admit(prompt)
            if pod.publisher is not None and events:
                pod.publisher.publish(events)
                await _applied(ingester, pod)
            start = max(now, pod.busy_until)
            prefill = (len(prompt) - hit) / PREFILL_TOKENS_PER_S
            pod.busy_until = start + prefill + DECODE_S
            pod.finishing.append(pod.busy_until)
            pod.served += 1
            outcome.ttft.append(start - now + prefill)
            outcome.prompt_tokens += len(prompt)
            outcome.cached_tokens += hit
        if tokenizers is not None:
            await tokenizers.settle()
    finally:
        if ingester is not None:
            await ingester.stop()
        if tokenizers is not None:
            tokenizers.close()
        fleet.close()
    served = [p.served for p in fleet.pods]
    outcome.imbalance = max(served) / statistics.fmean(served)
    return outcome


def capacity(tokens: list[list[int]]) -> float:
    """Requests/s the fleet serves with no cache hits at all: the reference for arrival rates."""
    mean_prompt = statistics.fmean(len(t) for t in tokens)
    return PODS / (mean_prompt / PREFILL_TOKENS_PER_S + DECODE_S)


async def run_async() -> dict:
    from extproc.sim import launcher

    tokenizer_dir = launcher.bundled_tokenizer_dir()
    tokenizer = load_tokenizer(tokenizer_dir)
    rows = []
    for name in ("tenants", "conversations", "skewed", "unshared"):
        requests = workload(name)
        tokens = [tokenize_with(tokenizer, RoutingRequest(model=MODEL, kind="chat", messages=m)) for m in requests]
        base = capacity(tokens)
        for rate_name, fraction in RATES.items():
            for policy in POLICIES:
                out = await simulate(policy, requests, tokens, base * fraction, tokenizer_dir)
                ttft = sorted(out.ttft)
                row = {"workload": name, "rate": rate_name, "arrivals_per_s": round(base * fraction, 2),
                       "policy": policy, "hit_rate": out.cached_tokens / out.prompt_tokens,
                       "ttft_mean_ms": statistics.fmean(ttft) * 1e3, "ttft_p99_ms": ttft[int(len(ttft) * 0.99) - 1] * 1e3,
                       "imbalance": out.imbalance, "decisions_per_s": len(ttft) / out.decide_s}
                rows.append(row)
                print(f"fleet  {name:<13} {rate_name:<8} {policy:<19} hit {row['hit_rate']:6.1%}  "
                      f"TTFT mean {row['ttft_mean_ms']:8.1f} ms  p99 {row['ttft_p99_ms']:8.1f} ms  "
                      f"imbalance {row['imbalance']:4.2f}  {row['decisions_per_s']:>9,.0f} decisions/s")
    result = {"pods": PODS, "capacity_blocks": CAPACITY_BLOCKS, "prefill_tokens_per_s": PREFILL_TOKENS_PER_S,
              "decode_s": DECODE_S, "requests": REQUESTS, "rows": rows}
    write("fleet", result)
    plot(rows)
    return result


def plot(rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fleet: matplotlib not installed (pip install -e '.[bench]'); no plots")
        return
    workloads = ["tenants", "conversations", "skewed", "unshared"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), sharey=True)
    for ax, name in zip(axes, workloads):
        busy = [r for r in rows if r["workload"] == name and r["rate"] == "busy"]
        ax.bar([r["policy"] for r in busy], [100 * r["hit_rate"] for r in busy], color="#4477aa")
        ax.set_title(f"({'abcd'[workloads.index(name)]}) {name}")
        ax.tick_params(axis="x", rotation=60)
    axes[0].set_ylabel("prompt tokens from cache (%)")
    fig.tight_layout()
    fig.savefig(RESULTS / "fleet_hit_rate.png", dpi=110)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, name in zip(axes, workloads):
        for policy in POLICIES:
            series = [r for r in rows if r["workload"] == name and r["policy"] == policy]
            ax.plot([r["arrivals_per_s"] for r in series], [r["ttft_mean_ms"] for r in series], marker="o", label=policy)
        ax.set_title(f"({'abcd'[workloads.index(name)]}) {name}")
        ax.set_xlabel("arrivals/s")
        ax.set_yscale("log")
    axes[0].set_ylabel("mean TTFT (ms, simulated)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "fleet_ttft.png", dpi=110)
    plt.close("all")


def run() -> dict:
    return uvloop.run(run_async())


if __name__ == "__main__":
    run()
