"""``index.tls`` (standalone: a ``rediss://`` redisUrl) against real TLS-only Redis
(``--port 0 --tls-port P``, client certificates required, AUTH on top), in every mode.

Standalone: one ``redis-server``, reached through ``rediss://`` with ``tlsCaFile``,
``tlsCertFile`` and ``tlsKeyFile``. Cluster: three ``redis-server --cluster-enabled yes
--tls-cluster yes``. Sentinel: a primary, a replica (``--tls-replication yes``) and three
Sentinels (``redis-server --sentinel``) on TLS ports that reach the data nodes and each other over TLS
(``tls-replication yes``). In every mode plaintext is refused; the credentials check, lookups,
ordered writes, the invalidation feed and a purge go over TLS, and ``kv-extproc serve`` becomes
ready through it and logs it without the password (standalone: a wrong password is a start-up
error, and a client without a certificate is refused). Last, the Sentinel primary is SIGKILLed:
the index answers again, over TLS, from the promoted replica (a new epoch) and the feed comes back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import key_slot
from redis.retry import Retry

from extproc import config as config_mod
from extproc.config import ConfigError
from extproc.index import FEED_LOST, IndexUnavailable, Writes
from extproc.index.redis import RedisIndex
from extproc.sim import launcher
from tests.harness.certs import make_pki
from tests.harness.redis_cluster import start_cluster, start_sentinel, start_standalone
from tests.integration.conftest import KEY_PREFIX

pytestmark = pytest.mark.integration

PASSWORD = "tls-cluster-secret-3"
SENTINEL_PASSWORD = "tls-sentinel-secret-5"
STANDALONE_PASSWORD = "tls-standalone-secret-7"


@pytest.fixture(scope="module")
def pki(workdir):
    return make_pki(workdir / "redis-tls-pki")


@pytest.fixture(scope="module")
def tls_cluster(workdir, pki):
    cluster = start_cluster(workdir / "tls", primaries=3, replicas=0, password=PASSWORD, tls=pki)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def index_conf(workdir, tls_cluster, pki) -> dict:
    secret = workdir / "tls-cluster-password"
    secret.write_text(PASSWORD)
    return {"backend": "redis", "mode": "cluster", "nodes": tls_cluster.seeds[:1], "passwordFile": str(secret),
            "tls": True, "tlsCaFile": str(pki.ca), "tlsCertFile": str(pki.client_cert),
            "tlsKeyFile": str(pki.client_key), "keyPrefix": KEY_PREFIX, "timeout": "1s"}


def refuses_plaintext(port: int, password: str) -> None:
    """A plaintext PING fails (once: redis-py's default retries would only add seconds of backoff)."""
    plain = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2, socket_connect_timeout=2,
                        retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    plain.close()


async def wait_heard(heard: list, what, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(what(m) for m in heard):
        assert time.monotonic() < deadline, "the invalidation feed delivered nothing over TLS"
        await asyncio.sleep(0.05)


def index_from(conf: dict) -> RedisIndex:
    return RedisIndex.from_config(config_mod.from_dict({"index": conf}).index)


async def round_trip(index: RedisIndex, pod: str, keys: list[int], at: float,
                     on_server: Callable[[list[int]], None] = lambda keys: None) -> None:
    """Credentials, ping, ordered writes, lookups, the feed and a purge, all over TLS;
    ``on_server`` checks what reached the servers themselves."""
    heard: list = []
    await index.check_credentials()
    await index.ping()
    await index.subscribe(heard.append)
    writes = Writes(at=at)
    for key in keys:
        writes.store(("tls-model", key))
    await index.apply(pod, writes)
    assert await index.lookup("tls-model", keys) == [{pod: at}] * len(keys)
    on_server(keys)
    await wait_heard(heard, lambda m: m.pod == pod and m.stored)
    assert sorted(k for m in heard if m.pod == pod for _, k in m.stored) == keys
    assert await index.purge_pod(pod) == len(keys)
    assert await index.lookup("tls-model", keys) == [{}] * len(keys)


def serve_says(workdir, conf: dict, line: str, password: str) -> None:
    """``kv-extproc serve`` becomes ready through the index and names it without the password."""
    proc = launcher.start_extproc({"index": conf}, workdir)  # waits for SERVING: the index answered
    try:
        log = proc.proc.log()
        assert line in log
        assert password not in log
    finally:
        proc.proc.stop()


def test_the_nodes_speak_tls_only(tls_cluster):
    port = tls_cluster.nodes[0].port
    refuses_plaintext(port, PASSWORD)
    assert tls_cluster.client(port).ping()


async def test_lookups_writes_feed_and_purge_over_tls(index_conf, tls_cluster):
    def spread(keys: list[int]) -> None:
        owners = {tls_cluster.primary_of_slot(key_slot(f"{KEY_PREFIX}tls-model@{k}".encode())) for k in keys}
        assert len(owners) == 3, "the blocks spread over every primary"

    index = index_from(index_conf)
    try:
        await round_trip(index, "tls-pod", list(range(1000, 1040)), 1_700_000_000.0, spread)
    finally:
        await index.close()


def test_serve_becomes_ready_over_tls_and_says_so(workdir, index_conf, tls_cluster):
    serve_says(workdir, index_conf, f"index: cluster, seed nodes {tls_cluster.seeds[0]} (password ***, TLS)", PASSWORD)


# -- Standalone ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_standalone(workdir, pki):
    server = start_standalone(workdir / "tls-standalone", password=STANDALONE_PASSWORD, tls=pki)
    yield server
    server.stop()


def standalone_conf(workdir, server, pki, password: str = STANDALONE_PASSWORD) -> dict:
    secret = workdir / ("tls-standalone-password" if password == STANDALONE_PASSWORD else "tls-standalone-wrong")
    secret.write_text(password)
    return {"backend": "redis", "redisUrl": f"rediss://127.0.0.1:{server.port}/0", "passwordFile": str(secret),
            "tlsCaFile": str(pki.ca), "tlsCertFile": str(pki.client_cert), "tlsKeyFile": str(pki.client_key),
            "keyPrefix": KEY_PREFIX, "timeout": "1s"}


def test_the_standalone_server_speaks_tls_only(tls_standalone, pki):
    refuses_plaintext(tls_standalone.port, STANDALONE_PASSWORD)
    no_cert = redis.Redis(host="127.0.0.1", port=tls_standalone.port, password=STANDALONE_PASSWORD, ssl=True,
                          ssl_ca_certs=str(pki.ca), socket_timeout=2, socket_connect_timeout=2,
                          retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.ConnectionError):
        no_cert.ping()  # client certificates are required
    no_cert.close()
    with tls_standalone.client() as c:
        assert c.ping()
        assert c.info("server")["redis_mode"] == "standalone"


async def test_standalone_rejects_a_wrong_password_over_tls(workdir, tls_standalone, pki):
    index = index_from(standalone_conf(workdir, tls_standalone, pki, password="not-the-password"))
    try:
        with pytest.raises(ConfigError, match="rejected the credentials"):
            await index.check_credentials()
    finally:
        await index.close()


async def test_standalone_lookups_writes_feed_and_purge_over_tls(workdir, tls_standalone, pki):
    def on_server(keys: list[int]) -> None:
        with tls_standalone.client() as server:
            assert server.hget(f"{KEY_PREFIX}tls-model@{keys[0]}", "tls-standalone-pod") == b"1700000003.0"

    index = index_from(standalone_conf(workdir, tls_standalone, pki))
    try:
        await round_trip(index, "tls-standalone-pod", list(range(4000, 4040)), 1_700_000_003.0, on_server)
    finally:
        await index.close()


def test_serve_in_standalone_mode_becomes_ready_over_tls_and_says_so(workdir, tls_standalone, pki):
    serve_says(workdir, standalone_conf(workdir, tls_standalone, pki),
               f"index: standalone rediss://127.0.0.1:{tls_standalone.port}/0 (password ***)", STANDALONE_PASSWORD)


# -- Sentinel ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_sentinel(workdir, pki):
    setup = start_sentinel(workdir / "tls-sentinel", password=SENTINEL_PASSWORD, tls=pki)
    yield setup
    setup.stop()


@pytest.fixture(scope="module")
def sentinel_conf(workdir, tls_sentinel, pki) -> dict:
    secret = workdir / "tls-sentinel-password"
    secret.write_text(SENTINEL_PASSWORD)
    return {"backend": "redis", "mode": "sentinel", "sentinels": tls_sentinel.sentinel_addresses,
            "sentinelService": tls_sentinel.service, "passwordFile": str(secret), "tls": True,
            "tlsCaFile": str(pki.ca), "tlsCertFile": str(pki.client_cert), "tlsKeyFile": str(pki.client_key),
            "keyPrefix": KEY_PREFIX, "timeout": "1s"}


def test_the_sentinel_setup_speaks_tls_only(tls_sentinel):
    for node in (tls_sentinel.primary, tls_sentinel.replica, *tls_sentinel.sentinels):
        refuses_plaintext(node.port, SENTINEL_PASSWORD)
        with (tls_sentinel.client if node in tls_sentinel.data_nodes() else tls_sentinel.sentinel_client)(node.port) as c:
            assert c.ping()
    with tls_sentinel.client(tls_sentinel.replica.port) as replica:
        info = replica.info("replication")
    assert info["role"] == "slave" and info["master_link_status"] == "up", "replication runs over TLS"
    with tls_sentinel.sentinel_client(tls_sentinel.sentinels[0].port) as sentinel:
        master = sentinel.sentinel_master(tls_sentinel.service)
    assert master["port"] == tls_sentinel.primary.port and not master["is_sdown"], "the sentinels reach the primary"
    assert master["num-slaves"] == 1 and master["num-other-sentinels"] == 2


async def test_sentinel_lookups_writes_feed_and_purge_over_tls(sentinel_conf, tls_sentinel):
    def on_primary(keys: list[int]) -> None:
        with tls_sentinel.client(tls_sentinel.primary.port) as primary:
            assert primary.hget(f"{KEY_PREFIX}tls-model@{keys[0]}", "tls-sentinel-pod") == b"1700000001.0"

    index = index_from(sentinel_conf)
    try:
        await round_trip(index, "tls-sentinel-pod", list(range(2000, 2040)), 1_700_000_001.0, on_primary)
    finally:
        await index.close()


def test_serve_in_sentinel_mode_becomes_ready_over_tls_and_says_so(workdir, sentinel_conf, tls_sentinel):
    serve_says(workdir, sentinel_conf,
               f"index: sentinel, service {tls_sentinel.service} via {','.join(tls_sentinel.sentinel_addresses)} "
               f"(password ***, TLS)", SENTINEL_PASSWORD)


async def test_sentinel_failover_over_tls(sentinel_conf, tls_sentinel):
    """Last: it kills the primary."""
    index = index_from(sentinel_conf)
    heard = []
    try:
        await index.subscribe(heard.append)
        before = await index.epoch()
        old = tls_sentinel.current_primary()
        with tls_sentinel.client(old) as primary:
            assert primary.execute_command("WAIT", 1, 5000) == 1, "the replica holds the epoch marker"
        tls_sentinel.kill(old)
        new = await asyncio.to_thread(tls_sentinel.wait_failover, old, 20)
        assert new == tls_sentinel.replica.port
        deadline = time.monotonic() + 15
        while True:
            try:
                after = await index.epoch()
                break
            except IndexUnavailable:
                assert time.monotonic() < deadline, "the index never answered from the promoted replica"
                await asyncio.sleep(0.2)
        assert after == f"{before}/failover-1", "the promoted replica's history is a new epoch"
        await wait_heard(heard, lambda m: m.pod == FEED_LOST, timeout=15)
        writes = Writes(at=1_700_000_002.0)
        writes.store(("tls-model", 3000))
        await index.apply("after-failover", writes)
        assert await index.lookup("tls-model", [3000]) == [{"after-failover": 1_700_000_002.0}]
        with tls_sentinel.client(new) as primary:
            assert primary.hexists(f"{KEY_PREFIX}tls-model@3000", "after-failover")
        await wait_heard(heard, lambda m: m.pod == "after-failover" and m.stored)
    finally:
        await index.close()
