"""Prompt -> token ids, exactly as vLLM computes them, off the event loop.

vLLM renders chat messages with the model's own chat template and tokenizes the result
without adding special tokens (the template already has them); completions are tokenized
with the tokenizer's default special tokens. We do the same, so our block keys name the
same tokens the engine caches.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import CancelledError, ThreadPoolExecutor
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from .requests import RoutingRequest

# Tokenizers are read from local directories; a hub download on the request path would
# stall routing for seconds, so it must be asked for explicitly (HF_HUB_OFFLINE=0).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("extproc.tokenization")

T = TypeVar("T")


REMOTE = "remote"
"""A model's tokenizer source that means "ask its engines" (config ``tokenizer: remote``)."""


class TokenizerUnavailable(Exception):
    """No tokenizer could be loaded for the model; routing falls back to load."""


class TokenizerBusy(Exception):
    """Every worker is taken and the queue is full; routing falls back to load."""


class PromptRenderError(Exception):
    """The request's messages, tools or template options do not render with the model's chat
    template: client input, routed by load without a traceback (the engine judges it)."""


class Tokenizer(Protocol):
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    @property
    def backend_tokenizer(self) -> Any: ...


def load_tokenizer(source: str) -> Tokenizer:
    from transformers import AutoTokenizer  # ~0.7 s to import: only when a model needs it

    return AutoTokenizer.from_pretrained(source)


def render_chat(tokenizer: Tokenizer, request: RoutingRequest, renderer: "ChatRenderer | None" = None) -> str:
    if renderer is not None:
        text = renderer.direct(request)
        if text is not None:
            return text
    kwargs = dict(request.chat_template_kwargs)
    if request.tools:
        kwargs["tools"] = request.tools
    try:
        return tokenizer.apply_chat_template(
            request.messages,
            tokenize=False,
            add_generation_prompt=request.add_generation_prompt and not request.continue_final_message,
            continue_final_message=request.continue_final_message,
            **kwargs,
        )
    except Exception as exc:  # noqa: BLE001 - templates raise anything on odd input (TemplateError, TypeError, RecursionError)
        raise PromptRenderError(f"chat template failed: {type(exc).__name__}: {str(exc)[:200]}") from None


class ChatRenderer:
    """One tokenizer's chat template, called straight for plain JSON messages.

    apply_chat_template spends about a fifth of a render normalising its input: copying every
    message, dropping keys whose value is None, aliasing reasoning fields. Messages
    parsed from JSON with no None value and no reasoning field come out of that unchanged, so
    for them the compiled template is rendered with the same arguments directly. Anything
    else (continue_final_message, template kwargs that name apply_chat_template's own
    parameters, a render that raises) takes apply_chat_template, and so does every request if
    the tokenizer's template does not render a set of sample conversations identically both
    ways when the renderer is made (another transformers version, another template).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.enabled = False
        self._compile: Callable[[str], Any] | None = None
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template
            params = set(inspect.signature(type(tokenizer).apply_chat_template).parameters)
        except (ImportError, TypeError, ValueError):
            return
        from transformers.utils import chat_template_utils

        self._reasoning = frozenset(getattr(chat_template_utils, "_REASONING_FIELDS", ())) | {
            "reasoning", "reasoning_content", "thinking"}
        self._reserved = params
        self._compile = _compile_jinja_template
        self.enabled = self._agrees()

    def direct(self, request: RoutingRequest) -> str | None:
        """The rendered prompt, or None when this request needs apply_chat_template."""
        if not self.enabled or request.continue_final_message or not self._plain(request):
            return None
        tokenizer = self._tokenizer
        try:
            compiled = self._compile(tokenizer.get_chat_template(None, request.tools or None))  # type: ignore[misc]
            return compiled.render(messages=request.messages, tools=request.tools or None, documents=None,
                                   add_generation_prompt=request.add_generation_prompt,
                                   **{**tokenizer.special_tokens_map, **request.chat_template_kwargs})
        except Exception:  # noqa: BLE001 - apply_chat_template gives the error its usual shape
            return None

    def _plain(self, request: RoutingRequest) -> bool:
        if not self._reserved.isdisjoint(request.chat_template_kwargs):
            return False
        reasoning = self._reasoning
        for message in request.messages or ():
            if type(message) is not dict or None in message.values() or not reasoning.isdisjoint(message):
                return False
        return True

    def _agrees(self) -> bool:
        tools = [{"type": "function", "function": {"name": "lookup", "description": "Find a fact.",
                                                    "parameters": {"type": "object", "properties": {}}}}]
        samples = [
            RoutingRequest(model="", kind="chat", messages=[{"role": "user", "content": "Hi <|im_end|> there"}]),
            RoutingRequest(model="", kind="chat", add_generation_prompt=False, messages=[
                {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]),
            RoutingRequest(model="", kind="chat", tools=tools, chat_template_kwargs={"enable_thinking": False},
                           messages=[{"role": "user", "content": "Look it up."}]),
        ]
        self.enabled = True
        try:
            for sample in samples:
                if self.direct(sample) != render_chat(self._tokenizer, sample):
                    return False
        except PromptRenderError:
            return False
        finally:
            self.enabled = False
        return True


def encode(tokenizer: Tokenizer, text: str, *, add_special_tokens: bool) -> list[int]:
    # The Rust tokenizer's encode does not mutate shared state (the Python wrapper may
    # reconfigure truncation), so worker threads can share one tokenizer safely.
    return encode_off_loop(tokenizer.backend_tokenizer, text, add_special_tokens=add_special_tokens).ids


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def encode_off_loop(backend: Any, text: str, *, add_special_tokens: bool) -> Any:
    """One text's Encoding, for a worker thread: the Rust tokenizer releases the GIL while it
    encodes a batch but not a single text, so a worker encoding with ``encode`` stops the
    event loop for as long (measured here: the loop kept 9% of its speed against 67%)."""
    return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]


def prompt_text(tokenizer: Tokenizer, request: RoutingRequest,
                renderer: ChatRenderer | None = None) -> tuple[str, bool]:
    """The text vLLM tokenizes for this request, and whether it adds special tokens."""
    if request.kind == "chat":
        return render_chat(tokenizer, request, renderer), False
    return request.prompt or "", True


def tokenize_with(tokenizer: Tokenizer, request: RoutingRequest) -> list[int]:
    if request.token_ids is not None:
        return request.token_ids
    text, add_special_tokens = prompt_text(tokenizer, request)
    return encode(tokenizer, text, add_special_tokens=add_special_tokens)


class TokenizerManager:
    """Loads each model's tokenizer once (bounded LRU) and encodes in a bounded thread pool."""

    RETRY_FAILED_LOAD_AFTER = 30.0

    def __init__(self, sources: dict[str, str], *, workers: int = 2, max_queued: int = 64, max_loaded: int = 8):
        self._sources = dict(sources)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize")
        self._pieces = ThreadPoolExecutor(max_workers=max(workers, cores() - 1), thread_name_prefix="tokenize-piece")
        """Pieces of a long prompt encoded beside the worker that cut them (spread); a pool of
        its own, so a worker never waits on a job queued behind itself, with a thread for every
        core the worker does not use."""
        self._slots = threading.BoundedSemaphore(workers + max_queued)
        self._max_loaded = max_loaded
        self._loaded: OrderedDict[str, Tokenizer] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Tokenizer]] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self._background: set = set()
        self._foreground = 0
        self._workers = workers
        self._renderers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def set_sources(self, sources: dict[str, str]) -> None:
        """Adopt a new model list; tokenizers whose source changed are reloaded lazily."""
        for model, source in list(self._loaded.items()):
            if sources.get(model) != self._sources.get(model):
                del self._loaded[model]
        self._sources = dict(sources)
        self._failed.clear()

    def loaded(self, model: str) -> bool:
        return model in self._loaded

    def peek(self, model: str) -> Tokenizer | None:
        """The model's tokenizer if it is already loaded, without loading it."""
        return self._loaded.get(model)

    def renderer(self, tokenizer: Tokenizer) -> ChatRenderer:
        """The tokenizer's direct chat renderer, made (and self-checked) on first use."""
        renderer = self._renderers.get(tokenizer)
        if renderer is None:
            renderer = self._renderers[tokenizer] = ChatRenderer(tokenizer)
            log.info("chat template: %s", "rendered directly for plain messages" if renderer.enabled
                     else "through apply_chat_template only (the direct render did not agree)")
        return renderer

    async def get(self, model: str) -> Tokenizer:
        tokenizer = self._loaded.get(model)
        if tokenizer is not None:
            self._loaded.move_to_end(model)
            return tokenizer
        source = self._sources.get(model)
        if source is None:
            raise TokenizerUnavailable(f"no tokenizer configured for model {model!r}")
        if source == REMOTE:
            raise TokenizerUnavailable(f"model {model!r} is tokenized by its engines (tokenizer: remote)")
        failed = self._failed.get(model)
        if failed and time.monotonic() - failed[0] < self.RETRY_FAILED_LOAD_AFTER:
            raise TokenizerUnavailable(failed[1])
        pending = self._loading.get(model)
        if pending is None:
            pending = asyncio.ensure_future(self._load(model, source))
            self._loading[model] = pending
        return await asyncio.shield(pending)

    def use_remote(self, model: str, *, fallback: bool) -> bool:
        """Whether the model's engines tokenize this request: always for ``tokenizer: remote``;
        with ``fallback``, also while no local tokenizer is usable (none configured, a load
        failed in the last RETRY_FAILED_LOAD_AFTER seconds, or still loading). A load is started
        here, so the local tokenizer takes over as soon as it is in memory."""
        source = self._sources.get(model)
        if source == REMOTE:
            return True
        if not fallback or model in self._loaded:
            return False
        if source is None:
            return True
        failed = self._failed.get(model)
        if failed and time.monotonic() - failed[0] < self.RETRY_FAILED_LOAD_AFTER:
            return True
        if model not in self._loading:
            pending = asyncio.ensure_future(self._load(model, source))
            pending.add_done_callback(_retrieve)  # its failure is recorded in _failed
            self._loading[model] = pending
        return True

    async def _load(self, model: str, source: str) -> Tokenizer:
        try:
            tokenizer = await asyncio.get_running_loop().run_in_executor(self._pool, load_tokenizer, source)
        except Exception as exc:  # noqa: BLE001 - any load failure means "route without the cache"
            reason = f"cannot load tokenizer for {model!r} from {source!r}: {type(exc).__name__}: {exc}"
            self._failed[model] = (time.monotonic(), reason.splitlines()[0])
            raise TokenizerUnavailable(self._failed[model][1]) from None
        finally:
            self._loading.pop(model, None)
        self._loaded[model] = tokenizer
        while len(self._loaded) > self._max_loaded:
            self._loaded.popitem(last=False)
        return tokenizer

    async def tokenize(self, request: RoutingRequest) -> list[int]:
        if request.token_ids is not None:
            return request.token_ids
        return await self.run(request.model, tokenize_with, request)

    async def run(self, model: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(tokenizer, *args)`` on a worker thread, within the queue bound."""
        tokenizer = await self.get(model)
        if not self._slots.acquire(blocking=False):
            raise TokenizerBusy("tokenizer queue is full")
        # The slot is held until the worker finishes, even if the caller gave up waiting,
        # so abandoned encodes still count against the queue bound.
        self._foreground += 1
        job = self._pool.submit(fn, tokenizer, *args)
        job.add_done_callback(self._foreground_done)
        return await asyncio.wrap_future(job)

    def _foreground_done(self, _job) -> None:
        self._foreground -= 1
        self._slots.release()

    def spread(self, backend: Any, texts: list[str], special_first: bool = False) -> list[Any]:
        """Encodings of ``texts`` (special tokens on the first only, if asked): the first on this
        thread, the others on the piece pool, each without the GIL, so a long prompt's pieces use
        every core. A piece the pool cannot take (shutting down) is encoded here."""
        jobs = []
        for text in texts[1:]:
            try:
                jobs.append(self._pieces.submit(encode_off_loop, backend, text, add_special_tokens=False))
            except RuntimeError:  # shut down
                jobs.append(None)
        encodings = [encode_off_loop(backend, texts[0], add_special_tokens=special_first)]
        for text, job in zip(texts[1:], jobs):
            done = _result(job)
            encodings.append(done if done is not None else encode_off_loop(backend, text, add_special_tokens=False))
        return encodings

    def background(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on a spare worker; skipped while requests keep every worker busy,
        so optional work (filling the prefix store) never slows requests under load."""
        if self._foreground >= self._workers or not self._slots.acquire(blocking=False):
            return False
        try:
            job = self._pool.submit(fn, *args)
        except RuntimeError:  # shut down meanwhile (a decision that ended during shutdown)
            self._slots.release()
            return False
        self._background.add(job)
        job.add_done_callback(self._background_done)
        return True

    def _background_done(self, job) -> None:
        self._background.discard(job)
        self._slots.release()

    async def settle(self) -> None:
        """Wait for background jobs submitted so far, after the work deferred onto the event loop
        until now (a small store fill, call_soon) has run (tests, benchmarks, shutdown)."""
        await asyncio.sleep(0)
        pending = list(self._background)
        if pending:
            await asyncio.wait([asyncio.wrap_future(job) for job in pending])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pieces.shutdown(wait=False, cancel_futures=True)


def _result(job) -> Any:
    """A piece job's encoding; None if there was no job or a shutdown cancelled it before it ran."""
    try:
        return job.result() if job is not None else None
    except CancelledError:
        return None


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
