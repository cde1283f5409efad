"""Prompt -> per-pod matched prefix: tokenize, key the blocks, one index lookup."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .blocks import HashScheme, block_keys
from .index import BlockIndex
from .requests import RoutingRequest
from .scoring import matched_prefix
from .tokenization import TokenizerManager


@dataclass(slots=True)
class PrefixMatch:
    matched: dict[str, int]
    """pod id -> blocks matched consecutively from the first."""
    total_blocks: int
    timings: dict[str, float] = field(default_factory=dict)
    """stage -> seconds, for metrics and the per-decision debug line."""


class Indexer:
    def __init__(
        self,
        tokenizers: TokenizerManager,
        index: BlockIndex,
        *,
        block_size: int,
        max_blocks: int,
        scheme: HashScheme,
        max_entry_age: float = 0.0,
    ):
        self.tokenizers = tokenizers
        self.index = index
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.scheme = scheme
        self.max_entry_age = max_entry_age

    def keys(self, tokens: Sequence[int]) -> list[int]:
        return block_keys(tokens, self.block_size, self.max_blocks, self.scheme)

    async def get_pod_scores(self, request: RoutingRequest, pod_ids: Sequence[str]) -> PrefixMatch:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        tokens = await self.tokenizers.tokenize(request)
        t1 = time.perf_counter()
        keys = self.keys(tokens)
        t2 = time.perf_counter()
        hits = await self.index.lookup(request.model, keys) if keys else []
        t3 = time.perf_counter()
        not_before = time.time() - self.max_entry_age if self.max_entry_age else 0.0
        matched = matched_prefix(hits, pod_ids, not_before)
        t4 = time.perf_counter()
        timings.update(tokenize=t1 - t0, hash=t2 - t1, lookup=t3 - t2, score=t4 - t3)
        return PrefixMatch(matched, len(keys), timings)
