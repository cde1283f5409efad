"""A fleet for index failover tests: simulated pods publishing real KV events (with replay
buffers), ``kv-extproc ingest`` and ``kv-extproc serve`` as separate processes, the shipped
Envoy config, and paced chat traffic from several tenants judged by where it lands.

Used by test_redis_cluster.py and test_redis_sentinel.py with the index config of their mode.
A request is "by cache" when the pod that served it already held its tenant's whole shared
prefix (the simulated pod reports cached tokens); only "telling" requests are judged: sent
while some pods held the prefix and some did not, so load routing lands on a holder only by
chance. Engine caches hold about two tenants each, so routing by load also evicts.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from extproc import config as config_mod
from extproc.index import IndexUnavailable
from extproc.index.redis import RedisIndex
from extproc.requests import parse
from extproc.sim import launcher
from extproc.sim.engine import EngineCache, KVEventPublisher, SimulatedEngine
from extproc.sim.pod import SimulatedPod
from extproc.tokenization import tokenize_with
from tests.conftest import MODEL
from tests.integration.conftest import envoy_for, extproc_config

TENANTS = 6
ENGINE_BLOCK = 16
PODS = ["pod-a", "pod-b", "pod-c"]
CAPACITY_TENANTS = 2.5
WINDOW, NEEDED = 20, 18
"""Routing by cache has resumed when 18 of 20 consecutive telling requests land on a holder."""


def system_prompt(tenant: int) -> str:
    rules = " ".join(f"Rule {i}: for tenant {tenant}, always cite source {tenant * 100 + i}." for i in range(20))
    return f"You are the assistant of tenant {tenant}. {rules}"


def messages(i: int) -> list[dict]:
    return [{"role": "system", "content": system_prompt(i % TENANTS)}, {"role": "user", "content": f"question {i}"}]


@dataclass
class Result:
    tenant: int
    sent: float
    done: float
    status: int
    served: str
    cached: int
    telling: bool


class Traffic:
    """Chat requests from ``workers`` threads, paced to at most ``rate`` per second, until stopped
    (or until ``total`` were sent)."""

    def __init__(self, url: str, shared: dict[int, int], holders, *, workers: int = 4, rate: float = 40.0,
                 total: int | None = None):
        self.url = url
        self.shared = shared
        """tenant -> tokens of its shared prefix (whole engine blocks)."""
        self.holders = holders
        """tenant -> (live pods caching its prefix now, live pods)."""
        self.rate = rate
        self.total = total
        self.results: list[Result] = []
        self._lock = threading.Lock()
        self._next = 0
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _take(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or (self.total is not None and self._next >= self.total):
                return None
            self._next += 1
            return self._next

    def _run(self) -> None:
        cycle = len(self._workers) / self.rate
        with httpx.Client(base_url=self.url, timeout=20) as client:
            while (i := self._take()) is not None:
                sent = time.monotonic()
                holding, live = self.holders(i % TENANTS)
                telling = 0 < holding < live
                try:
                    reply = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages(i)})
                    result = Result(i % TENANTS, sent, time.monotonic(), reply.status_code,
                                    reply.headers.get("x-served-by", ""), int(reply.headers.get("x-cached-tokens", 0)),
                                    telling)
                except httpx.HTTPError as exc:
                    result = Result(i % TENANTS, sent, time.monotonic(), 0, type(exc).__name__, 0, telling)
                with self._lock:
                    self.results.append(result)
                time.sleep(max(0.0, cycle - (time.monotonic() - sent)))

    def start(self) -> "Traffic":
        for worker in self._workers:
            worker.start()
        return self

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.1, end - time.monotonic()))

    def stop(self) -> list[Result]:
        self._stop.set()
        for worker in self._workers:
            worker.join(30)
        return self.snapshot()

    def snapshot(self) -> list[Result]:
        with self._lock:
            return list(self.results)

    def failures(self) -> list[Result]:
        return [r for r in self.snapshot() if r.status != 200]

    def by_cache(self, r: Result) -> bool:
        return r.status == 200 and r.cached >= self.shared[r.tenant]

    def share_by_cache(self, start: float, end: float) -> tuple[float, int]:
        told = [r for r in self.snapshot() if r.telling and start <= r.sent < end]
        return (round(sum(map(self.by_cache, told)) / len(told), 2) if told else float("nan")), len(told)

    def recovered_after(self, t0: float) -> float | None:
        """Seconds from t0 to the first request of the first window of telling requests that
        landed mostly by cache (None: not yet)."""
        after = sorted((r for r in self.snapshot() if r.sent >= t0 and r.telling), key=lambda r: r.sent)
        for i in range(len(after) - WINDOW + 1):
            window = after[i : i + WINDOW]
            if sum(map(self.by_cache, window)) >= NEEDED:
                return max(0.0, next(r for r in window if self.by_cache(r)).sent - t0)
        return None

    def wait_recovered(self, t0: float, limit: float) -> float | None:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            took = self.recovered_after(t0)
            if took is not None:
                return took
            time.sleep(0.1)
        return None


class IndexProbe:
    """Lookups of 60 block keys (spread over every shard of a cluster) every ``interval`` from a
    thread, through the product's RedisIndex with serve's timeout: when the index could not
    answer, i.e. when a decision that needs it falls back to load."""

    def __init__(self, index_conf: dict, *, interval: float = 0.02):
        self.index_conf = index_conf
        self.interval = interval
        self.results: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        index = RedisIndex.from_config(config_mod.from_dict({"index": self.index_conf}).index)
        try:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    await index.lookup(MODEL, list(range(1, 61)))
                    ok = True
                except IndexUnavailable:
                    ok = False
                self.results.append((sent, ok))
                await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - sent)))
        finally:
            await index.close()

    def start(self) -> "IndexProbe":
        self._thread.start()
        return self

    def stop(self) -> "IndexProbe":
        self._stop.set()
        self._thread.join(30)
        return self

    def unavailable(self, start: float) -> tuple[float, int]:
        """(seconds from the first failed lookup sent after ``start`` to the first lookup that
        succeeded after the last failure, failed lookups)."""
        after = [(t, ok) for t, ok in self.results if t >= start]
        failed = [t for t, ok in after if not ok]
        if not failed:
            return 0.0, 0
        back = next((t for t, ok in after if ok and t > failed[-1]), after[-1][0])
        return round(back - failed[0], 2), len(failed)


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class Fleet:
    pods: dict[str, SimulatedPod]
    shared: dict[int, int]
    prefix_hashes: dict[tuple[str, int], list[int]]
    ingester: launcher.ExtProc
    serve: launcher.ExtProc
    envoy: launcher.Envoy
    index_conf: dict
    procs: list = field(default_factory=list)

    def holders(self, tenant: int) -> tuple[int, int]:
        held = sum(all(h in pod.engine.cache.blocks for h in self.prefix_hashes[name, tenant])
                   for name, pod in self.pods.items())
        return held, len(self.pods)

    def traffic(self, **kw) -> Traffic:
        return Traffic(self.envoy.url, self.shared, self.holders, **kw).start()

    def probe(self) -> IndexProbe:
        return IndexProbe(self.index_conf).start()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.proc.stop()
        for pod in self.pods.values():
            try:
                pod.stop()
            except OSError:
                pass


def start_fleet(workdir: Path, tokenizer, tokenizer_dir: str, index: dict, *, host_base: int = 40) -> Fleet:
    """Pods, then ``kv-extproc ingest`` and ``serve`` (both on ``index``), then Envoy."""
    shared = {}
    for tenant in range(TENANTS):
        a, b = (tokenizer.apply_chat_template(messages(tenant + TENANTS * k), tokenize=True,
                                              add_generation_prompt=True)["input_ids"] for k in (1, 2))
        common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        shared[tenant] = common // ENGINE_BLOCK * ENGINE_BLOCK
    capacity = int(CAPACITY_TENANTS * max(shared.values()) / ENGINE_BLOCK)
    pods: dict[str, SimulatedPod] = {}
    procs: list = []
    try:
        for n, name in enumerate(PODS):
            host = f"127.0.0.{host_base + n}"
            engine = SimulatedEngine(lambda path, body: tokenize_with(tokenizer, parse(path, body)),
                                     EngineCache(capacity_blocks=capacity, block_size=ENGINE_BLOCK),
                                     KVEventPublisher(f"tcp://{host}:*", replay_endpoint=f"tcp://{host}:*"))
            pods[name] = SimulatedPod(name, host, launcher.free_port(host), model=MODEL, engine=engine).start()
        base = extproc_config("redis://127.0.0.1:1/0", pods, tokenizer_dir, logLevel="info")
        base["index"] = {"backend": "redis", "keyPrefix": base["index"]["keyPrefix"], "timeout": "100ms", **index}
        ingest_conf = {**base, "ingest": {"engineBlockSize": ENGINE_BLOCK, "replayTimeout": "1s"},
                       "pods": [dict(p) for p in base["pods"]]}
        for pod_conf in ingest_conf["pods"]:
            publisher = pods[pod_conf["id"]].engine.publisher
            pod_conf.update(kvEvents=publisher.endpoint, kvReplay=publisher.replay_endpoint)
        ingester = launcher.start_extproc(ingest_conf, workdir, command="ingest")
        procs.append(ingester)
        serve = launcher.start_extproc(base, workdir)
        procs.append(serve)
        envoy = envoy_for("envoy.yaml", [serve.listen], pods, workdir)
        procs.append(envoy)
    except BaseException:
        for proc in reversed(procs):
            proc.proc.stop()
        for pod in pods.values():
            pod.stop()
        raise
    prefix_hashes = {}
    for tenant in range(TENANTS):
        tokens = tokenizer.apply_chat_template(messages(tenant), tokenize=True,
                                               add_generation_prompt=True)["input_ids"][: shared[tenant]]
        for name, pod in pods.items():
            prefix_hashes[name, tenant] = pod.engine.cache.hashes(tokens)
    return Fleet(pods, shared, prefix_hashes, ingester, serve, envoy, base["index"], procs)
