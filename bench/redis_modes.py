"""One Redis vs a 3-primary Redis Cluster (3 primaries + 3 replicas), same machine, same load,
measured in one run (rounds alternate between the two so drift hits both alike):

- index lookups per second: ``CONCURRENCY`` coroutines each looking up the 16 block keys of a
  2k-token prompt (128-token blocks) through RedisIndex, for ``SECONDS`` per round;
- lookup latency p50/p99, one lookup at a time;
- routing decision p50/p99 (parse, tokenize 2k tokens, hash, lookup, score), as bench.decision;
- ingest engine blocks/s into each (bench.ingest's publisher in its own process);
- cluster only: seconds the index cannot answer when a primary is SIGKILLed (a lookup every
  20 ms; a decision that needs the index routes by load meanwhile).

Every process shares this machine's cores with the client: the cluster's figures include its
six servers competing for them, and say nothing about scaling out across machines.
"""

from __future__ import annotations

import asyncio
import json
import time

import uvloop

from extproc import config as config_mod
from extproc import responses, scoring
from extproc.blocks import block_keys
from extproc.config import PodConfig, ScoringConfig
from extproc.index import IndexUnavailable, Writes
from extproc.index.redis import RedisIndex
from extproc.indexer import Indexer
from extproc.metrics import Metrics
from extproc.pods import PodPool
from extproc.requests import parse
from extproc.routing import Router
from extproc.sim import launcher
from extproc.tokenization import TokenizerManager, load_tokenizer, tokenize_with
from tests.harness.redis_cluster import start_cluster

from . import ingest
from .common import summary, text_of_tokens, write

MODEL = "Qwen/Qwen3-0.6B"
PROMPT_TOKENS = 2000
CONCURRENCY = 16
SECONDS = 3.0
ROUNDS = 3
LATENCY_SAMPLES = 500
DECISION_SAMPLES = 200


async def _throughput(index: RedisIndex, keys: list[int]) -> float:
    done = 0
    end = time.perf_counter() + SECONDS

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await index.lookup(MODEL, keys)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done / (time.perf_counter() - start)


async def _latency(index: RedisIndex, keys: list[int]) -> list[float]:
    samples = []
    for _ in range(LATENCY_SAMPLES):
        t0 = time.perf_counter()
        await index.lookup(MODEL, keys)
        samples.append(time.perf_counter() - t0)
    return samples


async def _decisions(router: Router, body: bytes) -> list[float]:
    samples = []
    for _ in range(DECISION_SAMPLES + 20):
        t0 = time.perf_counter()
        decision = await router.route(parse("/v1/chat/completions", body))
        responses.body_route.__wrapped__("x-gateway-destination-endpoint", decision.pod.address)
        samples.append(time.perf_counter() - t0)
    return samples[20:]


async def _unavailable_on_kill(cluster, index: RedisIndex, keys: list[int]) -> dict:
    results: list[tuple[float, bool]] = []
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                await index.lookup(MODEL, keys)
                results.append((sent, True))
            except IndexUnavailable:
                results.append((sent, False))
            await asyncio.sleep(max(0.0, 0.02 - (time.monotonic() - sent)))

    cluster.wait_synced()
    task = asyncio.ensure_future(probe())
    await asyncio.sleep(1.0)
    victim = cluster.primaries()[0]
    replica = cluster.replica_of(victim)
    killed = time.monotonic()
    cluster.kill(victim)
    while True:
        try:
            if cluster.client(replica).info("replication")["role"] == "master":
                break
        except Exception:  # noqa: BLE001 - keep polling until it answers as primary
            pass
        await asyncio.sleep(0.05)
    promoted = time.monotonic()
    await asyncio.sleep(5.0)
    stop.set()
    await task
    failed = [t for t, ok in results if t >= killed and not ok]
    back = next((t for t, ok in results if ok and failed and t > failed[-1]), None)
    return {"takeover_s": round(promoted - killed, 2), "failed_lookups": len(failed),
            "unavailable_s": round((back - failed[0]) if failed and back else 0.0, 2),
            "answers_again": bool(results and results[-1][1])}


async def run_async() -> dict:
    tokenizer_dir = launcher.bundled_tokenizer_dir()
    tokenizer = load_tokenizer(tokenizer_dir)
    workdir = launcher.workdir("kv-extproc-bench-")
    single = launcher.start_redis(workdir)
    cluster = start_cluster(workdir)
    confs = {"1 node": {"backend": "redis", "redisUrl": single.url, "timeout": "1s"},
             "3-primary cluster": {"backend": "redis", "mode": "cluster", "nodes": cluster.seeds[:3], "timeout": "1s"}}
    result: dict = {"prompt_tokens": PROMPT_TOKENS, "concurrency": CONCURRENCY, "seconds_per_round": SECONDS,
                    "rounds": ROUNDS, "modes": {}}
    indexes: dict[str, RedisIndex] = {}
    try:
        system = text_of_tokens(tokenizer, PROMPT_TOKENS, seed=PROMPT_TOKENS)
        body = json.dumps({"model": MODEL, "messages": [{"role": "system", "content": system},
                                                        {"role": "user", "content": "What next?"}]}).encode()
        keys = block_keys(tokenize_with(tokenizer, parse("/v1/chat/completions", body)), 128, 128)
        pods = [PodConfig(id=f"pod-{i}", address=f"10.0.0.{i + 1}:8000") for i in range(8)]
        tokenizers = TokenizerManager({MODEL: tokenizer_dir}, workers=2)
        await tokenizers.get(MODEL)
        routers = {}
        for name, conf in confs.items():
            index = indexes[name] = RedisIndex.from_config(config_mod.from_dict({"index": conf}).index)
            await index.apply("pod-3", Writes(stored={(MODEL, k): time.time() for k in keys}))
            routers[name] = Router(PodPool(pods), Indexer(tokenizers, index, block_size=128, max_blocks=128,
                                                          scheme="chained"),
                                   scoring.build(ScoringConfig()), Metrics(), decision_timeout=5.0)
            result["modes"][name] = {"lookups_per_s": [], "lookup": [], "decision": [], "ingest": []}
        for _ in range(ROUNDS):
            for name, index in indexes.items():
                row = result["modes"][name]
                row["lookups_per_s"].append(await _throughput(index, keys))
                row["lookup"] += await _latency(index, keys)
                row["decision"] += await _decisions(routers[name], body)
        tokenizers.close()
        for per_event, batches in ingest.SHAPES[:1]:
            for name, conf in confs.items():
                for _ in range(2):
                    measured = await ingest._throughput(single.url, per_event, batches, index=conf)
                    result["modes"][name]["ingest"].append(measured["engine_blocks_per_s"])
        failover = await _unavailable_on_kill(cluster, indexes["3-primary cluster"], keys)
    finally:
        for index in indexes.values():
            await index.close()
        cluster.stop()
        single.proc.stop()
    table = {}
    for name, row in result["modes"].items():
        lookup, decision = summary(row.pop("lookup")), summary(row.pop("decision"))
        table[name] = {"lookups_per_s": round(sum(row["lookups_per_s"]) / len(row["lookups_per_s"])),
                       "lookup_p50_us": round(lookup["p50_us"]), "lookup_p99_us": round(lookup["p99_us"]),
                       "decision_p50_us": round(decision["p50_us"]), "decision_p99_us": round(decision["p99_us"]),
                       "ingest_engine_blocks_per_s": round(max(row["ingest"]))}
    one, many = table["1 node"], table["3-primary cluster"]
    result["table"] = table
    result["cluster_over_single"] = {k: round(many[k] / one[k], 2) for k in one}
    result["cluster_primary_killed"] = failover
    for name, row in table.items():
        print(f"redis     {name:<18} {row['lookups_per_s']:>7,} lookups/s ({CONCURRENCY} in flight)  lookup p50 "
              f"{row['lookup_p50_us']} us p99 {row['lookup_p99_us']} us  decision p50 {row['decision_p50_us']} us "
              f"p99 {row['decision_p99_us']} us  ingest {row['ingest_engine_blocks_per_s']:,} engine blocks/s")
    print(f"redis     cluster / 1 node: {result['cluster_over_single']}")
    print(f"redis     cluster primary SIGKILLed: {failover}")
    write("redis_modes", result)
    return result


def run() -> dict:
    return uvloop.run(run_async())


if __name__ == "__main__":
    run()
