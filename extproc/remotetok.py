"""Token ids from a vLLM engine (``POST /tokenize``), for models whose tokenizer files the router
does not hold: routing stays cache-aware without mounting tokenizers into every replica.

The engine renders chat messages with its own chat template and tokenizes exactly as it will for
the request itself, so the block keys built from its answer name the blocks it caches. The call
may go to any healthy pod serving the model (least loaded first, not necessarily the pod the
request is routed to).

Bounded on purpose, because it sits on the request path: one timeout for the whole call (below
``decisionTimeout``), at most ``maxInFlightPerPod`` calls per pod (a pod at its bound is skipped,
never queued on), a circuit breaker per pod (``breakerFailures`` failures in a row keep it out
for ``breakerOpenFor``, then one trial call decides). Every failure raises
``RemoteTokenizerUnavailable``, which routing turns into a load-based pick
(``kv_extproc_fallbacks_total{reason="remote_tokenizer"}``).

Why /tokenize and not vLLM's render endpoints: vLLM 0.32 also has ``/v1/chat/completions/render``
and ``/v1/completions/render`` (the whole request body in, token ids and sampling params out), but
they answer 403 unless the engine runs with ``--enable-scale-out``; ``/tokenize`` is always on
and renders through the same code (``OnlineRenderer.preprocess_chat``).

HTTP: a small HTTP/1.1 client on asyncio streams with keep-alive connections per pod (as
``podhealth.py`` probes), because no async HTTP client is a runtime dependency (httpx is a test
extra, aiohttp is not installed) and this path needs little: one POST with a JSON body and a
Content-Length or chunked JSON answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .pods import Pod, PodPool
from .requests import MAX_TOKEN_ID, RoutingRequest

log = logging.getLogger("extproc.remotetok")

TOKENIZE_PATH = "/tokenize"
KEEPALIVE_IDLE = 3.0
"""Idle connections older than this are closed, not reused: vLLM's server closes them after 5 s
(``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``), and a write into a closing socket would cost a retry."""
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
"""A 1M-token answer is about 8 MB of JSON; anything far larger is not vLLM's answer."""
MAX_HEADER_LINES = 100


class RemoteTokenizerUnavailable(Exception):
    """No engine tokenized the prompt in time (timeout, breaker open, every pod busy, an HTTP or
    protocol error): the request is routed by load, counted as reason ``remote_tokenizer``."""


class _TokenizeResponse(msgspec.Struct):
    """vLLM's TokenizeResponse: ``{count, max_model_len, tokens, token_strs?}``."""

    tokens: list[Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKEN_ID)]]
    count: int
    max_model_len: int = 0
    token_strs: list[str] | None = None


_decode_response = msgspec.json.Decoder(_TokenizeResponse).decode
_encode = msgspec.json.Encoder().encode


def tokenize_body(request: RoutingRequest) -> dict[str, Any]:
    """The /tokenize request vLLM renders exactly as the chat or completion request itself.

    Chat: the messages (content parts already joined as vLLM joins them for string-content
    templates), the generation-prompt flags resolved as for the local path (vLLM refuses both set),
    tools and the remaining chat_template_kwargs as the client sent them, no special tokens added
    on top of the template. Completions: the prompt with the tokenizer's default special tokens.
    """
    if request.kind == "chat":
        body: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages,
            "add_generation_prompt": request.add_generation_prompt and not request.continue_final_message,
            "continue_final_message": request.continue_final_message,
            "add_special_tokens": False,
        }
        if request.tools:
            body["tools"] = request.tools
        if request.chat_template_kwargs:
            body["chat_template_kwargs"] = request.chat_template_kwargs
        return body
    return {"model": request.model, "prompt": request.prompt or "", "add_special_tokens": True}


def encode_body(request: RoutingRequest) -> bytes:
    return _encode(tokenize_body(request))


def prompt_key(body: bytes) -> int:
    """Whole-request cache key: the exact bytes sent to the engine (model included). Python's
    keyed string hash, as the prefix store's own keys: 64 bits, not steerable by clients."""
    return hash(("remote", body))


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0

    def usable(self, now: float) -> bool:
        return now - self.idle_since < KEEPALIVE_IDLE and not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


@dataclass(slots=True)
class _PodState:
    """Per pod address: calls in flight, idle connections, and the circuit breaker."""

    in_flight: int = 0
    idle: list[_Connection] = field(default_factory=list)
    failures: int = 0
    """Failures in a row (timeouts, connection and protocol errors, 5xx)."""
    open_until: float = 0.0
    trial: bool = False
    """Half-open: one trial call is in flight; others skip the pod until it ends."""

    def allows(self, now: float, threshold: int) -> bool:
        if self.failures < threshold:
            return True
        return now >= self.open_until and not self.trial

    def is_open(self, now: float, threshold: int) -> bool:
        return self.failures >= threshold and now < self.open_until


class _Stale(Exception):
    """A reused keep-alive connection was closed by the server before it answered."""


@dataclass
class RemoteTokenizerMetrics:
    calls: Counter
    seconds: Histogram
    open_breakers: Gauge

    @classmethod
    def on(cls, registry: CollectorRegistry | None) -> "RemoteTokenizerMetrics":
        r = registry or CollectorRegistry()
        return cls(
            Counter("kv_extproc_remote_tokenize", "Calls to an engine's /tokenize, by result (ok, timeout, error, "
                    "refused: a 4xx answer, busy: every pod at maxInFlightPerPod, open: every breaker open, "
                    "no_pod: no healthy pod serves the model).", ["result"], registry=r),
            Histogram("kv_extproc_remote_tokenize_seconds", "Successful /tokenize calls, from send to parsed answer.",
                      buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0), registry=r),
            Gauge("kv_extproc_remote_tokenizer_open_breakers", "Pods whose /tokenize circuit breaker is open.",
                  registry=r),
        )


class RemoteTokenizer:
    """Asks the engines serving a model for its token ids; see the module docstring."""

    def __init__(self, pool: PodPool, *, timeout: float, max_in_flight_per_pod: int = 4, attempts: int = 2,
                 breaker_failures: int = 3, breaker_open_for: float = 5.0, fallback: bool = False,
                 metrics: RemoteTokenizerMetrics | None = None, path: str = TOKENIZE_PATH):
        self.pool = pool
        self.timeout = timeout
        self.max_in_flight = max_in_flight_per_pod
        self.attempts = attempts
        self.breaker_failures = breaker_failures
        self.breaker_open_for = breaker_open_for
        self.fallback = fallback
        """Also tokenize remotely the models whose local tokenizer is missing, loading or failed."""
        self.metrics = metrics or RemoteTokenizerMetrics.on(None)
        self.metrics.open_breakers.set_function(self.open_breakers)
        self.path = path
        self._states: dict[str, _PodState] = {}
        self._turn = 0

    # -- choosing a pod ------------------------------------------------------------------

    def _state(self, address: str) -> _PodState:
        state = self._states.get(address)
        if state is None:
            if len(self._states) >= 2 * max(len(self.pool), 8):
                self._prune()
            state = self._states[address] = _PodState()
        return state

    def _prune(self) -> None:
        """Forget pods that left the pool (their idle connections too), so state stays bounded."""
        live = {pod.address for pod in self.pool.all()}
        for address in [a for a in self._states if a not in live]:
            state = self._states.pop(address)
            for conn in state.idle:
                conn.close()

    def choose(self, model: str, exclude: Sequence[str] = ()) -> tuple[Pod | None, str]:
        """The least loaded healthy pod serving ``model`` that can take a call now, or (None, why):
        requests this replica has in flight there plus its own /tokenize calls; equals take turns."""
        now = time.monotonic()
        best: list[Pod] = []
        best_load = None
        busy = closed = 0
        for pod in self.pool.serving(model):
            if not pod.healthy or pod.address in exclude:
                continue
            state = self._state(pod.address)
            if state.in_flight >= self.max_in_flight:
                busy += 1
                continue
            if not state.allows(now, self.breaker_failures):
                closed += 1
                continue
            load = pod.in_flight + state.in_flight
            if best_load is None or load < best_load:
                best, best_load = [pod], load
            elif load == best_load:
                best.append(pod)
        if best:
            self._turn += 1
            return best[self._turn % len(best)], "ok"
        if busy:
            return None, "busy"
        if closed:
            return None, "open"
        return None, "no_pod"

    def open_breakers(self) -> int:
        now = time.monotonic()
        return sum(1 for state in self._states.values() if state.is_open(now, self.breaker_failures))

    # -- the call --------------------------------------------------------------------------

    async def tokenize(self, request: RoutingRequest, body: bytes | None = None) -> list[int]:
        """The engine's token ids for the request (``body``: its encoded /tokenize request, if
        the caller already built it for a cache key)."""
        if body is None:
            body = encode_body(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        tried: list[str] = []
        failure = ""
        for _ in range(self.attempts):
            pod, why = self.choose(request.model, tried)
            if pod is None:
                if not tried:
                    self.metrics.calls.labels(why).inc()
                    raise RemoteTokenizerUnavailable(_NO_POD[why].format(model=request.model, n=self.max_in_flight))
                break
            tried.append(pod.address)
            state = self._state(pod.address)
            trial = state.failures >= self.breaker_failures
            if trial:
                state.trial = True
            state.in_flight += 1
            started = time.perf_counter()
            try:
                status, payload = await self._exchange(state, pod.address, body, deadline)
            except TimeoutError:
                self._failed(state, pod, "timeout")
                raise RemoteTokenizerUnavailable(
                    f"pod {pod.id} did not tokenize within {self.timeout * 1000:.0f} ms") from None
            except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                self._failed(state, pod, "error")
                failure = f"pod {pod.id}: {type(exc).__name__}: {exc}"
                continue
            finally:
                state.in_flight -= 1
                if trial:
                    state.trial = False
            if status >= 500:
                self._failed(state, pod, "error")
                failure = f"pod {pod.id} answered {status}: {_error_message(payload)}"
                continue
            if status != 200:
                # The pod is up and judged the request (a 400 on the client's messages, a 404 for a
                # model it does not serve): no breaker failure; the request goes by load.
                state.failures = 0
                self.metrics.calls.labels("refused").inc()
                raise RemoteTokenizerUnavailable(f"pod {pod.id} answered {status}: {_error_message(payload)}")
            try:
                answer = _decode_response(payload)
                if answer.count != len(answer.tokens):
                    raise ValueError(f"count {answer.count} but {len(answer.tokens)} tokens")
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                self._failed(state, pod, "error")
                failure = f"pod {pod.id}: not a /tokenize answer: {exc}"
                continue
            state.failures = 0
            self.metrics.calls.labels("ok").inc()
            self.metrics.seconds.observe(time.perf_counter() - started)
            return answer.tokens
        raise RemoteTokenizerUnavailable(failure or f"no pod tokenized the prompt for {request.model!r}")

    def _failed(self, state: _PodState, pod: Pod, result: str) -> None:
        state.failures += 1
        self.metrics.calls.labels(result).inc()
        if state.failures >= self.breaker_failures:
            state.open_until = time.monotonic() + self.breaker_open_for
            if state.failures == self.breaker_failures:
                log.warning("pod %s: /tokenize failed %d times in a row: no tokenize calls to it for %.1fs",
                            pod.id, state.failures, self.breaker_open_for)

    async def _exchange(self, state: _PodState, address: str, body: bytes, deadline: float) -> tuple[int, bytes]:
        """One POST within the deadline; a reused connection the server had closed is retried
        once on a fresh one (the call is idempotent)."""
        async with asyncio.timeout_at(deadline):
            conn = self._idle(state)
            if conn is not None:
                try:
                    return await self._roundtrip(state, conn, address, body)
                except _Stale:
                    pass
            host, _, port = address.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            conn = _Connection(reader, writer)
            try:
                return await self._roundtrip(state, conn, address, body)
            except _Stale:
                raise EOFError("connection closed before an answer") from None

    @staticmethod
    def _idle(state: _PodState) -> _Connection | None:
        now = time.monotonic()
        while state.idle:
            conn = state.idle.pop()
            if conn.usable(now):
                return conn
            conn.close()
        return None

    async def _roundtrip(self, state: _PodState, conn: _Connection, address: str, body: bytes) -> tuple[int, bytes]:
        keep = False
        answered = False
        try:
            conn.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                              b"Accept: application/json\r\nContent-Length: %d\r\n\r\n%s"
                              % (self.path.encode(), address.encode(), len(body), body))
            await conn.writer.drain()
            status_line = await conn.reader.readline()
            if not status_line:
                raise _Stale()
            answered = True
            status, keep, payload = await _read_response(status_line, conn.reader)
            return status, payload
        except (ConnectionResetError, BrokenPipeError) as exc:
            if not answered:
                raise _Stale() from exc
            raise
        finally:
            # Only a connection whose whole answer was read goes back to the pool; anything else
            # (an error, a timeout or a cancel mid-answer) leaves it in an unknown state.
            if keep and len(state.idle) < self.max_in_flight:
                conn.idle_since = time.monotonic()
                state.idle.append(conn)
            else:
                conn.close()

    async def close(self) -> None:
        for state in self._states.values():
            for conn in state.idle:
                conn.close()
            state.idle.clear()


_NO_POD = {
    "busy": "every pod serving {model!r} already has {n} tokenize calls in flight",
    "open": "every pod serving {model!r} failed its recent tokenize calls (circuit breakers open)",
    "no_pod": "no healthy pod serves {model!r} to tokenize with",
}


async def _read_response(status_line: bytes, reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """(status, keep-alive, body) of an HTTP/1.1 answer: Content-Length, chunked, or to EOF."""
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP status line: {status_line[:80]!r}")
    status = int(parts[1])
    keep = parts[0] == b"HTTP/1.1"
    length: int | None = None
    chunked = False
    for _ in range(MAX_HEADER_LINES):
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            break
        if not line:
            raise EOFError("connection closed in the headers")
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = value.endswith(b"chunked")
        elif name == b"connection":
            keep = keep and value != b"close"
    else:
        raise ValueError("too many header lines")
    if chunked:
        pieces, total = [], 0
        while True:
            size = int((await reader.readline()).split(b";", 1)[0].strip() or b"x", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            total += size
            if total > MAX_RESPONSE_BYTES:
                raise ValueError(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
            pieces.append(await reader.readexactly(size))
            await reader.readline()
        return status, keep, b"".join(pieces)
    if length is not None:
        if length > MAX_RESPONSE_BYTES:
            raise ValueError(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
        return status, keep, await reader.readexactly(length)
    pieces, total = [], 0
    while piece := await reader.read(65536):
        total += len(piece)
        if total > MAX_RESPONSE_BYTES:
            raise ValueError(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
        pieces.append(piece)
    return status, False, b"".join(pieces)


def _error_message(payload: bytes) -> str:
    """vLLM's error text (``{"error": {"message": ...}}``), or the start of the body."""
    try:
        data = msgspec.json.decode(payload)
        message = data["error"]["message"] if isinstance(data.get("error"), dict) else data.get("message") or data
        return str(message)[:200]
    except Exception:  # noqa: BLE001 - any body: we only quote it
        return payload[:200].decode(errors="replace")
