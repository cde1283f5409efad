"""Discovery sources against real servers on loopback: an authoritative DNS server built from
dnslib, and our own list/watch Kubernetes API server (tests/harness/kube_api.py: resourceVersion,
bookmarks, 410 Gone, dropped watches); plus the membership rules (routing at once, purge later)."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from extproc.config import Config, DnsDiscovery, KubernetesDiscovery, ModelConfig, PodConfig, from_dict
from extproc.discovery import DiscoveryMetrics, label_safe
from extproc.discovery.dns import DnsSource
from extproc.discovery.kubernetes import KubernetesSource, is_ready
from extproc.discovery.membership import Membership
from extproc.pods import PodPool
from tests.harness.dns_server import DnsTestServer, Zone
from tests.harness.kube_api import FakeKubeApi

MODEL = "Qwen/Qwen3-0.6B"


class Published:
    """Collects what a source publishes; waits for a condition on the latest set."""

    def __init__(self):
        self.sets: list[list[PodConfig]] = []
        self.changed = asyncio.Event()

    async def __call__(self, pods: list[PodConfig]) -> None:
        self.sets.append(list(pods))
        self.changed.set()

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.sets[-1]] if self.sets else []

    async def until(self, predicate, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while not (self.sets and predicate(self.sets[-1])):
            self.changed.clear()
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; last published: {self.ids}")
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass


def metrics() -> DiscoveryMetrics:
    return DiscoveryMetrics.on(CollectorRegistry())


async def until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- DNS -------------------------------------------------------------------------------------

@pytest.fixture()
def dns_server():
    zone = Zone()
    server = DnsTestServer(zone).start()
    yield server
    server.stop()


async def test_dns_records_become_pods_and_follow_changes(dns_server):
    name = "vllm.default.svc.cluster.local"
    dns_server.zone.set(name, ["127.0.0.21", "127.0.0.22"])
    conf = DnsDiscovery(name=name, port=8000, kv_events_port=5557, nameserver=dns_server.address, interval=0.1)
    published = Published()
    task = asyncio.ensure_future(DnsSource(conf, metrics()).run(published))
    try:
        await published.until(lambda pods: len(pods) == 2)
        first = published.sets[-1][0]
        assert (first.id, first.address, first.kv_events) == ("127.0.0.21:8000", "127.0.0.21:8000",
                                                              "tcp://127.0.0.21:5557")
        dns_server.zone.set(name, ["127.0.0.22", "127.0.0.23", "::1"])
        await published.until(lambda pods: len(pods) == 3)
        assert published.ids == ["127.0.0.22:8000", "127.0.0.23:8000", "[::1]:8000"]
        dns_server.zone.set(name, [])
        await published.until(lambda pods: pods == [])
        assert {q[1] for q in dns_server.zone.queries} == {"A", "AAAA"}
    finally:
        task.cancel()


async def test_a_failing_dns_server_keeps_the_last_pod_set_and_is_counted(dns_server):
    name = "vllm.test"
    dns_server.zone.set(name, ["127.0.0.31"])
    m = metrics()
    conf = DnsDiscovery(name=name, port=8000, nameserver=dns_server.address, interval=0.05, timeout=0.5)
    published = Published()
    task = asyncio.ensure_future(DnsSource(conf, m).run(published))
    try:
        await published.until(lambda pods: len(pods) == 1)
        dns_server.zone.fail = True
        await until(lambda: m.errors.labels("dns")._value.get() >= 2, what="failed lookups counted")
        assert published.ids == ["127.0.0.31:8000"] and len(published.sets) == 1, "the fleet is not emptied"
        dns_server.zone.fail = False
        dns_server.zone.set(name, ["127.0.0.32"])
        await published.until(lambda pods: [p.id for p in pods] == ["127.0.0.32:8000"])
    finally:
        task.cancel()


async def test_an_unknown_name_means_no_pods(dns_server):
    published = Published()
    conf = DnsDiscovery(name="nothing.here", nameserver=dns_server.address, interval=0.05)
    task = asyncio.ensure_future(DnsSource(conf, metrics()).run(published))
    try:
        await published.until(lambda pods: pods == [])
    finally:
        task.cancel()


# -- Kubernetes ------------------------------------------------------------------------------

@pytest.fixture()
def kube():
    api = FakeKubeApi(bookmark_interval=0.2).start()
    yield api
    api.stop()


def kube_conf(api: FakeKubeApi, **extra) -> KubernetesDiscovery:
    base = {"apiServer": api.url, "namespace": "default", "labelSelector": "app=vllm", "targetPorts": [8000],
            "kvEventsPort": 5557, "kvReplayPort": 5558, "watchTimeout": 30}
    return from_dict({"models": [{"name": MODEL}], "discovery": {"type": "kubernetes",
                                                                "kubernetes": {**base, **extra}}}).discovery.kubernetes


async def start(source, published):
    task = asyncio.ensure_future(source.run(published))
    return task


async def test_ready_pods_with_an_ip_become_pods_and_watch_events_follow(kube):
    kube.put_pod("vllm-0", ip="10.1.0.10", labels={"app": "vllm"})
    kube.put_pod("vllm-1", ip="10.1.0.11", labels={"app": "vllm"}, ready=False)
    kube.put_pod("other", ip="10.1.0.99", labels={"app": "else"})
    listed_at = str(kube.version)
    published = Published()
    task = await start(KubernetesSource(kube_conf(kube), [MODEL], metrics()), published)
    try:
        await published.until(lambda pods: [p.id for p in pods] == ["vllm-0"])
        pod = published.sets[-1][0]
        assert (pod.address, pod.kv_events, pod.kv_replay, pod.models) == (
            "10.1.0.10:8000", "tcp://10.1.0.10:5557", "tcp://10.1.0.10:5558", [])
        kube.put_pod("vllm-1", ip="10.1.0.11", labels={"app": "vllm"})  # turns Ready
        await published.until(lambda pods: [p.id for p in pods] == ["vllm-0", "vllm-1"])
        kube.put_pod("vllm-0", ip="10.1.0.10", labels={"app": "vllm"}, ready=False)  # turns unready
        await published.until(lambda pods: [p.id for p in pods] == ["vllm-1"])
        kube.put_pod("vllm-2", ip="10.1.0.12", labels={"app": "vllm"})
        kube.put_pod("vllm-1", ip="10.1.0.11", labels={"app": "vllm"}, deleting=True)  # terminating
        await published.until(lambda pods: [p.id for p in pods] == ["vllm-2"])
        kube.put_pod("vllm-2", ip="10.1.0.12", labels={"app": "moved"})  # out of the selector: DELETED
        await published.until(lambda pods: pods == [])
        assert kube.lists() == 1, "one list, then only watches"
        assert kube.watch_versions()[0] == listed_at, "the watch starts at the list's resourceVersion"
    finally:
        task.cancel()


async def test_a_dropped_watch_resumes_from_the_last_resource_version_without_relisting(kube):
    kube.put_pod("vllm-0", ip="10.1.0.10", labels={"app": "vllm"})
    published = Published()
    task = await start(KubernetesSource(kube_conf(kube), [MODEL], metrics()), published)
    try:
        await published.until(lambda pods: len(pods) == 1)
        kube.put_pod("vllm-1", ip="10.1.0.11", labels={"app": "vllm"})
        await published.until(lambda pods: len(pods) == 2)
        await until(lambda: kube.open_watches() == 1, what="a watch open")
        seen = str(kube.version)
        kube.drop_watches()
        kube.put_pod("vllm-2", ip="10.1.0.12", labels={"app": "vllm"})  # while no watch is open
        await published.until(lambda pods: len(pods) == 3)
        assert kube.lists() == 1
        assert kube.watch_versions()[-1] >= seen, "resumed from where it was, not from the start"
    finally:
        task.cancel()


async def test_bookmarks_move_the_resource_version_forward(kube):
    kube.put_pod("vllm-0", ip="10.1.0.10", labels={"app": "vllm"})
    published = Published()
    source = KubernetesSource(kube_conf(kube), [MODEL], metrics())
    task = await start(source, published)
    try:
        await published.until(lambda pods: len(pods) == 1)
        for n in range(5):  # changes the watch does not select: only bookmarks carry them
            kube.put_pod(f"x-{n}", ip="10.9.0.1", labels={"app": "else"})
        await until(lambda: source.version == str(kube.version), what="a bookmark at the latest version")
        kube.drop_watches()
        await until(lambda: len(kube.watch_versions()) >= 2, what="a new watch")
        assert kube.watch_versions()[-1] == str(kube.version)
    finally:
        task.cancel()


async def test_410_gone_relists_and_misses_nothing(kube):
    kube.put_pod("vllm-0", ip="10.1.0.10", labels={"app": "vllm"})
    m = metrics()
    published = Published()
    task = await start(KubernetesSource(kube_conf(kube, watchTimeout=1), [MODEL], m), published)
    try:
        await published.until(lambda pods: len(pods) == 1)
        await until(lambda: kube.open_watches() == 1, what="a watch open")
        kube.drop_watches()
        kube.delete_pod("vllm-0")
        kube.put_pod("vllm-1", ip="10.1.0.11", labels={"app": "vllm"})
        kube.compact()  # the history the client would resume from is gone: its watch gets 410
        await published.until(lambda pods: [p.id for p in pods] == ["vllm-1"])
        assert kube.lists() == 2
        assert m.relists.labels("gone")._value.get() == 1
    finally:
        task.cancel()


async def test_an_unreachable_api_server_is_retried_with_backoff_and_counted():
    api = FakeKubeApi()
    url = api.url
    api._server.server_close()  # nothing listens there
    m = metrics()
    conf = from_dict({"discovery": {"type": "kubernetes", "kubernetes": {
        "apiServer": url, "namespace": "default", "labelSelector": "app=vllm"}}}).discovery.kubernetes
    published = Published()
    task = asyncio.ensure_future(KubernetesSource(conf, [], m).run(published))
    try:
        await until(lambda: m.errors.labels("kubernetes")._value.get() >= 2, what="retries")
        assert not task.done() and published.sets == []
    finally:
        task.cancel()


async def test_an_inference_pool_gives_selector_and_ports_and_its_changes_relist(kube):
    kube.put_pool("qwen", match_labels={"pool": "qwen"}, ports=[8000, 8001])
    kube.put_pod("vllm-0", ip="10.1.0.10", labels={"pool": "qwen", "app": "vllm"})
    kube.put_pod("vllm-1", ip="10.1.0.11", labels={"pool": "other"})
    published = Published()
    task = await start(KubernetesSource(kube_conf(kube, inferencePool="qwen", labelSelector=""), [MODEL], metrics()),
                       published)
    try:
        await published.until(lambda pods: len(pods) == 2)
        a, b = published.sets[-1]
        assert (a.id, a.address, a.kv_events, b.id, b.address, b.kv_events) == (
            "vllm-0:8000", "10.1.0.10:8000", "tcp://10.1.0.10:5557",
            "vllm-0:8001", "10.1.0.10:8001", "tcp://10.1.0.10:5558"), "rank i publishes on kvEventsPort + i"
        kube.put_pool("qwen", match_labels={"pool": "other"}, ports=[9000])
        await published.until(lambda pods: [(p.id, p.address) for p in pods] == [("vllm-1", "10.1.0.11:9000")])
        assert any(path.endswith("/inferencepools/qwen") for path, _ in kube.requests)
    finally:
        task.cancel()


async def test_models_from_a_pod_label_in_label_safe_form(kube):
    kube.put_pod("vllm-0", ip="10.1.0.10", labels={"app": "vllm", "model": label_safe(MODEL)})
    kube.put_pod("vllm-1", ip="10.1.0.11", labels={"app": "vllm", "model": "unknown-model"})
    published = Published()
    task = await start(KubernetesSource(kube_conf(kube, modelLabel="model"), [MODEL], metrics()), published)
    try:
        await published.until(lambda pods: len(pods) == 1)
        assert published.sets[-1][0].models == [MODEL] and label_safe(MODEL) == "Qwen-Qwen3-0.6B"
    finally:
        task.cancel()


def test_readiness_needs_the_ready_condition_an_ip_and_no_deletion():
    ok = {"metadata": {}, "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}
    assert is_ready(ok)
    assert not is_ready({**ok, "status": {**ok["status"], "podIP": ""}})
    assert not is_ready({**ok, "status": {**ok["status"], "conditions": [{"type": "Ready", "status": "False"}]}})
    assert not is_ready({**ok, "metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}})


# -- Membership ------------------------------------------------------------------------------

def pod(pod_id: str, n: int) -> PodConfig:
    return PodConfig(id=pod_id, address=f"10.0.0.{n}:8000", kv_events=f"tcp://10.0.0.{n}:5557")


async def test_a_pod_that_leaves_gets_no_traffic_at_once_and_is_purged_after_purge_after():
    config = Config(models=[ModelConfig(name=MODEL)])
    pool = PodPool([], [MODEL])
    subscribed: list[list[str]] = []

    async def reconfigure(new: Config) -> None:
        subscribed.append(sorted(p.id for p in new.pods))

    membership = Membership(config, pool, reconfigure=reconfigure, purge_after=0.3)
    await membership.apply([pod("a", 1), pod("b", 2)])
    assert membership.synced.is_set() and [p.id for p in pool.all()] == ["a", "b"]
    assert subscribed[-1] == ["a", "b"]
    await membership.apply([pod("b", 2)])
    assert [p.id for p in pool.all()] == ["b"], "routing follows at once"
    assert subscribed[-1] == ["a", "b"], "still subscribed (entries kept) within purgeAfter"
    await asyncio.sleep(0.35)
    await membership.expire()
    assert subscribed[-1] == ["b"], "the ingester purges a pod no longer listed"


async def test_a_pod_back_within_purge_after_keeps_its_entries():
    purged: list[str] = []

    async def purge(pod_id: str) -> None:
        purged.append(pod_id)

    membership = Membership(Config(), PodPool(), purge=purge, purge_after=0.2)
    await membership.apply([pod("a", 1)])
    await membership.apply([])
    await membership.apply([pod("a", 1)])
    await asyncio.sleep(0.25)
    await membership.expire()
    assert purged == []
    await membership.apply([])
    await asyncio.sleep(0.25)
    await membership.expire()
    assert purged == ["a"], "without an ingester in the process, the index is purged directly"


async def test_a_pod_set_whose_publishing_failed_is_published_again(dns_server):
    name = "vllm.retry"
    dns_server.zone.set(name, ["127.0.0.41"])
    m = metrics()
    attempts: list[list[str]] = []

    async def flaky(pods: list[PodConfig]) -> None:
        attempts.append([p.id for p in pods])
        if len(attempts) == 1:
            raise RuntimeError("the ingester could not subscribe")

    conf = DnsDiscovery(name=name, nameserver=dns_server.address, interval=0.05)
    task = asyncio.ensure_future(DnsSource(conf, m).run(flaky))
    try:
        await until(lambda: len(attempts) >= 2, what="a second attempt")
        assert attempts[:2] == [["127.0.0.41:8000"]] * 2 and m.errors.labels("dns")._value.get() == 1
    finally:
        task.cancel()
