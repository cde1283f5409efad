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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..config import PrefixStoreConfig
from ..tokenization import cores, encode_off_loop

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
    "In 2024 we shipped version 3 of it, then 17 more fixes and 2 x 4 tests.",
    "alpha123 beta456 gamma789 delta0 epsilon 42 zeta 7eta 8 theta",
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
        self._word: re.Pattern | None = None
        """Spaces the tokenizer always splits before (checked on it), or None."""
        for rule in (self._AFTER_WORD_OR_NUMBER, self._BETWEEN_WORDS):
            if self._check(rule):
                self._word = rule
                break
        self.word_splits = self._word is not None
        self.special_prefix = self._special_prefix()

    _BETWEEN_WORDS = re.compile(r"(?<=[A-Za-z]) (?=[A-Za-z])")
    _AFTER_WORD_OR_NUMBER = re.compile(r"(?<=[A-Za-z0-9]) (?=[A-Za-z])")

    def _check(self, rule: re.Pattern) -> bool:
        """True if cutting at every space the rule names in the sample texts keeps the tokens."""
        for text in _SELF_TEST_TEXTS:
            whole = self._encode(text, add_special_tokens=False).ids
            for p in (m.start() for m in rule.finditer(text)):
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

    def next_span(self, text: str, pos: int, end: int) -> tuple[int, int] | None:
        """The first added token starting in [pos, end) (leftmost, then longest), as (start, end)."""
        best: tuple[int, int] | None = None
        for first, tokens in self._added_by_first.items():
            at = text.find(first, pos, end if best is None else best[0])
            while at != -1:
                token = next((t for t in tokens if text.startswith(t, at)), None)  # longest first
                if token is not None:
                    best = (at, at + len(token))
                    break
                at = text.find(first, at + 1, end if best is None else best[0])
        return best

    def added_spans(self, text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        """Where the tokenizer cuts out added tokens, scanning from ``start``: leftmost-longest."""
        end = len(text) if end is None else end
        spans = []
        span = self.next_span(text, start, end)
        while span is not None:
            spans.append(span)
            span = self.next_span(text, span[1], end)
        return spans

    def last_split(self, text: str, start: int, end: int, spans: list[tuple[int, int]] | None = None) -> int:
        """The last split point in (start, end]; ``start`` when there is none.

        ``spans`` are the added-token spans of the text around (start, end], computed once.
        A word split is never taken inside an added token that crosses ``end``.
        """
        if end <= start:
            return start
        if spans is None:
            spans = self.added_spans(text, start, end + self.margin)
        best = start
        i = bisect_right(spans, (end + 1,)) - 1  # last span starting at or before end
        word_end = end
        while i >= 0 and spans[i][1] > end:
            word_end = min(word_end, spans[i][0])  # crosses end: no cut inside it
            i -= 1
        if i >= 0 and spans[i][1] > best:
            best = spans[i][1]
        if self._word is not None:
            # Backwards, a stretch at a time: the last word split is usually a few characters
            # from the end, so the first stretch is short and the next ones longer.
            hi, step = word_end + 1, 64
            while hi > best + 1:
                lo = max(best + 1, hi - step)
                found = [m.start() for m in self._word.finditer(text, lo, min(len(text), hi + 1))
                         if m.start() <= word_end]
                if found:
                    return found[-1]
                hi, step = lo, min(step * 2, 4096)
        return best




@dataclass(slots=True)
class Chunks:
    """A prompt's full chunks after ``start`` up to a point: where each ends, whether it ends on
    an added token, and its chained hash.

    A chunk ends right after each added token (so chat messages, which templates close with
    one, begin new chunks and a new turn reuses every earlier message's chunks) and at most
    every ``size`` characters in between. Boundaries depend on the text alone, so the same
    prefix always gives the same chunks; each chunk's hash chains the text before it. Cut from
    a ``start`` that ends an added token (an anchor), the chunks after it are the very ones a
    cut from the prompt's beginning gives there, hashes included (``origin`` is the chain's
    hash at ``start``).
    """

    ends: list[int]
    exact: list[bool]
    hashes: list[ChunkHash]
    start: int = 0
    origin: ChunkHash | None = None

    @classmethod
    def of(cls, text: str, seed: str, size: int, splitter: Splitter, limit: int | None = None, *,
           start: int = 0, origin: ChunkHash | None = None) -> "Chunks":
        """The chunks of ``text`` after ``start``, or up to its first ``limit`` characters when it
        is longer (only chunks the rest of the text cannot change are kept)."""
        whole = limit is None or limit >= len(text)
        limit = len(text) if whole else limit
        ends: list[int] = []
        exact: list[bool] = []
        first = pos = start
        for _, span_end in splitter.added_spans(text, start, limit):
            while span_end - pos > size:
                pos += size
                ends.append(pos)
                exact.append(False)
            ends.append(span_end)
            exact.append(True)
            pos = span_end
        while limit - pos >= size:
            pos += size
            ends.append(pos)
            exact.append(False)
        if not whole:
            # An added token starting past the limit could end a chunk that starts after limit - size.
            keep = 0
            while keep < len(ends) and (ends[keep - 1] if keep else start) < limit - size:
                keep += 1
            del ends[keep:], exact[keep:]
        hashes = []
        h = _digest(0, seed) if origin is None else origin
        for end in ends:
            h = hash((h, text[start:end]))
            hashes.append(h)
            start = end
        return cls(ends, exact, hashes, first, origin)


@dataclass(slots=True)
class Run:
    """The longest cached prefix of a prompt."""

    chars: int = 0
    """Prompt characters covered (a split point: the tokens before it are exact)."""
    tokens: int = 0
    keys: list[int] = field(default_factory=list)
    """Block keys of the full blocks inside the covered tokens (at most maxBlocksToMatch)."""
    chunks: int = 0
    """Chunks found in the store after the anchor (or from the start)."""
    anchor: tuple = ()
    """The anchor the run starts from (see PrefixStore._find_anchor), if any."""


@dataclass(slots=True)
class Tokenized:
    """What the store gives the indexer for one prompt."""

    keys: list[int]
    """Block keys of the prompt's first full blocks (at most maxBlocksToMatch)."""
    tokens: int
    """Exact tokens counted (up to the cut, or the whole prompt when ``cut`` is False)."""
    cut: bool
    """Tokenizing stopped once every block that can match was known."""
    chars: int
    """Characters tokenized; past the cut the rest of the prompt is only estimated."""
    cached_tokens: int
    estimated: int = 0
    """Tokens of the whole prompt (exact or estimated past the cut), for limits.maxPromptTokens."""
    fill: Callable[[], None] | None = None
    """Caches the newly tokenized chunks; run after the decision, off the critical path."""

    def estimated_total(self, prompt_chars: int) -> int:
        """Exact when not cut; past the cut, the rest at the tokens per character seen so far."""
        if not self.cut or not self.chars:
            return self.tokens
        return self.tokens + round((prompt_chars - self.chars) * self.tokens / self.chars)


Keyer = Callable[[Sequence[int], "int | None", int], list[int]]
"""(tokens, parent key, blocks wanted) -> keys of the full blocks of tokens, chained from parent."""

_Chunk = tuple  # (split point: int, tokens: bytes of native uint32, keys: bytes of native uint64)
"""A plain tuple of an int and bytes: the garbage collector stops tracking it, so a store of
100,000 chunks adds no collection pauses (a class instance or an array would be tracked)."""

_Prompt = tuple  # (keys: bytes of native uint64, exact tokens, cut, chars tokenized, estimated total)

_Anchor = tuple  # (chars, hash of the 64 chars before, hash of the text up to chars, chain hash there,
#                  tokens, keys: bytes of uint64, tokens after the last full block: bytes of uint32)
"""A known prefix's state at a chunk end after an added token: where the next request with
the same text up to there can start cutting, hashing and looking up."""

ANCHOR_HEAD = 128
"""Characters of a prompt's beginning that name its anchors."""

ANCHORS_PER_HEAD = 4
"""Anchors kept per beginning (prompts that start alike but part before their anchors)."""

MIN_ANCHOR_CHARS = 2048
"""Shorter prefixes are cut and looked up chunk by chunk as fast as an anchor is checked."""

_CHECK_CHARS = 64

PLAN_CHARS = 65536
"""A prompt's chunks are hashed up to at least this far (or 8 characters per token that can
match); the rest of a longer prompt only if tokenizing goes that far."""

MIN_PIECE_CHARS = 8192
"""Pieces encoded side by side are at least this long: below it, a thread hop costs more than
encoding on one core."""

MAX_PIECES = 4

Spread = Callable[[Any, list[str], bool], list[Any]]
"""(backend tokenizer, texts, special tokens on the first) -> their encodings, side by side."""

INLINE_CHARS = 2048
"""Text up to this long is tokenized on the calling thread (the event loop): a worker-thread
hop costs more than encoding it."""


class PrefixStore:
    """Text -> tokens and block keys, per chunk (a prefix) and per whole prompt.

    ``block_size``, ``max_blocks`` and ``keyer`` are the indexer's block keying: keys kept
    with the chunks are never hashed again.
    """

    def __init__(self, config: PrefixStoreConfig, *, block_size: int, max_blocks: int, keyer: Keyer,
                 min_window_chars: int = 4 * INLINE_CHARS, min_anchor_chars: int = MIN_ANCHOR_CHARS,
                 anchor_head: int = ANCHOR_HEAD, min_piece_chars: int = MIN_PIECE_CHARS, max_pieces: int = 0):
        self.config = config
        self.min_window_chars = min_window_chars
        """Text encoded at least at once when cutting (tests make it tiny to cut everywhere)."""
        self.min_piece_chars = max(1, min_piece_chars)
        self.max_pieces = max_pieces or max(2, min(MAX_PIECES, cores()))
        """A stretch encoded side by side is cut into at most this many pieces (one per core)."""
        self.min_anchor_chars = max(1, min_anchor_chars)
        self.anchor_head = anchor_head
        """(Tests make both tiny to anchor everywhere.)"""
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.keyer = keyer
        self._lock = threading.Lock()
        self._chunks_by_hash: OrderedDict[ChunkHash, _Chunk] = OrderedDict()
        self._prompts: OrderedDict[ChunkHash, _Prompt] = OrderedDict()
        self._anchors: OrderedDict[ChunkHash, tuple[_Anchor, ...]] = OrderedDict()
        """hash of a prompt's first ANCHOR_HEAD characters -> anchors after them, most recent
        first; at most maxPrompts / ANCHORS_PER_HEAD beginnings (LRU)."""
        self._bytes = 0
        self.evictions = 0
        self._generations: dict[str, int] = {}
        """model -> times its tokenizer changed; part of every key, so nothing learnt with an
        old tokenizer is found again (those entries age out of the LRU)."""
        self._splitters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        """tokenizer -> its Splitter, freed with the tokenizer (an id() could be reused by
        another model's tokenizer and hand it the wrong split rules)."""

    @property
    def need_tokens(self) -> int:
        """Tokens that can ever match: tokenizing further cannot change a decision."""
        return self.block_size * self.max_blocks

    def splitter(self, tokenizer) -> Splitter:
        splitter = self._splitters.get(tokenizer)
        if splitter is None:
            splitter = self._splitters[tokenizer] = Splitter(tokenizer)
            log.info("prefix store: split on added tokens%s (margin %d chars)",
                     " and between words" if splitter.word_splits else " only", splitter.margin)
        return splitter

    def _seed(self, model: str, add_special_tokens: bool) -> str:
        return f"{model}\0{self._generations.get(model, 0)}\0{int(add_special_tokens)}"

    def forget_model(self, model: str) -> None:
        """The model's tokenizer changed (a reload): its chunks, prompts and request bodies
        were cut and counted by the old one."""
        with self._lock:
            self._generations[model] = self._generations.get(model, 0) + 1

    def request_key(self, fingerprint: int, model: str) -> ChunkHash:
        """The key of a whole request body (requests.py's fingerprint) for the model's tokenizer."""
        return hash((fingerprint, self._generations.get(model, 0)))

    # -- whole prompts ---------------------------------------------------------------

    def prompt_key(self, prompt: str, model: str, add_special_tokens: bool) -> ChunkHash:
        return hash((self._seed(model, add_special_tokens), prompt))

    def get_prompt(self, key: ChunkHash) -> Tokenized | None:
        """A prompt seen before: its keys and counts, with nothing to tokenize."""
        with self._lock:
            entry = self._prompts.get(key)
            if entry is None:
                return None
            self._prompts.move_to_end(key)
        packed, tokens, cut, chars, estimated = entry
        return Tokenized(list(memoryview(packed).cast("Q")), tokens, cut, chars, tokens, estimated)

    def put_prompt(self, key: ChunkHash, result: Tokenized) -> None:
        entry = (array("Q", result.keys).tobytes(), result.tokens, result.cut, result.chars,
                 result.estimated or result.tokens)
        with self._lock:
            old = self._prompts.pop(key, None)
            if old is not None:
                self._bytes -= len(old[0]) + _ENTRY_OVERHEAD
            self._prompts[key] = entry
            self._bytes += len(entry[0]) + _ENTRY_OVERHEAD
            while len(self._prompts) > self.config.max_prompts:
                _, dropped = self._prompts.popitem(last=False)
                self._bytes -= len(dropped[0]) + _ENTRY_OVERHEAD
                self.evictions += 1

    # -- prefixes ----------------------------------------------------------------------

    def _chunks(self, prompt: str, model: str, add_special_tokens: bool, splitter: Splitter,
                limit: int | None = None, *, start: int = 0, origin: ChunkHash | None = None) -> Chunks:
        return Chunks.of(prompt, self._seed(model, add_special_tokens), self.config.block_size, splitter,
                         limit if limit is not None else max(PLAN_CHARS, self.need_tokens * 8),
                         start=start, origin=origin)

    def find_longest_contained_tokens(self, prompt: str, model: str, *, add_special_tokens: bool = False,
                                      splitter: Splitter) -> tuple[Run, Chunks, list[_Chunk]]:
        """The longest cached run of chunks from the prompt's start (possibly empty), the prompt's
        chunks (after the anchor the run starts from, if any), and the run's chunks.

        A prompt whose beginning is anchored (a long prefix seen in earlier prompts) is checked
        against the anchor with two hashes and cut, hashed and looked up only after it: a new
        question after a long cached system prompt costs what the question costs.
        """
        anchor = self._find_anchor(prompt, self._seed(model, add_special_tokens))
        if anchor:
            chars, _, _, origin, tokens, packed_keys, tail = anchor
            chunks = self._chunks(prompt, model, add_special_tokens, splitter, start=chars, origin=origin)
            run = Run(chars=chars, tokens=tokens, keys=list(memoryview(packed_keys).cast("Q")), anchor=anchor)
            found: list[_Chunk] = [(chars, tail, b"")]  # the run's last tokens, for the next block's key
        else:
            chunks = self._chunks(prompt, model, add_special_tokens, splitter)
            run, found = Run(), []
        new: list[_Chunk] = []
        stored = self._chunks_by_hash
        with self._lock:
            for h in chunks.hashes:
                chunk = stored.get(h)
                if chunk is None:
                    break
                stored.move_to_end(h)
                new.append(chunk)
        if new:
            run.chunks = len(new)
            run.chars = new[-1][0]
            run.tokens += _add_keys(new, run.keys)
        return run, chunks, found + new

    # -- anchors -----------------------------------------------------------------------

    def _find_anchor(self, prompt: str, seed: str) -> _Anchor | None:
        """The longest anchor whose text the prompt starts with, or None (two hashes per
        candidate: its last 64 characters, then everything up to it)."""
        if len(prompt) < self.min_anchor_chars:
            return None
        head = hash((seed, prompt[:self.anchor_head]))
        with self._lock:
            candidates = self._anchors.get(head)
            if not candidates:
                return None
            self._anchors.move_to_end(head)
        for anchor in sorted(candidates, reverse=True) if len(candidates) > 1 else candidates:
            chars = anchor[0]
            if (chars <= len(prompt) and hash(prompt[max(0, chars - _CHECK_CHARS):chars]) == anchor[1]
                    and hash((seed, prompt[:chars])) == anchor[2]):
                return anchor
        return None

    def _record_anchor(self, plan: "Plan") -> None:
        """Anchor the plan's prompt at the last chunk end after an added token that the store
        already knew, if the run found any past its own anchor (with the store fill, after the
        decision)."""
        run, chunks, found = plan.run, plan.chunks, plan.found
        assert chunks is not None
        j = run.chunks - 1
        while j >= 0 and not chunks.exact[j]:
            j -= 1
        chars = chunks.ends[j] if j >= 0 else 0
        if chars < self.min_anchor_chars or (run.anchor and run.anchor[0] >= chars):
            return
        base = len(found) - run.chunks
        upto = found[: base + j + 1]
        keys = list(memoryview(run.anchor[5]).cast("Q")) if run.anchor else []
        tokens = (run.anchor[4] if run.anchor else 0) + _add_keys(upto[base:], keys)
        count = tokens - len(keys) * self.block_size if len(keys) < self.max_blocks else 0
        text, seed = plan.prompt, self._seed(plan.model, plan.add_special_tokens)
        check = hash(text[max(0, chars - _CHECK_CHARS):chars])
        anchor = (chars, check, hash((seed, text[:chars])), chunks.hashes[j], tokens,
                  array("Q", keys).tobytes(), array("I", _tail_tokens(upto, count)).tobytes())
        head = hash((seed, text[:self.anchor_head]))
        with self._lock:
            kept = self._anchors.pop(head, ())
            kept = (anchor,) + tuple(a for a in kept if a[:3] != anchor[:3])
            for dropped in kept[ANCHORS_PER_HEAD:]:
                self._bytes -= _anchor_bytes(dropped)
                self.evictions += 1
            kept = kept[:ANCHORS_PER_HEAD]
            self._anchors[head] = kept
            self._bytes += _anchor_bytes(anchor)
            while len(self._anchors) > max(1, self.config.max_prompts // ANCHORS_PER_HEAD):
                _, dropped_all = self._anchors.popitem(last=False)
                self._bytes -= sum(_anchor_bytes(a) for a in dropped_all)
                self.evictions += len(dropped_all)

    def plan(self, tokenizer, prompt: str, model: str, *, add_special_tokens: bool) -> "Plan":
        """What the store knows of the prompt (cheap: hashing and lookups, no tokenizing)."""
        splitter = self.splitter(tokenizer)
        if add_special_tokens and splitter.special_prefix is None:
            # Special tokens that are not a plain prefix: only a whole encoding is exact.
            return Plan(prompt, model, tokenizer, splitter, Run(), None, [], whole=True)
        run, chunks, found = self.find_longest_contained_tokens(prompt, model, add_special_tokens=add_special_tokens,
                                                                splitter=splitter)
        return Plan(prompt, model, tokenizer, splitter, run, chunks, found, add_special_tokens=add_special_tokens)

    def finish(self, plan: "Plan", *, off_loop: bool = False, spread: Spread | None = None) -> Tokenized:
        """Encode what the plan lacks, until every block that can match is known, and key it.

        ``off_loop``: on a worker thread, encoding without the GIL (the event loop runs on).
        ``spread``: encodes several texts at once on other threads; a long stretch is then cut at
        split points into pieces encoded side by side (the tokens are the same).
        """
        run, prompt = plan.run, plan.prompt
        backend = plan.tokenizer.backend_tokenizer
        encode = partial(encode_off_loop, backend) if off_loop else backend.encode
        many = partial(spread, backend) if spread is not None else None
        if plan.whole:
            ids = encode(prompt, add_special_tokens=True).ids
            return Tokenized(self.keyer(ids, None, self.max_blocks), len(ids), False, len(prompt), 0)
        need = self.need_tokens - run.tokens
        if need <= 0 or run.chars == len(prompt):
            result = Tokenized(run.keys, run.tokens, run.chars < len(prompt), run.chars, run.tokens)
            if run.chunks:
                result.fill = lambda: self._record_anchor(plan)
            return result
        pieces = self._encode_until(plan.splitter, encode, prompt, run.chars, need,
                                    plan.add_special_tokens and run.chars == 0, many)
        new_ids = [t for _, _, encoding in pieces for t in encoding.ids]
        rest = _tail_tokens(plan.found, run.tokens - len(run.keys) * self.block_size)
        keys = run.keys + self.keyer(rest + new_ids, run.keys[-1] if run.keys else None,
                                     self.max_blocks - len(run.keys))
        chars = pieces[-1][1]
        result = Tokenized(keys, run.tokens + len(new_ids), chars < len(prompt), chars, run.tokens)
        result.fill = lambda: self._fill(plan, pieces, keys)
        return result

    def _fill(self, plan: "Plan", pieces: list[tuple[int, int, object]], keys: list[int]) -> None:
        self._store_chunks(plan, pieces, keys)
        if plan.run.chunks:
            self._record_anchor(plan)

    def tokenize(self, tokenizer, prompt: str, model: str, *, add_special_tokens: bool,
                 off_loop: bool = False, spread: Spread | None = None) -> Tokenized:
        """plan + finish, and the new chunks stored at once (tests, benchmarks)."""
        result = self.finish(self.plan(tokenizer, prompt, model, add_special_tokens=add_special_tokens),
                             off_loop=off_loop, spread=spread)
        if result.fill is not None:
            result.fill()
        return result

    def _encode_until(self, splitter: Splitter, encode: Callable[..., Any], text: str, start: int, need: int,
                      add_special_tokens: bool,
                      many: Callable[[list[str], bool], list[Any]] | None = None) -> list[tuple[int, int, object]]:
        """Encode text from ``start`` in pieces cut at split points, until ``need`` tokens or the
        end: [(first char, end char, encoding)]. Each piece's tokens are exactly those a whole
        tokenization gives there (special tokens, which plan() allows only as a plain prefix,
        on the piece at the very start). With ``many``, a stretch of at least two
        min_piece_chars is cut again and its pieces encoded side by side."""
        pieces: list[tuple[int, int, object]] = []
        # Two characters per token at first (a whole prompt of up to that many tokens in one
        # encode: a second call costs more than it saves there), then the rate seen so far plus
        # 5%: far past the cut, every token encoded is wasted (2 us each on a dense document).
        window = max(need * 2, self.min_window_chars)
        pos, got = start, 0
        while pos < len(text) and got < need:
            end = pos + window
            if end + splitter.margin >= len(text):
                cut = len(text)
            else:
                cut = splitter.last_split(text, pos, end - splitter.margin)
                if cut <= pos:
                    window *= 2  # no split point in this stretch: look further
                    continue
            special = add_special_tokens and pos == 0
            bounds = self._piece_bounds(splitter, text, pos, cut) if many is not None else [pos, cut]
            if len(bounds) > 2:
                encodings = many([text[a:b] for a, b in zip(bounds, bounds[1:])], special)
            else:
                encodings = [encode(text[pos:cut], add_special_tokens=special)]
            for a, b, encoding in zip(bounds, bounds[1:], encodings):
                pieces.append((a, b, encoding))
                got += len(encoding.ids)
            # Next stretch: what is still needed at the characters per token seen so far, plus a margin.
            rate = (cut - start) / max(got, 1)
            window = max(min(self.min_window_chars, 1024), int((need - got) * rate * 1.05) + 128)
            pos = cut
        return pieces

    def _piece_bounds(self, splitter: Splitter, text: str, start: int, end: int) -> list[int]:
        """[start, split points near equal shares of the stretch..., end]: at most max_pieces
        pieces of about min_piece_chars or more."""
        count = min(self.max_pieces, (end - start) // self.min_piece_chars)
        bounds = [start]
        for j in range(1, count):
            cut = splitter.last_split(text, bounds[-1], start + (end - start) * j // count - splitter.margin)
            if cut > bounds[-1]:
                bounds.append(cut)
        bounds.append(end)
        return bounds

    def _store_chunks(self, plan: "Plan", pieces: list[tuple[int, int, object]], keys: list[int]) -> None:
        """Cache the chunks the new pieces cover: each chunk's tokens up to its split point, and the
        keys of the blocks that end inside them."""
        splitter, run, text = plan.splitter, plan.run, plan.prompt
        covered = pieces[-1][1]
        chunks = plan.chunks
        assert chunks is not None
        if chunks.ends and chunks.ends[-1] < covered and covered - chunks.ends[-1] >= self.config.block_size:
            chunks = self._chunks(text, plan.model, plan.add_special_tokens, splitter, covered + 2 * self.config.block_size,
                                  start=chunks.start, origin=chunks.origin)
        starts = [first for first, _, _ in pieces]
        packed_pieces = [array("I", encoding.ids).tobytes() for _, _, encoding in pieces]
        block = self.block_size
        split, tokens_before = run.chars, run.tokens
        new: list[tuple[ChunkHash, _Chunk]] = []
        for i in range(run.chunks, len(chunks.ends)):
            end = chunks.ends[i]
            if end > covered:
                break
            cut = end if chunks.exact[i] else max(split, splitter.last_split(text, split, end - splitter.margin))
            parts: list[bytes] = []
            pos = split
            while pos < cut:
                k = bisect_right(starts, pos) - 1
                first, last, encoding = pieces[k]
                lo = _token_at(encoding, pos - first)
                hi = _token_at(encoding, cut - first) if cut < last else len(encoding.ids)
                parts.append(packed_pieces[k][4 * lo: 4 * hi])
                pos = min(cut, last)
            packed = b"".join(parts)
            count = len(packed) // 4
            chunk_keys = keys[tokens_before // block:min((tokens_before + count) // block, len(keys))]
            new.append((chunks.hashes[i], (cut, packed, array("Q", chunk_keys).tobytes())))
            tokens_before += count
            split = cut
        with self._lock:
            for h, chunk in new:
                if h not in self._chunks_by_hash:
                    self._chunks_by_hash[h] = chunk
                    self._bytes += len(chunk[1]) + len(chunk[2]) + _ENTRY_OVERHEAD
            while len(self._chunks_by_hash) > self.config.max_entries:
                _, old = self._chunks_by_hash.popitem(last=False)
                self._bytes -= len(old[1]) + len(old[2]) + _ENTRY_OVERHEAD
                self.evictions += 1

    def __len__(self) -> int:
        return len(self._chunks_by_hash)

    @property
    def prompts(self) -> int:
        return len(self._prompts)

    @property
    def anchors(self) -> int:
        with self._lock:
            return sum(len(kept) for kept in self._anchors.values())

    @property
    def memory_bytes(self) -> int:
        return self._bytes


@dataclass(slots=True)
class Plan:
    prompt: str
    model: str
    tokenizer: object
    splitter: Splitter
    run: Run
    chunks: Chunks | None
    found: list
    add_special_tokens: bool = False
    whole: bool = False

    @property
    def to_encode(self) -> int:
        """Characters finish() may have to encode (an upper bound)."""
        return len(self.prompt) - self.run.chars


def _add_keys(chunks: list[_Chunk], keys: list[int]) -> int:
    """Append the block keys the chunks carry to ``keys``; the tokens the chunks hold."""
    size = 0
    for _, packed, packed_keys in chunks:
        size += len(packed)
        if packed_keys:
            keys.extend(memoryview(packed_keys).cast("Q"))
    return size // 4


def _anchor_bytes(anchor: _Anchor) -> int:
    return len(anchor[5]) + len(anchor[6]) + _ENTRY_OVERHEAD


def _tail_tokens(chunks: list[_Chunk], count: int) -> list[int]:
    """The last ``count`` tokens of a run of chunks."""
    if count <= 0:
        return []
    tokens: list[int] = []
    for _, packed, _ in reversed(chunks):
        tokens[:0] = memoryview(packed).cast("I")
        if len(tokens) >= count:
            break
    return tokens[len(tokens) - count:]


def _token_at(encoding, char: int) -> int:
    """Index of the first token starting at or after ``char`` (a split point, so a token boundary)."""
    if char <= 0:
        return 0
    index = encoding.char_to_token(char)
    if index is not None and encoding.token_to_chars(index)[0] == char:
        return index
    starts = [offset[0] for offset in encoding.offsets]
    return bisect_left(starts, char)
