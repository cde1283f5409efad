"""Client input never escapes: every body ends as a routed request or a JSON 4xx, never a
traceback, and a bug of ours passes the request on unrouted with one traceback per interval.

The stream is driven with real ext_proc messages (serialized as Envoy sends them, parsed by
extproc.wire); routing uses the real Qwen3 tokenizer and chat template."""

from __future__ import annotations

import json
import logging

import pytest
from envoy_data_plane.envoy.config.core.v3 import HeaderMap, HeaderValue
from envoy_data_plane.envoy.service.ext_proc.v3 import (
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
    ProtocolConfiguration,
)

from extproc import config as config_mod
from extproc import scoring, wire
from extproc.index.memory import MemoryIndex
from extproc.indexer import Indexer, build_cache
from extproc.metrics import Metrics
from extproc.pods import PodPool
from extproc.requests import RequestError, parse
from extproc.routing import Router
from extproc.server import ExtProcService
from extproc.tokenization import TokenizerManager
from tests.conftest import MODEL

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hello there"}]


def nested(depth: int) -> bytes:
    return b'{"model": "m", "messages": ' + b"[" * depth + b"]" * depth + b"}"


# -- parsing ---------------------------------------------------------------------------

def test_a_body_nested_100000_deep_is_a_400_not_a_recursion_error():
    with pytest.raises(RequestError) as err:
        parse(CHAT, nested(100_000))
    assert err.value.status == 400 and json.loads(err.value.body())["error"]["message"]


def test_token_ids_that_do_not_fit_32_bits_are_a_400():
    for bad in ([2**32], [1, 2**40], [[5, 2**32]]):
        with pytest.raises(RequestError) as err:
            parse("/v1/completions", json.dumps({"model": "m", "prompt": bad}).encode())
        assert err.value.param == "prompt"
    assert parse("/v1/completions", json.dumps({"model": "m", "prompt": [2**32 - 1]}).encode()).token_ids == [2**32 - 1]


def test_template_kwargs_override_our_own_arguments_as_vllm_does():
    body = {"model": "m", "messages": USER, "add_generation_prompt": True, "tools": [{"type": "function"}],
            "chat_template_kwargs": {"add_generation_prompt": False, "continue_final_message": True, "tools": None,
                                     "enable_thinking": False}}
    request = parse(CHAT, json.dumps(body).encode())
    assert request.add_generation_prompt is False and request.continue_final_message is True
    assert request.tools is None
    assert request.chat_template_kwargs == {"enable_thinking": False}


@pytest.mark.parametrize("key", ["tokenize", "chat_template"])
def test_template_kwargs_vllm_refuses_are_a_400(key):
    with pytest.raises(RequestError) as err:
        parse(CHAT, json.dumps({"model": "m", "messages": USER, "chat_template_kwargs": {key: "x"}}).encode())
    assert err.value.param == "chat_template_kwargs"


# -- through the stream, with the real router ---------------------------------------

def headers(path: str = CHAT, *, full_duplex: bool = False) -> bytes:
    hv = [HeaderValue(key=":method", raw_value=b"POST"), HeaderValue(key=":path", raw_value=path.encode())]
    msg = ProcessingRequest(request_headers=HttpHeaders(headers=HeaderMap(headers=hv)))
    if full_duplex:
        msg.protocol_config = ProtocolConfiguration(request_body_mode=wire.FULL_DUPLEX_STREAMED)
    return bytes(msg)


def body(data: bytes) -> bytes:
    return bytes(ProcessingRequest(request_body=HttpBody(body=data, end_of_stream=True)))


async def exchange(service: ExtProcService, data: bytes, *, full_duplex: bool = False) -> list[ProcessingResponse]:
    async def messages():
        for raw in (headers(full_duplex=full_duplex), body(data)):
            yield wire.parse_request(raw)

    return [ProcessingResponse.parse(answer) async for answer in service.process(messages(), None)]


def routed_to(answers: list[ProcessingResponse]) -> str | None:
    for answer in answers:
        for part in (answer.request_body, answer.request_headers):
            mutation = part.response.header_mutation if part is not None and part.response else None
            for option in mutation.set_headers if mutation else ():
                if option.header.key == "x-gateway-destination-endpoint":
                    return option.header.raw_value.decode()
    return None


def immediate_status(answers: list[ProcessingResponse]) -> int | None:
    for answer in answers:
        if answer.immediate_response is not None:
            return int(answer.immediate_response.status.code)
    return None


@pytest.fixture()
async def service(tokenizer_dir):
    config = config_mod.from_dict({
        "blockSizeToHash": 16, "models": [{"name": MODEL, "tokenizer": tokenizer_dir}],
        "pods": [{"id": "pod-a", "address": "10.0.0.1:8000"}, {"id": "pod-b", "address": "10.0.0.2:8000"}],
    })
    tokenizers = TokenizerManager({MODEL: tokenizer_dir})
    await tokenizers.get(MODEL)
    metrics = Metrics()
    indexer = Indexer(tokenizers, MemoryIndex(), block_size=16, max_blocks=64, scheme="chained",
                      cache=build_cache(config.prefix_store_config, block_size=16, max_blocks=64, scheme="chained"))
    router = Router(PodPool(config.pods), indexer, scoring.build(config.scoring), metrics, decision_timeout=5.0)
    yield ExtProcService(router, metrics, routing_header="x-gateway-destination-endpoint", max_body_bytes=1 << 20)
    tokenizers.close()


def fallbacks(service: ExtProcService, reason: str) -> float:
    return service.metrics.fallbacks.labels(reason)._value.get()


@pytest.mark.parametrize("full_duplex", [False, True], ids=["buffered", "full-duplex"])
async def test_odd_bodies_end_routed_or_as_json_4xx_without_a_traceback(service, full_duplex, caplog):
    cases = {
        "nested": (nested(100_000), 400),
        "kwarg add_generation_prompt": (json.dumps({"model": MODEL, "messages": USER, "chat_template_kwargs": {
            "add_generation_prompt": True}}).encode(), None),
        "kwarg tools": (json.dumps({"model": MODEL, "messages": USER, "tools": [],
                                    "chat_template_kwargs": {"tools": [{"type": "function", "function": {
                                        "name": "f", "parameters": {}}}]}}).encode(), None),
        "kwarg messages": (json.dumps({"model": MODEL, "messages": USER,
                                       "chat_template_kwargs": {"messages": [], "conversation": 1}}).encode(), None),
        "deep tools": (b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "x"}], '
                       b'"tools": [' + b'{"a": ' * 900 + b"1" + b"}" * 900 + b"]}", None),
        "kwarg tokenize": (json.dumps({"model": MODEL, "messages": USER, "chat_template_kwargs": {
            "tokenize": True}}).encode(), 400),
        "token ids": (json.dumps({"model": MODEL, "prompt": [2**33]}).encode(), 400),
    }
    with caplog.at_level(logging.DEBUG):
        for name, (data, status) in cases.items():
            answers = await exchange(service, data, full_duplex=full_duplex)
            if status is None:
                assert routed_to(answers) in {"10.0.0.1:8000", "10.0.0.2:8000"}, name
            else:
                assert immediate_status(answers) == status, name
    assert not [r for r in caplog.records if r.exc_info], "client input logged a traceback"
    assert fallbacks(service, "error") == 0
    assert fallbacks(service, "template") >= 1, "the kwargs that break the template fell back by load"


@pytest.mark.parametrize("full_duplex", [False, True], ids=["buffered", "full-duplex"])
async def test_a_bug_of_ours_passes_requests_on_unrouted_with_one_traceback_per_interval(service, full_duplex, caplog):
    async def broken(request):
        raise RuntimeError("a bug of ours")

    service.router.route = broken
    data = json.dumps({"model": MODEL, "messages": USER}).encode()
    with caplog.at_level(logging.ERROR):
        for _ in range(30):
            answers = await exchange(service, data, full_duplex=full_duplex)
            assert immediate_status(answers) is None and routed_to(answers) is None
            if full_duplex:  # our held headers answer, then the body back unchanged
                assert answers[0].request_headers is not None
                assert answers[1].request_body.response.body_mutation.streamed_response.body == data
            else:  # the headers answer, then the body's, without a route
                assert answers[0].request_headers is not None and answers[1].request_body is not None
    assert service.metrics.internal_errors._value.get() == 30
    assert len([r for r in caplog.records if r.exc_info]) == 1, "one traceback per interval, not per request"
