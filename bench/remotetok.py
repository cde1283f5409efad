"""Remote tokenization: the in-process routing decision for a ``tokenizer: remote`` model beside the
local tokenizer, for chat prompts of about 1k, 4k and 16k tokens, against a real local Redis.

The engine is a real vLLM (the CPU engine and tiny model that tests/realvllm/setup.sh builds under
~/.cache/kv-extproc) when one is installed, else the test harness's /tokenize server (real HTTP,
the real tokenizer and chat template, in its own process); the table says which. Cases alternate
within each round, so the ratios come from one run:
- local hit / local miss: the local tokenizer with the prefix cache, the same prompt again / a new one;
- remote hit: the same request again (its block keys from the whole-request cache: no engine call);
- remote miss: a new request (one /tokenize call to the engine);
- turn (both): a new user turn after the shared system prompt (local: only the new text is
  tokenized; remote: a new request, so one engine call, and routed by cache).
Then "busy": remote misses at 4k while the engine serves long prefills (2 at a time), with the
shipped defaults (tokenization.remote.timeout 150 ms, decisionTimeout 300 ms): how many decisions
fell back to load.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import uvloop

from extproc import scoring
from extproc.config import IndexConfig, PodConfig, PrefixStoreConfig, ScoringConfig, TokenizationConfig
from extproc.index import Writes
from extproc.index.redis import RedisIndex
from extproc.indexer import Indexer, build_cache
from extproc.metrics import Metrics
from extproc.pods import PodPool
from extproc.remotetok import RemoteTokenizer
from extproc.requests import RoutingRequest
from extproc.routing import Router
from extproc.sim import launcher
from extproc.tokenization import TokenizerManager, load_tokenizer, tokenize_with

from .common import summary, text_of_tokens, write

MODEL = "Qwen/Qwen3-0.6B"
SIZES = (1000, 4000, 16000)
ROUNDS = {1000: 100, 4000: 60, 16000: 30}
BUSY_ROUNDS = 60
CASES = ("local_hit", "local_turn", "local_miss", "remote_hit", "remote_turn", "remote_miss")
"""hit: the same request again; turn: a new user turn after the cached system prompt; miss: a new prompt."""
PODS = [PodConfig(id=f"pod-{i}", address=f"10.0.0.{i + 1}:8000", models=[MODEL]) for i in range(8)]
HOME = Path(os.environ.get("KV_REALVLLM_HOME", Path.home() / ".cache" / "kv-extproc"))


def request(system: str, user: str) -> RoutingRequest:
    return RoutingRequest(model=MODEL, kind="chat", messages=[{"role": "system", "content": system},
                                                             {"role": "user", "content": user}])


def start_engine(workdir: Path) -> tuple[str, launcher.Proc, str]:
    """(address, process, what it is): a real vLLM engine if installed, else the harness server."""
    port = launcher.free_port()
    venv_python = HOME / "realvllm-venv" / "bin" / "python"
    if (HOME / "realvllm-venv" / ".complete").exists() and (HOME / "tiny-model" / "config.json").exists():
        argv = [str(venv_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(HOME / "tiny-model"),
                "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--enable-prefix-caching",
                "--block-size", "32", "--max-model-len", "4096"]
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
               "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        proc, what, timeout = launcher._spawn("vllm-bench", argv, workdir, env=env, group=True), "vLLM 0.32 (CPU)", 300
    else:
        argv = [sys.executable, "-m", "tests.harness.vllm_tokenize", "--port", str(port), "--model", MODEL]
        proc, what, timeout = launcher._spawn("tokenize-bench", argv, workdir), "harness /tokenize server", 60
    launcher.wait_http(f"http://127.0.0.1:{port}/health", timeout=timeout, proc=proc, interval=0.5)
    return f"127.0.0.1:{port}", proc, what


class Prefills:
    """Long prompts sent to the engine from two threads: an engine busy with inference."""

    def __init__(self, address: str, tokenizer):
        self.url = f"http://{address}/v1/chat/completions"
        self.system = text_of_tokens(tokenizer, 3000, seed=99)
        self.stop = threading.Event()
        self.sent = 0
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(2)]

    def _run(self, n: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            body = {"model": MODEL, "max_tokens": 16, "messages": [
                {"role": "system", "content": f"Load {n}-{i}. " + self.system}, {"role": "user", "content": "go"}]}
            req = urllib.request.Request(self.url, data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as reply:
                    reply.read()
                self.sent += 1
            except OSError:
                time.sleep(0.1)

    def __enter__(self) -> "Prefills":
        for thread in self.threads:
            thread.start()
        time.sleep(2.0)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


class GcPauses:
    """This process's garbage-collector pauses (start, end), to tell a slow decision of ours from one
    that waited on the collector."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float]] = []
        self._started = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((self._started, time.perf_counter()))

    def within(self, start: float, end: float) -> float:
        return sum(min(b, end) - max(a, start) for a, b in self.pauses if b > start and a < end)

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)


class LoopStalls:
    """How late this event loop wakes a 5 ms sleeper: a stall means the process (or its loop) did not
    run, so no timeout inside it could fire on time."""

    def __init__(self) -> None:
        self.stalls: list[tuple[float, float]] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.005)
            self.stalls.append((started, time.perf_counter() - started - 0.005))

    def longest(self, start: float, end: float) -> float:
        return max((late for at, late in self.stalls if at < end and at + 0.005 + late > start), default=0.0)

    async def __aenter__(self) -> "LoopStalls":
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()


async def _timed(router: Router, req: RoutingRequest) -> float:
    t0 = time.perf_counter()
    await router.route(req)
    elapsed = time.perf_counter() - t0
    await router.indexer.tokenizers.settle()
    return elapsed


async def run_async() -> dict:
    tokenizer_dir = launcher.bundled_tokenizer_dir()
    tokenizer = load_tokenizer(tokenizer_dir)
    workdir = launcher.workdir("kv-extproc-bench-")
    server = launcher.start_redis(workdir)
    address, engine, engine_kind = start_engine(workdir)
    print(f"remotetok: engine = {engine_kind} at {address}")
    index = RedisIndex.from_config(IndexConfig(backend="redis", redis_url=server.url, timeout=1.0))
    local_tokenizers = TokenizerManager({MODEL: tokenizer_dir}, workers=2)
    remote_tokenizers = TokenizerManager({MODEL: "remote"}, workers=2)
    await local_tokenizers.get(MODEL)
    defaults = TokenizationConfig().remote
    client = RemoteTokenizer(PodPool([PodConfig(id="engine", address=address, models=[MODEL])], [MODEL]),
                             timeout=defaults.timeout, max_in_flight_per_pod=defaults.max_in_flight_per_pod)

    def router(tokenizers: TokenizerManager, *, decision_timeout: float = 10.0) -> Router:
        cache = build_cache(PrefixStoreConfig(), block_size=128, max_blocks=128, scheme="chained")
        indexer = Indexer(tokenizers, index, block_size=128, max_blocks=128, scheme="chained", cache=cache,
                          remote=client)
        return Router(PodPool(PODS), indexer, scoring.build(ScoringConfig()), Metrics(),
                      decision_timeout=decision_timeout)

    rows = []
    try:
        for size in SIZES:
            system = text_of_tokens(tokenizer, size, seed=size)
            local, remote = router(local_tokenizers), router(remote_tokenizers)
            keys = local.indexer.keys(tokenize_with(tokenizer, request(system, "warm")))
            await index.apply("pod-3", Writes(stored={(MODEL, k): time.time() for k in keys}))
            for r in (local, remote):
                await _timed(r, request(system, "repeat"))
            samples: dict[str, list[float]] = {case: [] for case in CASES}
            for i in range(ROUNDS[size] + 3):
                timings = {
                    "local_hit": await _timed(local, request(system, "repeat")),
                    "local_turn": await _timed(local, request(system, f"follow-up question number {i}")),
                    "local_miss": await _timed(local, request(f"Local {size}-{i}. " + system, "new")),
                    "remote_hit": await _timed(remote, request(system, "repeat")),
                    "remote_turn": await _timed(remote, request(system, f"follow-up question number {i}")),
                    "remote_miss": await _timed(remote, request(f"Remote {size}-{i}. " + system, "new")),
                }
                if i >= 3:
                    for case, seconds in timings.items():
                        samples[case].append(seconds)
            assert remote.metrics.fallbacks.labels("remote_tokenizer")._value.get() == 0, "no remote call failed"
            assert remote.metrics.requests.labels("cache")._value.get() >= 2 * ROUNDS[size], "hits and turns by cache"
            stats = {case: summary(values) for case, values in samples.items()}
            row = {"prompt_tokens": len(tokenize_with(tokenizer, request(system, "repeat"))),
                   **{f"{case}_{k}": v for case, s in stats.items() for k, v in s.items() if k in ("p50_us", "p99_us")}}
            row["remote_miss_over_local_miss"] = stats["remote_miss"]["p50_us"] / stats["local_miss"]["p50_us"]
            row["removed_by_cache"] = 1 - stats["remote_hit"]["p50_us"] / stats["remote_miss"]["p50_us"]
            rows.append(row)
            print(f"remotetok {row['prompt_tokens']:>6} tokens  p50/p99 ms: "
                  + "  ".join(f"{case.replace('_', ' ')} {_ms(stats, case)}" for case in CASES)
                  + f"  remote/local miss {row['remote_miss_over_local_miss']:.1f}x  the cache removes "
                  f"{row['removed_by_cache']:.1%} of a remote miss")

        # Busy engine: shipped budgets, 4k-token misses while the engine runs long prefills.
        system = text_of_tokens(tokenizer, 4000, seed=4000)
        busy = router(remote_tokenizers, decision_timeout=0.3)
        decisions, spans = [], []
        with Prefills(address, tokenizer) as load, GcPauses() as collector:
            async with LoopStalls() as stalls:
                for i in range(BUSY_ROUNDS):
                    started = time.perf_counter()
                    decisions.append(await _timed(busy, request(f"Busy {i}. " + system, "new")))
                    spans.append((started, started + decisions[-1]))
        slowest = max(range(BUSY_ROUNDS), key=decisions.__getitem__)
        fell_back = {reason: busy.metrics.fallbacks.labels(reason)._value.get()
                     for reason in ("remote_tokenizer", "timeout", "index", "error")}
        busy_row = {"prompt_tokens": rows[1]["prompt_tokens"], **{f"remote_miss_{k}": v for k, v in
                                                                  summary(decisions).items() if k != "n"},
                    "remote_miss_max_us": max(decisions) * 1e6, "decisions": BUSY_ROUNDS,
                    "fell_back": {reason: n for reason, n in fell_back.items() if n},
                    "tokenized": sum(busy.metrics.requests.labels(o)._value.get() for o in ("cache", "load")),
                    "prefills_done": load.sent, "slowest_gc_pause_us": collector.within(*spans[slowest]) * 1e6,
                    "gc_pause_max_us": max((b - a for a, b in collector.pauses), default=0.0) * 1e6,
                    "slowest_loop_stall_us": stalls.longest(*spans[slowest]) * 1e6,
                    "loop_stall_max_us": stalls.longest(0.0, float("inf")) * 1e6}
        print(f"remotetok busy engine (2 prefills of ~3k tokens at a time): 4k remote miss p50 "
              f"{busy_row['remote_miss_p50_us'] / 1000:.1f} ms, max {busy_row['remote_miss_max_us'] / 1000:.1f} ms; "
              f"{busy_row['tokenized']:.0f} of {BUSY_ROUNDS} decisions with the engine's tokens, fell back to load: "
              + (", ".join(f"{n:.0f} {reason}" for reason, n in busy_row["fell_back"].items()) or "none")
              + f"; {load.sent} prefills done meanwhile; the slowest decision spent "
              f"{busy_row['slowest_gc_pause_us'] / 1000:.1f} ms in this process's garbage collector "
              f"(longest pause {busy_row['gc_pause_max_us'] / 1000:.1f} ms), its event loop's longest stall was "
              f"{busy_row['slowest_loop_stall_us'] / 1000:.1f} ms (in the whole phase "
              f"{busy_row['loop_stall_max_us'] / 1000:.1f} ms)")
    finally:
        await client.close()
        local_tokenizers.close()
        remote_tokenizers.close()
        await index.close()
        engine.stop()
        server.proc.stop()
    result = {"model": MODEL, "engine": engine_kind, "block_size": 128, "index": "redis", "rows": rows,
              "busy": busy_row, "remote_timeout_ms": defaults.timeout * 1000}
    write("remotetok", result)
    return result


def _ms(stats: dict, case: str) -> str:
    return f"{stats[case]['p50_us'] / 1000:.2f}/{stats[case]['p99_us'] / 1000:.2f}"


def run() -> dict:
    return uvloop.run(run_async())


if __name__ == "__main__":
    run()
