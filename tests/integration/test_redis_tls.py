"""``index.tls`` in cluster mode against a real TLS-only Redis Cluster: three
``redis-server --cluster-enabled yes --port 0 --tls-port P --tls-cluster yes``, client
certificates required, AUTH on top. Lookups, ordered writes, the sharded invalidation feed and
a purge all go over TLS; ``kv-extproc serve`` becomes ready through it and logs it.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from redis.cluster import key_slot

from extproc import config as config_mod
from extproc.index import Writes
from extproc.index.redis import RedisIndex
from extproc.sim import launcher
from tests.harness.certs import make_pki
from tests.harness.redis_cluster import start_cluster
from tests.integration.conftest import KEY_PREFIX

pytestmark = pytest.mark.integration

PASSWORD = "tls-cluster-secret-3"


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


def test_the_nodes_speak_tls_only(tls_cluster):
    port = tls_cluster.nodes[0].port
    plain = redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, socket_timeout=2, socket_connect_timeout=2)
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    plain.close()
    assert tls_cluster.client(port).ping()


async def test_lookups_writes_feed_and_purge_over_tls(index_conf, tls_cluster):
    index = RedisIndex.from_config(config_mod.from_dict({"index": index_conf}).index)
    heard = []
    try:
        await index.check_credentials()
        await index.ping()
        await index.subscribe(heard.append)
        keys = list(range(1000, 1040))
        writes = Writes(at=1_700_000_000.0)
        for key in keys:
            writes.store(("tls-model", key))
        await index.apply("tls-pod", writes)
        assert await index.lookup("tls-model", keys) == [{"tls-pod": 1_700_000_000.0}] * len(keys)
        owners = {tls_cluster.primary_of_slot(key_slot(f"{KEY_PREFIX}tls-model@{k}".encode()))
                  for k in keys}
        assert len(owners) == 3, "the blocks spread over every primary"
        deadline = time.monotonic() + 5
        while not any(m.pod == "tls-pod" and m.stored for m in heard):
            assert time.monotonic() < deadline, "the invalidation feed delivered nothing over TLS"
            await asyncio.sleep(0.05)
        assert sorted(k for m in heard if m.pod == "tls-pod" for _, k in m.stored) == keys
        assert await index.purge_pod("tls-pod") == len(keys)
        assert await index.lookup("tls-model", keys) == [{}] * len(keys)
    finally:
        await index.close()


def test_serve_becomes_ready_over_tls_and_says_so(workdir, index_conf, tls_cluster):
    proc = launcher.start_extproc({"index": index_conf}, workdir)  # waits for SERVING: the index answered
    try:
        log = proc.proc.log()
        assert f"index: cluster, seed nodes {tls_cluster.seeds[0]} (password ***, TLS)" in log
        assert PASSWORD not in log
    finally:
        proc.proc.stop()
