"""Discovery end to end: ``kv-extproc serve`` finding its pods through DNS (a real authoritative
server from dnslib on loopback) or Kubernetes (our own list/watch API server), simulated pods on
distinct loopback addresses that publish real KV events on the same port, Redis and Envoy.

With DNS, Envoy resolves the same name through the same server (STRICT_DNS), so the
override-host policy and kv-extproc see one pod list: the EDS-free pairing the README describes.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import time

import httpx
import pytest
import redis

from extproc.sim import launcher
from extproc.sim.engine import EngineCache, KVEventPublisher, SimulatedEngine
from extproc.sim.pod import SimulatedPod
from tests.conftest import MODEL
from tests.harness.dns_server import DnsTestServer, Zone
from tests.harness.kube_api import FakeKubeApi
from tests.integration.conftest import extproc_config, wait_until

pytestmark = pytest.mark.integration

NAME = "vllm.inference.svc.cluster.local"


@contextlib.contextmanager
def engines(tokenizer, hosts: list[str]):
    """Simulated pods on the given loopback addresses, all on one HTTP port and one KV event port."""
    from extproc.requests import parse
    from extproc.tokenization import tokenize_with

    http_port, events_port = launcher.free_port(hosts[0]), launcher.free_port(hosts[0])
    pods = {}
    try:
        for host in hosts:
            engine = SimulatedEngine(lambda path, body: tokenize_with(tokenizer, parse(path, body)),
                                     EngineCache(capacity_blocks=400, block_size=16),
                                     KVEventPublisher(f"tcp://{host}:{events_port}", bind=True))
            pods[host] = SimulatedPod(f"pod@{host}", host, http_port, model=MODEL, engine=engine).start()
        yield pods, http_port, events_port
    finally:
        for pod in pods.values():
            pod.stop()


def chat(i: int, tenant: int = 0) -> dict:
    system = f"Tenant {tenant} system prompt. " + " ".join(f"Rule {n} of tenant {tenant}." for n in range(60))
    return {"model": MODEL, "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}]}


_TENANTS = itertools.count(10_000)


def served(client: httpx.Client, n: int, tenant_from: int = 0) -> list[str]:
    """Who serves ``n`` requests of tenants never seen before (no cache to follow: spread by load)."""
    out = []
    for i in range(n):
        reply = client.post("/v1/chat/completions", json=chat(i, tenant=next(_TENANTS)))
        assert reply.status_code == 200, reply.text
        out.append(reply.headers["x-served-by"])
    return out


def render_dns_envoy(extproc_listen: str, dns: DnsTestServer, http_port: int) -> dict:
    conf = launcher.render_envoy("envoy.yaml", listen=f"127.0.0.1:{launcher.free_port()}",
                                 admin=f"127.0.0.1:{launcher.free_port()}", extproc=[extproc_listen],
                                 pods=[f"{NAME}:{http_port}"])
    cluster = next(c for c in conf["static_resources"]["clusters"] if c["name"] == "vllm_pods")
    cluster.update({
        "dns_refresh_rate": "0.5s", "respect_dns_ttl": False, "dns_lookup_family": "V4_ONLY",
        "typed_dns_resolver_config": {
            "name": "envoy.network.dns_resolver.cares",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
                "resolvers": [{"socket_address": {"address": dns.host, "port_value": dns.port}}],
                "use_resolvers_as_fallback": False}},
    })
    return conf


def test_dns_discovery_routes_to_resolved_pods_subscribes_new_ones_and_drops_removed_ones(workdir, tokenizer,
                                                                                          tokenizer_dir):
    hosts = ["127.0.0.91", "127.0.0.92", "127.0.0.93"]
    zone = Zone()
    dns = DnsTestServer(zone).start()
    server = launcher.start_redis(workdir)
    with engines(tokenizer, hosts) as (pods, http_port, events_port):
        zone.set(NAME, hosts[:2])
        conf = extproc_config(server.url, {}, tokenizer_dir, ingest={"enabled": True, "engineBlockSize": 16},
                              endpointPicker={"fallbackEndpoints": 2},
                              discovery={"type": "dns", "purgeAfter": "1s", "dns": {
                                  "name": NAME, "port": http_port, "kvEventsPort": events_port, "models": [MODEL],
                                  "nameserver": dns.address, "interval": "200ms"}})
        del conf["pods"]
        proc = launcher.start_extproc(conf, workdir)
        proxy = launcher.start_envoy(render_dns_envoy(proc.listen, dns, http_port), workdir)
        r = redis.Redis.from_url(server.url)
        try:
            with httpx.Client(base_url=proxy.url, timeout=20) as client:
                wait_until(lambda: set(served(client, 6)) == {f"pod@{h}" for h in hosts[:2]}, timeout=20,
                           what="both resolved pods to serve")
                zone.set(NAME, hosts)  # a pod scales up
                wait_until(lambda: f"pod@{hosts[2]}" in served(client, 6, 100), timeout=20, what="the new pod to serve")
                # The new pod's KV events are subscribed: what it served is in the index under its id.
                new_id = f"{hosts[2]}:{http_port}"
                wait_until(lambda: any(r.hexists(k, new_id) for k in r.scan_iter("matrix:kv:block:*")),
                           timeout=20, what="the new pod's KV events in the index")
                # Cache-aware across the discovered fleet: a repeated prompt goes where its prefix is.
                first = client.post("/v1/chat/completions", json=chat(0, tenant=500)).headers["x-served-by"]
                time.sleep(0.5)  # its KV events reach the index
                again = {client.post("/v1/chat/completions", json=chat(i, tenant=500)).headers["x-served-by"]
                         for i in range(1, 5)}
                assert again == {first}
                zone.set(NAME, hosts[1:])  # a pod scales down
                time.sleep(1.0)  # discovery interval + Envoy's DNS refresh
                after = served(client, 12, 200)
                assert f"pod@{hosts[0]}" not in after and set(after) == {f"pod@{h}" for h in hosts[1:]}
                gone_id = f"{hosts[0]}:{http_port}"
                wait_until(lambda: not any(r.hexists(k, gone_id) for k in r.scan_iter("matrix:kv:block:*")),
                           timeout=10, what="the removed pod's entries purged after purgeAfter")
        finally:
            r.close()
            proxy.proc.stop()
            proc.proc.stop()
            server.proc.stop()
            dns.stop()


def test_kubernetes_discovery_follows_readiness_and_new_pods_and_purges_after_purge_after(workdir, tokenizer,
                                                                                       tokenizer_dir):
    hosts = ["127.0.0.95", "127.0.0.96", "127.0.0.97"]
    api = FakeKubeApi(bookmark_interval=0.5).start()
    server = launcher.start_redis(workdir)
    with engines(tokenizer, hosts) as (pods, http_port, events_port):
        for n, host in enumerate(hosts[:2]):
            api.put_pod(f"vllm-{n}", ip=host, labels={"app": "vllm"})
        conf = extproc_config(server.url, {}, tokenizer_dir, ingest={"enabled": True, "engineBlockSize": 16},
                              discovery={"type": "kubernetes", "purgeAfter": "1s", "kubernetes": {
                                  "apiServer": api.url, "namespace": "default", "labelSelector": "app=vllm",
                                  "targetPorts": [http_port], "kvEventsPort": events_port, "models": [MODEL]}})
        del conf["pods"]
        proc = launcher.start_extproc(conf, workdir)
        from tests.integration.conftest import envoy_for
        proxy = envoy_for("envoy-original-dst.yaml", [proc.listen], {h: pods[h] for h in hosts}, workdir)
        r = redis.Redis.from_url(server.url)
        try:
            with httpx.Client(base_url=proxy.url, timeout=20) as client:
                assert set(served(client, 6)) == {f"pod@{h}" for h in hosts[:2]}
                wait_until(lambda: any(r.hexists(k, "vllm-0") for k in r.scan_iter("matrix:kv:block:*")),
                           timeout=20, what="vllm-0's KV events in the index")
                api.put_pod("vllm-0", ip=hosts[0], labels={"app": "vllm"}, ready=False)
                time.sleep(0.3)
                assert set(served(client, 8, 100)) == {f"pod@{hosts[1]}"}, "an unready pod gets no traffic at once"
                api.put_pod("vllm-2", ip=hosts[2], labels={"app": "vllm"})
                wait_until(lambda: f"pod@{hosts[2]}" in served(client, 4, 200), timeout=10, what="the new pod to serve")
                wait_until(lambda: any(r.hexists(k, "vllm-2") for k in r.scan_iter("matrix:kv:block:*")),
                           timeout=20, what="the new pod subscribed")
                wait_until(lambda: not any(r.hexists(k, "vllm-0") for k in r.scan_iter("matrix:kv:block:*")),
                           timeout=10, what="vllm-0 purged after purgeAfter")
                api.delete_pod("vllm-1")
                api.delete_pod("vllm-2")
                time.sleep(0.3)
                reply = client.post("/v1/chat/completions", json=chat(999))
                assert reply.status_code == 503 and reply.json()["error"]["code"] == "no_ready_pod"
            counts = collections.Counter(q.get("watch", "list") for _, q in api.requests)
            assert counts["list"] >= 1 and api.lists() == 1, "one list, the rest watched"
        finally:
            r.close()
            proxy.proc.stop()
            proc.proc.stop()
            server.proc.stop()
            api.stop()
