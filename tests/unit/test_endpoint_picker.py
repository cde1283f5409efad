"""Endpoint-picker protocol (GAIE proposal 004) at the ext_proc stream: fallback lists, the
subset hint, 404/503 answers, health service names. Real routing stack, memory index, real
tokenizer; ext_proc messages built with envoy-data-plane and parsed as the server parses them."""

from __future__ import annotations

import json

import grpc
import pytest
from envoy_data_plane.envoy.config.core.v3 import HeaderMap, HeaderValue, Metadata
from envoy_data_plane.envoy.service.ext_proc.v3 import HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse
from envoy_data_plane.google.protobuf import ListValue, Struct, Value
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc import scoring, wire
from extproc.config import PodConfig, ScoringConfig
from extproc.health import Readiness
from extproc.index.memory import MemoryIndex
from extproc.indexer import Indexer
from extproc.metrics import Metrics
from extproc.pods import PodPool
from extproc.routing import Router
from extproc.server import ExtProcService, SERVICE_NAME, _Stream
from extproc.tokenization import TokenizerManager

MODEL = "m"
PODS = [PodConfig(id=f"pod-{c}", address=f"10.0.0.{n + 1}:8000", models=[MODEL]) for n, c in enumerate("abc")]


@pytest.fixture()
def stack(tokenizer_dir):
    tokenizers = TokenizerManager({MODEL: tokenizer_dir, "other": tokenizer_dir})
    pool = PodPool(PODS, [MODEL, "other"])
    router = Router(pool, Indexer(tokenizers, MemoryIndex(), block_size=16, max_blocks=8, scheme="chained"),
                    scoring.build(ScoringConfig()), Metrics(), decision_timeout=10)
    yield pool, router
    tokenizers.close()


def service(router, fallbacks=0):
    return ExtProcService(router, Metrics(), routing_header="x-gateway-destination-endpoint", max_body_bytes=1 << 20,
                          fallback_endpoints=fallbacks)


def messages(body: dict, subset: list[str] | str | None = None) -> list:
    meta = None
    if subset is not None:
        value = Value(string_value=subset) if isinstance(subset, str) else \
            Value(list_value=ListValue(values=[Value(string_value=s) for s in subset]))
        meta = Metadata(filter_metadata={"envoy.lb.subset_hint": Struct(
            fields={"x-gateway-destination-endpoint-subset": value})})
    headers = HttpHeaders(headers=HeaderMap(headers=[HeaderValue(key=":path", raw_value=b"/v1/completions"),
                                                     HeaderValue(key=":method", raw_value=b"POST")]))
    return [wire.parse_request(bytes(ProcessingRequest(request_headers=headers, metadata_context=meta))),
            wire.parse_request(bytes(ProcessingRequest(
                request_body=HttpBody(body=json.dumps(body).encode(), end_of_stream=True))))]


async def answer(svc, body, subset=None) -> ProcessingResponse:
    stream = _Stream(svc)
    out = []
    for message in messages(body, subset):
        out += await stream.on_message(message)
    stream.release()
    return ProcessingResponse.parse(out[-1])


def destination(reply: ProcessingResponse) -> tuple[str, str]:
    """(header value, envoy.lb metadata value) of a BUFFERED body answer."""
    [option] = reply.request_body.response.header_mutation.set_headers
    meta = reply.dynamic_metadata.fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint"]
    return option.header.raw_value.decode(), meta.string_value


async def test_one_address_by_default_for_original_dst(stack):
    _, router = stack
    header, meta = destination(await answer(service(router), {"model": MODEL, "prompt": "hello"}))
    assert header == meta and header in {p.address for p in PODS}


async def test_the_fallback_list_is_the_pick_then_alternates_the_same_in_header_and_metadata(stack):
    _, router = stack
    header, meta = destination(await answer(service(router, fallbacks=2), {"model": MODEL, "prompt": "hello"}))
    listed = header.split(",")
    assert header == meta and len(listed) == 3 and set(listed) == {p.address for p in PODS}
    header, _ = destination(await answer(service(router, fallbacks=1), {"model": MODEL, "prompt": "hello"}))
    assert len(header.split(",")) == 2


async def test_only_endpoints_in_the_subset_hint_are_chosen(stack):
    _, router = stack
    svc = service(router, fallbacks=2)
    for _ in range(6):
        header, _ = destination(await answer(svc, {"model": MODEL, "prompt": "hello"}, subset=["10.0.0.2:8000"]))
        assert header == "10.0.0.2:8000"
    header, _ = destination(await answer(svc, {"model": MODEL, "prompt": "x"}, subset="10.0.0.3:8000, 10.0.0.1:8000"))
    assert set(header.split(",")) == {"10.0.0.3:8000", "10.0.0.1:8000"}


@pytest.mark.parametrize("subset", [[], ["10.9.9.9:8000"]], ids=["empty", "no-known-endpoint"])
async def test_a_subset_hint_with_no_eligible_endpoint_is_a_503(stack, subset):
    _, router = stack
    reply = await answer(service(router), {"model": MODEL, "prompt": "hello"}, subset=subset)
    assert reply.immediate_response.status.code == 503
    assert json.loads(reply.immediate_response.body)["error"]["code"] == "no_eligible_endpoint"


async def test_a_model_no_pod_serves_is_a_404_model_not_found(stack):
    _, router = stack
    reply = await answer(service(router), {"model": "nobody-serves-this", "prompt": "hello"})
    assert reply.immediate_response.status.code == 404
    error = json.loads(reply.immediate_response.body)["error"]
    assert (error["code"], error["param"], error["type"]) == ("model_not_found", "model", "invalid_request_error")


async def test_pods_of_the_model_none_ready_is_a_503(stack):
    pool, router = stack
    for pod in pool.all():
        pod.healthy = False
    reply = await answer(service(router), {"model": MODEL, "prompt": "hello"})
    assert reply.immediate_response.status.code == 503
    assert json.loads(reply.immediate_response.body)["error"]["code"] == "no_ready_pod"
    # A configured model whose pods are all gone (discovery found none) is a 503 too, not a 404.
    reply = await answer(service(router), {"model": "other", "prompt": "hello"})
    assert reply.immediate_response.status.code == 503


async def test_fallback_decisions_carry_alternates_too(stack):
    _, router = stack
    router.decision_timeout = 1e-9  # every decision falls back (reason timeout)
    header, _ = destination(await answer(service(router, fallbacks=2), {"model": MODEL, "prompt": "hello"}))
    assert len(header.split(",")) == 3


async def test_health_service_names_of_the_protocol():
    server = grpc.aio.server()
    readiness = Readiness(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await readiness.live()
        await readiness.set(False)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def status(name):
                return (await stub.Check(health_pb2.HealthCheckRequest(service=name))).status

            serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
            assert [await status(n) for n in ("liveness", "readiness", SERVICE_NAME, "")] == \
                [serving, not_serving, not_serving, not_serving]
            await readiness.set(True)
            assert [await status(n) for n in ("liveness", "readiness", SERVICE_NAME, "")] == [serving] * 4
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await status("no-such-service")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop(0)


async def test_a_routed_stream_holds_its_prefill_on_the_pod_until_it_ends(stack):
    """The work a request brings (its uncached prompt tokens) counts ahead of the next one on
    that pod while its stream is open, and is given back when it ends."""
    pool, router = stack
    stream = _Stream(service(router))
    for message in messages({"model": MODEL, "prompt": "a prompt long enough to fill some blocks " * 8}):
        await stream.on_message(message)
    pod = stream.pod
    assert pod.in_flight == 1 and pod.open_tokens > 16
    stream.release()
    assert (pod.in_flight, pod.open_tokens) == (0, 0)
    assert all(p.open_tokens == 0 for p in pool.all())


async def test_the_prefill_a_pod_owes_is_exported_while_the_stream_is_open(stack):
    """Operators see the prefill our open requests bring each pod, and how long ours take there."""
    from prometheus_client import generate_latest

    pool, router = stack
    metrics = Metrics()
    metrics.watch_pods(pool, None)
    stream = _Stream(service(router))
    for message in messages({"model": MODEL, "prompt": "a prompt long enough to fill some blocks " * 8}):
        await stream.on_message(message)
    pod = stream.pod
    line = f'kv_extproc_pod_owed_prefill_tokens{{pod="{pod.id}"}} {float(pod.open_tokens)}'
    assert pod.open_tokens > 0 and line in generate_latest(metrics.registry).decode()
    assert "kv_extproc_pod_request_lifetime_seconds{" not in generate_latest(metrics.registry).decode()
    stream.release()
    exported = generate_latest(metrics.registry).decode()
    assert f'kv_extproc_pod_owed_prefill_tokens{{pod="{pod.id}"}} 0.0' in exported
    assert f'kv_extproc_pod_request_lifetime_seconds{{pod="{pod.id}"}} {pod.ledger.lifetime}' in exported
    assert pod.ledger.lifetime > 0, "the ended stream taught the pod's request lifetime"
