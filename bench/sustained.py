"""Sustained load: new user turns after a shared system prompt, for long enough to see decay.

In-process: the real router (tokenizer, prefix cache, real Redis index, three pods) decides
BENCH_DECISIONS (default 200,000) requests, each a tenant's cached system prompt followed by a
new question; an ingester-like writer stores each decision's blocks on the chosen pod (so the
index and the invalidation feed grow as in a fleet). Prints decisions/s and process RSS per
interval: the last interval must keep >= 90% of the first's rate, and RSS must level off once
the cache bounds are reached.

Through Envoy (BENCH_ENVOY_SECONDS, default 180): wrk sends new turns through the shipped
Envoy config to kv-extproc, in 20 s intervals, beside the floor ext_proc measured first.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path

import uvloop

from extproc import scoring
from extproc.config import IndexConfig, PodConfig, PrefixStoreConfig, ScoringConfig
from extproc.index import Writes
from extproc.index.redis import RedisIndex
from extproc.indexer import Indexer, build_cache
from extproc.metrics import Metrics
from extproc.pods import PodPool
from extproc.requests import RoutingRequest
from extproc.routing import Router
from extproc.sim import launcher
from extproc.tokenization import TokenizerManager, load_tokenizer

from .common import text_of_tokens, write

MODEL = "Qwen/Qwen3-0.6B"
PODS = [PodConfig(id=f"pod-{i}", address=f"10.0.0.{i + 1}:8000") for i in range(3)]
TENANTS = 8


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def question(i: int) -> str:
    return f"Question {i}: how does change number {i * 7919 % 100003} affect the release plan, and why?"


async def in_process(decisions: int, interval: int) -> dict:
    tokenizer_dir = launcher.bundled_tokenizer_dir()
    tokenizer = load_tokenizer(tokenizer_dir)
    workdir = launcher.workdir("kv-extproc-sustained-")
    server = launcher.start_redis(workdir)
    index = RedisIndex.from_config(IndexConfig(backend="redis", redis_url=server.url, timeout=1.0))
    writer = RedisIndex.from_config(IndexConfig(backend="redis", redis_url=server.url, timeout=1.0))
    tokenizers = TokenizerManager({MODEL: tokenizer_dir}, workers=2)
    await tokenizers.get(MODEL)
    config = PrefixStoreConfig()
    cache = build_cache(config, block_size=128, max_blocks=128, scheme="chained")
    indexer = Indexer(tokenizers, index, block_size=128, max_blocks=128, scheme="chained", cache=cache)
    await index.subscribe(indexer.on_invalidation)
    router = Router(PodPool(PODS), indexer, scoring.build(ScoringConfig()), Metrics(), decision_timeout=10.0)
    systems = [text_of_tokens(tokenizer, 2000, seed=100 + t) for t in range(TENANTS)]
    rows = []
    try:
        started = last = time.perf_counter()
        last_cpu = time.process_time()
        for i in range(decisions):
            tenant = i % TENANTS
            request = RoutingRequest(model=MODEL, kind="chat", messages=[
                {"role": "system", "content": systems[tenant]}, {"role": "user", "content": question(i)}])
            decision = await router.route(request)
            if i % 50 == 0:
                # Like the pod's KV events would: the chosen pod now holds this prompt's blocks.
                result = cache.store.get_prompt(cache.store.prompt_key(
                    tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True),
                    MODEL, False))
                if result is not None:
                    await writer.apply(decision.pod.id, Writes(at=time.time(),
                                                               stored={(MODEL, k): time.time() for k in result.keys}))
            if (i + 1) % interval == 0:
                now, cpu = time.perf_counter(), time.process_time()
                stats = cache.get_cache_stats()
                row = {"decisions": i + 1, "rate": interval / (now - last), "cpu_us": (cpu - last_cpu) / interval * 1e6,
                       "rss_mb": rss_mb(),
                       "chunks": stats.entries, "prompts": stats.prompts, "owners": stats.owners,
                       "hits": stats.hits, "partial": stats.partial_hits, "misses": stats.misses}
                rows.append(row)
                last, last_cpu = now, cpu
                print(f"sustained {row['decisions']:>8} decisions  {row['rate']:7.0f}/s  {row['cpu_us']:5.0f} us CPU each  "
                      f"RSS {row['rss_mb']:6.0f} MB  "
                      f"chunks {row['chunks']:>6}  prompts {row['prompts']:>6}  owners {row['owners']:>6}", flush=True)
        elapsed = time.perf_counter() - started
    finally:
        tokenizers.close()
        await index.close()
        await writer.close()
        server.proc.stop()
    bounds = {"maxEntries": config.max_entries, "maxPrompts": config.max_prompts,
              "maxPodMappings": config.max_pod_mappings}
    last_over_first = rows[-1]["rate"] / rows[0]["rate"]
    cpu_first_over_last = rows[0]["cpu_us"] / rows[-1]["cpu_us"]
    print(f"sustained in-process: {decisions} decisions in {elapsed:.0f}s; last interval {last_over_first:.2f}x the "
          f"first's rate, {cpu_first_over_last:.2f}x its throughput per CPU second (target >= 0.90); "
          f"RSS {rows[0]['rss_mb']:.0f} -> {rows[-1]['rss_mb']:.0f} MB", flush=True)
    return {"decisions": decisions, "interval": interval, "rows": rows, "bounds": bounds,
            "last_over_first": last_over_first, "cpu_throughput_last_over_first": cpu_first_over_last}


def through_envoy(seconds: int, interval: int = 20) -> dict:
    from . import floors
    from .envoy_load import BACKENDS, backend_config, chat_body, wrk

    workdir = Path(tempfile.mkdtemp(prefix="kv-extproc-sustained-envoy-"))
    tokenizer_dir = launcher.bundled_tokenizer_dir()
    tokenizer = load_tokenizer(tokenizer_dir)
    ports = [launcher.free_port(h) for h in BACKENDS]
    started: list = [launcher.start_envoy(backend_config(ports, launcher.free_port()), workdir)]
    pods = [{"id": f"pod-{i}", "address": f"{h}:{p}"} for i, (h, p) in enumerate(zip(BACKENDS, ports))]
    redis_server = launcher.start_redis(workdir)
    started.append(redis_server)
    rows = []
    try:
        proc = launcher.start_extproc({"index": {"backend": "redis", "redisUrl": redis_server.url}, "logLevel": "warning",
                                       "models": [{"name": MODEL, "tokenizer": tokenizer_dir}], "pods": pods}, workdir)
        started.append(proc)
        reference = floors.start("floor", workdir, header="x-gateway-destination-endpoint", address=pods[0]["address"])
        started.append(reference)

        def proxy(listen_ext: str) -> str:
            conf = launcher.render_envoy("envoy.yaml", listen=f"127.0.0.1:{launcher.free_port()}",
                                         admin=f"127.0.0.1:{launcher.free_port()}", extproc=[listen_ext],
                                         pods=[p["address"] for p in pods])
            envoy = launcher.start_envoy(conf, workdir)
            started.append(envoy)
            return envoy.url

        floor_url, kv_url = proxy(reference.listen), proxy(proc.listen)
        body = chat_body(text_of_tokens(tokenizer, 2000, seed=2000), "Question @@N@@: what changed, and why?")
        os.environ["BENCH_DURATION"] = str(interval)
        import bench.envoy_load as envoy_load

        envoy_load.DURATION = interval
        floor = wrk(floor_url, body, connections=8, unique=True, workdir=workdir)
        print(f"sustained envoy  floor {floor['rps']:7.0f} req/s  p50 {floor['p50_ms']:.2f} ms", flush=True)
        pid = proc.proc.popen.pid
        for n in range(max(1, seconds // interval)):
            cpu_before = _cpu_of(pid)
            stats = wrk(kv_url, body, connections=8, unique=True, workdir=workdir)
            rss = _rss_of(pid)
            cpu_ms = (_cpu_of(pid) - cpu_before) * 1000 / max(1, stats["rps"] * interval)
            row = {"second": (n + 1) * interval, **stats, "rss_mb": rss, "vs_floor": stats["rps"] / floor["rps"],
                   "cpu_ms_per_request": cpu_ms}
            rows.append(row)
            print(f"sustained envoy  {row['second']:>4}s  {stats['rps']:7.0f} req/s ({row['vs_floor']:.2f}x floor)  "
                  f"p50 {stats['p50_ms']:.2f} ms  p99 {stats['p99_ms']:.2f} ms  non-2xx {stats['non_2xx']}  "
                  f"kv-extproc RSS {rss:.0f} MB, {cpu_ms:.2f} ms CPU per request", flush=True)
    finally:
        for part in reversed(started):
            part.proc.stop()
    last_over_first = rows[-1]["rps"] / rows[0]["rps"]
    cpu = rows[0]["cpu_ms_per_request"] / rows[-1]["cpu_ms_per_request"]
    print(f"sustained envoy: last interval {last_over_first:.2f}x the first's rate, {cpu:.2f}x its requests per "
          f"kv-extproc CPU second (target >= 0.90)", flush=True)
    return {"floor": floor, "rows": rows, "last_over_first": last_over_first, "cpu_last_over_first": cpu}


def _cpu_of(pid: int) -> float:
    """CPU seconds the process has used (user + system)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_of(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run() -> dict:
    decisions = int(os.environ.get("BENCH_DECISIONS", "200000"))
    result = {"in_process": uvloop.run(in_process(decisions, max(1, decisions // 20)))}
    seconds = int(os.environ.get("BENCH_ENVOY_SECONDS", "180"))
    if seconds:
        result["envoy"] = through_envoy(seconds)
    write("sustained", result)
    return result


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
