"""Real vLLM engines on the CPU (a tiny random-weight model with the real Qwen3 tokenizer),
kv-extproc with its ingester, Redis and the real Envoy. Engines start once per session.

Run ``tests/realvllm/setup.sh`` first (``.ci/run`` does). Without the engine venv the whole
suite is skipped with one loud line.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from extproc.sim import launcher
from tests.integration.conftest import stack as integration_stack

HOME = Path(os.environ.get("KV_REALVLLM_HOME", Path.home() / ".cache" / "kv-extproc"))
VENV_PYTHON = HOME / "realvllm-venv" / "bin" / "python"
MODEL_DIR = HOME / "tiny-model"
MODEL = "Qwen/Qwen3-0.6B"
ENGINES = 3
ENGINE_BLOCK = 32
STACK_CONFIG = {"ingest": {"enabled": True, "engineBlockSize": ENGINE_BLOCK},
                "podHealth": {"interval": "500ms", "timeout": "2s", "unhealthyAfter": "1.5s", "purgeAfter": "3s"}}
"""kv-extproc's settings in front of real engines (with the ingester); shared with bench/ttft_real.py."""


def pytest_collection_modifyitems(config, items):
    ready = (HOME / "realvllm-venv" / ".complete").exists() and (MODEL_DIR / "config.json").exists()
    if ready:
        return
    message = f"REAL-VLLM SUITE SKIPPED: no engine at {HOME} (run tests/realvllm/setup.sh)"
    print(f"\n{'!' * 20} {message} {'!' * 20}", file=sys.stderr)
    for item in items:
        if "realvllm" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=message))


@dataclass
class Engine:
    name: str
    address: str
    events_port: int
    proc: launcher.Proc

    @property
    def pod_id(self) -> str:
        return self.name

    @property
    def kv_events(self) -> str:
        return f"tcp://127.0.0.1:{self.events_port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def counter(self, name: str) -> float:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))

    def post(self, path: str, body: bytes = b"{}") -> int:
        request = urllib.request.Request(f"{self.url}{path}", data=body, method="POST",
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status


def start_engine(index: int, workdir: Path, *, cpus: str | None = None, extra: Sequence[str] = ()) -> Engine:
    """Engine ``index`` on its own loopback address. ``cpus`` pins its whole process tree with
    ``taskset`` (a benchmark wants one core per engine, not three engines sharing two); ``extra``
    adds engine flags."""
    host = f"127.0.0.{21 + index}"
    port, events = launcher.free_port(host), launcher.free_port()
    kv_events = ('{"enable_kv_cache_events": true, "publisher": "zmq", '
                 f'"endpoint": "tcp://*:{events}", "topic": "kv-events"}}')
    argv = [str(VENV_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL_DIR),
            "--served-model-name", MODEL, "--host", host, "--port", str(port), "--enable-prefix-caching",
            "--block-size", str(ENGINE_BLOCK), "--max-model-len", "4096", "--kv-events-config", kv_events, *extra]
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    # Three engines share two cores: one OpenMP thread each, sleeping (not spinning) when idle.
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_SERVER_DEV_MODE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = launcher._spawn(f"vllm-{index}", argv, workdir, env=env, group=True)
    return Engine(f"engine-{index}", f"{host}:{port}", events, proc)


def reset(engine: Engine) -> None:
    """Empty the engine's prefix cache (needs VLLM_SERVER_DEV_MODE). vLLM publishes KV events from
    its step loop, so an idle engine sends AllBlocksCleared with its next step: a short request
    (no full block) runs one."""
    engine.post("/reset_prefix_cache")
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    assert engine.post("/v1/completions", body) == 200


@pytest.fixture(scope="session")
def workdir():
    return launcher.workdir("kv-extproc-realvllm-")


@pytest.fixture(scope="session")
def engines(workdir):
    started = [start_engine(i, workdir) for i in range(ENGINES)]
    try:
        deadline = time.monotonic() + 420  # they start together; ~60 s each alone
        for engine in started:
            launcher.wait_http(f"{engine.url}/health", timeout=max(1.0, deadline - time.monotonic()),
                               proc=engine.proc, interval=1.0)
        yield {e.name: e for e in started}
    finally:
        for engine in started:
            engine.proc.stop()


@pytest.fixture(scope="session")
def stack(workdir, engines, tokenizer_dir):
    with integration_stack(workdir, engines, tokenizer_dir, **STACK_CONFIG) as parts:
        yield parts
