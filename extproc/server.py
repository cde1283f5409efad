"""The ext_proc gRPC stream: one small state machine per HTTP request.

Envoy sends the request headers, then the body (one message in BUFFERED mode, chunks in
FULL_DUPLEX_STREAMED mode). We decide at the end of the body and answer with the routing
header and ``clear_route_cache``, so Envoy picks the route (and upstream) again.

BUFFERED: headers are answered at once (minus client routing headers); the route goes in
the body answer. FULL_DUPLEX_STREAMED: the headers answer is held until the body is
complete, then sent with the route and a Content-Length, followed by the body, unchanged,
in chunks. Requests that are not completion calls pass with Envoy's default route.

Endpoint-picker protocol (GAIE proposal 004): the destination is the chosen pod, then up to
``fallback_endpoints`` alternates, best first ("ip:port,ip:port"), the same value in the header
and in ``envoy.lb`` metadata; the proxy's subset hint limits the choice; a request no pod may
take is answered at once (404 unknown model, 503 no ready pod).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import grpc

from . import requests, responses, wire
from .logs import ThrottledLog
from .metrics import Metrics
from .pods import Pod
from .requests import RequestError
from .routing import NoRoute, Router

log = logging.getLogger("extproc.server")

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
CLIENT_HEADER_PREFIX = "x-kv-"
RANK_HEADER = "x-data-parallel-rank"
"""vLLM (0.11.0 and later) pins a request to this data-parallel rank of the engine (read
case-insensitively by ``_get_data_parallel_rank``); set by us only, a client's is dropped."""


class ExtProcService:
    def __init__(self, router: Router, metrics: Metrics, *, routing_header: str, max_body_bytes: int,
                 max_messages: int = 1 << 30, fallback_endpoints: int = 0):
        self.router = router
        self.metrics = metrics
        self.routing_header = routing_header
        self.max_body_bytes = max_body_bytes
        self.max_messages = max_messages
        self.fallback_endpoints = fallback_endpoints
        self.errors = ThrottledLog(log, 10.0)
        """Tracebacks of the internal-error path, at most one per interval: no client can flood the logs."""

    async def process(self, messages: AsyncIterator, context: grpc.aio.ServicerContext):
        stream = _Stream(self)
        try:
            async for message in messages:
                try:
                    answers = await stream.on_message(message)
                except Exception:  # noqa: BLE001 - a bug of ours: the request goes on unrouted, never a 500
                    answers = stream.fail_open(message)
                for answer in answers:
                    yield answer
        finally:
            stream.release()

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(
            self.process, request_deserializer=wire.parse_request, response_serializer=None
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Process": method})


class _Stream:
    """State of one HTTP request's ext_proc stream."""

    __slots__ = ("svc", "full_duplex", "path", "routed", "remove", "body", "pod", "open", "done", "subset", "headers_held")

    def __init__(self, svc: ExtProcService):
        self.svc = svc
        self.full_duplex = False
        self.path = ""
        self.routed = False
        self.remove: tuple[str, ...] = (svc.routing_header,)
        self.body = bytearray()
        self.pod: Pod | None = None
        self.open = None
        self.done = False
        self.subset: frozenset[str] | None = None
        self.headers_held = False
        """Full duplex: our answer to the headers waits for the end of the body."""

    async def on_message(self, message) -> list[bytes]:
        kind = message.WhichOneof("request")
        if self.subset is None:
            self.subset = wire.subset_hint(message)
        if kind == "request_headers":
            if message.HasField("protocol_config"):
                self.full_duplex = message.protocol_config.request_body_mode == wire.FULL_DUPLEX_STREAMED
            return self._on_headers(message.request_headers)
        if kind == "request_body":
            return await self._on_body(message.request_body)
        if kind == "request_trailers":
            answers = [] if self.done or not self.routed or not self.full_duplex else await self._finish(False)
            return answers + [responses.TRAILERS_CONTINUE]
        if kind == "response_headers":
            return [responses.RESPONSE_HEADERS_CONTINUE]
        if kind == "response_body":
            return [responses.RESPONSE_BODY_CONTINUE]
        return []

    def _on_headers(self, headers) -> list[bytes]:
        path = method = ""
        remove = [self.svc.routing_header]
        for header in headers.headers.headers:
            key = header.key
            if key == ":path":
                path = _value(header)
            elif key == ":method":
                method = _value(header)
            elif key.startswith(CLIENT_HEADER_PREFIX) or key == RANK_HEADER:
                remove.append(key)
        self.path = path
        self.remove = tuple(remove)
        self.routed = method == "POST" and requests.is_routed_path(path) and not headers.end_of_stream
        if not self.routed:
            self.svc.metrics.requests.labels("passthrough").inc()
        if self.routed and self.full_duplex:
            self.headers_held = True
            return []  # held until the body is complete
        return [responses.headers_continue(self.remove)]

    async def _on_body(self, chunk) -> list[bytes]:
        if not self.routed or self.done:
            if self.full_duplex:
                return responses.body_chunks(chunk.body, end_of_stream=chunk.end_of_stream)
            return [responses.BODY_CONTINUE]
        data = chunk.body
        if len(self.body) + len(data) > self.svc.max_body_bytes:
            return [self._reject(RequestError(
                f"request body exceeds {self.svc.max_body_bytes} bytes", status=413, code="request_too_large"
            ))]
        if chunk.end_of_stream and not self.body and not self.full_duplex:
            # BUFFERED: the whole body in one message, used as it is (full duplex keeps its copy
            # in self.body: a failure must still hand the body back to Envoy).
            return await self._finish(True, data)
        self.body += data
        if chunk.end_of_stream:
            return await self._finish(True)
        return [] if self.full_duplex else [responses.BODY_CONTINUE]

    async def _finish(self, end_of_stream: bool, whole: bytes | None = None) -> list[bytes]:
        self.done = True
        body = bytes(self.body) if whole is None else whole
        started = time.perf_counter()
        try:
            parsed = requests.parse(self.path, body, max_messages=self.svc.max_messages)
        except RequestError as exc:
            return [self._reject(exc)]
        self.svc.metrics.stage_seconds.labels("parse").observe(time.perf_counter() - started)
        if self.subset is not None:
            parsed = dataclasses.replace(parsed, subset=self.subset)
        try:
            decision = await self.svc.router.route(parsed)
        except NoRoute as exc:
            self.svc.metrics.requests.labels("rejected" if exc.status < 500 else "unavailable").inc()
            return [responses.immediate(exc.status, exc.body(), f"kv-extproc: {exc.message}")]
        address = None
        extra: tuple[tuple[str, str], ...] = ()
        if decision is not None:
            self.open = decision.pod.opened(decision.uncached_tokens, self.svc.router.clock())
            self.pod = decision.pod
            self.svc.metrics.in_flight.labels(self.pod.id).inc()
            address = self.pod.address
            if self.pod.rank is not None:
                extra = ((RANK_HEADER, str(self.pod.rank)),)
            if self.svc.fallback_endpoints and decision.alternates:
                # Retries go to other addresses (another rank of the same pod is no fallback:
                # the same address). A retry must not carry the rank; see envoy/envoy.yaml.
                listed = [address]
                for alternate in decision.alternates:
                    if len(listed) > self.svc.fallback_endpoints:
                        break
                    if alternate.address not in listed:
                        listed.append(alternate.address)
                address = ",".join(listed)
        header = self.svc.routing_header
        if not self.full_duplex:
            return [responses.body_route(header, address, extra) if address else responses.BODY_CONTINUE]
        held = (responses.headers_route(header, address, self.remove, extra) if address
                else responses.headers_continue(self.remove))
        answers = [held, *responses.body_chunks(body, end_of_stream=end_of_stream)]
        self.headers_held = False
        return answers

    def fail_open(self, message) -> list[bytes]:
        """The answers that let this request go on as if we were not here (Envoy's own pool
        picks the pod), after a bug of ours; the traceback is logged at most once per interval."""
        self.svc.metrics.internal_errors.inc()
        self.svc.errors.exception("internal_error", "ext_proc stream failed; the request goes on unrouted")
        held, self.headers_held = self.headers_held, False
        self.done = True
        try:
            kind = message.WhichOneof("request")
        except Exception:  # noqa: BLE001 - nothing more to learn from it
            kind = None
        if kind == "request_headers":
            return [responses.headers_continue(self.remove)]
        if kind == "request_body":
            if not self.full_duplex:
                return [responses.BODY_CONTINUE]
            end = bool(message.request_body.end_of_stream)
            if held:
                return [responses.headers_continue(self.remove), *responses.body_chunks(bytes(self.body), end_of_stream=end)]
            return responses.body_chunks(message.request_body.body, end_of_stream=end)
        if kind == "request_trailers":
            if held:
                return [responses.headers_continue(self.remove),
                        *responses.body_chunks(bytes(self.body), end_of_stream=False), responses.TRAILERS_CONTINUE]
            return [responses.TRAILERS_CONTINUE]
        if kind == "response_headers":
            return [responses.RESPONSE_HEADERS_CONTINUE]
        if kind == "response_body":
            return [responses.RESPONSE_BODY_CONTINUE]
        return []

    def _reject(self, error: RequestError) -> bytes:
        self.done = True
        self.svc.metrics.requests.labels("rejected").inc()
        return responses.immediate(error.status, error.body(), f"kv-extproc: {error.message}")

    def release(self) -> None:
        if self.pod is not None:
            self.pod.closed(self.open, self.svc.router.clock())
            self.svc.metrics.in_flight.labels(self.pod.id).dec()
            self.pod = None


def _value(header) -> str:
    return header.raw_value.decode("latin-1") if header.raw_value else header.value
