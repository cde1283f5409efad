"""Prefix store and pod-mapping cache: a repeated prefix skips tokenizing and Redis.

Prefix store. The prompt text is cut into fixed-size chunks, each keyed by a chained hash
of the text so far. A chunk maps to the tokens its text contributes, so a lookup returns
the longest cached run of tokens and only the rest of the text is tokenized.

Exactness. A token may straddle a chunk boundary, so a chunk's tokens end at a *split
point* at or before the chunk's end: a place where tokenizing the two sides apart gives
the same tokens as tokenizing the whole. Split points are (1) right after an added token
(``<|im_end|>`` ...: HF tokenizers cut the text there before anything else runs, so chat
templates give one at every message boundary) and (2) before a space between two ASCII
letters, for tokenizers whose pre-tokenizer splits words there (checked on the tokenizer
itself when it is loaded; others use (1) only). A split point is only taken far enough
before the chunk's end that the text after the chunk cannot change it.

Pod mappings. The result of the index lookup for a whole prompt (its block keys and who
holds them) is kept under the hash of the prompt's last text block and of the candidate
pod set, for ``podMappingTTL``. Every index change the ingester announces (stored or
removed) drops the mappings that contain the block, so a cached mapping never hides a
pod that just stored a prefix nor keeps one that lost it.

Thread-safe: the tokenizer threads, the event loop and the invalidation feed share it.
"""

from __future__ import annotations

import hashlib
import logging
from bisect import bisect_left, bisect_right
import re
import sys
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .index import PodTimes

log = logging.getLogger("extproc.prefixcache")

_ENTRY_OVERHEAD = 200
"""Bytes per cached entry besides its token ids (dict slot, key, objects); for the estimate."""

_SELF_TEST_TEXTS = (
    "The quick brown fox jumps over the lazy dog while the cache keeps every block warm.",
    "It's what they'd call a well-known fact: routers route, engines cache, and users wait less.",
    "Summarise   the following  text,  please: prefill costs grow with prompt length.",
    "naïve café résumé über straße and the word apple",
    "You are a helpful assistant. Answer in English. Cite sources when you can.",
    "line one\nline two\n\nline three ends here with words",
)


ChunkHash = int


def _digest(previous: ChunkHash, text: str) -> ChunkHash:
    """Chained 64-bit hash. Python's own string hash (SipHash, keyed per process) is 4x faster
    than blake2b here and cannot be steered by clients; the store lives in one process."""
    return hash((previous, text))


class Splitter:
    """Where a tokenizer's text can be cut without changing its tokens."""

    def __init__(self, tokenizer) -> None:
        backend = tokenizer.backend_tokenizer
        added = [
            t.content
            for t in backend.get_added_tokens_decoder().values()
            if t.content and not t.normalized and not t.lstrip and not t.rstrip and not t.single_word
        ]
        self._encode = backend.encode
        self._added_by_first: dict[str, list[str]] = {}
        for token in sorted(set(added), key=len, reverse=True):
            self._added_by_first.setdefault(token[0], []).append(token)
        self.margin = max((len(a) for a in added), default=0) + 3
        self.word_splits = self._check(self._word_positions)
        self.special_prefix = self._special_prefix()

    _WORD = re.compile(r"(?<=[A-Za-z]) (?=[A-Za-z])")

    def _word_positions(self, text: str, start: int, end: int) -> Iterable[int]:
        """Spaces at positions start..end with an ASCII letter on each side."""
        return (m.start() for m in self._WORD.finditer(text, start, end + 2) if m.start() <= end)

    def _check(self, positions) -> bool:
        """True if cutting at every such position in the sample texts keeps the tokens."""
        for text in _SELF_TEST_TEXTS:
            whole = self._encode(text, add_special_tokens=False).ids
            for p in positions(text, 1, len(text) - 2):
                parts = self._encode(text[:p], add_special_tokens=False).ids + self._encode(text[p:], add_special_tokens=False).ids
                if parts != whole:
                    return False
        return True

    def _special_prefix(self) -> list[int] | None:
        """Tokens add_special_tokens puts in front, or None if it also appends or changes more."""
        prefixes = set()
        for text in _SELF_TEST_TEXTS[:3]:
            full = self._encode(text, add_special_tokens=True).ids
            plain = self._encode(text, add_special_tokens=False).ids
            if len(full) < len(plain) or full[len(full) - len(plain):] != plain:
                return None
            prefixes.add(tuple(full[: len(full) - len(plain)]))
        return list(prefixes.pop()) if len(prefixes) == 1 else None

    def added_spans(self, text: str) -> list[tuple[int, int]]:
        """Where the tokenizer cuts out added tokens: leftmost-longest, scanning from the start."""
        found = []
        for first, tokens in self._added_by_first.items():
            at = text.find(first)
            while at != -1:
                for token in tokens:  # longest first
                    if text.startswith(token, at):
                        found.append((at, -len(token)))
                        break
                at = text.find(first, at + 1)
        if not found:
            return []
        found.sort()
        spans, cursor = [], 0
        for at, neg_len in found:
            if at >= cursor:
                spans.append((at, at - neg_len))
                cursor = at - neg_len
        return spans

    def last_split(self, text: str, start: int, end: int, spans: list[tuple[int, int]] | None = None) -> int:
        """The last split point in (start, end]; ``start`` when there is none.

        ``spans`` are the text's added-token spans (``added_spans``), computed once per text.
        """
        if spans is None:
            spans = self.added_spans(text)
        best = start
        i = bisect_right(spans, (end + 1,)) - 1  # last span starting at or before end
        while i >= 0 and spans[i][1] > end:
            i -= 1
        if i >= 0 and spans[i][1] > best:
            best = spans[i][1]
        if self.word_splits:
            p = text.rfind(" ", best + 1, end + 1)
            while p > best:
                if _ascii_letter(text[p - 1]) and p + 1 < len(text) and _ascii_letter(text[p + 1]):
                    return p
                p = text.rfind(" ", best + 1, p)
        return best


def _ascii_letter(ch: str) -> bool:
    return ("a" <= ch <= "z") or ("A" <= ch <= "Z")


@dataclass(slots=True)
class CachedTokens:
    tokens: list[int]
    chars: int
    """Prompt characters those tokens cover (a split point)."""
    chunks: int


@dataclass(slots=True)
class CachedPodMapping:
    kv_block_keys: list[int]
    hit_keys: frozenset[int]
    key_to_pods: dict[int, PodTimes]
    cached_at: float
    pod_set_hash: int
    total_tokens: int = 0


@dataclass(slots=True)
class CacheStats:
    entries: int = 0
    mappings: int = 0
    hits: int = 0
    partial_hits: int = 0
    misses: int = 0
    evictions: int = 0
    invalidations: int = 0
    memory_bytes: int = 0


_Chunk = tuple  # (split point: int, tokens: bytes of native uint32)
"""A plain tuple of an int and bytes: the garbage collector stops tracking it, so a store of
100,000 chunks adds no collection pauses (a class instance or an array would be tracked)."""


@dataclass
class PrefixCacheConfig:
    chunk_chars: int = 256
    max_chunks: int = 100_000
    enable_pod_mappings: bool = True
    pod_mapping_ttl: float = 30.0
    max_pod_sets_per_block: int = 5
    max_mappings: int = 50_000


def pod_set_hash(pod_ids: Iterable[str]) -> int:
    """Deterministic across processes (unlike hash()), independent of order."""
    digest = hashlib.blake2b("\0".join(sorted(pod_ids)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class PrefixCache:
    def __init__(self, config: PrefixCacheConfig | None = None):
        self.config = config or PrefixCacheConfig()
        self._lock = threading.RLock()
        self._chunks: OrderedDict[ChunkHash, _Chunk] = OrderedDict()
        self._chunk_bytes = 0
        self._mappings: OrderedDict[ChunkHash, OrderedDict[int, CachedPodMapping]] = OrderedDict()
        self._by_key: dict[int, tuple[ChunkHash, ...]] = {}
        """block key -> prompts whose mapping holds it; tuples of ints, which the garbage
        collector stops tracking (a set per key made full collections pause for tens of ms)."""
        self._epoch = 0
        self._invalidated_at: OrderedDict[int, int] = OrderedDict()
        self._forgotten_epoch = -1
        """Newest epoch among changes no longer remembered per key."""
        self.stats = CacheStats()
        self._splitters: dict[int, Splitter] = {}

    # -- text -> tokens ---------------------------------------------------------------

    def splitter(self, tokenizer) -> Splitter:
        key = id(tokenizer)
        splitter = self._splitters.get(key)
        if splitter is None:
            splitter = self._splitters[key] = Splitter(tokenizer)
            log.info("prefix store: split on added tokens%s (margin %d chars)",
                     " and between words" if splitter.word_splits else " only", splitter.margin)
        return splitter

    def chunk_hashes(self, prompt: str, model: str, add_special_tokens: bool) -> tuple[list[ChunkHash], ChunkHash]:
        """Chained hashes of the prompt's full chunks, and of the whole prompt (its last text block)."""
        size = self.config.chunk_chars
        h = _digest(0, f"{model}\0{int(add_special_tokens)}")
        hashes = []
        full = len(prompt) // size
        for i in range(full):
            h = _digest(h, prompt[i * size : (i + 1) * size])
            hashes.append(h)
        return hashes, _digest(h, "\0tail\0" + prompt[full * size :])

    def find_longest_contained_tokens(self, prompt: str, model: str, *, add_special_tokens: bool = False,
                                      hashes: list[ChunkHash] | None = None) -> CachedTokens:
        """The longest run of cached tokens for the prompt's prefix (possibly empty)."""
        if hashes is None:
            hashes = self.chunk_hashes(prompt, model, add_special_tokens)[0]
        tokens: list[int] = []
        chars = found = 0
        with self._lock:
            for h in hashes:
                chunk = self._chunks.get(h)
                if chunk is None:
                    break
                self._chunks.move_to_end(h)
                chars, packed = chunk
                tokens.extend(memoryview(packed).cast("I"))
                found += 1
        return CachedTokens(tokens, chars, found)

    def tokenize(self, tokenizer, prompt: str, model: str, *, add_special_tokens: bool,
                 hashes: list[ChunkHash] | None = None) -> tuple[list[int], CachedTokens]:
        """Tokens of the whole prompt: the cached prefix, the rest encoded now and cached."""
        tokens, cached, store = self.tokenize_deferred(
            tokenizer, prompt, model, add_special_tokens=add_special_tokens, hashes=hashes
        )
        if store is not None:
            store()
        return tokens, cached

    def tokenize_deferred(self, tokenizer, prompt: str, model: str, *, add_special_tokens: bool,
                          hashes: list[ChunkHash] | None = None):
        """Like tokenize, but hands back the caching of the new chunks as a callable, so the
        caller can run it after the routing decision instead of before."""
        splitter = self.splitter(tokenizer)
        if add_special_tokens and splitter.special_prefix is None:
            return tokenizer.backend_tokenizer.encode(prompt, add_special_tokens=True).ids, CachedTokens([], 0, 0), None
        if hashes is None:
            hashes = self.chunk_hashes(prompt, model, add_special_tokens)[0]
        cached = self.find_longest_contained_tokens(prompt, model, hashes=hashes)
        if cached.chunks == len(hashes) and cached.chars == len(prompt):
            return cached.tokens, cached, None
        start = cached.chars
        encoding = tokenizer.backend_tokenizer.encode(prompt[start:], add_special_tokens=add_special_tokens and start == 0)
        tail_ids = encoding.ids
        if cached.chunks == len(hashes):
            return cached.tokens + tail_ids, cached, None

        def store() -> None:
            self._store_chunks(splitter, prompt, hashes, cached.chunks, start, tail_ids, encoding)

        return cached.tokens + tail_ids, cached, store

    def _store_chunks(self, splitter: Splitter, prompt: str, hashes: list[ChunkHash], first: int, start: int,
                      ids: Sequence[int], encoding) -> None:
        size = self.config.chunk_chars
        split, cursor = start, 0
        starts: list[int] | None = None
        spans = splitter.added_spans(prompt)
        packed = array("I", ids).tobytes()
        new: list[tuple[ChunkHash, _Chunk]] = []
        for i in range(first, len(hashes)):
            limit = (i + 1) * size - splitter.margin
            if limit > split:
                split = splitter.last_split(prompt, split, limit, spans)
            # Index of the first token at or after the split: split points are token
            # boundaries, so the token holding that character starts there.
            end = encoding.char_to_token(split - start) if split < len(prompt) else len(ids)
            if end is None or (end < len(ids) and encoding.token_to_chars(end)[0] != split - start):
                if starts is None:
                    starts = [o[0] for o in encoding.offsets]
                end = bisect_left(starts, split - start, cursor)
            end = max(end, cursor)
            new.append((hashes[i], (split, packed[4 * cursor : 4 * end])))
            cursor = end
        with self._lock:
            for h, chunk in new:
                if h not in self._chunks:
                    self._chunks[h] = chunk
                    self._chunk_bytes += len(chunk[1]) + _ENTRY_OVERHEAD
            while len(self._chunks) > self.config.max_chunks:
                _, old = self._chunks.popitem(last=False)
                self._chunk_bytes -= len(old[1]) + _ENTRY_OVERHEAD
                self.stats.evictions += 1

    # -- pod mappings -----------------------------------------------------------------

    def epoch(self) -> int:
        """Take before asking the index; cache_pod_mappings refuses results older than a change."""
        return self._epoch

    def find_longest_contained_tokens_with_pod_mappings(
        self, prompt: str, model: str, pod_ids: Sequence[str], *, add_special_tokens: bool = False
    ) -> tuple[CachedTokens, CachedPodMapping | None]:
        """Full hit: tokens and the mapping. Partial: tokens only. Miss: nothing cached."""
        hashes, last = self.chunk_hashes(prompt, model, add_special_tokens)
        cached = self.find_longest_contained_tokens(prompt, model, hashes=hashes)
        mapping = self.get_mapping(last, pod_set_hash(pod_ids))
        return cached, mapping

    def get_mapping(self, block_hash: ChunkHash, set_hash: int) -> CachedPodMapping | None:
        if not self.config.enable_pod_mappings:
            return None
        with self._lock:
            by_set = self._mappings.get(block_hash)
            mapping = by_set.get(set_hash) if by_set else None
            if mapping is None:
                return None
            if time.monotonic() - mapping.cached_at > self.config.pod_mapping_ttl:
                self._drop_mapping(block_hash, set_hash)
                return None
            self._mappings.move_to_end(block_hash)
            return mapping

    def cache_pod_mappings(self, block_hash: ChunkHash, pod_ids: Sequence[str], kv_block_keys: Sequence[int],
                           hits: Sequence[PodTimes], *, since_epoch: int, total_tokens: int = 0) -> bool:
        """Keep a lookup result, unless a change to one of its blocks arrived since ``since_epoch``."""
        if not self.config.enable_pod_mappings:
            return False
        set_hash = pod_set_hash(pod_ids)
        key_to_pods = {key: dict(pods) for key, pods in zip(kv_block_keys, hits) if pods}
        mapping = CachedPodMapping(list(kv_block_keys), frozenset(key_to_pods), key_to_pods, time.monotonic(),
                                   set_hash, total_tokens)
        with self._lock:
            if self._forgotten_epoch > since_epoch:
                return False  # too many changes since to tell which blocks they touched
            if any(self._invalidated_at.get(key, -1) > since_epoch for key in kv_block_keys):
                return False
            by_set = self._mappings.setdefault(block_hash, OrderedDict())
            if set_hash in by_set:
                self._drop_mapping(block_hash, set_hash)
                by_set = self._mappings.setdefault(block_hash, OrderedDict())
            by_set[set_hash] = mapping
            for key in kv_block_keys:
                owners = self._by_key.get(key, ())
                if block_hash not in owners:
                    self._by_key[key] = owners + (block_hash,)
            while len(by_set) > self.config.max_pod_sets_per_block:
                self._drop_mapping(block_hash, next(iter(by_set)))
            while len(self._mappings) > self.config.max_mappings:
                oldest = next(iter(self._mappings))
                for s in list(self._mappings[oldest]):
                    self._drop_mapping(oldest, s)
                self.stats.evictions += 1
        return True

    def _drop_mapping(self, block_hash: ChunkHash, set_hash: int) -> None:
        by_set = self._mappings.get(block_hash)
        if not by_set or set_hash not in by_set:
            return
        mapping = by_set.pop(set_hash)
        if not by_set:
            del self._mappings[block_hash]
        still = {k for m in by_set.values() for k in m.kv_block_keys} if by_set else set()
        for key in mapping.kv_block_keys:
            if key in still:
                continue
            owners = self._by_key.get(key)
            if owners is not None and block_hash in owners:
                rest = tuple(h for h in owners if h != block_hash)
                if rest:
                    self._by_key[key] = rest
                else:
                    del self._by_key[key]

    def invalidate_pod_mappings_for_keys(self, keys: Iterable[int]) -> int:
        """Drop every mapping containing one of the keys; returns how many were dropped."""
        dropped = 0
        with self._lock:
            self._epoch += 1
            remembered = max(1024, self.config.max_mappings)
            for key in keys:
                self._invalidated_at[key] = self._epoch
                self._invalidated_at.move_to_end(key)
                for block_hash in list(self._by_key.get(key, ())):
                    for set_hash in list(self._mappings.get(block_hash, {})):
                        self._drop_mapping(block_hash, set_hash)
                        dropped += 1
            while len(self._invalidated_at) > remembered:
                _, epoch = self._invalidated_at.popitem(last=False)
                self._forgotten_epoch = max(self._forgotten_epoch, epoch)
            self.stats.invalidations += dropped
        return dropped

    def invalidate_all(self) -> int:
        with self._lock:
            self._epoch += 1
            count = sum(len(v) for v in self._mappings.values())
            self._mappings.clear()
            self._by_key.clear()
            self._invalidated_at.clear()
            self._forgotten_epoch = self._epoch
            self.stats.invalidations += count
            return count

    def cleanup_expired_mappings(self) -> int:
        now = time.monotonic()
        removed = 0
        with self._lock:
            for block_hash, by_set in list(self._mappings.items()):
                for set_hash, mapping in list(by_set.items()):
                    if now - mapping.cached_at > self.config.pod_mapping_ttl:
                        self._drop_mapping(block_hash, set_hash)
                        removed += 1
        return removed

    def record(self, outcome: str) -> None:
        with self._lock:
            if outcome == "hit":
                self.stats.hits += 1
            elif outcome == "partial":
                self.stats.partial_hits += 1
            else:
                self.stats.misses += 1

    def get_cache_stats(self) -> CacheStats:
        with self._lock:
            mappings = sum(len(v) for v in self._mappings.values())
            mapping_bytes = sum(
                sys.getsizeof(m.kv_block_keys) + 8 * len(m.kv_block_keys) + 120 * len(m.key_to_pods) + _ENTRY_OVERHEAD
                for by_set in self._mappings.values() for m in by_set.values()
            )
            s = self.stats
            return CacheStats(len(self._chunks), mappings, s.hits, s.partial_hits, s.misses, s.evictions,
                              s.invalidations, self._chunk_bytes + mapping_bytes)
