"""ext_proc answers, built with envoy-data-plane and serialized to bytes.

Building and serializing one message costs ~100 us of Python, more than the rest of a
cached routing decision, so the answers that depend only on the chosen pod are kept
serialized per pod address.
"""

from __future__ import annotations

from functools import lru_cache

from envoy_data_plane.envoy.config.core.v3 import HeaderValue, HeaderValueOption
from envoy_data_plane.envoy.service.ext_proc.v3 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    ImmediateResponse,
    ProcessingResponse,
    StreamedBodyResponse,
    TrailersResponse,
)
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
from envoy_data_plane.google.protobuf import Struct, Value

MAX_STREAMED_CHUNK = 62_000
"""Bytes per body chunk we send back in full-duplex mode (below gRPC's default frame cap)."""

LB_METADATA_NAMESPACE = "envoy.lb"


def _set(name: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=name, raw_value=value.encode()))


def _route_mutation(header: str, address: str, remove: tuple[str, ...] = (),
                    extra: tuple[tuple[str, str], ...] = ()) -> CommonResponse:
    names = {header, *(name for name, _ in extra)}
    mutation = HeaderMutation(set_headers=[_set(header, address), *(_set(n, v) for n, v in extra)],
                              remove_headers=[n for n in remove if n not in names])
    return CommonResponse(header_mutation=mutation, clear_route_cache=True)


def _lb_metadata(header: str, address: str) -> Struct:
    inner = Struct(fields={header: Value(string_value=address)})
    return Struct(fields={LB_METADATA_NAMESPACE: Value(struct_value=inner)})


@lru_cache(maxsize=256)
def headers_continue(remove: tuple[str, ...]) -> bytes:
    """Let the headers through, minus the named ones (client-supplied routing headers)."""
    mutation = HeaderMutation(remove_headers=list(remove)) if remove else None
    return bytes(ProcessingResponse(request_headers=HeadersResponse(response=CommonResponse(header_mutation=mutation))))


BODY_CONTINUE = bytes(ProcessingResponse(request_body=BodyResponse(response=CommonResponse())))
TRAILERS_CONTINUE = bytes(ProcessingResponse(request_trailers=TrailersResponse()))
RESPONSE_HEADERS_CONTINUE = bytes(ProcessingResponse(response_headers=HeadersResponse()))
RESPONSE_BODY_CONTINUE = bytes(ProcessingResponse(response_body=BodyResponse()))


@lru_cache(maxsize=4096)
def body_route(header: str, address: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """BUFFERED mode: route from the body answer (Envoy still holds the headers then);
    ``extra`` headers go upstream too (a data-parallel rank)."""
    return bytes(
        ProcessingResponse(
            request_body=BodyResponse(response=_route_mutation(header, address, (), extra)),
            dynamic_metadata=_lb_metadata(header, address),
        )
    )


@lru_cache(maxsize=4096)
def headers_route(header: str, address: str, remove: tuple[str, ...], extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """FULL_DUPLEX_STREAMED mode: the held headers answer, sent once the body is complete.

    No Content-Length: Envoy 1.40 drops it in this mode whatever we set, and forwards the
    body chunked (envoyproxy/envoy#39035), which vLLM's HTTP server accepts.
    """
    common = _route_mutation(header, address, remove, extra)
    return bytes(
        ProcessingResponse(request_headers=HeadersResponse(response=common), dynamic_metadata=_lb_metadata(header, address))
    )


def body_chunks(body: bytes, *, end_of_stream: bool = True) -> list[bytes]:
    """FULL_DUPLEX_STREAMED mode: the body handed back unchanged, in bounded chunks."""
    pieces = [body[i : i + MAX_STREAMED_CHUNK] for i in range(0, len(body), MAX_STREAMED_CHUNK)] or [b""]
    last = len(pieces) - 1
    return [
        bytes(
            ProcessingResponse(
                request_body=BodyResponse(
                    response=CommonResponse(
                        body_mutation=BodyMutation(
                            streamed_response=StreamedBodyResponse(body=piece, end_of_stream=end_of_stream and i == last)
                        )
                    )
                )
            )
        )
        for i, piece in enumerate(pieces)
    ]


def immediate(status: int, body: bytes, details: str) -> bytes:
    """Answer the client now (a 4xx with a JSON body) instead of forwarding the request."""
    return bytes(
        ProcessingResponse(
            immediate_response=ImmediateResponse(
                status=HttpStatus(code=StatusCode(status)),
                headers=HeaderMutation(set_headers=[_set("content-type", "application/json")]),
                body=body,
                details=details,
            )
        )
    )
