"""Retrying on the next-best pod: envoy.yaml (the override-host policy) with kv-extproc's fallback list,
through the real Envoy, against simulated pods running as their own processes so that a pod
can be SIGKILLed (its listening socket and every open connection die with it).

Also: each shipped Envoy config with the fallbackEndpoints it pairs with, and the pod-kill
under steady load measurement on envoy.yaml and on envoy-original-dst.yaml (ORIGINAL_DST) for comparison.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import time

import httpx
import pytest
import redis

from extproc.blocks import block_keys
from extproc.sim import launcher
from tests.conftest import MODEL
from tests.integration.conftest import BLOCK_SIZE, KEY_PREFIX, LoadLoop, envoy_for, extproc_config, wait_until

pytestmark = pytest.mark.integration

SYSTEM = "You are the tenant-9 assistant. " + " ".join(f"Rule {i}: answer from source {i}." for i in range(80))
CONFIGS = sorted(p.name for p in launcher.envoy_config_dir().glob("*.yaml"))


def tenant(i: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"question {i}"}]


class PodProcess:
    """``kv-extproc simulate-pod`` in its own process: SIGKILL is a real pod crash."""

    def __init__(self, pod_id: str, host: str, workdir):
        self.pod_id = pod_id
        self.address = f"{host}:{launcher.free_port(host)}"
        self.proc = launcher._spawn(f"pod-{pod_id}-{self.address.replace(':', '-')}",
                                    [sys.executable, "-m", "extproc", "simulate-pod", "--id", pod_id,
                                     "--listen", self.address, "--model", MODEL], workdir)
        host, _, port = self.address.rpartition(":")
        launcher.wait_tcp(host, int(port), timeout=30, proc=self.proc)


@contextlib.contextmanager
def fleet(workdir, tokenizer_dir, envoy_name: str, first_host: int, *, fallbacks: int | None = None, **extra):
    """Redis + 3 pod processes + kv-extproc (with the fallback list the config pairs with) + Envoy."""
    server = launcher.start_redis(workdir)
    pods = {}
    proc = proxy = None
    try:
        for n, name in enumerate(["pod-a", "pod-b", "pod-c"]):
            pods[name] = PodProcess(name, f"127.0.0.{first_host + n}", workdir)
        paired = launcher.paired_fallback_endpoints(envoy_name) if fallbacks is None else fallbacks
        conf = extproc_config(server.url, pods, tokenizer_dir, endpointPicker={"fallbackEndpoints": paired}, **extra)
        proc = launcher.start_extproc(conf, workdir)
        proxy = envoy_for(envoy_name, [proc.listen], pods, workdir)
        yield server, pods, proc, proxy
    finally:
        for item in (proxy, proc):
            if item is not None:
                item.proc.stop()
        for pod in pods.values():
            pod.proc.stop()
        server.proc.stop()


def store_prefix(r: redis.Redis, tokenizer, pod: str, blocks: int | None = None) -> None:
    """Index the tenant's system prompt (or its first ``blocks`` blocks) as cached on ``pod``."""
    shared = len(tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}], tokenize=True)["input_ids"])
    tokens = list(tokenizer.apply_chat_template(tenant(0), tokenize=True, add_generation_prompt=True)["input_ids"])
    keys = block_keys(tokens[:shared], BLOCK_SIZE, 128)
    for key in keys[:blocks]:
        r.hset(f"{KEY_PREFIX}{MODEL}@{key}", pod, str(time.time()))


def ask(client: httpx.Client, i: int) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": tenant(i)})


@pytest.mark.parametrize("name", CONFIGS)
def test_each_shipped_config_works_with_the_fallback_list_it_pairs_with(name, workdir, tokenizer_dir, tokenizer):
    paired = launcher.paired_fallback_endpoints(name)
    with fleet(workdir, tokenizer_dir, name, 60 + 3 * CONFIGS.index(name)) as (server, pods, proc, proxy):
        r = redis.Redis.from_url(server.url)
        store_prefix(r, tokenizer, "pod-b")
        with httpx.Client(base_url=proxy.url, timeout=20) as client:
            replies = [ask(client, i) for i in range(6)]
        assert [x.status_code for x in replies] == [200] * 6
        assert {x.headers["x-served-by"] for x in replies} == {"pod-b"}
        listed = replies[0].headers["x-test-lb-metadata"].split(",")
        assert len(listed) == 1 + paired and listed[0] == pods["pod-b"].address
        r.close()


def test_an_original_dst_config_cannot_read_a_fallback_list(workdir, tokenizer_dir):
    """Why the pairing matters: a list sent to an ORIGINAL_DST config names no single upstream."""
    with fleet(workdir, tokenizer_dir, "envoy-original-dst.yaml", 70, fallbacks=2) as (_, pods, proc, proxy):
        with httpx.Client(base_url=proxy.url, timeout=20) as client:
            statuses = {ask(client, i).status_code for i in range(3)}
        assert statuses != {200}


def test_the_chosen_pod_killed_just_before_requests_arrive_they_are_served_by_the_second_choice(
        workdir, tokenizer_dir, tokenizer):
    with fleet(workdir, tokenizer_dir, "envoy.yaml", 73) as (server, pods, proc, proxy):
        r = redis.Redis.from_url(server.url)
        store_prefix(r, tokenizer, "pod-a")
        store_prefix(r, tokenizer, "pod-c", blocks=2)  # second best by cache: the retry goes there
        with httpx.Client(base_url=proxy.url, timeout=20) as client:
            warm = [ask(client, i) for i in range(4)]  # Envoy now holds open connections to pod-a
            assert {x.headers["x-served-by"] for x in warm} == {"pod-a"}
            assert warm[0].headers["x-test-lb-metadata"].split(",")[:2] == [pods["pod-a"].address,
                                                                              pods["pod-c"].address]
            pods["pod-a"].proc.kill()  # SIGKILL: no goodbye, its connections die with it
            after = [ask(client, i) for i in range(4, 24)]
        assert [x.status_code for x in after] == [200] * 20
        assert {x.headers["x-served-by"] for x in after} == {"pod-c"}, "the second choice, not any pod"
        # kv-extproc still ranked the dead pod first (its health checks take 3 s): Envoy retried.
        assert after[0].headers["x-test-lb-metadata"].startswith(pods["pod-a"].address)
        r.close()


def test_fail_open_spoofing_and_body_limits_hold_on_the_default_override_host_config(workdir, tokenizer_dir):
    with fleet(workdir, tokenizer_dir, "envoy.yaml", 76) as (_, pods, proc, proxy):
        with httpx.Client(base_url=proxy.url, timeout=20) as client:
            too_big = client.post("/v1/completions", content=b'{"model": "%s", "prompt": "%s"}' % (
                MODEL.encode(), b"x" * (1024 * 1024 + 10)), headers={"content-type": "application/json"})
            assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
            proc.proc.kill()
            spoofed = [client.post("/v1/completions", json={"model": MODEL, "prompt": "x"},
                                   headers={"x-gateway-destination-endpoint": pods["pod-c"].address})
                       for _ in range(9)]
        assert [x.status_code for x in spoofed] == [200] * 9, "kv-extproc down: Envoy fails open"
        assert len({x.headers["x-served-by"] for x in spoofed}) > 1, "the client's header chose nothing"


def measure_pod_kill(envoy_name: str, workdir, tokenizer_dir, tokenizer, first_host: int) -> dict:
    """4 clients of steady traffic on one hot prefix; SIGKILL the pod holding it mid-run."""
    with fleet(workdir, tokenizer_dir, envoy_name, first_host) as (server, pods, proc, proxy):
        r = redis.Redis.from_url(server.url)
        store_prefix(r, tokenizer, "pod-a")
        loop = LoadLoop(proxy.url, total=3000, threads=4, seconds=40, prompt=tenant).start()
        loop.wait_for(300)
        killed_at = time.monotonic()
        pods["pod-a"].proc.kill()
        wait_until(lambda: 'kv_extproc_pod_healthy{pod="pod-a"} 0.0' in proc.metrics(), timeout=15,
                   what="kv-extproc's health checks to take pod-a out")
        noticed = time.monotonic() - killed_at
        loop.wait_for(len(loop.results) + 300)
        loop.deadline = 0  # stop sending
        loop.join()
        r.close()
        elapsed = loop.results[-1][0] - loop.results[0][0]
        return {"config": envoy_name, "requests": len(loop.results), "failed": len(loop.failures()),
                "statuses": dict(collections.Counter(s for _, s, _ in loop.failures())),
                "req_per_s": round(len(loop.results) / elapsed), "noticed_after_s": round(noticed, 1),
                "served": dict(collections.Counter(s for _, st, s in loop.results if st == 200))}


def test_pod_kill_under_steady_load_loses_nothing_on_override_host_and_requests_on_original_dst(
        workdir, tokenizer_dir, tokenizer):
    """The measurement of issue 15, both configs side by side (printed; run with -s to see it)."""
    override = measure_pod_kill("envoy.yaml", workdir, tokenizer_dir, tokenizer, 80)
    original = measure_pod_kill("envoy-original-dst.yaml", workdir, tokenizer_dir, tokenizer, 84)
    for figures in (override, original):
        print(f"\npod kill under load: {figures}")
    assert override["failed"] == 0, override
    assert original["failed"] > 0, "ORIGINAL_DST has no second address to retry: if this passes, revisit the README"


@pytest.mark.parametrize("subset, expect", [(["pod-c"], 200), ([], 503), (["nowhere"], 503)],
                         ids=["one-endpoint", "empty", "unknown-endpoint"])
def test_the_proxys_subset_hint_reaches_kv_extproc_through_envoy(subset, expect, workdir, pods, extproc, cache):
    """A gateway's subset hint (filter metadata envoy.lb.subset_hint, set here by Envoy's
    set_metadata filter before ext_proc) limits the choice; none eligible -> 503 JSON."""
    addresses = [pods[name].address if name in pods else "10.9.9.9:8000" for name in subset]
    conf = launcher.render_envoy("envoy.yaml", listen=f"127.0.0.1:{launcher.free_port()}",
                                 admin=f"127.0.0.1:{launcher.free_port()}", extproc=[extproc.listen],
                                 pods=[pod.address for pod in pods.values()])
    hcm = conf["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"].insert(0, {"name": "envoy.filters.http.set_metadata", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
        "metadata": [{"metadata_namespace": "envoy.lb.subset_hint",
                      "value": {"x-gateway-destination-endpoint-subset": addresses}}]}})
    proxy = launcher.start_envoy(conf, workdir)
    try:
        cache.store("pod-b", cache.keys(cache.chat_tokens(tenant(0))))  # the cache says pod-b
        with httpx.Client(base_url=proxy.url, timeout=20) as client:
            replies = [ask(client, i) for i in range(4)]
        assert {x.status_code for x in replies} == {expect}
        if expect == 200:
            assert {x.headers["x-served-by"] for x in replies} == {"pod-c"}, "only the hinted endpoint"
        else:
            assert replies[0].json()["error"]["code"] == "no_eligible_endpoint"
    finally:
        proxy.proc.stop()
