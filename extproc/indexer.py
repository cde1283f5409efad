"""Prompt -> per-pod matched prefix: tokens, block keys, and who holds each block.

With the prefix cache (the default), each stage asks only for what the replica does not
already know:
- the prompt was seen before (hit): its block keys come from the store, nothing is tokenized;
- its prefix was seen (partial): the cached chunks give tokens and keys of the prefix, and
  only the rest is tokenized, on the event loop when it is short;
- nothing was seen (miss): the prompt is tokenized on a worker thread.
In every case tokenizing stops once every block that can match (maxBlocksToMatch x
blockSizeToHash tokens) is known. Block owners come from the block-owner cache, kept true by
the invalidation feed; the index is asked only for the blocks the cache cannot answer for,
and only while some candidate pod can still extend its run. Any error in the cache falls
back to the full pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field

from .blocks import HashScheme, block_keys
from .endpoints import PrefixRuns
from .index import FEED_LOST, BlockIndex, IndexUnavailable, Invalidation, PodTimes
from .prefixcache import CacheStats, PrefixCache, Tokenized
from .prefixcache.speculation import Speculation
from .prefixcache.store import INLINE_CHARS
from .remotetok import RemoteTokenizer, encode_body, prompt_key
from .requests import RoutingRequest
from .tokenization import PromptRenderError, TokenizerManager, prompt_text

log = logging.getLogger("extproc.indexer")

FAST_PATH_MAX_CHARS = 64 * 1024
"""Prompts up to this size are rendered and looked up on the event loop (well under 1 ms)."""

ERROR_LOG_INTERVAL = 10.0

FIRST_ASK = 8
"""Blocks the index is first asked for past what the owner cache knows; the rest only if some
candidate's run reaches past them. A new document after a cached prefix then costs one small
read instead of one per block that can match (128 by default), for one more round trip when
a run does go on."""

INLINE_FILL_TOKENS = 512
"""A prefix store fill for at most this many newly encoded tokens runs on the event loop."""


@dataclass(slots=True)
class PrefixMatch:
    matched: dict[str, int]
    """pod id -> blocks matched consecutively from the first."""
    total_blocks: int
    timings: dict[str, float] = field(default_factory=dict)
    """stage -> seconds, for metrics and the per-decision debug line."""
    cache: str = "off"
    """hit, partial, miss, error or off."""
    degraded: bool = False
    """The index could not answer for some blocks: matched on the cached owners alone."""
    keys: list[int] = field(default_factory=list)
    """The prompt's block keys (for speculative owners once a pod is chosen)."""
    prompt_tokens: int = 0
    """Tokens of the prompt (estimated past the blocks that can match)."""
    weighted: dict[str, float] | None = None
    """pod id -> its run weighted by where each block is held (tiers.mediumWeights); None
    when the indexer weighs no tiers."""


def _rough_chars(request: RoutingRequest) -> int:
    if request.prompt is not None:
        return len(request.prompt)
    return sum(len(m.get("content") or "") for m in request.messages or ())


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
    speculation: Speculation | None = None
    remote: RemoteTokenizer | None = None
    """Engines' /tokenize, for ``tokenizer: remote`` models (and remoteFallback)."""
    medium_weights: dict[str, float] | None = None
    """Weights of KV tiers (endpoints.PrefixRuns): a run continues across tiers. None: GPU
    presence only, every block counting 1."""
    _last_error_log: float = field(default=-ERROR_LOG_INTERVAL, init=False)

    def keys(self, tokens: Sequence[int], parent: int | None = None, max_blocks: int | None = None) -> list[int]:
        return block_keys(tokens, self.block_size, self.max_blocks if max_blocks is None else max_blocks,
                          self.scheme, parent)

    def _check_length(self, tokens: int) -> None:
        if tokens > self.max_prompt_tokens:
            raise PromptTooLong(f"prompt of about {tokens} tokens is over maxPromptTokens ({self.max_prompt_tokens})")

    async def get_pod_scores(self, request: RoutingRequest, pod_ids: Sequence[str]) -> PrefixMatch:
        if (request.token_ids is None and self.remote is not None
                and self.tokenizers.use_remote(request.model, fallback=self.remote.fallback)):
            return await self._remote_pod_scores(request, pod_ids)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        fill: Callable[[], None] | None = None
        fill_here = False
        if request.token_ids is not None:
            total = len(request.token_ids)
            self._check_length(total)
            keys, outcome = self.keys(request.token_ids), "off"
            timings["hash"] = time.perf_counter() - t0
        elif self.cache is None:
            tokens = await self.tokenizers.tokenize(request)
            t1 = time.perf_counter()
            timings["tokenize"] = t1 - t0
            total = len(tokens)
            self._check_length(total)
            keys, outcome = self.keys(tokens), "off"
            timings["hash"] = time.perf_counter() - t1
        else:
            try:
                result, outcome, total = await self._tokenized(request)
            except PromptRenderError:
                raise  # the client's input, not a cache bug: no traceback
            except Exception:  # noqa: BLE001 - a cache bug must not cost the decision
                self._log_cache_error()
                tokens = await self.tokenizers.tokenize(request)
                result, outcome, total = Tokenized(self.keys(tokens), len(tokens), False, 0, 0), "error", len(tokens)
            timings["tokenize"] = time.perf_counter() - t0
            self._check_length(total)
            keys, fill = result.keys, result.fill
            fill_here = result.tokens - result.cached_tokens <= INLINE_FILL_TOKENS
            self.cache.record(outcome)
            if log.isEnabledFor(logging.DEBUG):
                if outcome == "hit":
                    log.debug("CACHE HIT blocks=%d", len(keys))
                else:
                    log.debug("CACHE MISS outcome=%s tokens=%d cached_tokens=%d blocks=%d", outcome, result.tokens,
                              result.cached_tokens, len(keys))
        t2 = time.perf_counter()
        try:
            hits, degraded, runs = await self._owners(request.model, keys, pod_ids)
        finally:
            if fill is not None:
                self._schedule_fill(fill, fill_here)
        matched, weighted = self._matched(hits, runs, pod_ids, timings, t2)
        return PrefixMatch(matched, len(keys), timings, outcome, degraded, keys, total, weighted)

    def _matched(self, hits: Sequence[PodTimes], runs: PrefixRuns | None, pod_ids: Sequence[str],
                 timings: dict[str, float], since: float) -> tuple[dict[str, int], dict[str, float] | None]:
        """The candidates' runs (those ``_owners`` walked, or a walk of ``hits`` where it walked
        none), with the lookup and score stages' times since ``since``: a walk's own time is the
        score stage's."""
        if runs is None:
            lookup = time.perf_counter() - since
            runs = PrefixRuns(pod_ids, self.medium_weights, self._not_before())
            runs.walk(hits)  # every owner is known here: an index answer
        else:
            lookup = time.perf_counter() - since - runs.seconds
        timings["lookup"], timings["score"] = lookup, runs.seconds
        return runs.matched, runs.weighted

    def routed(self, model: str, keys: list[int], pod: str, held: int) -> None:
        """The request went to ``pod``, which held its first ``held`` blocks: it will hold the rest soon."""
        if self.speculation is not None:
            self.speculation.routed(model, keys[held:], pod)

    async def _remote_pod_scores(self, request: RoutingRequest, pod_ids: Sequence[str]) -> PrefixMatch:
        """The remote path: no local tokenizer or template, so the whole request is the cache key
        (the exact /tokenize body: model, messages, tools, template flags and kwargs, or the
        prompt) -> block keys; only a request not seen before costs a call to an engine."""
        assert self.remote is not None
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        body = encode_body(request)
        store = self.cache.store if self.cache is not None else None
        key = prompt_key(body) if store is not None else 0
        known = store.get_prompt(key) if store is not None else None
        if known is not None:
            keys, total, outcome = known.keys, known.tokens, "hit"
        else:
            tokens = await self.remote.tokenize(request, body)
            t1 = time.perf_counter()
            timings["tokenize"] = t1 - t0
            keys, total = self.keys(tokens), len(tokens)
            timings["hash"] = time.perf_counter() - t1
            outcome = "off"
            if store is not None:
                store.put_prompt(key, Tokenized(keys, total, False, 0, 0))
                outcome = "miss"
        if outcome == "hit":
            timings["tokenize"] = time.perf_counter() - t0
        if self.cache is not None:
            self.cache.record(outcome)
        self._check_length(total)
        t2 = time.perf_counter()
        hits, degraded, runs = await self._owners(request.model, keys, pod_ids)
        matched, weighted = self._matched(hits, runs, pod_ids, timings, t2)
        return PrefixMatch(matched, len(keys), timings, outcome, degraded, keys, total, weighted)

    async def _tokenized(self, request: RoutingRequest) -> tuple[Tokenized, str, int]:
        """(keys and counts, cache outcome, estimated prompt tokens), through the prefix store."""
        assert self.cache is not None
        store = self.cache.store
        tokenizer = self.tokenizers.peek(request.model) or await self.tokenizers.get(request.model)
        if _rough_chars(request) > FAST_PATH_MAX_CHARS:
            # Rendering a long prompt is work for a worker thread, not the event loop.
            return await self.tokenizers.run(request.model, self._prepare, request)
        if request.fingerprint:
            known = store.get_prompt(store.request_key(request.fingerprint, request.model))
            if known is not None:  # the very same body: nothing to render, hash or tokenize
                return known, "hit", known.estimated
        text, add_special_tokens = prompt_text(tokenizer, request, self.tokenizers.renderer(tokenizer))
        key = store.prompt_key(text, request.model, add_special_tokens)
        known = store.get_prompt(key)
        if known is None:
            plan = store.plan(tokenizer, text, request.model, add_special_tokens=add_special_tokens)
            if plan.to_encode <= INLINE_CHARS:
                result = store.finish(plan)
            else:
                result = await self.tokenizers.run(request.model, _finish, store, plan, self.tokenizers.spread)
            result.estimated = result.estimated_total(len(text))
            store.put_prompt(key, result)
            outcome = "partial" if plan.run.tokens else "miss"
        else:
            result, outcome = known, "hit"
        if request.fingerprint:
            store.put_prompt(store.request_key(request.fingerprint, request.model), result)
        return result, outcome, result.estimated

    def _prepare(self, tokenizer, request: RoutingRequest) -> tuple[Tokenized, str, int]:
        """On a tokenizer thread: the same steps for a long prompt."""
        assert self.cache is not None
        store = self.cache.store
        text, add_special_tokens = prompt_text(tokenizer, request, self.tokenizers.renderer(tokenizer))
        key = store.prompt_key(text, request.model, add_special_tokens)
        known = store.get_prompt(key)
        if known is not None:
            return known, "hit", known.estimated
        plan = store.plan(tokenizer, text, request.model, add_special_tokens=add_special_tokens)
        result = store.finish(plan, off_loop=True, spread=self.tokenizers.spread)
        result.estimated = result.estimated_total(len(text))
        store.put_prompt(key, result)
        return result, "partial" if plan.run.tokens else "miss", result.estimated

    async def _owners(self, model: str, keys: list[int], pod_ids: Sequence[str]
                      ) -> tuple[list[PodTimes], bool, PrefixRuns | None]:
        """Who holds each block, from the block-owner cache; the index only for what it cannot
        answer, and only while a candidate pod can still extend its run. (owners, degraded,
        runs): when the index fails but the cache knows a run for some candidate, that run
        decides. ``runs`` are the candidates' runs, walked on the way (None: use ``_runs``)."""
        if not keys:
            return [], False, None
        owners = self.cache.owners if self.cache is not None else None
        speculation = self.speculation
        if owners is None or not owners.enabled or getattr(self.index, "local", False):
            hits = await self.index.lookup(model, keys)
            if speculation is not None:
                speculation.overlay(model, keys, hits)
            return hits, False, None
        known = owners.get(model, keys)
        if speculation is not None:
            speculation.overlay(model, keys, known)
        runs = PrefixRuns(pod_ids, self.medium_weights, self._not_before())
        asked = False
        while runs.walk(known):  # times itself: the score stage, apart from the lookup's
            depth = runs.depth
            unknown = [i for i in range(depth, len(keys)) if known[i] is None]
            ask = unknown if asked else unknown[:FIRST_ASK]
            asked = True
            epoch = owners.epoch()
            try:
                answers = await self.index.lookup(model, [keys[i] for i in ask])
            except IndexUnavailable:
                if depth:
                    runs.stop()
                    return known, True, runs  # type: ignore[return-value]
                raise
            refused = owners.learn(model, [keys[i] for i in ask], answers, since_epoch=epoch)
            log.debug("CACHED blocks=%d asked=%d refused=%d", len(keys), len(ask), len(refused))
            for i, answer in zip(ask, answers):
                known[i] = answer
            if speculation is not None:
                speculation.overlay(model, keys, known, ask[0])
        return known, False, runs  # type: ignore[return-value]

    def _schedule_fill(self, fill: Callable[[], None], here: bool) -> None:
        """Fill the prefix store for later requests once the index has answered (or failed: the
        tokens are right either way); from here the decision runs without waiting, so a worker
        waiting for the GIL starts when it is made. Started before the lookup, the worker held
        the GIL while the decision waited on the index (a 4k-token miss: lookup 1.3 -> 3.7 ms).
        A small fill (a new turn's chunks) runs on the event loop, after the decision."""
        if here:
            asyncio.get_running_loop().call_soon(self._fill, fill)
        else:
            self.tokenizers.background(self._fill, fill)

    @staticmethod
    def _fill(fill: Callable[[], None]) -> None:
        try:
            fill()
        except Exception:  # noqa: BLE001 - losing a cache fill only costs a later tokenize
            log.exception("prefix store fill failed")

    def _log_cache_error(self) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL:
            self._last_error_log = now
            log.exception("prefix cache failed; using the full pipeline (repeats suppressed for %.0fs)",
                          ERROR_LOG_INTERVAL)

    def _not_before(self) -> float:
        return time.time() - self.max_entry_age if self.max_entry_age else 0.0

    # -- cache maintenance -----------------------------------------------------------

    def on_invalidation(self, message: Invalidation) -> None:
        """Listener for the index's invalidation feed (every store and removal, any pod)."""
        if self.cache is not None:
            self.cache.owners.apply(message)
        if self.speculation is not None:
            self.speculation.apply(message)

    async def load_mirror(self) -> bool:
        """Load every block of the index into the owner cache (mirror mode); True once complete."""
        assert self.cache is not None
        owners = self.cache.owners
        epoch = owners.begin_load()
        retry: list[tuple[str, int]] = []
        async for model, keys, answers in self.index.scan_blocks():
            retry += [(model, key) for key in owners.mirror_learn(model, keys, answers, epoch)]
        for _ in range(10):
            changed = owners.end_load()
            if changed is None:
                return False
            todo = sorted(set(changed) | set(retry))
            if not todo:
                return owners.finish_load()
            epoch, retry = owners.epoch(), []
            for model, keys in _by_model(todo).items():
                answers = await self.index.lookup(model, keys)
                retry += [(model, key) for key in owners.mirror_learn(model, keys, answers, epoch)]
        log.warning("block owner mirror: the index kept changing under the load; answering per block meanwhile")
        return False

    def get_cache_stats(self) -> CacheStats:
        return self.cache.get_cache_stats() if self.cache is not None else CacheStats()


def _finish(tokenizer, store, plan, spread) -> Tokenized:
    return store.finish(plan, off_loop=True, spread=spread)


def _by_model(refs: Sequence[tuple[str, int]]) -> dict[str, list[int]]:
    grouped: dict[str, list[int]] = {}
    for model, key in refs:
        grouped.setdefault(model, []).append(key)
    return grouped


def build_cache(config, *, block_size: int, max_blocks: int, scheme: HashScheme) -> PrefixCache:
    def keyer(tokens: Sequence[int], parent: int | None, blocks: int) -> list[int]:
        return block_keys(tokens, block_size, blocks, scheme, parent)

    return PrefixCache(config, block_size=block_size, max_blocks=max_blocks, keyer=keyer)


__all__ = ["FEED_LOST", "Indexer", "PrefixMatch", "PromptTooLong", "build_cache"]
