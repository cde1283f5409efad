"""``kv-extproc quickstart``: Envoy + kv-extproc + Redis + three simulated vLLM pods, locally.

Each simulated pod keeps a prefix cache and publishes vLLM KV events over ZMQ; kv-extproc
ingests them (``ingest.enabled``) into Redis, so the demo shows requests that share a
system prompt following the cache their pod reports.
"""

from __future__ import annotations

import json
import time
import urllib.request

from . import launcher
from .engine import EngineCache, KVEventPublisher, SimulatedEngine
from .pod import SimulatedPod
from ..requests import parse
from ..tokenization import load_tokenizer, tokenize_with

MODEL = "Qwen/Qwen3-0.6B"
BLOCK_SIZE = 64

TENANTS = {
    "support": "You are the support assistant of a cloud GPU provider. Answer politely, cite the runbook, "
    "and escalate billing disputes. " * 12,
    "legal": "You review contracts for a law firm. Flag indemnity, liability caps, termination and governing "
    "law clauses, quoting each clause exactly. " * 12,
}
DEMO = [
    ("support", "My instance will not boot."),
    ("support", "How do I resize a volume?"),
    ("legal", "Review clause 7 of the attached MSA."),
    ("support", "Where is my invoice?"),
    ("legal", "Is the liability cap mutual?"),
]


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as reply:
        return json.load(reply)


def run(*, port: int = 8080, stay_up: bool = True) -> int:
    workdir = launcher.workdir("kv-extproc-quickstart-")
    tokenizer_dir = launcher.bundled_tokenizer_dir()
    tokenizer = load_tokenizer(tokenizer_dir)
    redis_server = launcher.start_redis(workdir)
    pods = []
    extproc = envoy = None
    try:
        for n, name in enumerate(["pod-a", "pod-b", "pod-c"]):
            host = f"127.0.0.{n + 2}"
            engine = SimulatedEngine(
                lambda path, body: tokenize_with(tokenizer, parse(path, body)),
                EngineCache(capacity_blocks=4096, block_size=16),
                KVEventPublisher(f"tcp://{host}:*"),
                prefill_tokens_per_s=20_000.0, decode_s=0.02,  # queues and /metrics like an engine's
            )
            pods.append(SimulatedPod(name, host, launcher.free_port(host), model=MODEL, engine=engine).start())
        extproc = launcher.start_extproc(
            {
                "index": {"backend": "redis", "redisUrl": redis_server.url},
                "blockSizeToHash": BLOCK_SIZE,
                "models": [{"name": MODEL, "tokenizer": tokenizer_dir}],
                "ingest": {"enabled": True, "engineBlockSize": 16},
                "endpointPicker": {"fallbackEndpoints": launcher.paired_fallback_endpoints("envoy.yaml")},
                "pods": [{"id": p.pod_id, "address": p.address, "kvEvents": p.engine.publisher.endpoint} for p in pods],
            },
            workdir,
        )
        envoy = launcher.start_envoy(
            launcher.render_envoy(
                "envoy.yaml",
                listen=f"127.0.0.1:{port or launcher.free_port()}",
                admin=f"127.0.0.1:{launcher.free_port()}",
                extproc=[extproc.listen],
                pods=[p.address for p in pods],
            ),
            workdir,
        )
        print(f"Envoy on {envoy.url} -> kv-extproc on {extproc.listen} -> pods "
              + ", ".join(f"{p.pod_id}@{p.address}" for p in pods))
        print(f"Redis index at {redis_server.url}; logs in {workdir}\n")
        for n, (tenant, question) in enumerate(DEMO, 1):
            reply = _post(f"{envoy.url}/v1/chat/completions", {
                "model": MODEL,
                "messages": [{"role": "system", "content": TENANTS[tenant]}, {"role": "user", "content": question}],
            })
            print(f"request {n}: tenant={tenant:<8} {question!r:<42} -> served by {reply['choices'][0]['message']['content']}")
            time.sleep(0.3)  # the pod's KV events reach the index within milliseconds; leave a margin
        print("\nRequests of one tenant share a system prompt: after the first, its pod's KV events put the")
        print("prompt's blocks in the index, and the rest follow that cache.")
        if stay_up:
            print(f"\nStill up. Try:\n  curl -s {envoy.url}/v1/chat/completions -H 'content-type: application/json' "
                  f"-d '{{\"model\": \"{MODEL}\", \"messages\": [{{\"role\": \"user\", \"content\": \"hello\"}}]}}'\n"
                  f"  curl -s http://{extproc.config['metricsListen']}/metrics | grep kv_extproc_requests\n"
                  "Ctrl-C stops everything.")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for part in (envoy, extproc):
            if part is not None:
                part.proc.stop()
        for pod in pods:
            pod.stop()
        redis_server.proc.stop()
    return 0
