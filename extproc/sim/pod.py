"""A simulated vLLM pod: answers the OpenAI endpoints with its own name.

With a SimulatedEngine it also keeps a prefix cache and publishes real vLLM KV events
(``POST /reset_prefix_cache`` empties it, as vLLM's dev endpoint does).

Used by the quickstart, the integration tests and the benchmarks. It records what it
received (so tests can check bodies arrive byte for byte) and calls an optional hook per
completion request (so KV-event publishing can be layered on top).
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .engine import SimulatedEngine


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that hung up (a scraper past its timeout) is no error worth a traceback."""
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class SimulatedPod:
    def __init__(self, pod_id: str, host: str, port: int, *, model: str = "fake-model",
                 on_request: Callable[[str, bytes], None] | None = None, engine: SimulatedEngine | None = None):
        self.pod_id = pod_id
        self.model = model
        self.on_request = on_request
        self.engine = engine
        self.received: list[Received] = []
        self.down = False
        """Set: every request's connection is dropped unanswered (a pod dying mid-request)."""
        self._lock = threading.Lock()
        self._server = _Server((host, port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"fakepod-{pod_id}", daemon=True)

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> "SimulatedPod":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self.engine is not None:
            self.engine.close()

    def record(self, item: Received) -> None:
        with self._lock:
            self.received.append(item)

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def completion(self, path: str, body: bytes) -> dict:
        try:
            model = json.loads(body).get("model", self.model)
        except (ValueError, AttributeError, RecursionError):  # whatever a client sent
            model = self.model
        now = int(time.time())
        usage = {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}
        if path.startswith("/v1/chat/completions"):
            return {
                "id": f"chatcmpl-{self.pod_id}-{now}", "object": "chat.completion", "created": now, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.pod_id},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": usage,
            }
        return {
            "id": f"cmpl-{self.pod_id}-{now}", "object": "text_completion", "created": now, "model": model,
            "choices": [{"index": 0, "text": self.pod_id, "finish_reason": "stop", "logprobs": None}],
            "usage": usage,
        }


def _handler_for(pod: SimulatedPod) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet by design
            pass

        def _reply(self, status: int, payload: dict, extra: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.send_header("x-served-by", pod.pod_id)
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _read_body(self) -> bytes:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("content-length") or 0))

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _stream(self, body: bytes) -> None:
            """Server-sent events as vLLM streams them: the first chunk once the prefill is done
            (what a client measures as time to first token), the rest after the decode."""
            chat = self.path.startswith("/v1/chat/completions")
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.send_header("x-served-by", pod.pod_id)
            self.end_headers()

            def event(payload: dict) -> bytes:
                return b"data: " + json.dumps(payload).encode() + b"\n\n"

            def piece(text: str, finish: str | None) -> dict:
                choice = ({"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": finish}
                          if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
                return {"id": f"sim-{pod.pod_id}", "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": int(time.time()), "model": pod.model, "choices": [choice]}

            first = lambda: self._chunk(event(piece(pod.pod_id, None)))  # noqa: E731
            if pod.engine is not None:
                pod.engine.serve(self.path, body, dict(self.headers), first_token=first)
            else:
                first()
            self._chunk(event(piece("", "stop")) + b"data: [DONE]\n\n")
            self._chunk(b"")

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.startswith("/v1/models"):
                self._reply(200, {"object": "list", "data": [{"id": pod.model, "object": "model", "owned_by": pod.pod_id}]})
            elif self.path.startswith("/health"):
                self._reply(200, {"status": "ok"})
            elif self.path.startswith("/metrics"):
                text = pod.engine.metrics_text() if pod.engine is not None else (
                    "vllm:num_requests_waiting 0.0\nvllm:num_requests_running 0.0\nvllm:kv_cache_usage_perc 0.0\n")
                data = text.encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain; version=0.0.4")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                self._reply(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:  # noqa: N802
            if pod.down:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            body = self._read_body()
            pod.record(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            if pod.on_request is not None:
                pod.on_request(self.path, body)
            if self.path.startswith(("/v1/completions", "/v1/chat/completions")):
                if _wants_stream(body):
                    self._stream(body)
                    return
                try:
                    cached = pod.engine.serve(self.path, body, dict(self.headers)) if pod.engine is not None else 0
                except ValueError as exc:  # a data-parallel rank the engine does not have
                    self._reply(400, {"error": {"message": str(exc), "type": "BadRequestError"}})
                    return
                self._reply(200, pod.completion(self.path, body),
                            {"x-body-sha256": hashlib.sha256(body).hexdigest(), "x-cached-tokens": str(cached)})
            elif self.path == "/reset_prefix_cache" and pod.engine is not None:
                pod.engine.reset()
                self._reply(200, {"status": "ok"})
            else:
                self._reply(404, {"error": {"message": "not found"}})

    return Handler


def _wants_stream(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("stream") is True


def run_simulated(pod_id: str, listen: str, *, kv_events: str = "", tokenizer: str = "", model: str = "",
                  capacity_blocks: int = 4096, prefill_tokens_per_s: float = 0.0, decode_s: float = 0.0) -> None:
    """``kv-extproc simulate-pod``: one simulated vLLM pod, publishing KV events when asked."""
    import signal

    from .launcher import bundled_tokenizer_dir
    from .engine import EngineCache, KVEventPublisher
    from ..requests import parse
    from ..tokenization import load_tokenizer, tokenize_with

    engine = None
    if kv_events:
        tok = load_tokenizer(tokenizer or bundled_tokenizer_dir())
        engine = SimulatedEngine(lambda path, body: tokenize_with(tok, parse(path, body)),
                                 EngineCache(capacity_blocks=capacity_blocks), KVEventPublisher(kv_events),
                                 prefill_tokens_per_s=prefill_tokens_per_s, decode_s=decode_s)
    host, _, port = listen.rpartition(":")
    pod = SimulatedPod(pod_id, host, int(port), model=model or "fake-model", engine=engine).start()
    print(f"simulated pod {pod_id} on {pod.address}" + (f", KV events on {kv_events}" if kv_events else ""), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    pod.stop()
