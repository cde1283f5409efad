"""Real vLLM engines: client-measured time to first token, kv-extproc against round-robin.

Two real vLLM CPU engines (the tiny random-weight model of tests/realvllm, real Qwen3
tokenizer), each pinned to its own core with ``taskset`` so one engine's prefill does not slow
the other's. Redis and kv-extproc (default ``ttft`` scoring, with the ingester) are configured as
the realvllm tests do, behind the shipped Envoy config. Round-robin is a second Envoy from the
same config without the ext_proc filter and with Envoy's ROUND_ROBIN policy, so both policies
pay the same proxy hop. Nothing else is pinned: Envoy, kv-extproc, Redis and the clients share
the two cores with the engines, as they would share a node.

Traffic: about half the requests carry one hot tenant's system prompt (~3,000 tokens, so that
prefill is most of a cold first token), the rest one of four other tenants'; each request adds a
new user question. Four clients send streaming chat completions in a closed loop; TTFT is the
time to the first SSE chunk as the client sees it. Rounds alternate the policies (kv-extproc
first, then round-robin first) to cancel drift; every segment starts from empty prefix caches
(``POST /reset_prefix_cache``), and vLLM's own hit counters are read around it.

Two cache sizes: ``roomy`` (the engines' 1 GiB of KV, as in the tests: nothing is ever evicted,
so round-robin only pays each tenant's first miss once per engine) and ``tight`` (384 blocks of
32 tokens per engine: about four of the five prompts, so an engine that sees every tenant
evicts).

``python -m bench ttft_real`` (~6 min; up to 10 on a busy machine) writes bench/results/ttft_real.json. Not run in CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from extproc.sim import launcher
from extproc.tokenization import load_tokenizer
from tests.integration.conftest import extproc_config
from tests.realvllm.conftest import MODEL, STACK_CONFIG, VENV_PYTHON, Engine, reset, start_engine

from .common import summary, text_of_tokens, write

SYSTEM_TOKENS = 3000
TENANTS = 5
"""Tenant 0 is hot (HOT_SHARE of the requests); the rest share the remainder evenly."""
HOT_SHARE = 0.5
CLIENTS = 4
MAX_TOKENS = 16
REQUESTS = 50
"""Per policy and round."""
ROUNDS = 2
SEGMENT_S = 60.0
"""A segment stops sending after this long (its request count is then smaller)."""
SCENARIOS: dict[str, tuple[str, ...]] = {"roomy": (), "tight": ("--num-gpu-blocks-override", "384")}
ECHO = "x-upstream-host"
"""Response header both Envoys add: the engine that answered."""


@dataclass
class Outcome:
    tenant: int
    ttft_s: float | None
    """None: the request failed."""
    engine: str
    sent_s: float
    """When it was sent, from the start of its segment."""
    error: str = ""


def stream_chat(client: httpx.Client, messages: list[dict]) -> tuple[float, str]:
    """One streaming chat completion read to its end: (seconds to the first chunk, engine address).
    A non-200 answer, an error chunk or a stream without [DONE] raises."""
    body = {"model": MODEL, "messages": messages, "stream": True, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    sent = time.monotonic()
    first: float | None = None
    with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {reply.read()[:200]!r}")
        for line in reply.iter_lines():
            if not line.startswith("data:"):
                continue
            first = time.monotonic() - sent if first is None else first
            payload = line[5:].strip()
            if payload == "[DONE]":
                return first, reply.headers.get(ECHO, "")
            if "error" in json.loads(payload):
                raise RuntimeError(payload[:200])
    raise RuntimeError("stream ended without [DONE]")


def run_segment(url: str, traffic: Sequence[tuple[int, list[dict]]]) -> tuple[list[Outcome], float]:
    """CLIENTS closed-loop clients through ``url``; returns the outcomes and the wall time."""
    local = threading.local()
    start = time.monotonic()

    def one(item: tuple[int, list[dict]]) -> Outcome | None:
        if time.monotonic() - start > SEGMENT_S:
            return None
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=120)
        sent = time.monotonic() - start
        try:
            ttft, engine = stream_chat(local.client, item[1])
            return Outcome(item[0], ttft, engine, sent)
        except (httpx.HTTPError, RuntimeError, ValueError) as exc:
            return Outcome(item[0], None, "", sent, f"{type(exc).__name__}: {exc}"[:300])

    with ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = [o for o in pool.map(one, traffic) if o is not None]
    return outcomes, time.monotonic() - start


def envoy(engines: Sequence[Engine], workdir: Path, extproc: str | None) -> launcher.Envoy:
    """The shipped envoy.yaml in front of the engines, echoing the engine that answered. With
    ``extproc`` as shipped (kv-extproc picks); without, minus ext_proc and balanced ROUND_ROBIN."""
    conf = launcher.render_envoy("envoy.yaml", listen=f"127.0.0.1:{launcher.free_port()}",
                                 admin=f"127.0.0.1:{launcher.free_port()}", extproc=[extproc] if extproc else [],
                                 pods=[e.address for e in engines])
    hcm = conf["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"][0]["response_headers_to_add"] = [
        {"header": {"key": ECHO, "value": "%UPSTREAM_HOST%"}}]
    if extproc is None:
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
        clusters = [c for c in conf["static_resources"]["clusters"] if c["name"] != "kv_extproc"]
        for cluster in clusters:
            cluster.pop("load_balancing_policy", None)
            cluster["lb_policy"] = "ROUND_ROBIN"
        conf["static_resources"]["clusters"] = clusters
    return launcher.start_envoy(conf, workdir)


def prefix_counters(engines: Sequence[Engine]) -> tuple[float, float]:
    return (sum(e.counter("vllm:prefix_cache_hits_total") for e in engines),
            sum(e.counter("vllm:prefix_cache_queries_total") for e in engines))


def empty_caches(engines: Sequence[Engine], index: redis.Redis) -> None:
    """Reset every engine's prefix cache and wait until kv-extproc's index has heard it; then
    outlast its speculative owners (2 s), so no segment inherits the previous one's cache."""
    for engine in engines:
        reset(engine)
    deadline = time.monotonic() + 30
    while any(index.scard(f"matrix:kv:pod:{e.name}") for e in engines):
        if time.monotonic() > deadline:
            raise TimeoutError("the index still lists blocks after the engines' caches were reset")
        time.sleep(0.1)
    time.sleep(2.5)


def make_traffic(prompts: list[str], seed: int) -> list[tuple[int, list[dict]]]:
    """REQUESTS (tenant, messages): the tenant's system prompt and a question never asked before."""
    rng = random.Random(seed)
    traffic = []
    for i in range(REQUESTS):
        tenant = 0 if rng.random() < HOT_SHARE else rng.randrange(1, TENANTS)
        question = f"Request {seed}-{i}: which clause covers shipment {rng.randrange(10**6)}, and why?"
        traffic.append((tenant, [{"role": "system", "content": prompts[tenant]}, {"role": "user", "content": question}]))
    return traffic


def cold_and_cached(engine: Engine, prompt: str) -> dict[str, float]:
    """One request alone on an empty cache, then one sharing its system prompt (direct to the engine)."""
    with httpx.Client(base_url=engine.url, timeout=120) as client:
        cold, _ = stream_chat(client, [{"role": "system", "content": prompt}, {"role": "user", "content": "first?"}])
        cached, _ = stream_chat(client, [{"role": "system", "content": prompt}, {"role": "user", "content": "second?"}])
    return {"cold_ms": cold * 1e3, "cached_ms": cached * 1e3}


def stats(outcomes: list[Outcome], hits: float, queries: float, seconds: float, names: dict[str, str],
          rounds: list[float]) -> dict[str, object]:
    ok = [o for o in outcomes if o.ttft_s is not None]
    times = summary([o.ttft_s for o in ok]) if ok else {}
    per_tenant = lambda hot: [o.ttft_s * 1e3 for o in ok if (o.tenant == 0) == hot]  # noqa: E731
    return {
        "requests": len(outcomes), "failed": len(outcomes) - len(ok),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
        "ttft_mean_ms": times.get("mean_us", 0) / 1e3, "ttft_p50_ms": times.get("p50_us", 0) / 1e3,
        "ttft_p99_ms": times.get("p99_us", 0) / 1e3,
        "hot_mean_ms": statistics.fmean(per_tenant(True) or [0]),
        "others_mean_ms": statistics.fmean(per_tenant(False) or [0]),
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "served": {name: sum(1 for o in ok if o.engine == address) for address, name in names.items()},
        "seconds": seconds,
        "round_means_ms": rounds,
        "slowest": [{"tenant": o.tenant, "engine": names.get(o.engine, o.engine), "ttft_ms": o.ttft_s * 1e3,
                     "sent_s": o.sent_s} for o in sorted(ok, key=lambda o: -(o.ttft_s or 0))[:3]],
    }


def run_scenario(name: str, extra: tuple[str, ...], prompts: list[str], tokenizer_dir: str) -> dict[str, object]:
    workdir = launcher.workdir(f"kv-extproc-ttft-{name}-")
    with contextlib.ExitStack() as cleanup:
        engines = [start_engine(i, workdir, cpus=str(i), extra=extra) for i in range(2)]
        for engine in engines:
            cleanup.callback(engine.proc.stop)
        started = time.monotonic()
        for engine in engines:
            launcher.wait_http(f"{engine.url}/health", timeout=420, proc=engine.proc, interval=1.0)
        print(f"{name}: engines up in {time.monotonic() - started:.0f} s", flush=True)
        server = launcher.start_redis(workdir)
        cleanup.callback(server.proc.stop)
        extproc = launcher.start_extproc(extproc_config(server.url, {e.name: e for e in engines}, tokenizer_dir,
                                                        **STACK_CONFIG), workdir)
        cleanup.callback(extproc.proc.stop)
        urls = {}
        for policy, listen in (("kv-extproc", extproc.listen), ("round-robin", None)):
            proxy = envoy(engines, workdir, listen)
            cleanup.callback(proxy.proc.stop)
            urls[policy] = proxy.url
        index = cleanup.enter_context(redis.Redis.from_url(server.url))

        for url in urls.values():  # warm-up: compile paths, connections, kv-extproc's tokenizer
            run_segment(url, make_traffic(prompts, seed=0)[:8])
        empty_caches(engines, index)
        probe = cold_and_cached(engines[0], prompts[0])
        print(f"{name}: one request alone, TTFT cold {probe['cold_ms']:.0f} ms, cached {probe['cached_ms']:.0f} ms",
              flush=True)
        runs: dict[str, dict[str, list]] = {p: {"outcomes": [], "hq": [], "s": [], "means": []} for p in urls}
        for r in range(ROUNDS):
            traffic = make_traffic(prompts, seed=r + 1)
            for policy in (list(urls) if r % 2 == 0 else list(urls)[::-1]):
                empty_caches(engines, index)
                h0, q0 = prefix_counters(engines)
                outcomes, seconds = run_segment(urls[policy], traffic)
                time.sleep(1.0)  # the engines' counters catch up with their last step
                h1, q1 = prefix_counters(engines)
                runs[policy]["outcomes"] += outcomes
                runs[policy]["hq"].append((h1 - h0, q1 - q0))
                runs[policy]["s"].append(seconds)
                runs[policy]["means"].append(statistics.fmean([o.ttft_s * 1e3 for o in outcomes if o.ttft_s] or [0]))
                print(f"{name} round {r} {policy}: {len(outcomes)} requests in {seconds:.0f} s", flush=True)
    names = {e.address: e.name for e in engines}
    return {"engine_flags": list(extra), "alone": probe, "policies": {
        p: stats(run["outcomes"], sum(h for h, _ in run["hq"]), sum(q for _, q in run["hq"]), sum(run["s"]), names,
              run["means"])
        for p, run in runs.items()}}


def run() -> None:
    if not VENV_PYTHON.exists():
        print(f"skipped: no vLLM engine venv at {VENV_PYTHON} (run tests/realvllm/setup.sh)")
        return
    began, load_at_start = time.monotonic(), os.getloadavg()[0]  # others' work shares these two cores
    tokenizer_dir = launcher.bundled_tokenizer_dir()
    tokenizer = load_tokenizer(tokenizer_dir)
    prompts = [f"Tenant {t} rules. " + text_of_tokens(tokenizer, SYSTEM_TOKENS, seed=100 + t) for t in range(TENANTS)]
    results = {name: run_scenario(name, extra, prompts, tokenizer_dir) for name, extra in SCENARIOS.items()}
    print("| cache | policy | requests | failed | TTFT mean | p50 | p99 (ms) | hot / others mean | vLLM hit rate | served |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, scenario in results.items():
        for policy, s in scenario["policies"].items():
            print(f"| {name} | {policy} | {s['requests']} | {s['failed']} | {s['ttft_mean_ms']:.0f} | "
                  f"{s['ttft_p50_ms']:.0f} | {s['ttft_p99_ms']:.0f} | {s['hot_mean_ms']:.0f} / "
                  f"{s['others_mean_ms']:.0f} | {s['prefix_cache_hit_rate']:.1%} | {s['served']} |")
    path = write("ttft_real", {
        "config": {"system_tokens": SYSTEM_TOKENS, "tenants": TENANTS, "hot_share": HOT_SHARE, "clients": CLIENTS,
                   "max_tokens": MAX_TOKENS, "requests_per_segment": REQUESTS, "rounds": ROUNDS,
                   "engines": "2, taskset -c 0 / -c 1, OMP_NUM_THREADS=1", "model": MODEL},
        "scenarios": results, "wall_s": time.monotonic() - began,
        "loadavg_1m": {"start": load_at_start, "end": os.getloadavg()[0]}})
    print(f"wrote {path} ({time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    run()
