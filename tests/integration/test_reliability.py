"""A running kv-extproc (real process, real Envoy, real Redis): reloads apply what they can
and say what they cannot; readiness reports only failures that make routing wrong."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest
from grpc_health.v1 import health_pb2

from extproc.sim import launcher
from tests.conftest import MODEL
from tests.integration.conftest import envoy_for, extproc_config, wait_until
from tests.integration.test_operations import health

pytestmark = pytest.mark.integration


def test_a_reload_applies_live_settings_and_names_the_others(workdir, pods, tokenizer_dir, redis_server):
    conf = extproc_config(redis_server.url, pods, tokenizer_dir, reloadInterval="0s", logLevel="info")
    proc = launcher.start_extproc(conf, workdir)
    proxy = envoy_for("envoy.yaml", [proc.listen], pods, workdir)
    body = json.dumps({"model": MODEL, "prompt": "x" * 3000}).encode()
    try:
        with httpx.Client(base_url=proxy.url, timeout=20) as client:
            assert client.post("/v1/completions", content=body).status_code == 200
            changed = {**conf, "limits": {**conf["limits"], "maxBodyBytes": 2000, "maxConcurrentStreams": 10},
                       "index": {**conf["index"], "keyPrefix": "other:"}, "decisionTimeout": "250ms"}
            proc.config_path.write_text(json.dumps(changed))
            proc.proc.popen.send_signal(signal.SIGHUP)
            wait_until(lambda: client.post("/v1/completions", content=body).status_code == 413, 10,
                       what="the new body limit in force")
        log = proc.proc.log()
        lines = [line for line in log.splitlines() if "need a restart" in line]
        assert len(lines) == 1, lines
        assert "index.keyPrefix" in lines[0] and "limits.maxConcurrentStreams" in lines[0]
        assert "maxBodyBytes" not in lines[0] and "decisionTimeout" not in lines[0]
        assert "Traceback" not in log
    finally:
        proxy.proc.stop()
        proc.proc.stop()


def test_a_redis_outage_does_not_make_a_replica_unready_when_the_index_is_not_required(workdir, pods, tokenizer_dir):
    """The invalidation subscriber rides the outage out itself (resubscribing every second):
    routing falls back by load by design, so readiness must not go NOT_SERVING."""
    server = launcher.start_redis(workdir)
    conf = extproc_config(server.url, pods, tokenizer_dir, health={"requireIndex": False, "checkInterval": "200ms"},
                          logLevel="info")
    proc = launcher.start_extproc(conf, workdir)
    try:
        server.proc.kill()
        deadline = time.monotonic() + 6.0  # past the supervisor's "keeps failing" threshold, were it failing
        while time.monotonic() < deadline:
            assert health(proc.listen) == health_pb2.HealthCheckResponse.SERVING
            time.sleep(0.3)
        metrics = proc.metrics()
        assert "kv_extproc_task_restarts_total" not in metrics or \
            'kv_extproc_task_restarts_total{task="invalidation"}' not in metrics
        assert "invalidation feed lost" in proc.proc.log()
    finally:
        proc.proc.stop()
        server.proc.stop()


def test_not_serving_until_ready_even_while_start_up_waits_on_a_stalled_redis(workdir, pods, tokenizer_dir,
                                                                             redis_server):
    """grpc's health servicer says SERVING until told otherwise, and start-up can wait on Redis
    (here: a proxy that forwards nothing) after the port is open: Envoy must see NOT_SERVING."""
    from tests.harness.tcpproxy import StallingProxy

    proxy = StallingProxy(("127.0.0.1", redis_server.port)).start()
    proxy.stall()
    conf = extproc_config(f"redis://127.0.0.1:{proxy.port}/0", pods, tokenizer_dir, logLevel="info")
    proc = launcher.start_extproc(conf, workdir, wait_ready=False)
    try:
        seen = set()
        deadline = time.monotonic() + 9.0  # past the 5 s credential check, into the subscription
        while time.monotonic() < deadline:
            seen.add(health(proc.listen))
            time.sleep(0.1)
        assert health_pb2.HealthCheckResponse.NOT_SERVING in seen
        assert health_pb2.HealthCheckResponse.SERVING not in seen
        proxy.resume()
        wait_until(lambda: health(proc.listen) == health_pb2.HealthCheckResponse.SERVING, 30, what="SERVING")
    finally:
        proc.proc.stop()
        proxy.close()


async def test_the_invalidation_subscriber_restarts_and_its_listeners_hear_the_feed_was_lost(redis_server):
    import asyncio

    from extproc import config as config_mod
    from extproc.index import FEED_LOST, Writes
    from extproc.index.redis import RedisIndex
    from extproc.metrics import Metrics
    from extproc.supervise import Supervisor

    conf = config_mod.IndexConfig(backend="redis", redis_url=redis_server.url, meta_prefix="reliability:")
    reader, writer = RedisIndex.from_config(conf), RedisIndex.from_config(conf)
    metrics = Metrics()
    supervisor = Supervisor(metrics, backoff=0.05)
    heard: list = []

    def listener(message) -> None:
        heard.append(message.pod)
        if len(heard) == 1:
            raise RuntimeError("a bug in a listener")

    try:
        await reader.subscribe(listener, supervisor=supervisor)
        for n in range(3):
            writes = Writes(at=1.0)
            writes.store((MODEL, 1000 + n))
            await writer.apply(f"pod-{n}", writes)
            await asyncio.sleep(0.3)
        assert metrics.task_restarts.labels("invalidation")._value.get() == 1
        assert heard[:2] == ["pod-0", FEED_LOST], "after the restart: anything may have been missed"
        assert heard[2:] == ["pod-1", "pod-2"], "and the feed goes on"
    finally:
        await reader.close()
        await writer.close()
        await supervisor.stop_all()
