"""Pod mappings: full, partial and missed lookups; freshness; bounds; concurrency."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time

import pytest

from extproc.config import PodConfig
from extproc.index import Writes
from extproc.index.memory import MemoryIndex
from extproc.indexer import Indexer
from extproc.config import PrefixStoreConfig
from extproc.prefixcache import PrefixCache, pod_set_hash
from extproc.requests import RoutingRequest
from extproc.tokenization import TokenizerManager, tokenize_with

MODEL = "Qwen/Qwen3-0.6B"
PODS = ["pod-a", "pod-b", "pod-c"]
SYSTEM = "You are the assistant of tenant {n}. Follow the handbook, section by section, with care. " * 25


def chat(n: int, question: str) -> RoutingRequest:
    return RoutingRequest(model=MODEL, kind="chat", messages=[
        {"role": "system", "content": SYSTEM.format(n=n)}, {"role": "user", "content": question}])


@pytest.fixture()
async def tokenizers(tokenizer_dir):
    manager = TokenizerManager({MODEL: tokenizer_dir}, workers=2)
    await manager.get(MODEL)
    yield manager
    manager.close()


def make_indexer(tokenizers, index, cache=None, **cfg) -> Indexer:
    return Indexer(tokenizers, index, block_size=64, max_blocks=128, scheme="chained",
                   cache=cache if cache is not None else PrefixCache(PrefixStoreConfig(**cfg)))


async def store_prompt(index: MemoryIndex, tokenizer, indexer: Indexer, request: RoutingRequest, pod: str,
                       blocks: int | None = None) -> list[int]:
    keys = indexer.keys(tokenize_with(tokenizer, request))[:blocks]
    await index.apply(pod, Writes(stored={(MODEL, k): time.time() for k in keys}))
    return keys


def test_pod_set_hash_is_order_free_and_the_same_in_every_process():
    import subprocess
    import sys

    assert pod_set_hash(["b", "a"]) == pod_set_hash(["a", "b"]) != pod_set_hash(["a"])
    other = subprocess.run([sys.executable, "-c", "from extproc.prefixcache import pod_set_hash; "
                            "print(pod_set_hash(['pod-b', 'pod-a']))"], capture_output=True, text=True, check=True)
    assert int(other.stdout) == pod_set_hash(["pod-a", "pod-b"])


async def test_miss_then_partial_then_full_hit(tokenizers, tokenizer):
    index = MemoryIndex()
    indexer = make_indexer(tokenizers, index)
    await index.subscribe(indexer.on_invalidation)
    await store_prompt(index, tokenizer, indexer, chat(1, "first"), "pod-b")
    first = await indexer.get_pod_scores(chat(1, "first"), PODS)
    await tokenizers.settle()  # the new chunks are cached after the decision, off its path
    second = await indexer.get_pod_scores(chat(1, "second question"), PODS)
    third = await indexer.get_pod_scores(chat(1, "second question"), PODS)
    assert (first.cache, second.cache, third.cache) == ("miss", "partial", "hit")
    assert first.matched["pod-b"] == first.total_blocks
    assert third.matched == second.matched and third.total_blocks == second.total_blocks
    assert "lookup" not in third.timings, "a full hit does not ask the index"
    stats = indexer.get_cache_stats()
    assert (stats.hits, stats.partial_hits, stats.misses) == (1, 1, 1)
    assert stats.entries > 0 and stats.mappings == 2 and stats.memory_bytes > 0


async def test_the_interface_names_of_the_design(tokenizers, tokenizer):
    cache = PrefixCache()
    indexer = make_indexer(tokenizers, MemoryIndex(), cache=cache)
    await indexer.get_pod_scores(chat(2, "q"), PODS)
    await tokenizers.settle()
    text = tokenizer.apply_chat_template(chat(2, "q").messages, tokenize=False, add_generation_prompt=True)
    cached = cache.store.find_longest_contained_tokens(text, MODEL)
    assert cached.tokens and cached.tokens == tokenizer.backend_tokenizer.encode(text[: cached.chars]).ids
    tokens, mapping = cache.find_longest_contained_tokens_with_pod_mappings(text, MODEL, PODS)
    assert tokens.tokens == cached.tokens and mapping is not None
    assert mapping.pod_set_hash == pod_set_hash(PODS)
    assert cache.find_longest_contained_tokens_with_pod_mappings(text, MODEL, ["pod-a"])[1] is None
    assert cache.mappings.invalidate_pod_mappings_for_keys(mapping.kv_block_keys[:1]) == 1
    assert cache.find_longest_contained_tokens_with_pod_mappings(text, MODEL, PODS)[1] is None


async def test_a_newly_stored_block_shows_at_once(tokenizers, tokenizer):
    index = MemoryIndex()
    indexer = make_indexer(tokenizers, index)
    await index.subscribe(indexer.on_invalidation)
    request = chat(3, "q")
    assert (await indexer.get_pod_scores(request, PODS)).matched == {}
    assert (await indexer.get_pod_scores(request, PODS)).cache == "hit"
    await store_prompt(index, tokenizer, indexer, request, "pod-c")
    after = await indexer.get_pod_scores(request, PODS)
    assert after.cache != "hit" and after.matched["pod-c"] == after.total_blocks


async def test_a_removed_block_drops_every_mapping_containing_it(tokenizers, tokenizer):
    index = MemoryIndex()
    indexer = make_indexer(tokenizers, index)
    await index.subscribe(indexer.on_invalidation)
    keys = await store_prompt(index, tokenizer, indexer, chat(4, "a"), "pod-a")
    for question in ("a", "b", "c"):
        await indexer.get_pod_scores(chat(4, question), PODS)
    assert indexer.get_cache_stats().mappings == 3
    await index.apply("pod-a", Writes(removed={(MODEL, keys[2])}))
    assert indexer.get_cache_stats().mappings == 0
    again = await indexer.get_pod_scores(chat(4, "a"), PODS)
    assert again.matched["pod-a"] == 2


async def test_mappings_expire_after_the_ttl(tokenizers):
    indexer = make_indexer(tokenizers, MemoryIndex(), pod_mapping_ttl=0.2)
    await indexer.get_pod_scores(chat(5, "q"), PODS)
    assert (await indexer.get_pod_scores(chat(5, "q"), PODS)).cache == "hit"
    await asyncio.sleep(0.3)
    await tokenizers.settle()
    assert indexer.cache.mappings.cleanup_expired_mappings() == 1
    assert (await indexer.get_pod_scores(chat(5, "q"), PODS)).cache == "partial"


def test_at_most_max_pod_sets_per_block():
    cache = PrefixCache(PrefixStoreConfig(max_pod_sets_per_block=2))
    for pods in (["a"], ["b"], ["c"]):
        assert cache.mappings.cache_pod_mappings(b"h", pods, [1, 2], [{}, {}], since_epoch=cache.mappings.epoch())
    assert cache.mappings.get_mapping(b"h", pod_set_hash(["a"])) is None
    assert cache.mappings.get_mapping(b"h", pod_set_hash(["c"])) is not None
    assert cache.get_cache_stats().mappings == 2


def test_a_change_during_the_lookup_is_not_lost():
    """Results read before an invalidation of one of their blocks are never cached."""
    cache = PrefixCache()
    epoch = cache.mappings.epoch()
    cache.mappings.invalidate_pod_mappings_for_keys([2])  # arrives while the lookup is in flight
    assert not cache.mappings.cache_pod_mappings(b"h", ["a"], [1, 2, 3], [{"a": 1.0}] * 3, since_epoch=epoch)
    assert cache.mappings.cache_pod_mappings(b"h", ["a"], [1, 3], [{"a": 1.0}] * 2, since_epoch=epoch)
    assert cache.mappings.get_mapping(b"h", pod_set_hash(["a"])) is not None


async def test_decisions_are_identical_with_the_cache_off(tokenizers, tokenizer):
    index = MemoryIndex()
    cached = make_indexer(tokenizers, index)
    plain = Indexer(tokenizers, index, block_size=64, max_blocks=128, scheme="chained", cache=None)
    await index.subscribe(cached.on_invalidation)
    rng = random.Random(5)
    requests = [chat(rng.randrange(4), rng.choice(["a", "b", "a longer question about caching"])) for _ in range(40)]
    for step, request in enumerate(requests):
        if step % 7 == 0:  # the index changes as we go
            pod = rng.choice(PODS)
            await store_prompt(index, tokenizer, plain, request, pod, blocks=rng.randrange(1, 8))
        if step % 11 == 0:
            keys = plain.keys(tokenize_with(tokenizer, request))
            await index.apply(rng.choice(PODS), Writes(removed={(MODEL, k) for k in keys[3:5]}))
        a = await cached.get_pod_scores(request, PODS)
        b = await plain.get_pod_scores(request, PODS)
        await tokenizers.settle()
        assert (a.matched, a.total_blocks) == (b.matched, b.total_blocks), f"step {step}"
    stats = cached.get_cache_stats()
    assert stats.hits > 0 and stats.partial_hits > 0


def test_memory_stays_bounded_over_a_long_stream_of_distinct_prompts(tokenizer):
    cache = PrefixCache(PrefixStoreConfig(block_size=64, max_entries=500, max_pod_mappings=100))
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "kv", "cache", "route", "pod"]
    peak = 0
    for i in range(600):
        text = f"prompt {i}: " + " ".join(rng.choice(words) for _ in range(120))
        tokens, _ = cache.store.tokenize(tokenizer, text, MODEL, add_special_tokens=False)
        _, block_hash = cache.store.chunk_hashes(text, MODEL, False)
        cache.mappings.cache_pod_mappings(block_hash, PODS, list(range(i, i + 10)), [{"pod-a": 1.0}] * 10, since_epoch=cache.mappings.epoch())
        stats = cache.get_cache_stats()
        peak = max(peak, stats.memory_bytes)
        assert stats.entries <= 500 and stats.mappings <= 100
    assert stats.evictions > 0
    assert peak < 2_000_000, f"peak estimate {peak} bytes"


async def test_concurrent_tokenizing_lookups_and_invalidations_keep_the_cache_consistent(tokenizer):
    cache = PrefixCache(PrefixStoreConfig(block_size=32, max_entries=300, max_pod_mappings=50))
    stop = threading.Event()
    errors: list[BaseException] = []
    texts = [f"tenant {i % 5} " + "shared words for everyone " * 20 + f"question {i}" for i in range(200)]

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                text = rng.choice(texts)
                tokens, _ = cache.store.tokenize(tokenizer, text, MODEL, add_special_tokens=False)
                if tokens != tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids:
                    raise AssertionError("torn entry: wrong tokens")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    rng = random.Random(9)
    stale = 0
    try:
        for round_ in range(2000):
            keys = [rng.randrange(50) for _ in range(4)]
            epoch = cache.mappings.epoch()
            if rng.random() < 0.5:
                cache.mappings.invalidate_pod_mappings_for_keys([rng.randrange(50)])
            cached = cache.mappings.cache_pod_mappings(round_.to_bytes(4, "big"), PODS, keys, [{"a": 1.0}] * 4, since_epoch=epoch)
            # Invariant: a cached mapping never contains a key invalidated after its lookup began.
            if cached and any(cache.mappings._invalidated_at.get(k, -1) > epoch for k in keys):
                stale += 1
            if round_ % 100 == 0:
                await asyncio.sleep(0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert stale == 0
    with cache.mappings._lock:
        indexed = {(k, h) for k, hs in cache.mappings._by_key.items() for h in hs}
        actual = {(k, h) for h, by_set in cache.mappings._mappings.items() for m in by_set.values() for k in m.kv_block_keys}
    assert indexed == actual, "the key -> mapping index matches the mappings"


async def test_debug_logs_say_hit_miss_and_cached(tokenizers, caplog):
    indexer = make_indexer(tokenizers, MemoryIndex())
    with caplog.at_level(logging.DEBUG, logger="extproc.indexer"):
        await indexer.get_pod_scores(chat(6, "q"), PODS)
        await indexer.get_pod_scores(chat(6, "q"), PODS)
    text = caplog.text
    assert "CACHE MISS" in text and "CACHED tokens=" in text and "CACHE HIT blocks=" in text
    assert "handbook" not in text, "no prompt text in logs"


async def test_an_error_inside_the_cache_falls_back_to_the_full_pipeline(tokenizers, tokenizer, monkeypatch):
    index = MemoryIndex()
    indexer = make_indexer(tokenizers, index)
    request = chat(7, "q")
    await store_prompt(index, tokenizer, indexer, request, "pod-b")

    def broken(*args, **kwargs):
        raise RuntimeError("cache bug")

    monkeypatch.setattr(indexer.cache.store, "chunk_hashes", broken)
    match = await indexer.get_pod_scores(request, PODS)
    assert match.cache == "error"
    assert match.matched == {"pod-b": match.total_blocks} and match.total_blocks > 0
