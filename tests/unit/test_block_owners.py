"""The prefix cache on the decision path: hits, partial hits and misses; block owners kept true by
the invalidation feed; expiry, bounds, lost feeds, the mirror, and concurrency.

The index here is the in-process one, flagged as remote (``local = False``) so the owner cache is
used as it is in front of Redis, and counting the lookups that reach it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time

import pytest

from extproc.config import PrefixStoreConfig
from extproc.index import FEED_LOST, Invalidation, Writes
from extproc.index.memory import MemoryIndex
from extproc.indexer import Indexer, build_cache
from extproc.requests import RoutingRequest
from extproc.tokenization import TokenizerManager, tokenize_with

MODEL = "Qwen/Qwen3-0.6B"
PODS = ["pod-a", "pod-b", "pod-c"]
SYSTEM = "You are the assistant of tenant {n}. Follow the handbook, section by section, with care. " * 25
BLOCK = 64


class RemoteIndex(MemoryIndex):
    """The memory index behind the owner cache, as Redis would be; counts the blocks asked for."""

    local = False

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    async def lookup(self, model, keys):
        self.asked += len(keys)
        return await super().lookup(model, keys)


def chat(n: int, question: str) -> RoutingRequest:
    return RoutingRequest(model=MODEL, kind="chat", messages=[
        {"role": "system", "content": SYSTEM.format(n=n)}, {"role": "user", "content": question}])


@pytest.fixture()
async def tokenizers(tokenizer_dir):
    manager = TokenizerManager({MODEL: tokenizer_dir}, workers=2)
    await manager.get(MODEL)
    yield manager
    manager.close()


def make_indexer(tokenizers, index, **cfg) -> Indexer:
    cache = build_cache(PrefixStoreConfig(**cfg), block_size=BLOCK, max_blocks=128, scheme="chained")
    return Indexer(tokenizers, index, block_size=BLOCK, max_blocks=128, scheme="chained", cache=cache)


async def subscribed(tokenizers, **cfg) -> tuple[RemoteIndex, Indexer]:
    index = RemoteIndex()
    indexer = make_indexer(tokenizers, index, **cfg)
    await index.subscribe(indexer.on_invalidation)
    return index, indexer


async def store_prompt(index: MemoryIndex, tokenizer, indexer: Indexer, request: RoutingRequest, pod: str,
                       blocks: int | None = None) -> list[int]:
    keys = indexer.keys(tokenize_with(tokenizer, request))[:blocks]
    await index.apply(pod, Writes(stored={(MODEL, k): time.time() for k in keys}))
    return keys


async def test_miss_then_partial_then_full_hit(tokenizers, tokenizer):
    index, indexer = await subscribed(tokenizers)
    await store_prompt(index, tokenizer, indexer, chat(1, "first"), "pod-b")
    first = await indexer.get_pod_scores(chat(1, "first"), PODS)
    await tokenizers.settle()  # the new chunks are cached after the decision, off its path
    asked = index.asked
    second = await indexer.get_pod_scores(chat(1, "second question"), PODS)
    third = await indexer.get_pod_scores(chat(1, "second question"), PODS)
    assert (first.cache, second.cache, third.cache) == ("miss", "partial", "hit")
    assert first.matched["pod-b"] == first.total_blocks
    assert second.matched["pod-b"] == second.total_blocks - 1, "the new turn's last block is nobody's yet"
    assert third.matched == second.matched and third.total_blocks == second.total_blocks
    assert index.asked - asked == 1, "a new turn asks the index for its one new block; a repeat asks nothing"
    stats = indexer.get_cache_stats()
    assert (stats.hits, stats.partial_hits, stats.misses) == (1, 1, 1)
    assert stats.entries > 0 and stats.prompts == 2 and stats.owners == first.total_blocks + 1, "one answer per block"
    assert stats.memory_bytes > 0


async def test_after_a_tokenizer_change_nothing_learnt_with_the_old_one_is_found(tokenizers, tokenizer):
    """A reload that points a model at another tokenizer: text chunks, prompts and request bodies
    were cut and counted by the old one, so the next request is tokenized afresh."""
    import dataclasses
    index, indexer = await subscribed(tokenizers)
    request = dataclasses.replace(chat(1, "same body"), fingerprint=12345)
    await indexer.get_pod_scores(request, PODS)
    await tokenizers.settle()
    assert (await indexer.get_pod_scores(request, PODS)).cache == "hit"
    indexer.cache.store.forget_model(MODEL)
    assert (await indexer.get_pod_scores(request, PODS)).cache == "miss"
    await tokenizers.settle()
    assert (await indexer.get_pod_scores(request, PODS)).cache == "hit", "and learnt again with the new one"


async def test_a_new_document_after_a_known_prefix_asks_the_index_for_a_few_blocks_not_all(tokenizers, tokenizer):
    """Past the blocks the owner cache knows, the index is asked for FIRST_ASK blocks first and
    for the rest only while some candidate's run goes on: a document no pod holds costs one
    small read, a prompt a pod does hold is still matched to its end."""
    from extproc.indexer import FIRST_ASK
    index, indexer = await subscribed(tokenizers)
    await store_prompt(index, tokenizer, indexer, chat(1, "first"), "pod-b")
    await indexer.get_pod_scores(chat(1, "first"), PODS)
    await tokenizers.settle()
    document = " ".join(f"Clause {i} binds party {i % 7} to term {i * 13 % 101}." for i in range(400))
    asked = index.asked
    fresh = await indexer.get_pod_scores(chat(1, document), PODS)
    assert list(fresh.matched) == ["pod-b"] and fresh.matched["pod-b"] + 3 * FIRST_ASK < fresh.total_blocks
    assert index.asked - asked == FIRST_ASK, "the blocks past the known prefix that nobody holds: one small read"

    held = chat(2, document)
    keys = await store_prompt(index, tokenizer, indexer, held, "pod-c")
    asked = index.asked
    whole = await indexer.get_pod_scores(held, PODS)
    assert whole.matched == {"pod-c": whole.total_blocks} and len(keys) == whole.total_blocks
    assert index.asked - asked == whole.total_blocks, "a run that goes on is asked for to its end, once per block"


async def test_a_newly_stored_block_shows_at_once_without_asking_the_index(tokenizers, tokenizer):
    index, indexer = await subscribed(tokenizers)
    request = chat(3, "q")
    assert (await indexer.get_pod_scores(request, PODS)).matched == {}
    asked = index.asked
    await store_prompt(index, tokenizer, indexer, request, "pod-c")
    after = await indexer.get_pod_scores(request, PODS)
    assert after.matched["pod-c"] == after.total_blocks
    assert index.asked == asked, "the feed updated the cached answers in place"


async def test_a_removed_block_is_removed_from_every_answer_holding_it(tokenizers, tokenizer):
    index, indexer = await subscribed(tokenizers)
    keys = await store_prompt(index, tokenizer, indexer, chat(4, "a"), "pod-a")
    for question in ("a", "b", "c"):
        await indexer.get_pod_scores(chat(4, question), PODS)
    await index.apply("pod-a", Writes(removed={(MODEL, keys[2])}))
    for question in ("a", "b", "c"):
        assert (await indexer.get_pod_scores(chat(4, question), PODS)).matched["pod-a"] == 2


async def test_answers_expire_after_the_ttl(tokenizers):
    index, indexer = await subscribed(tokenizers, pod_mapping_ttl=0.2)
    await indexer.get_pod_scores(chat(5, "q"), PODS)
    asked = index.asked
    await indexer.get_pod_scores(chat(5, "q"), PODS)
    assert index.asked == asked
    await asyncio.sleep(0.3)
    await indexer.get_pod_scores(chat(5, "q"), PODS)
    assert index.asked > asked, "expired answers are asked for again"
    assert indexer.cache.owners.sweep() == 0


async def test_an_answer_read_while_its_block_changed_is_not_kept(tokenizers):
    _, indexer = await subscribed(tokenizers)
    owners = indexer.cache.owners
    epoch = owners.epoch()  # the index is asked...
    owners.apply(Invalidation("pod-a", stored=[(MODEL, 7)], stored_at=[1.0]))  # ...a change lands meanwhile...
    assert owners.learn(MODEL, [7, 8], [{}, {}], since_epoch=epoch) == [7]  # ...so the old answer for 7 is refused
    assert owners.get(MODEL, [7, 8]) == [None, {}]


async def test_a_lost_feed_drops_every_cached_answer(tokenizers):
    index, indexer = await subscribed(tokenizers)
    await indexer.get_pod_scores(chat(6, "q"), PODS)
    assert indexer.get_cache_stats().owners > 0
    indexer.on_invalidation(Invalidation(FEED_LOST, cleared=True))
    assert indexer.get_cache_stats().owners == 0
    asked = index.asked
    await indexer.get_pod_scores(chat(6, "q"), PODS)
    assert index.asked > asked


async def test_decisions_are_identical_with_the_cache_off(tokenizers, tokenizer):
    index = RemoteIndex()
    cached = make_indexer(tokenizers, index)
    plain = Indexer(tokenizers, index, block_size=BLOCK, max_blocks=128, scheme="chained", cache=None)
    await index.subscribe(cached.on_invalidation)
    rng = random.Random(5)
    requests = [chat(rng.randrange(4), rng.choice(["a", "b", "a longer question about caching"])) for _ in range(60)]
    for step, request in enumerate(requests):
        if step % 7 == 0:  # the index changes as we go
            pod = rng.choice(PODS)
            await store_prompt(index, tokenizer, plain, request, pod, blocks=rng.randrange(1, 8))
        if step % 11 == 0:
            keys = plain.keys(tokenize_with(tokenizer, request))
            await index.apply(rng.choice(PODS), Writes(removed={(MODEL, k) for k in keys[3:5]}))
        if step % 23 == 0:
            await index.purge_pod(rng.choice(PODS))
        a = await cached.get_pod_scores(request, PODS)
        b = await plain.get_pod_scores(request, PODS)
        await tokenizers.settle()
        assert (a.matched, a.total_blocks) == (b.matched, b.total_blocks), f"step {step}"
    stats = cached.get_cache_stats()
    assert stats.hits > 0 and stats.partial_hits > 0


async def test_the_mirror_answers_every_block_without_the_index(tokenizers, tokenizer):
    index = RemoteIndex()
    warm = make_indexer(tokenizers, index)
    for n in range(3):
        await store_prompt(index, tokenizer, warm, chat(n, "q"), PODS[n])
    _, indexer = index, make_indexer(tokenizers, index, mirror=True)
    await index.subscribe(indexer.on_invalidation)
    assert await indexer.load_mirror() and indexer.cache.owners.complete
    asked = index.asked
    for n in range(3):
        match = await indexer.get_pod_scores(chat(n, "q"), PODS)
        assert match.matched == {PODS[n]: match.total_blocks}
    assert (await indexer.get_pod_scores(chat(9, "never seen"), PODS)).matched == {}
    await store_prompt(index, tokenizer, indexer, chat(9, "never seen"), "pod-b")  # announced after the load
    match = await indexer.get_pod_scores(chat(9, "never seen"), PODS)
    assert match.matched == {"pod-b": match.total_blocks}
    assert index.asked == asked, "a complete mirror never asks the index"


async def test_changes_during_a_mirror_load_are_read_again(tokenizers, tokenizer):
    class ChangingIndex(RemoteIndex):
        async def scan_blocks(self, batch: int = 1000):
            async for item in super().scan_blocks(batch=2):
                yield item
                if not self.changed:  # a pod stores a new prefix in the middle of the scan
                    self.changed = True
                    await store_prompt(self, tokenizer, indexer, chat(8, "late"), "pod-c")

    index = ChangingIndex()
    index.changed = False
    indexer = make_indexer(tokenizers, index, mirror=True)
    await store_prompt(index, tokenizer, indexer, chat(7, "early"), "pod-a")
    await index.subscribe(indexer.on_invalidation)
    assert await indexer.load_mirror()
    asked = index.asked
    for request, pod in ((chat(8, "late"), "pod-c"), (chat(7, "early"), "pod-a")):
        match = await indexer.get_pod_scores(request, PODS)
        assert match.matched == {pod: match.total_blocks}
    assert index.asked == asked


async def test_at_its_bound_the_mirror_drops_old_blocks_and_asks_the_index_for_them(tokenizers, tokenizer):
    index = RemoteIndex()
    indexer = make_indexer(tokenizers, index, mirror=True, max_pod_mappings=10)
    for n in range(3):
        await store_prompt(index, tokenizer, indexer, chat(n, "q"), PODS[n])  # 21 blocks in all
    await index.subscribe(indexer.on_invalidation)
    assert not await indexer.load_mirror()
    owners = indexer.cache.owners
    assert not owners.complete and owners.size()[0] <= 10 and owners.evictions > 0
    for n in range(3):
        match = await indexer.get_pod_scores(chat(n, "q"), PODS)
        assert match.matched == {PODS[n]: match.total_blocks}, "still right"
    assert index.asked > 0


def test_memory_stays_bounded_over_a_long_stream_of_distinct_prompts(tokenizer):
    cache = build_cache(PrefixStoreConfig(block_size=64, max_entries=500, max_prompts=100, max_pod_mappings=300),
                        block_size=16, max_blocks=128, scheme="chained")
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "kv", "cache", "route", "pod"]
    peak = 0
    for i in range(600):
        text = f"prompt {i}: " + " ".join(rng.choice(words) for _ in range(120))
        result = cache.store.tokenize(tokenizer, text, MODEL, add_special_tokens=False)
        cache.store.put_prompt(cache.store.prompt_key(text, MODEL, False), result)
        cache.owners.learn(MODEL, result.keys, [{"pod-a": 1.0}] * len(result.keys), since_epoch=cache.owners.epoch())
        stats = cache.get_cache_stats()
        peak = max(peak, stats.memory_bytes)
        assert stats.entries <= 500 and stats.prompts <= 100 and stats.owners <= 300
    assert stats.evictions > 0
    assert peak < 2_000_000, f"peak estimate {peak} bytes"


async def test_concurrent_tokenizing_lookups_and_invalidations_keep_the_cache_consistent(tokenizer):
    cache = build_cache(PrefixStoreConfig(block_size=32, max_entries=300, max_pod_mappings=50),
                        block_size=16, max_blocks=128, scheme="chained")
    stop = threading.Event()
    errors: list[BaseException] = []
    texts = [f"tenant {i % 5} " + "shared words for everyone " * 20 + f"question {i}" for i in range(200)]

    def worker(seed: int) -> None:
        from extproc.blocks import block_keys

        rng = random.Random(seed)
        try:
            while not stop.is_set():
                text = rng.choice(texts)
                result = cache.store.tokenize(tokenizer, text, MODEL, add_special_tokens=False)
                truth = block_keys(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids, 16, 128)
                if result.keys != truth:
                    raise AssertionError("torn entry: wrong keys")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    rng = random.Random(9)
    owners = cache.owners
    try:
        for round_ in range(3000):
            keys = [rng.randrange(50) for _ in range(4)]
            epoch = owners.epoch()
            changed = rng.randrange(50)
            if rng.random() < 0.5:
                owners.apply(Invalidation("pod-a", stored=[(MODEL, changed)], stored_at=[float(round_)]))
            refused = owners.learn(MODEL, keys, [{"pod-b": 1.0}] * 4, since_epoch=epoch)
            # Invariant: an answer read before a change to its block is never kept.
            if rng.random() < 0.5 and changed in keys and changed not in refused:
                assert owners._changed_at.get((MODEL, changed), -1) <= epoch
            if round_ % 100 == 0:
                await asyncio.sleep(0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert owners.size()[0] <= 50


async def test_debug_logs_say_hit_miss_and_cached(tokenizers, caplog):
    _, indexer = await subscribed(tokenizers)
    with caplog.at_level(logging.DEBUG, logger="extproc.indexer"):
        await indexer.get_pod_scores(chat(6, "q"), PODS)
        await indexer.get_pod_scores(chat(6, "q"), PODS)
    text = caplog.text
    assert "CACHE MISS" in text and "CACHED blocks=" in text and "CACHE HIT blocks=" in text
    assert "handbook" not in text, "no prompt text in logs"


async def test_an_error_inside_the_cache_falls_back_to_the_full_pipeline(tokenizers, tokenizer, monkeypatch):
    index, indexer = await subscribed(tokenizers)
    request = chat(7, "q")
    await store_prompt(index, tokenizer, indexer, request, "pod-b")

    def broken(*args, **kwargs):
        raise RuntimeError("cache bug")

    monkeypatch.setattr(indexer.cache.store, "plan", broken)
    match = await indexer.get_pod_scores(request, PODS)
    assert match.cache == "error"
    assert match.matched == {"pod-b": match.total_blocks} and match.total_blocks > 0


async def test_when_the_index_fails_the_known_owners_still_decide(tokenizers, tokenizer):
    from extproc.index import IndexUnavailable

    index, indexer = await subscribed(tokenizers)
    await store_prompt(index, tokenizer, indexer, chat(11, "q"), "pod-a")
    first = await indexer.get_pod_scores(chat(11, "q"), PODS)

    async def down(model, keys):
        raise IndexUnavailable("redis: down")

    index.lookup = down
    longer = chat(11, "a much longer question " * 30)  # new blocks after the known system prompt
    match = await indexer.get_pod_scores(longer, PODS)
    shared = sum(1 for a, b in zip(indexer.keys(tokenize_with(tokenizer, chat(11, "q"))),
                                   indexer.keys(tokenize_with(tokenizer, longer))) if a == b)
    assert 0 < shared < match.total_blocks and first.matched == {"pod-a": first.total_blocks}
    assert match.degraded and match.matched == {"pod-a": shared}
    with pytest.raises(IndexUnavailable):
        await indexer.get_pod_scores(chat(12, "nothing known"), PODS)


async def test_the_same_body_again_needs_no_rendering(tokenizers, monkeypatch):
    import json

    from extproc import indexer as indexer_module
    from extproc.requests import parse

    _, indexer = await subscribed(tokenizers)
    body = json.dumps({"model": MODEL, "messages": chat(13, "q").messages}).encode()
    first = await indexer.get_pod_scores(parse("/v1/chat/completions", body), PODS)
    rendered = []
    real = indexer_module.prompt_text
    monkeypatch.setattr(indexer_module, "prompt_text", lambda *a: rendered.append(1) or real(*a))
    again = await indexer.get_pod_scores(parse("/v1/chat/completions", body), PODS)
    other = await indexer.get_pod_scores(parse("/v1/chat/completions", body.replace(b'"model"', b'"stream": true, "model"')), PODS)
    assert (first.cache, again.cache, other.cache) == ("miss", "hit", "hit")
    assert len(rendered) == 1, "only the body with other bytes was rendered (and found by its text)"
    assert again.total_blocks == other.total_blocks == first.total_blocks
