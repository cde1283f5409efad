"""Prefix store: prompt text chunks -> the tokens they contribute, so a repeated prefix is
not tokenized again.

The prompt text is cut into fixed-size chunks (``prefixStoreConfig.blockSize`` characters),
each keyed by a chained hash of the text so far. A chunk maps to the tokens its text
contributes, so a lookup returns the longest cached run of tokens and only the rest of the
text is tokenized.

Exactness. A token may straddle a chunk boundary, so a chunk's tokens end at a *split
point* at or before the chunk's end: a place where tokenizing the two sides apart gives
the same tokens as tokenizing the whole. Split points are (1) right after an added token
(``<|im_end|>`` ...: HF tokenizers cut the text there before anything else runs, so chat
templates give one at every message boundary) and (2) before a space between two ASCII
letters, for tokenizers whose pre-tokenizer splits words there (checked on the tokenizer
itself when it is loaded; others use (1) only). A split point is only taken far enough
before the chunk's end that the text after the chunk cannot change it.

Thread-safe (its own lock): tokenizer threads fill it, the event loop reads it.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..config import PrefixStoreConfig

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


_Chunk = tuple  # (split point: int, tokens: bytes of native uint32)
"""A plain tuple of an int and bytes: the garbage collector stops tracking it, so a store of
100,000 chunks adds no collection pauses (a class instance or an array would be tracked)."""


class PrefixStore:
    def __init__(self, config: PrefixStoreConfig):
        self.config = config
        self._lock = threading.RLock()
        self._chunks: OrderedDict[ChunkHash, _Chunk] = OrderedDict()
        self._chunk_bytes = 0
        self.evictions = 0
        self._splitters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        """tokenizer -> its Splitter, freed with the tokenizer (an id() could be reused by
        another model's tokenizer and hand it the wrong split rules)."""

    def splitter(self, tokenizer) -> Splitter:
        splitter = self._splitters.get(tokenizer)
        if splitter is None:
            splitter = self._splitters[tokenizer] = Splitter(tokenizer)
            log.info("prefix store: split on added tokens%s (margin %d chars)",
                     " and between words" if splitter.word_splits else " only", splitter.margin)
        return splitter

    def chunk_hashes(self, prompt: str, model: str, add_special_tokens: bool) -> tuple[list[ChunkHash], ChunkHash]:
        """Chained hashes of the prompt's full chunks, and of the whole prompt (its last text block)."""
        size = self.config.block_size
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
        size = self.config.block_size
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
            while len(self._chunks) > self.config.max_entries:
                _, old = self._chunks.popitem(last=False)
                self._chunk_bytes -= len(old[1]) + _ENTRY_OVERHEAD
                self.evictions += 1

    # -- pod mappings -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._chunks)

    @property
    def memory_bytes(self) -> int:
        return self._chunk_bytes
