"""kv-extproc on a Sentinel-managed Redis: a primary, one replica and three Sentinels (``redis-server --sentinel``)
(quorum 2), with AUTH on the data nodes, started on loopback for this module.

In order (the last test breaks the primary): wrong modes fail at start-up with one line; both
processes log mode, service and sentinels without the password; routing by cache end to end
(``kv-extproc ingest`` writes, ``kv-extproc serve`` reads, through the shipped Envoy config);
then the primary is SIGKILLed under paced traffic from six tenants: no client request may
fail, the Sentinels' failover must be treated as a loss of the index (every pod rebuilt from
its replay buffer: the promoted replica may lack writes the dead primary acknowledged), and
routing by cache must resume within seconds of the promotion. Figures print with -s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from extproc.sim import launcher
from tests.harness.redis_cluster import start_sentinel
from tests.integration.index_fleet import metric, start_fleet

pytestmark = pytest.mark.integration

PASSWORD = "sentinel-data-secret-7"
RECOVERY_LIMIT = 10.0
FIGURES: dict = {}


@pytest.fixture(scope="module")
def sentinel(workdir):
    setup = start_sentinel(workdir, password=PASSWORD)
    yield setup
    setup.stop()


@pytest.fixture(scope="module")
def password_file(workdir):
    path = workdir / "sentinel-data-password"
    path.write_text(PASSWORD + "\n")
    return str(path)


@pytest.fixture(scope="module")
def index_conf(sentinel, password_file) -> dict:
    return {"backend": "redis", "mode": "sentinel", "sentinels": sentinel.sentinel_addresses,
            "sentinelService": sentinel.service, "passwordFile": password_file}


@pytest.fixture(scope="module")
def fleet(workdir, tokenizer, tokenizer_dir, sentinel, index_conf):
    started = start_fleet(workdir, tokenizer, tokenizer_dir, index_conf, host_base=50)
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
            print("\nsentinel figures:", FIGURES)


def run_kv(workdir, index: dict) -> subprocess.CompletedProcess:
    conf = {"listen": f"127.0.0.1:{launcher.free_port()}", "metricsListen": f"127.0.0.1:{launcher.free_port()}",
            "index": index}
    path = workdir / f"wrong-sentinel-{launcher.free_port()}.json"
    path.write_text(json.dumps(conf))
    return subprocess.run([sys.executable, "-m", "extproc", "serve", "--config", str(path)], capture_output=True,
                          text=True, timeout=60)


def last_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert PASSWORD not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_a_wrong_mode_stops_start_up_with_one_line(workdir, sentinel, password_file, redis_server):
    one_sentinel = sentinel.sentinel_addresses[0]
    standalone = run_kv(workdir, {"backend": "redis", "redisUrl": f"redis://{one_sentinel}/0"})
    line = last_line(standalone)
    assert line.startswith("kv-extproc: index.mode is standalone but redis at") and "is a Sentinel" in line, line

    data_node = f"127.0.0.1:{redis_server.port}"
    not_sentinels = run_kv(workdir, {"backend": "redis", "mode": "sentinel", "sentinels": [data_node],
                                     "sentinelService": sentinel.service})
    line = last_line(not_sentinels)
    assert line.startswith("kv-extproc: index.mode is sentinel but") and "is not a Sentinel" in line, line

    wrong_service = run_kv(workdir, {"backend": "redis", "mode": "sentinel", "sentinels": sentinel.sentinel_addresses,
                                     "sentinelService": "nosuch", "passwordFile": password_file})
    line = last_line(wrong_service)
    assert "monitors index.sentinelService 'nosuch'" in line and sentinel.service in line, line


def test_serve_and_ingest_log_mode_and_nodes_without_the_password(fleet, sentinel):
    expected = (f"index: sentinel, service {sentinel.service} via {','.join(sentinel.sentinel_addresses)} "
                f"(password ***)")
    for proc in (fleet.serve, fleet.ingester):
        log = proc.proc.log()
        assert expected in log
        assert PASSWORD not in log


def test_routing_by_cache_end_to_end(fleet, sentinel):
    traffic = fleet.traffic()
    start = time.monotonic()
    time.sleep(5.0)
    results = traffic.stop()
    assert results and not traffic.failures()
    share, told = traffic.share_by_cache(start, time.monotonic())
    assert told >= 20 and share >= 0.9, (share, told)
    with sentinel.client(sentinel.current_primary()) as client:
        assert client.dbsize() > 0
        assert {m.decode() for m in client.smembers("matrix:kv:pods")} == set(fleet.pods)
    FIGURES["steady_by_cache"] = share


def test_killing_the_primary_under_load(fleet, sentinel):
    old = sentinel.current_primary()
    with sentinel.client(old) as client:
        marker = client.get("matrix:kv:epoch")
    assert marker
    sentinel.wait_synced()
    lost_before = metric(fleet.ingester.metrics(), "kv_extproc_index_lost_total")
    traffic = fleet.traffic()
    probe = fleet.probe()
    time.sleep(2.0)
    injected = time.monotonic()
    sentinel.kill(old)
    new = sentinel.wait_failover(old, timeout=30)
    promoted = time.monotonic()
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
    assert probe.results[-1][1], "the index answers again through the new primary"
    assert unavailable <= (promoted - injected) + RECOVERY_LIMIT, (unavailable, failed_lookups)
    with sentinel.client(new) as client:
        assert client.get("matrix:kv:epoch") == marker, "the epoch marker (replicated long before) survives"
        assert {m.decode() for m in client.smembers("matrix:kv:pods")} == set(fleet.pods), "every pod rebuilt"
    assert "invalidation feed lost" in fleet.serve.proc.log()
    FIGURES["kill"] = {"takeover_s": round(promoted - injected, 2), "rebuild_started_s": round(rebuilt - promoted, 2),
                       "index_unavailable_s": unavailable, "failed_lookups": failed_lookups,
                       "by_cache_resumed_s": round(recovered, 2), "requests": len(results),
                       "by_cache_during": traffic.share_by_cache(injected, promoted + recovered)[0]}
