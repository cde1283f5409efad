"""Prompt -> token ids, exactly as vLLM computes them, off the event loop.

vLLM renders chat messages with the model's own chat template and tokenizes the result
without adding special tokens (the template already has them); completions are tokenized
with the tokenizer's default special tokens. We do the same, so our block keys name the
same tokens the engine caches.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from .requests import RoutingRequest

# Tokenizers are read from local directories; a hub download on the request path would
# stall routing for seconds, so it must be asked for explicitly (HF_HUB_OFFLINE=0).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


def render_chat(tokenizer: Tokenizer, request: RoutingRequest) -> str:
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


def encode(tokenizer: Tokenizer, text: str, *, add_special_tokens: bool) -> list[int]:
    # The Rust tokenizer's encode does not mutate shared state (the Python wrapper may
    # reconfigure truncation), so worker threads can share one tokenizer safely.
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


def prompt_text(tokenizer: Tokenizer, request: RoutingRequest) -> tuple[str, bool]:
    """The text vLLM tokenizes for this request, and whether it adds special tokens."""
    if request.kind == "chat":
        return render_chat(tokenizer, request), False
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
        self._slots = threading.BoundedSemaphore(workers + max_queued)
        self._max_loaded = max_loaded
        self._loaded: OrderedDict[str, Tokenizer] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Tokenizer]] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self._background: set = set()
        self._foreground = 0
        self._workers = workers

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

    def background(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on a spare worker; skipped while requests keep every worker busy,
        so optional work (filling the prefix store) never slows requests under load."""
        if self._foreground >= self._workers or not self._slots.acquire(blocking=False):
            return False
        job = self._pool.submit(fn, *args)
        self._background.add(job)
        job.add_done_callback(self._background_done)
        return True

    def _background_done(self, job) -> None:
        self._background.discard(job)
        self._slots.release()

    async def settle(self) -> None:
        """Wait for background jobs submitted so far (tests, benchmarks, shutdown)."""
        pending = list(self._background)
        if pending:
            await asyncio.wait([asyncio.wrap_future(job) for job in pending])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
