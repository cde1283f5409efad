"""End to end through the real Envoy: KV tiers and data-parallel ranks.

- Simulated engines that offload to CPU memory (every block also written to a CPU tier, events
  naming the medium, as vLLM's OffloadingConnector with self_describing_kv_events): a pod whose
  GPU evicted a prefix that its CPU memory still holds keeps attracting that prefix, and ranks
  below a pod holding it on its GPU.
- A simulated vLLM with --data-parallel-size 2 behind one address (each rank its own cache and
  publisher on port + rank, batches tagged with the rank): a prefix cached by one rank pulls its
  requests to that pod with X-data-parallel-rank naming that rank; a client's own rank header
  is replaced; a retry on another pod does not carry the rank.
"""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest
import redis

from extproc.blocks import block_keys
from extproc.requests import parse
from extproc.sim import launcher
from extproc.sim.engine import DataParallelEngine, EngineCache, KVEventPublisher, OffloadingEngineCache, SimulatedEngine
from extproc.sim.pod import SimulatedPod
from extproc.tokenization import tokenize_with
from tests.conftest import MODEL
from tests.integration.conftest import BLOCK_SIZE, KEY_PREFIX, envoy_for, event_fleet, extproc_config, wait_until

pytestmark = pytest.mark.integration

GPU_BLOCKS = 100  # 16-token blocks: one tenant prompt (~70 blocks) fits, two do not
CPU_BLOCKS = 2000


def system_prompt(tenant: int) -> str:
    return f"Tenant {tenant} handbook. " + " ".join(f"Section {i}: follow procedure {tenant}-{i} exactly." for i in range(90))


def messages(tenant: int, user: str) -> list[dict]:
    return [{"role": "system", "content": system_prompt(tenant)}, {"role": "user", "content": user}]


def body(tenant: int, user: str) -> bytes:
    return json.dumps({"model": MODEL, "messages": messages(tenant, user), "max_tokens": 1}).encode()


def first_block_holders(r: redis.Redis, tokenizer, tenant: int) -> set[str]:
    tokens = tokenizer.apply_chat_template(messages(tenant, "x"), tokenize=True, add_generation_prompt=True)["input_ids"]
    key = block_keys(list(tokens), BLOCK_SIZE, 1)[0]
    return {k.decode() for k in r.hkeys(f"{KEY_PREFIX}{MODEL}@{key}")}


def chat(url: str, tenant: int, user: str, headers: dict[str, str] | None = None) -> tuple[str, int]:
    """(the pod that answered, prompt tokens it had cached)."""
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body(tenant, user),
                                     headers={"content-type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=20) as response:
        answer = json.loads(response.read())
        return answer["choices"][0]["message"]["content"], int(response.headers["x-cached-tokens"])


def serve_directly(engine, tenant: int, user: str = "warm up") -> None:
    engine.serve("/v1/chat/completions", body(tenant, user))


# -- tiers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offloading_fleet(workdir, tokenizer, tokenizer_dir):
    with event_fleet(workdir, tokenizer, tokenizer_dir, hosts_from=30,
                     cache=lambda: OffloadingEngineCache(GPU_BLOCKS, 16, cpu_blocks=CPU_BLOCKS)) as parts:
        yield parts


def idle(proc) -> bool:
    """kv-extproc's last readings of every engine show nothing running or waiting (the requests
    served directly below are load the ttft scorer would rightly route around)."""
    lines = [line for line in proc.metrics().splitlines()
             if line.startswith(("kv_extproc_pod_engine_requests_running{", "kv_extproc_pod_engine_requests_waiting{"))]
    return len(lines) == 6 and all(float(line.split()[-1]) == 0.0 for line in lines)


def test_a_prefix_offloaded_to_cpu_still_attracts_and_ranks_below_one_on_a_gpu(offloading_fleet, tokenizer):
    server, pods, proc, proxy = offloading_fleet
    r = redis.Redis.from_url(server.url)
    first, _ = chat(proxy.url, 1, "first question")
    wait_until(lambda: first_block_holders(r, tokenizer, 1) == {first, f"{first}|CPU"},
               what="the prefix indexed on the pod's GPU and CPU")
    # The pod's GPU serves two other tenants and evicts tenant 1; its CPU memory keeps it.
    for tenant in (2, 3):
        serve_directly(pods[first].engine, tenant)
    wait_until(lambda: first_block_holders(r, tokenizer, 1) == {f"{first}|CPU"}, what="the GPU copy evicted")
    wait_until(lambda: idle(proc), what="an idle fleet in kv-extproc's engine readings")
    # Nobody holds it on a GPU: the CPU copy decides, and the engine reloads instead of computing.
    answered = [chat(proxy.url, 1, f"question {i}") for i in range(3)]
    assert [pod for pod, _ in answered] == [first] * 3
    assert all(cached > 1000 for _, cached in answered), answered
    # Another pod gets it onto its GPU; the first pod's GPU evicts it again.
    other = next(name for name in pods if name != first)
    serve_directly(pods[other].engine, 1)
    for tenant in (4, 5):
        serve_directly(pods[first].engine, tenant)
    wait_until(lambda: first_block_holders(r, tokenizer, 1) == {other, f"{other}|CPU", f"{first}|CPU"},
               what="tenant 1 on the other pod's GPU, on the first pod's CPU only")
    wait_until(lambda: idle(proc), what="an idle fleet in kv-extproc's engine readings")
    assert [chat(proxy.url, 1, f"later {i}")[0] for i in range(3)] == [other] * 3


# -- data-parallel ranks --------------------------------------------------------------


def consecutive_ports(host: str, count: int) -> int:
    """A port P with P..P+count-1 free on ``host`` (a DP engine publishes on port + rank)."""
    for _ in range(100):
        base = launcher.free_port(host)
        held = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sock.bind((host, port))
                held.append(sock)
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no run of free ports")


@pytest.fixture(scope="module")
def dp_fleet(workdir, tokenizer, tokenizer_dir):
    def tokenize(path, raw):
        return tokenize_with(tokenizer, parse(path, raw))

    server = launcher.start_redis(workdir)
    dp_host, plain_host = "127.0.0.40", "127.0.0.41"
    base = consecutive_ports(dp_host, 2)
    dp = DataParallelEngine([
        SimulatedEngine(tokenize, EngineCache(300, 16), KVEventPublisher(f"tcp://{dp_host}:{base + rank}", rank=rank, bind=True))
        for rank in range(2)
    ])
    plain = SimulatedEngine(tokenize, EngineCache(300, 16), KVEventPublisher(f"tcp://{plain_host}:*"))
    pods = {
        "pod-dp": SimulatedPod("pod-dp", dp_host, launcher.free_port(dp_host), model=MODEL, engine=dp).start(),
        "pod-b": SimulatedPod("pod-b", plain_host, launcher.free_port(plain_host), model=MODEL, engine=plain).start(),
    }
    conf = extproc_config(server.url, pods, tokenizer_dir, ingest={"enabled": True, "engineBlockSize": 16},
                          endpointPicker={"fallbackEndpoints": 2}, podHealth={"enabled": False})
    conf["pods"][0].update(kvEvents=f"tcp://{dp_host}:{base}", dataParallelSize=2)
    conf["pods"][1].update(kvEvents=plain.publisher.endpoint)
    proc = launcher.start_extproc(conf, workdir)
    proxy = envoy_for("envoy.yaml", [proc.listen], pods, workdir)
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


def test_a_rank_holding_the_prefix_gets_its_requests_pinned_and_a_retry_elsewhere_carries_no_rank(dp_fleet, tokenizer):
    server, pods, proc, proxy = dp_fleet
    r = redis.Redis.from_url(server.url)
    dp = pods["pod-dp"].engine
    # Rank 1 caches tenant 1, rank 0 tenant 2: each rank's events land under its own endpoint.
    serve_directly(dp.ranks[1], 1)
    serve_directly(dp.ranks[0], 2)
    wait_until(lambda: first_block_holders(r, tokenizer, 1) == {"pod-dp#1"}, what="rank 1's events indexed")
    wait_until(lambda: first_block_holders(r, tokenizer, 2) == {"pod-dp#0"}, what="rank 0's events indexed")
    for tenant, rank in ((1, 1), (2, 0), (1, 1)):
        # A client's own rank header is no say in it.
        pod, cached = chat(proxy.url, tenant, "question", headers={"X-data-parallel-rank": str(1 - rank)})
        assert pod == "pod-dp" and dp.served_by[-1] == rank and cached > 1000
        assert pods["pod-dp"].received[-1].headers["x-data-parallel-rank"] == str(rank)
    # A prefix nobody holds: the answer comes from whichever candidate, and a rank of the DP
    # pod is always named (each rank is a candidate of its own).
    for i in range(4):
        pod, _ = chat(proxy.url, 7 + i, "cold")
        last = pods[pod].received[-1].headers
        assert ("x-data-parallel-rank" in last) == (pod == "pod-dp")
    # The DP pod drops requests unanswered: Envoy retries on the next address, which must not
    # get rank 1 (vLLM would pin it there, or refuse a rank it does not have).
    retries_before = envoy_counter(proxy, "cluster.vllm_pods.upstream_rq_retry")
    pods["pod-dp"].down = True
    pod, _ = chat(proxy.url, 1, "after the DP pod went away")
    assert pod == "pod-b"
    assert envoy_counter(proxy, "cluster.vllm_pods.upstream_rq_retry") > retries_before
    assert "x-data-parallel-rank" not in pods["pod-b"].received[-1].headers


def envoy_counter(proxy, name: str) -> int:
    with urllib.request.urlopen(f"http://{proxy.admin}/stats?filter=^{name}$", timeout=5) as response:
        for line in response.read().decode().splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
    return 0
