"""Running in front of a real fleet: TLS, Redis auth, health, reload, shutdown, metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import grpc
import httpx
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.sim import launcher
from tests.harness.certs import make_pki
from tests.conftest import MODEL
from tests.integration.conftest import LoadLoop, envoy_for, extproc_config, wait_until

pytestmark = pytest.mark.integration


def health(address: str, credentials: grpc.ChannelCredentials | None = None) -> int | str:
    """The health status, or the gRPC error code name if the call failed."""
    channel = grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", "localhost")]) \
        if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError as exc:
            return exc.code().name




def with_tls_upstream(conf: dict, pki, *, client_cert: bool) -> dict:
    context = {"validation_context": {"trusted_ca": {"filename": str(pki.ca)}}, "alpn_protocols": ["h2"]}
    if client_cert:
        context["tls_certificates"] = [{"certificate_chain": {"filename": str(pki.client_cert)},
                                        "private_key": {"filename": str(pki.client_key)}}]
    for cluster in conf["static_resources"]["clusters"]:
        if cluster["name"] == "kv_extproc":
            cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "localhost", "common_tls_context": context}}
    return conf


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_envoy_reaches_kv_extproc_over_tls_and_mtls(mutual, workdir, pods, tokenizer_dir, redis_server, tmp_path):
    pki = make_pki(tmp_path / "pki")
    tls = {"certFile": str(pki.server_cert), "keyFile": str(pki.server_key)}
    if mutual:
        tls["clientCaFile"] = str(pki.ca)
    conf = extproc_config(redis_server.url, pods, tokenizer_dir, tls=tls)
    proc = launcher.start_extproc(conf, workdir, wait_ready=False)
    try:
        with_cert = grpc.ssl_channel_credentials(pki.ca.read_bytes(), pki.client_key.read_bytes(),
                                                 pki.client_cert.read_bytes())
        wait_until(lambda: health(proc.listen, with_cert) == health_pb2.HealthCheckResponse.SERVING, what="SERVING")
        assert health(proc.listen) != health_pb2.HealthCheckResponse.SERVING, "plaintext is refused"
        if mutual:
            no_cert = grpc.ssl_channel_credentials(pki.ca.read_bytes())
            assert health(proc.listen, no_cert) == "UNAVAILABLE", "a client without a certificate is refused"

        rendered = launcher.render_envoy("envoy.yaml", listen=f"127.0.0.1:{launcher.free_port()}",
                                         admin=f"127.0.0.1:{launcher.free_port()}", extproc=[proc.listen],
                                         pods=[p.address for p in pods.values()])
        proxy = launcher.start_envoy(with_tls_upstream(rendered, pki, client_cert=mutual), workdir)
        try:
            with httpx.Client(base_url=proxy.url, timeout=20) as client:
                replies = [client.post("/v1/completions", json={"model": MODEL, "prompt": f"tls {i}"}) for i in range(6)]
            assert [r.status_code for r in replies] == [200] * 6
            metrics = proc.metrics()
            assert 'kv_extproc_requests_total{outcome="load"} 6.0' in metrics, "every request went through kv-extproc"
        finally:
            proxy.proc.stop()
    finally:
        proc.proc.stop()


def test_redis_with_a_password_works_and_a_wrong_one_stops_start_up(workdir, pods, tokenizer_dir, tmp_path):
    server = launcher.start_redis(workdir, password="s3cret-pass")
    try:
        secret = tmp_path / "redis-password"
        secret.write_text("s3cret-pass\n")
        conf = extproc_config(f"redis://127.0.0.1:{server.port}/0", pods, tokenizer_dir)
        conf["index"]["passwordFile"] = str(secret)
        proc = launcher.start_extproc(conf, workdir)  # SERVING requires the index to answer
        try:
            r = redis.Redis(port=server.port, password="s3cret-pass")
            r.hset(f"matrix:kv:block:{MODEL}@123", "pod-a", "1")
            r.close()
            assert 'kv_extproc_index_errors_total 0.0' in proc.metrics()
        finally:
            proc.proc.stop()
        secret.write_text("wrong")
        conf["listen"] = f"127.0.0.1:{launcher.free_port()}"
        conf["metricsListen"] = f"127.0.0.1:{launcher.free_port()}"
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(conf))
        result = subprocess.run([sys.executable, "-m", "extproc", "serve", "--config", str(path)],
                                capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
        assert result.returncode == 2
        assert "rejected the credentials" in result.stderr and "127.0.0.1" in result.stderr
        assert "wrong" not in result.stderr and "s3cret" not in result.stderr, "secrets never appear in output"
    finally:
        server.proc.stop()


def test_readiness_follows_the_index_only_when_configured(workdir, pods, tokenizer_dir):
    server = launcher.start_redis(workdir)
    conf = extproc_config(server.url, pods, tokenizer_dir, health={"requireIndex": True, "checkInterval": "200ms"})
    proc = launcher.start_extproc(conf, workdir)
    proxy = envoy_for("envoy.yaml", [proc.listen], pods, workdir)
    try:
        assert health(proc.listen) == health_pb2.HealthCheckResponse.SERVING
        server.proc.kill()
        wait_until(lambda: health(proc.listen) == health_pb2.HealthCheckResponse.NOT_SERVING, what="NOT_SERVING")
        with httpx.Client(base_url=proxy.url, timeout=20) as client:  # routing goes on, by load
            assert all(client.post("/v1/completions", json={"model": MODEL, "prompt": f"p{i}"}).status_code == 200
                       for i in range(4))
        restarted = launcher.start_redis(workdir, port=server.port)
        try:
            wait_until(lambda: health(proc.listen) == health_pb2.HealthCheckResponse.SERVING, what="SERVING again")
        finally:
            restarted.proc.stop()
    finally:
        proxy.proc.stop()
        proc.proc.stop()
        server.proc.stop()


def test_not_serving_until_tokenizers_are_loaded(workdir, pods, redis_server, tokenizer_dir, tmp_path):
    conf = extproc_config(redis_server.url, pods, tokenizer_dir)
    conf["models"] = [{"name": MODEL, "tokenizer": str(tmp_path / "missing")}]
    proc = launcher.start_extproc(conf, workdir, wait_ready=False)
    try:
        time.sleep(1.0)
        assert health(proc.listen) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        proc.proc.stop()


def test_pods_change_by_reload_under_load_without_a_failed_request(workdir, pods, tokenizer_dir, redis_server, tmp_path):
    conf = extproc_config(redis_server.url, pods, tokenizer_dir, reloadInterval="0s")
    proc = launcher.start_extproc(conf, workdir)
    proxy = envoy_for("envoy.yaml", [proc.listen], pods, workdir)

    def pods_metric() -> float:
        line = next(line for line in proc.metrics().splitlines() if line.startswith("kv_extproc_pods "))
        return float(line.split()[1])

    def reload(new_pods: list[dict]) -> None:
        proc.config_path.write_text(json.dumps({**proc.config, "pods": new_pods}))
        proc.proc.popen.send_signal(signal.SIGHUP)

    try:
        loop = LoadLoop(proxy.url, total=600, threads=3).start()
        loop.wait_for(50)
        reload([p for p in conf["pods"] if p["id"] != "pod-c"])
        wait_until(lambda: pods_metric() == 2, what="pod-c removed")
        removed_at = time.monotonic()
        loop.wait_for(len(loop.results) + 150)
        proc.config_path.write_text("pods: [this is not valid")  # a broken edit changes nothing
        proc.proc.popen.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert pods_metric() == 2
        readd_asked_at = time.monotonic()
        reload(conf["pods"])
        wait_until(lambda: pods_metric() == 3, what="pod-c back")
        added_at = time.monotonic()
        loop.join()
        assert loop.failures() == []
        between = [served for at, _, served in loop.results if removed_at + 0.05 < at < readd_asked_at]
        after = [served for at, _, served in loop.results if at > added_at + 0.05]
        assert between and "pod-c" not in between, "a removed pod gets no traffic at once"
        assert "pod-c" in after, "an added pod gets traffic"
        assert "config not reloaded" in proc.proc.log()
    finally:
        proxy.proc.stop()
        proc.proc.stop()


def test_sigterm_during_a_load_loop_loses_no_request(workdir, pods, tokenizer_dir, redis_server):
    proc = launcher.start_extproc(extproc_config(redis_server.url, pods, tokenizer_dir), workdir)
    proxy = envoy_for("envoy.yaml", [proc.listen], pods, workdir)
    try:
        loop = LoadLoop(proxy.url, total=400, threads=4).start()
        loop.wait_for(80)
        proc.proc.popen.send_signal(signal.SIGTERM)
        loop.join()
        assert proc.proc.popen.wait(20) == 0, "a clean exit"
        assert len(loop.results) == 400 and loop.failures() == []
        assert "shutting down" in proc.proc.log()
    finally:
        proxy.proc.stop()
        proc.proc.stop()


def test_a_redis_acl_user_with_its_password_from_the_environment(workdir, pods, tokenizer_dir, monkeypatch):
    server = launcher.start_redis(workdir, password="admin-pass")
    try:
        admin = redis.Redis(port=server.port, password="admin-pass")
        admin.execute_command("ACL", "SETUSER", "router", "on", ">router-pass", "~*", "&*", "+@all")
        admin.close()
        conf = extproc_config(f"redis://127.0.0.1:{server.port}/0", pods, tokenizer_dir)
        conf["index"].update(username="router", passwordEnv="KV_TEST_REDIS_PASSWORD")
        monkeypatch.setenv("KV_TEST_REDIS_PASSWORD", "router-pass")
        proc = launcher.start_extproc(conf, workdir)  # SERVING only once the index answered
        try:
            assert health(proc.listen) == health_pb2.HealthCheckResponse.SERVING
            assert "router-pass" not in proc.proc.log()
        finally:
            proc.proc.stop()
    finally:
        server.proc.stop()


def test_the_config_file_is_reloaded_when_it_changes(workdir, pods, tokenizer_dir, redis_server):
    conf = extproc_config(redis_server.url, pods, tokenizer_dir, reloadInterval="200ms")
    proc = launcher.start_extproc(conf, workdir)
    try:
        time.sleep(0.05)
        proc.config_path.write_text(json.dumps({**proc.config, "pods": conf["pods"][:1]}))
        wait_until(lambda: "kv_extproc_pods 1.0" in proc.metrics(), what="reloaded on change")
    finally:
        proc.proc.stop()
