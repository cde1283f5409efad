"""The benches' reference ext_procs (bench/floors.py) run in processes of their own and answer
Envoy's messages as kv-extproc would route a request: the floor with bytes built once, the
no-op by letting the headers through."""

from __future__ import annotations

import os

import grpc
import pytest

from bench import floors
from extproc import responses, wire
from extproc.server import SERVICE_NAME


def headers_message() -> bytes:
    message = wire.ProcessingRequest()
    message.request_headers.headers.headers.add(key=":path", raw_value=b"/v1/chat/completions")
    return message.SerializeToString()


def body_message() -> bytes:
    message = wire.ProcessingRequest()
    message.request_body.body = b'{"model": "m", "prompt": "hi"}'
    message.request_body.end_of_stream = True
    return message.SerializeToString()


def exchange(listen: str, messages: list[bytes]) -> list[bytes]:
    with grpc.insecure_channel(listen) as channel:
        process = channel.stream_stream(f"/{SERVICE_NAME}/Process", request_serializer=None,
                                        response_deserializer=None)
        return list(process(iter(messages), timeout=10))


def test_the_floor_answers_headers_and_body_with_the_route_built_at_start(tmp_path):
    floor = floors.start("floor", tmp_path, header="x-gateway-destination-endpoint", address="10.0.0.7:8000")
    try:
        assert floor.pid != os.getpid()  # its CPU is its own, not the bench's
        answers = exchange(floor.listen, [headers_message(), body_message()])
    finally:
        floor.proc.stop()
    assert answers == [responses.headers_continue(("x-gateway-destination-endpoint",)),
                       responses.body_route("x-gateway-destination-endpoint", "10.0.0.7:8000")]


def test_the_noop_lets_every_headers_message_through(tmp_path):
    noop = floors.start("noop", tmp_path)
    try:
        answers = exchange(noop.listen, [headers_message()])
    finally:
        noop.proc.stop()
    assert answers == [responses.headers_continue(())]


def test_an_unknown_reference_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="unknown reference"):
        floors.start("fastest", tmp_path)
    assert not list(tmp_path.iterdir())  # no process was started, so no log either


def test_the_full_duplex_floor_holds_the_headers_until_the_body_ends_and_hands_it_back(tmp_path):
    duplex = floors.start("duplex", tmp_path, header="x-gateway-destination-endpoint", address="10.0.0.7:8000")
    try:
        answers = exchange(duplex.listen, [headers_message(), body_message()])
    finally:
        duplex.proc.stop()
    held = responses.headers_route("x-gateway-destination-endpoint", "10.0.0.7:8000", ("x-gateway-destination-endpoint",))
    assert answers == [held, *responses.body_chunks(b'{"model": "m", "prompt": "hi"}')]
