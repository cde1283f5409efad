"""Prompt -> per-pod matched prefix: tokenize, key the blocks, one index lookup.

With the prefix cache, a prompt whose lookup result is cached (full hit) skips both the
tokenizer and Redis; one whose prefix text was seen (partial hit) tokenizes only the rest
and asks Redis; a new one (miss) takes the full pipeline and is cached. Any error in the
cache falls back to the full pipeline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import KW_ONLY, dataclass, field

from .blocks import HashScheme, block_keys
from .index import FEED_LOST, BlockIndex, Invalidation, PodTimes
from .prefixcache import CachedPodMapping, CacheStats, PrefixCache, pod_set_hash
from .requests import RoutingRequest
from .tokenization import PromptRenderError, TokenizerManager, encode, prompt_text

log = logging.getLogger("extproc.indexer")


@dataclass(slots=True)
class PrefixMatch:
    matched: dict[str, int]
    """pod id -> blocks matched consecutively from the first."""
    total_blocks: int
    timings: dict[str, float] = field(default_factory=dict)
    """stage -> seconds, for metrics and the per-decision debug line."""
    cache: str = "off"
    """hit, partial, miss or off."""


@dataclass(slots=True)
class _Rendered:
    """The prompt text vLLM would tokenize and its chunk hashes (last = the whole prompt)."""

    text: str
    add_special_tokens: bool
    hashes: list[int]
    block_hash: int


@dataclass(slots=True)
class _Prepared:
    """What the tokenizer thread hands back to the event loop."""

    outcome: str
    tokens: list[int] | None = None
    mapping: CachedPodMapping | None = None
    block_hash: int | None = None
    cached_tokens: int = 0
    store: Callable[[], None] | None = None
    """Caches the newly tokenized chunks; run after the decision, off the critical path."""


FAST_PATH_MAX_CHARS = 64 * 1024
"""Prompts up to this size are checked for a full hit on the event loop (well under 1 ms)."""


def _rough_chars(request: RoutingRequest) -> int:
    if request.prompt is not None:
        return len(request.prompt)
    return sum(len(m.get("content") or "") for m in request.messages or ())


def matched_prefix(hits: Sequence[PodTimes], pod_ids: Sequence[str], not_before: float = 0.0) -> dict[str, int]:
    """Consecutive blocks from the first that each pod holds (pods with none are absent).

    Entries stored before ``not_before`` (unix seconds) are treated as absent.
    """
    matched: dict[str, int] = {}
    active = list(pod_ids)
    for depth, holders in enumerate(hits):
        still = [p for p in active if p in holders and holders[p] >= not_before]
        if depth:
            for pod in active:
                if pod not in still:
                    matched[pod] = depth
        active = still
        if not active:
            break
    else:
        for pod in active:
            matched[pod] = len(hits)
    return matched


class PromptTooLong(Exception):
    """Over limits.maxPromptTokens: routed by load, the engine judges the prompt itself."""


@dataclass
class Indexer:
    tokenizers: TokenizerManager
    index: BlockIndex
    _: KW_ONLY
    block_size: int
    max_blocks: int
    scheme: HashScheme
    max_entry_age: float = 0.0
    cache: PrefixCache | None = None
    max_prompt_tokens: int = 1 << 30

    def _check_length(self, tokens: int) -> None:
        if tokens > self.max_prompt_tokens:
            raise PromptTooLong(f"prompt of {tokens} tokens is over maxPromptTokens ({self.max_prompt_tokens})")

    def keys(self, tokens: Sequence[int]) -> list[int]:
        return block_keys(tokens, self.block_size, self.max_blocks, self.scheme)

    async def get_pod_scores(self, request: RoutingRequest, pod_ids: Sequence[str]) -> PrefixMatch:
        if request.token_ids is not None:
            self._check_length(len(request.token_ids))
        if self.cache is None or request.token_ids is not None:
            return await self._uncached(request, pod_ids)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        set_hash = pod_set_hash(pod_ids)
        prepared, rendered = self._try_hit_here(request, set_hash)
        if prepared is None:
            prepared = await self.tokenizers.run(request.model, self._prepare, request, set_hash, rendered)
        t1 = time.perf_counter()
        timings["tokenize"] = t1 - t0
        if prepared.mapping is not None:
            self._check_length(prepared.mapping.total_tokens)
            keys = prepared.mapping.kv_block_keys
            hits: list[PodTimes] = [prepared.mapping.key_to_pods.get(k, {}) for k in keys]
            log.debug("CACHE HIT blocks=%d hit_keys=%d", len(keys), len(prepared.mapping.hit_keys))
        else:
            assert prepared.tokens is not None
            self._check_length(len(prepared.tokens))
            keys = self.keys(prepared.tokens)
            t2 = time.perf_counter()
            timings["hash"] = t2 - t1
            epoch = self.cache.mappings.epoch()
            hits = await self.index.lookup(request.model, keys) if keys else []
            t1 = time.perf_counter()
            timings["lookup"] = t1 - t2
            debug = log.isEnabledFor(logging.DEBUG)
            if debug:
                log.debug("CACHE MISS outcome=%s tokens=%d cached_tokens=%d blocks=%d", prepared.outcome,
                          len(prepared.tokens), prepared.cached_tokens, len(keys))
            if prepared.block_hash is not None and self.cache.mappings.cache_pod_mappings(
                prepared.block_hash, pod_ids, keys, hits, since_epoch=epoch, total_tokens=len(prepared.tokens)
            ) and debug:
                log.debug("CACHED tokens=%d keys=%d hit_keys=%d", len(prepared.tokens), len(keys),
                          sum(1 for h in hits if h))
        self.cache.record(prepared.outcome)
        matched = matched_prefix(hits, pod_ids, self._not_before())
        timings["score"] = time.perf_counter() - t1
        if prepared.store is not None:
            # Filling the prefix store waits until the decision is made: it is for later requests.
            self.tokenizers.background(self._store, prepared.store)
        return PrefixMatch(matched, len(keys), timings, prepared.outcome)

    def _try_hit_here(self, request: RoutingRequest, set_hash: int) -> tuple[_Prepared | None, _Rendered | None]:
        """A full hit needs no tokenizing: render and hash on the event loop (tens of
        microseconds for ordinary prompts) and skip the hop to a worker thread. On a miss the
        rendering is handed to the worker, not done twice."""
        tokenizer = self.tokenizers.peek(request.model)
        if tokenizer is None or _rough_chars(request) > FAST_PATH_MAX_CHARS:
            return None, None
        try:
            rendered = self._render(tokenizer, request)
            mapping = self.cache.mappings.get_mapping(rendered.block_hash, set_hash)
        except Exception:  # noqa: BLE001 - the worker path will retry and fall back
            return None, None
        if mapping is None:
            return None, rendered
        return _Prepared("hit", mapping=mapping, block_hash=rendered.block_hash), None

    def _render(self, tokenizer, request: RoutingRequest) -> _Rendered:
        text, add_special_tokens = prompt_text(tokenizer, request)
        hashes, block_hash = self.cache.store.chunk_hashes(text, request.model, add_special_tokens)
        return _Rendered(text, add_special_tokens, hashes, block_hash)

    def _prepare(self, tokenizer, request: RoutingRequest, set_hash: int, rendered: _Rendered | None) -> _Prepared:
        """On a tokenizer thread: render, look in the cache, tokenize what it lacks."""
        cache = self.cache
        assert cache is not None
        try:
            if rendered is None:
                rendered = self._render(tokenizer, request)
                mapping = cache.mappings.get_mapping(rendered.block_hash, set_hash)
                if mapping is not None:
                    return _Prepared("hit", mapping=mapping, block_hash=rendered.block_hash)
            tokens, cached, store = cache.store.tokenize_deferred(
                tokenizer, rendered.text, request.model, add_special_tokens=rendered.add_special_tokens,
                hashes=rendered.hashes,
            )
            outcome = "partial" if cached.tokens else "miss"
            return _Prepared(outcome, tokens, None, rendered.block_hash, len(cached.tokens), store)
        except PromptRenderError:
            raise  # the client's input, not a cache bug: no traceback
        except Exception:  # noqa: BLE001 - a cache bug must not cost the decision
            log.exception("prefix cache failed; using the full pipeline")
            text, add_special_tokens = prompt_text(tokenizer, request)
            return _Prepared("error", encode(tokenizer, text, add_special_tokens=add_special_tokens))

    @staticmethod
    def _store(store: Callable[[], None]) -> None:
        try:
            store()
        except Exception:  # noqa: BLE001 - losing a cache fill only costs a later tokenize
            log.exception("prefix store fill failed")

    async def _uncached(self, request: RoutingRequest, pod_ids: Sequence[str]) -> PrefixMatch:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        tokens = await self.tokenizers.tokenize(request)
        t1 = time.perf_counter()
        self._check_length(len(tokens))
        keys = self.keys(tokens)
        t2 = time.perf_counter()
        hits = await self.index.lookup(request.model, keys) if keys else []
        t3 = time.perf_counter()
        matched = matched_prefix(hits, pod_ids, self._not_before())
        t4 = time.perf_counter()
        timings.update(tokenize=t1 - t0, hash=t2 - t1, lookup=t3 - t2, score=t4 - t3)
        return PrefixMatch(matched, len(keys), timings)

    def _not_before(self) -> float:
        return time.time() - self.max_entry_age if self.max_entry_age else 0.0

    # -- cache maintenance -----------------------------------------------------------

    def invalidate_cache_for_kv_events(self, keys: Iterable[int]) -> int:
        return self.cache.mappings.invalidate_pod_mappings_for_keys(keys) if self.cache is not None else 0

    def on_invalidation(self, message: Invalidation) -> None:
        """Listener for the index's invalidation feed (every store and removal, any pod)."""
        if self.cache is None:
            return
        if message.pod == FEED_LOST:
            self.cache.mappings.invalidate_all()  # changes may have been missed: trust nothing cached
            return
        self.invalidate_cache_for_kv_events([key for _, key in message.removed] + [key for _, key in message.stored])

    def get_cache_stats(self) -> CacheStats:
        return self.cache.get_cache_stats() if self.cache is not None else CacheStats()
