"""A small HTTP server that answers ``POST /tokenize`` the way vLLM 0.32 does (the version of the
real-vLLM suite), with a real tokenizer and its chat template, for the remote tokenizer's unit tests.

Shapes, as in vLLM 0.32's ``entrypoints/serve/tokenize/protocol.py``:
- completion: ``{model?, prompt, add_special_tokens=true, return_token_strs=false}``
- chat: ``{model?, messages, add_generation_prompt=true, continue_final_message=false,
  add_special_tokens=false, return_token_strs=false, chat_template?, chat_template_kwargs?,
  media_io_kwargs?, mm_processor_kwargs?, tools?}``; both generation flags set is a 400
- answer: ``{count, max_model_len, tokens, token_strs}``; errors: ``{"error": {message, type,
  param, code}}`` (404 for a model it does not serve, 400 for a bad request).
vLLM ignores unknown fields; this server records them (``ignored``) so tests can require none.

Real HTTP/1.1 from the standard library (keep-alive, Content-Length or chunked answers), in a
thread; knobs let tests make it slow, fail, or drop connections.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COMPLETION_FIELDS = {"model", "prompt", "add_special_tokens", "return_token_strs"}
CHAT_FIELDS = {"model", "messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
               "return_token_strs", "chat_template", "chat_template_kwargs", "media_io_kwargs",
               "mm_processor_kwargs", "tools"}
MAX_MODEL_LEN = 32768


class TokenizeServer:
    def __init__(self, tokenizer, model: str, host: str = "127.0.0.1", *, keepalive_timeout: float = 5.0,
                 name: str = "engine", port: int = 0):
        self.tokenizer = tokenizer
        self.model = model
        self.name = name
        """Answered as the content of any /v1/ completion, so tests through Envoy see who served."""
        self.served = 0
        self.delay = 0.0
        """Seconds each answer waits (an engine busy with inference)."""
        self.status: int | None = None
        """Answer every request with this error status instead."""
        self.drop = False
        """Close the connection after reading a request, without answering."""
        self.chunked = False
        self.bad_answer = False
        """Answer 200 with a body that is not a TokenizeResponse."""
        self.requests: list[dict[str, Any]] = []
        self.ignored: list[set[str]] = []
        self.connections = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = keepalive_timeout  # idle keep-alive connections are closed after this, as uvicorn does

            def setup(self) -> None:
                super().setup()
                # Headers and body leave in two writes: without this, Nagle holds the body until the
                # client's delayed ACK (40 ms), which uvicorn (vLLM's server) does not do.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with server._lock:
                    server.connections += 1

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._send(200 if self.path == "/health" else 404, b"")

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path.startswith("/v1/"):
                    server.served += 1
                    self._send(200, json.dumps({
                        "id": "cmpl-0", "object": "chat.completion", "created": 0, "model": server.model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": server.name},
                                     "finish_reason": "stop"}]}).encode())
                    return
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if server.delay:
                        time.sleep(server.delay)
                    if server.drop:
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    status, answer = server.answer(self.path, body)
                    self._send(status, json.dumps(answer).encode())
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _send(self, status: int, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                if server.chunked:
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(payload), 1000):
                        piece = payload[i:i + 1000]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.address = f"{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> "TokenizeServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, path: str, raw: bytes) -> tuple[int, dict]:
        if self.status is not None:
            return self.status, _error(f"injected {self.status}", "InternalServerError", self.status)
        if self.bad_answer:
            return 200, {"count": 1, "tokens": ["not", "ids"]}
        if path != "/tokenize":
            return 404, {"detail": "Not Found"}
        body = json.loads(raw)
        self.requests.append(body)
        if body.get("model") not in (None, self.model):
            return 404, _error(f"The model `{body['model']}` does not exist.", "NotFoundError", 404, "model")
        if "messages" in body:
            self.ignored.append(body.keys() - CHAT_FIELDS)
            if body.get("continue_final_message") and body.get("add_generation_prompt", True):
                return 400, _error("Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                                   "BadRequestError", 400)
            if body.get("chat_template") is not None:
                return 400, _error("Chat template is passed with request, but --trust-request-chat-template is "
                                   "not set. Refused request with untrusted chat template.", "BadRequestError", 400)
            kwargs = {**(body.get("chat_template_kwargs") or {}),
                      "add_generation_prompt": body.get("add_generation_prompt", True),
                      "continue_final_message": body.get("continue_final_message", False)}
            try:
                text = self.tokenizer.apply_chat_template(body["messages"], tools=body.get("tools"), tokenize=False,
                                                          **kwargs)
            except Exception as exc:  # noqa: BLE001 - vLLM answers 400 to a template that fails
                return 400, _error(str(exc), "BadRequestError", 400)
            tokens = self.tokenizer(text, add_special_tokens=body.get("add_special_tokens", False))["input_ids"]
        elif isinstance(body.get("prompt"), str):
            self.ignored.append(body.keys() - COMPLETION_FIELDS)
            tokens = self.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
        else:
            return 400, _error("1 validation error: prompt or messages required", "BadRequestError", 400)
        strs = self.tokenizer.convert_ids_to_tokens(tokens) if body.get("return_token_strs") else None
        return 200, {"count": len(tokens), "max_model_len": MAX_MODEL_LEN, "tokens": list(tokens), "token_strs": strs}


def _error(message: str, kind: str, code: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def main() -> None:
    """``python -m tests.harness.vllm_tokenize --port N [--model M]``: serve until killed (the bench
    uses it where no real vLLM engine is installed)."""
    import argparse

    from extproc.sim.launcher import bundled_tokenizer_dir
    from extproc.tokenization import load_tokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="Qwen/Qwen3-0.6B")
    args = parser.parse_args()
    server = TokenizeServer(load_tokenizer(bundled_tokenizer_dir()), args.model, args.host, port=args.port)
    server.httpd.serve_forever(poll_interval=0.05)


if __name__ == "__main__":
    main()
