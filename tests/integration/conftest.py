"""Real processes on loopback: redis-server, envoy (the shipped configs), kv-extproc, fake pods.

Expensive processes start once per session; tests isolate themselves by flushing Redis
and by choosing fresh prompts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
import redis

from extproc.sim import launcher
from extproc.blocks import block_keys
from extproc.sim.pod import SimulatedPod
from tests.conftest import MODEL

BLOCK_SIZE = 64
BODY_LIMIT = 1024 * 1024
KEY_PREFIX = "matrix:kv:block:"
MODES = ["envoy.yaml", "envoy-full-duplex.yaml", "envoy-original-dst.yaml"]
MODE_IDS = ["override-host", "full-duplex", "original-dst"]


@pytest.fixture(scope="session")
def workdir():
    return launcher.workdir("kv-extproc-it-")


@pytest.fixture(scope="session")
def redis_server(workdir):
    server = launcher.start_redis(workdir)
    yield server
    server.proc.stop()


@pytest.fixture(scope="session")
def pods() -> Iterator[dict[str, SimulatedPod]]:
    started = {}
    for n, name in enumerate(["pod-a", "pod-b", "pod-c"]):
        host = f"127.0.0.{n + 2}"
        started[name] = SimulatedPod(name, host, launcher.free_port(host), model=MODEL).start()
    yield started
    for pod in started.values():
        pod.stop()


def extproc_config(redis_url: str, pods: dict[str, SimulatedPod], tokenizer_dir: str, **extra) -> dict:
    return {
        "index": {"backend": "redis", "redisUrl": redis_url, "keyPrefix": KEY_PREFIX, "timeout": "100ms"},
        "blockSizeToHash": BLOCK_SIZE,
        "maxBlocksToMatch": 128,
        "limits": {"maxBodyBytes": BODY_LIMIT},
        "logLevel": "debug",
        "models": [{"name": MODEL, "tokenizer": tokenizer_dir}],
        "pods": [{"id": pod.pod_id, "address": pod.address, "models": [MODEL],
                  **({"kvEvents": pod.kv_events} if getattr(pod, "kv_events", "") else {})} for pod in pods.values()],
        **extra,
    }


@pytest.fixture(scope="session")
def extproc(workdir, redis_server, pods, tokenizer_dir):
    proc = launcher.start_extproc(extproc_config(redis_server.url, pods, tokenizer_dir), workdir)
    yield proc
    proc.proc.stop()


def envoy_for(mode: str, extproc_listen: list[str], pods: dict[str, SimulatedPod], workdir) -> launcher.Envoy:
    conf = launcher.render_envoy(
        mode,
        listen=f"127.0.0.1:{launcher.free_port()}",
        admin=f"127.0.0.1:{launcher.free_port()}",
        extproc=extproc_listen,
        pods=[pod.address for pod in pods.values()],
    )
    # Echo the envoy.lb dynamic metadata kv-extproc set, so tests can see Envoy received it.
    hcm = conf["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"][0]["response_headers_to_add"] = [{
        "header": {"key": "x-test-lb-metadata",
                   "value": "%DYNAMIC_METADATA(envoy.lb:x-gateway-destination-endpoint)%"},
    }]
    return launcher.start_envoy(conf, workdir)


@pytest.fixture(scope="session", params=MODES, ids=MODE_IDS)
def envoy(request, extproc, pods, workdir):
    proxy = envoy_for(request.param, [extproc.listen], pods, workdir)
    yield proxy
    proxy.proc.stop()


@pytest.fixture()
def index(redis_server) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture()
def client(envoy) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{envoy.url}/v1", api_key="unused", max_retries=0, timeout=20) as c:
        yield c


@pytest.fixture()
def http(envoy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=envoy.url, timeout=20) as c:
        yield c


@dataclass
class Cache:
    """Writes index entries the way the ingester does: HSET prefix{model}@{key} pod unix-seconds."""

    index: redis.Redis
    tokenizer: object

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])

    def keys(self, tokens: list[int]) -> list[int]:
        return block_keys(tokens, BLOCK_SIZE, 128)

    def store(self, pod: str, keys: list[int], at: float = 1_700_000_000.0) -> None:
        for key in keys:
            self.index.hset(f"{KEY_PREFIX}{MODEL}@{key}", pod, str(at))


@pytest.fixture()
def cache(index, tokenizer) -> Cache:
    return Cache(index, tokenizer)


def served_by(completion) -> str:
    return completion.choices[0].message.content


@contextlib.contextmanager
def stack(workdir, pods, tokenizer_dir, mode="envoy.yaml", **extra):
    """A private redis + kv-extproc + envoy, for tests that break one of them."""
    server = launcher.start_redis(workdir)
    proc = launcher.start_extproc(extproc_config(server.url, pods, tokenizer_dir, **extra), workdir)
    proxy = envoy_for(mode, [proc.listen], pods, workdir)
    try:
        yield server, proc, proxy
    finally:
        proxy.proc.stop()
        proc.proc.stop()
        server.proc.stop()


def wait_until(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    """Poll until ``predicate()`` is true; fail the test naming ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class LoadLoop:
    """A bounded loop of chat requests through Envoy from a few threads; records every outcome."""

    def __init__(self, url: str, *, total: int = 400, threads: int = 4, seconds: float = 60.0, prompt=None,
                 extra: dict | None = None):
        import threading

        self.url = url
        self.total = total
        self.threads = threads
        self.deadline = time.monotonic() + seconds
        self.prompt = prompt or (lambda i: [{"role": "user", "content": f"load {i}"}])
        self.extra = extra or {}
        """More body fields, e.g. max_tokens for a real engine."""
        self.results: list[tuple[float, int, str]] = []  # (time, status, served by or error)
        self.chosen: list[tuple[float, str]] = []  # (time, the address kv-extproc chose; "" if none)
        self.timeline: list[tuple[float, float, int]] = []  # (sent, done, status)
        self._lock = threading.Lock()
        self._next = 0
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= self.total or time.monotonic() > self.deadline:
                return None
            self._next += 1
            return self._next

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=20) as client:
            while (i := self._take()) is not None:
                sent = time.monotonic()
                try:
                    reply = client.post("/v1/chat/completions",
                                        json={"model": MODEL, "messages": self.prompt(i), **self.extra})
                    outcome = (time.monotonic(), reply.status_code, reply.headers.get("x-served-by", ""))
                    self.chosen.append((outcome[0], reply.headers.get("x-test-lb-metadata", "")))
                except httpx.HTTPError as exc:
                    outcome = (time.monotonic(), 0, f"{type(exc).__name__}: {exc}")
                with self._lock:
                    self.results.append(outcome)
                    self.timeline.append((sent, outcome[0], outcome[1]))

    def start(self) -> "LoadLoop":
        for worker in self._workers:
            worker.start()
        return self

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while len(self.results) < count and time.monotonic() < end:
            time.sleep(0.01)

    def join(self) -> "LoadLoop":
        for worker in self._workers:
            worker.join(90)
        return self

    def failures(self) -> list[tuple[float, int, str]]:
        return [r for r in self.results if r[1] != 200]


@contextlib.contextmanager
def event_fleet(workdir, tokenizer, tokenizer_dir, *, capacity_blocks: int = 300, hosts_from: int = 5,
                mode: str = "envoy.yaml", cache=None, timing: dict | None = None, **extra):
    """Redis + three fake pods that keep a prefix cache and publish KV events + kv-extproc
    ingesting them (inside serve) + Envoy. Yields (redis, pods, kv-extproc, envoy).
    ``cache``: makes each pod's engine cache (default: an EngineCache of ``capacity_blocks``);
    ``timing``: SimulatedEngine timing (prefill_tokens_per_s, decode_s) for load-realistic pods."""
    from extproc.sim.engine import EngineCache, KVEventPublisher, SimulatedEngine
    from extproc.requests import parse
    from extproc.tokenization import tokenize_with

    server = launcher.start_redis(workdir)
    pods = {}
    for n, name in enumerate(["pod-a", "pod-b", "pod-c"]):
        host = f"127.0.0.{n + hosts_from}"
        engine = SimulatedEngine(
            lambda path, body: tokenize_with(tokenizer, parse(path, body)),
            cache() if cache is not None else EngineCache(capacity_blocks=capacity_blocks, block_size=16),
            KVEventPublisher(f"tcp://{host}:*"),
            **(timing or {}),
        )
        pods[name] = SimulatedPod(name, host, launcher.free_port(host), model=MODEL, engine=engine).start()
    conf = extproc_config(server.url, pods, tokenizer_dir, ingest={"enabled": True, "engineBlockSize": 16}, **extra)
    for pod_conf in conf["pods"]:
        pod_conf["kvEvents"] = pods[pod_conf["id"]].engine.publisher.endpoint
    proc = launcher.start_extproc(conf, workdir)
    proxy = envoy_for(mode, [proc.listen], pods, workdir)
    try:
        yield server, pods, proc, proxy
    finally:
        proxy.proc.stop()
        proc.proc.stop()
        for pod in pods.values():
            try:
                pod.stop()
            except OSError:
                pass
        server.proc.stop()
