"""kv-extproc on a real Redis Cluster: 6 ``redis-server --cluster-enabled yes`` (3 primaries,
1 replica each), AUTH as an ACL user, started on loopback for this module.

In order (the later tests break the cluster): wrong modes fail at start-up with one line; both
processes log mode and nodes without the password; block keys spread over every primary and a
lookup is one batch per node; routing by cache end to end (``kv-extproc ingest`` writes,
``kv-extproc serve`` reads, through the shipped Envoy config); then, under paced traffic from
six tenants: slots migrated key by key (ASK, then MOVED), a manual failover (CLUSTER FAILOVER on
a replica), and the primary of the invalidation feed's shard SIGKILLed. Each fault must cost
no failed request, routing by cache must resume within seconds after the new owner takes over,
a failover must be treated as a loss of the index (every pod rebuilt from its replay buffer),
and no block entry may be left that its pod's record does not name. Figures print with -s.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
import redis
from redis.asyncio.cluster import ClusterNode, NodesManager
from redis.cluster import RedisCluster as SyncCluster
from redis.cluster import key_slot

from extproc import config as config_mod
from extproc.blocks import block_keys
from extproc.index import IndexUnavailable, Writes
from extproc.index.redis import RedisIndex
from extproc.sim import launcher
from tests.conftest import MODEL
from tests.harness.redis_cluster import keys_in_slot, start_cluster
from tests.integration.conftest import BLOCK_SIZE, KEY_PREFIX
from tests.integration.index_fleet import messages, metric, start_fleet

pytestmark = pytest.mark.integration

PASSWORD = "cluster-default-secret"
USER, USER_PASSWORD = "kv", "kv-user-secret-42"
CHANNEL = "matrix:kv:invalidate"
RECOVERY_LIMIT = 10.0
FIGURES: dict = {}


@pytest.fixture(scope="module")
def cluster(workdir):
    started = start_cluster(workdir, password=PASSWORD, acl_user=(USER, USER_PASSWORD))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def password_file(workdir):
    path = workdir / "cluster-password"
    path.write_text(USER_PASSWORD + "\n")
    return str(path)


@pytest.fixture(scope="module")
def index_conf(cluster, password_file) -> dict:
    return {"backend": "redis", "mode": "cluster", "nodes": cluster.seeds[:2], "username": USER,
            "passwordFile": password_file, "timeout": "1s"}


@pytest.fixture(scope="module")
def fleet(workdir, tokenizer, tokenizer_dir, cluster, index_conf):
    started = start_fleet(workdir, tokenizer, tokenizer_dir, {k: v for k, v in index_conf.items() if k != "timeout"})
    try:
        warm = started.traffic()
        deadline = time.monotonic() + 30
        while warm.recovered_after(0.0) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        warm.stop()
        assert not warm.failures()
        assert warm.recovered_after(0.0) is not None, "routing by cache after warm-up"
        yield started
    finally:
        started.stop()
        if FIGURES:
            print("\ncluster figures:", FIGURES)


def admin(cluster) -> SyncCluster:
    return SyncCluster(host="127.0.0.1", port=cluster.nodes[0].port, password=PASSWORD)


def orphans(cluster) -> list[tuple[str, str]]:
    """Block entries whose pod's record does not name them (a purge could never find them)."""
    found = []
    client = admin(cluster)
    try:
        records: dict[str, set[bytes]] = {}
        for name in client.scan_iter(match=KEY_PREFIX + "*", count=1000, target_nodes=SyncCluster.PRIMARIES):
            member = name[len(KEY_PREFIX):]
            for pod in client.hgetall(name):
                pod = pod.decode()
                if pod not in records:
                    records[pod] = client.smembers(f"matrix:kv:pod:{{{pod}}}")
                if member not in records[pod]:
                    found.append((name.decode(), pod))
    finally:
        client.close()
    return found


def run_kv(workdir, index: dict) -> subprocess.CompletedProcess:
    conf = {"listen": f"127.0.0.1:{launcher.free_port()}", "metricsListen": f"127.0.0.1:{launcher.free_port()}",
            "index": index}
    path = workdir / f"wrong-mode-{launcher.free_port()}.json"
    path.write_text(__import__("json").dumps(conf))
    return subprocess.run([sys.executable, "-m", "extproc", "serve", "--config", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_a_wrong_mode_stops_start_up_with_one_line(workdir, cluster, redis_server):
    node = cluster.seeds[0]
    pw = workdir / "default-password"
    pw.write_text(PASSWORD)
    standalone = run_kv(workdir, {"backend": "redis", "redisUrl": f"redis://127.0.0.1:{node.split(':')[1]}/0",
                                  "passwordFile": str(pw)})
    assert standalone.returncode == 2, standalone.stderr
    lines = standalone.stderr.strip().splitlines()
    assert lines[-1].startswith("kv-extproc: index.mode is standalone but redis at") and "is a cluster node" in lines[-1]
    assert PASSWORD not in standalone.stderr
    clustered = run_kv(workdir, {"backend": "redis", "mode": "cluster", "nodes": [f"127.0.0.1:{redis_server.port}"]})
    assert clustered.returncode == 2, clustered.stderr
    last = clustered.stderr.strip().splitlines()[-1]
    assert last.startswith("kv-extproc: index.mode is cluster but index.nodes") and "not cluster nodes" in last


def test_serve_and_ingest_log_mode_and_nodes_without_the_password(fleet, cluster):
    expected = f"index: cluster, seed nodes {cluster.seeds[0]},{cluster.seeds[1]} (user {USER}, password ***)"
    for proc in (fleet.serve, fleet.ingester):
        log = proc.proc.log()
        assert expected in log
        assert USER_PASSWORD not in log and PASSWORD not in log


async def test_blocks_spread_over_every_primary_and_a_lookup_is_one_batch_per_node(cluster, index_conf, tokenizer,
                                                                                    monkeypatch):
    index = RedisIndex.from_config(config_mod.from_dict({"index": index_conf}).index)
    try:
        tokens = tokenizer.apply_chat_template(messages(0), tokenize=True, add_generation_prompt=True)["input_ids"]
        keys = block_keys(list(tokens) * 4, BLOCK_SIZE, 128)
        assert len(keys) >= 20
        owners = {cluster.primary_of_slot(key_slot(f"{KEY_PREFIX}probe@{k}".encode())) for k in keys}
        assert owners == set(cluster.primaries()), "one prompt's blocks land on every shard: no hash tag pins a model"
        held = [index._held(pod) for pod in ("pod-a", "pod-b")] + [index._engine("pod-a")]
        assert key_slot(held[0].encode()) == key_slot(held[2].encode()) != key_slot(held[1].encode())

        writes = Writes(at=1_700_000_000.0)
        for key in keys:
            writes.store(("probe", key))
        await index.apply("probe-pod", writes)
        batches: list[str] = []
        original = ClusterNode.execute_pipeline

        async def counting(self, commands):
            batches.append(self.name)
            return await original(self, commands)

        monkeypatch.setattr(ClusterNode, "execute_pipeline", counting)
        answers = await index.lookup("probe", keys)
        assert answers == [{"probe-pod": 1_700_000_000.0}] * len(keys)
        assert sorted(batches) == sorted(set(batches)) and len(batches) == 3, "one pipelined batch per primary"
        monkeypatch.setattr(ClusterNode, "execute_pipeline", original)
        assert await index.purge_pod("probe-pod") == len(keys)
    finally:
        await index.close()


def test_routing_by_cache_end_to_end(fleet, cluster):
    traffic = fleet.traffic()
    start = time.monotonic()
    time.sleep(5.0)
    results = traffic.stop()
    assert results and not traffic.failures()
    share, told = traffic.share_by_cache(start, time.monotonic())
    assert told >= 20 and share >= 0.9, (share, told)
    client = admin(cluster)
    try:
        blocks = sum(1 for _ in client.scan_iter(match=KEY_PREFIX + "*", target_nodes=SyncCluster.PRIMARIES))
        assert blocks > 0
        assert {m.decode() for m in client.smembers("matrix:kv:pods")} == set(fleet.pods)
    finally:
        client.close()
    FIGURES["steady_by_cache"] = share


async def test_slot_migration_under_load(fleet, cluster, index_conf):
    """Slots move key by key while traffic flows and an in-process reader checks every answer:
    the reader sees ASK and MOVED and never an error; no client request fails."""
    index = RedisIndex.from_config(config_mod.from_dict({"index": index_conf}).index)
    probe_keys = list(range(1, 61))
    writes = Writes(at=1_700_000_000.0)
    for key in probe_keys:
        writes.store(("probe", key))
    await index.apply("probe-pod", writes)
    expected = await index.lookup("probe", probe_keys)
    assert all(expected)

    seen = {"ask": 0, "moved": 0}
    original_execute = ClusterNode.execute_command
    original_move = NodesManager.move_slot

    async def counting_execute(self, *args, **kwargs):
        if args and args[0] == "ASKING":
            seen["ask"] += 1
        return await original_execute(self, *args, **kwargs)

    async def counting_move(self, error):
        seen["moved"] += 1
        return await original_move(self, error)

    ClusterNode.execute_command = counting_execute
    NodesManager.move_slot = counting_move
    primaries = cluster.primaries()
    probe_slots = sorted({key_slot(f"{KEY_PREFIX}probe@{k}".encode()) for k in probe_keys[:3]})
    slots = probe_slots + [key_slot(CHANNEL.encode()), key_slot(index._held("pod-a").encode())]
    stop = asyncio.Event()
    bad: list = []
    lookups = writes_done = 0
    phases: list = []

    async def reader():
        nonlocal lookups
        while not stop.is_set():
            sent = time.monotonic()
            try:
                answers = await index.lookup("probe", probe_keys)
                if answers != expected:
                    bad.append(f"wrong answer at {sent - start:.2f}s")
            except IndexUnavailable as exc:
                bad.append(f"lookup at {sent - start:.2f}s, failed after {time.monotonic() - sent:.2f}s: {exc}")
            lookups += 1
            await asyncio.sleep(0.005)

    async def writer():
        nonlocal writes_done
        n = 0
        while not stop.is_set():
            w = Writes(at=1_700_000_001.0)
            (w.store if n % 2 == 0 else w.remove)(("probe-churn", 7 + n % 5))
            sent = time.monotonic()
            try:
                await index.apply("churn-pod", w)
            except IndexUnavailable as exc:
                bad.append(f"write at {sent - start:.2f}s, failed after {time.monotonic() - sent:.2f}s: {exc}")
            writes_done += 1
            n += 1
            await asyncio.sleep(0.01)

    traffic = fleet.traffic()
    start = time.monotonic()
    tasks = [asyncio.ensure_future(reader()), asyncio.ensure_future(writer())]
    try:
        await asyncio.sleep(1.0)
        for n, slot in enumerate(slots):
            source = cluster.primary_of_slot(slot)
            dest = next(p for p in primaries if p != source)
            first = [f"{KEY_PREFIX}probe@{k}" for k in probe_keys if key_slot(f"{KEY_PREFIX}probe@{k}".encode()) == slot]
            fillers = keys_in_slot(slot, 15, prefix=f"filler{n}")
            admin_client = cluster.client(source)
            for name in fillers:
                admin_client.set(name, "x")
            phases.append((f"slot {slot} {source}->{dest}", round(time.monotonic() - start, 2)))
            moved = await asyncio.to_thread(cluster.migrate_slot, slot, dest, batch=1, pause=0.03, first=first)
            phases.append((f"slot {slot} moved", round(time.monotonic() - start, 2)))
            assert moved >= len(fillers)
            await asyncio.sleep(0.3)
        await asyncio.sleep(1.5)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        ClusterNode.execute_command = original_execute
        NodesManager.move_slot = original_move
        results = traffic.stop()
        await index.purge_pod("probe-pod")
        await index.purge_pod("churn-pod")
        await index.close()
    assert results and not traffic.failures(), traffic.failures()[:5]
    assert not bad, (bad[:5], phases)
    assert lookups > 100 and writes_done > 50
    assert seen["ask"] >= 1 and seen["moved"] >= 1, seen
    share, told = traffic.share_by_cache(start, time.monotonic())
    assert told == 0 or share >= 0.8, (share, told)
    log = fleet.serve.proc.log()
    assert "invalidation feed lost" in log and "invalidation feed back" in log, "the feed's slot moved: a gap, noticed"
    FIGURES["migration"] = {"slots": len(slots), "lookups": lookups, "ask": seen["ask"], "moved": seen["moved"],
                            "requests": len(results), "by_cache": share}


def _failover(fleet, cluster, fault: str) -> dict:
    client = admin(cluster)
    marker = client.get("matrix:kv:epoch")
    client.close()
    assert marker
    lost_before = metric(fleet.ingester.metrics(), "kv_extproc_index_lost_total")
    cluster.wait_synced()
    primary = cluster.primary_of_slot(key_slot(CHANNEL.encode()))
    replica = cluster.replica_of(primary)
    traffic = fleet.traffic()
    probe = fleet.probe()
    time.sleep(2.0)
    injected = time.monotonic()
    if fault == "manual":
        cluster.manual_failover(replica)
    else:
        cluster.kill(primary)
        deadline = time.monotonic() + 20
        while cluster.client(replica).info("replication")["role"] != "master":
            assert time.monotonic() < deadline, "replica never took over"
            time.sleep(0.05)
    promoted = time.monotonic()
    cluster.wait_ok()
    deadline = time.monotonic() + 15
    while metric(fleet.ingester.metrics(), "kv_extproc_index_lost_total") <= lost_before:
        assert time.monotonic() < deadline, "the failover was not treated as a loss of the index"
        time.sleep(0.1)
    rebuilt = time.monotonic()
    recovered = traffic.wait_recovered(promoted, RECOVERY_LIMIT + 5)
    time.sleep(max(0.0, promoted + 6.0 - time.monotonic()))
    results = traffic.stop()
    unavailable, failed_lookups = probe.stop().unavailable(injected)
    assert results and not traffic.failures(), traffic.failures()[:5]
    assert recovered is not None and recovered <= RECOVERY_LIMIT, recovered
    assert probe.results[-1][1] and unavailable <= RECOVERY_LIMIT, (unavailable, failed_lookups)
    client = admin(cluster)
    try:
        assert client.get("matrix:kv:epoch") == marker, "the epoch marker (replicated long before) survives"
    finally:
        client.close()
    time.sleep(1.0)
    assert orphans(cluster) == []
    figures = {"takeover_s": round(promoted - injected, 2), "rebuild_started_s": round(rebuilt - promoted, 2),
               "index_unavailable_s": unavailable, "failed_lookups": failed_lookups,
               "by_cache_resumed_s": round(recovered, 2), "requests": len(results),
               "by_cache_during": traffic.share_by_cache(injected, promoted + recovered)[0]}
    FIGURES[fault] = figures
    return figures


def test_manual_failover_under_load(fleet, cluster):
    _failover(fleet, cluster, "manual")
    assert "invalidation feed lost" in fleet.serve.proc.log()


def test_killing_the_feed_shards_primary_under_load(fleet, cluster):
    figures = _failover(fleet, cluster, "kill")
    assert figures["takeover_s"] < 10
