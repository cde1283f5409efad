"""The ingester through real ZMQ sockets into a real redis-server.

A fake engine (its own seeded block hashes, 16-token blocks) publishes vLLM's wire format
for chat prompts tokenized with the real Qwen3 tokenizer; routing keys (64-token blocks)
computed for the same prompt must then name that pod.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq

from extproc import config as config_mod
from extproc.sim import launcher
from extproc.blocks import block_keys
from extproc.events.ingest import Ingester
from extproc.sim.engine import EngineCache, KVEventPublisher, removed_event
from extproc.index.redis import RedisIndex
from extproc.metrics import Metrics
from tests.harness.runs import matched_prefix
from tests.conftest import MODEL

pytestmark = pytest.mark.integration

ROUTER_BLOCK = 64
ENGINE_BLOCK = 16


def prompt_tokens(tokenizer, seed: int, words: int = 400) -> list[int]:
    text = f"Tenant {seed}: " + " ".join(f"rule{(seed * 31 + i) % 97} applies" for i in range(words))
    messages = [{"role": "system", "content": text}, {"role": "user", "content": f"question {seed}"}]
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])


def make_config(redis_url: str, pods: list[dict], **ingest) -> config_mod.Config:
    return config_mod.from_dict({
        "index": {"backend": "redis", "redisUrl": redis_url, "timeout": "1s"},
        "blockSizeToHash": ROUTER_BLOCK,
        "models": [{"name": MODEL}],
        "pods": [{"address": "127.0.0.1:1", "models": [MODEL], **p} for p in pods],
        "ingest": {"engineBlockSize": ENGINE_BLOCK, "replayTimeout": "1s", **ingest},
    })


async def wait_for(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await predicate()
        if result:
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Harness:
    def __init__(self, redis_url: str):
        self.redis_url = redis_url
        self.index = RedisIndex.from_config(config_mod.IndexConfig(backend="redis", redis_url=redis_url, timeout=1.0))
        self.ingesters: list[Ingester] = []
        self.publishers: list[KVEventPublisher] = []

    def publisher(self, *, replay: bool = False, endpoint: str = "tcp://127.0.0.1:*", topic: str = "kv-events",
                  bind: bool | None = None):
        pub = KVEventPublisher(endpoint, replay_endpoint="tcp://127.0.0.1:*" if replay else None, topic=topic,
                               bind=bind)
        self.publishers.append(pub)
        return pub

    async def ingester(self, conf: config_mod.Config) -> Ingester:
        ingester = Ingester(RedisIndex.from_config(conf.index), conf, Metrics())
        await ingester.start()
        self.ingesters.append(ingester)
        return ingester

    async def connect(self, pub: KVEventPublisher, ingester: Ingester, pod: str) -> None:
        """ZMQ drops what is published before the subscription lands: publish empty batches until one arrives."""
        async def seen():
            feed = ingester.feeds.get(pod)
            if feed is not None and feed.last_seq is not None:
                return True
            pub.publish([])
            return False
        await wait_for(seen, what=f"{pod} connected")

    async def matched(self, tokens: list[int], pod: str) -> int:
        keys = block_keys(tokens, ROUTER_BLOCK, 128)
        return matched_prefix(await self.index.lookup(MODEL, keys), [pod]).get(pod, 0)

    async def close(self):
        for ingester in self.ingesters:
            await ingester.stop()
            await ingester.index.close()
        for pub in self.publishers:
            pub.close()
        await self.index.close()


@pytest.fixture()
async def h(index, redis_server):
    harness = Harness(redis_server.url)
    yield harness
    await harness.close()


async def test_stored_blocks_of_a_chat_prompt_name_the_pod(h, tokenizer):
    pub = h.publisher()
    ing = await h.ingester(make_config(h.redis_url, [{"id": "pod-a", "kvEvents": pub.endpoint}]))
    await h.connect(pub, ing, "pod-a")
    tokens = prompt_tokens(tokenizer, 1)
    engine = EngineCache(block_size=ENGINE_BLOCK)
    _, events = engine.admit(tokens)
    pub.publish(events)
    full = len(tokens) // ROUTER_BLOCK
    assert full >= 8
    assert await wait_for(lambda: h.matched(tokens, "pod-a"), what="blocks indexed") == full


async def test_blocks_arrive_in_many_events_chained_through_parents(h, tokenizer):
    pub = h.publisher()
    ing = await h.ingester(make_config(h.redis_url, [{"id": "pod-a", "kvEvents": pub.endpoint}]))
    await h.connect(pub, ing, "pod-a")
    tokens = prompt_tokens(tokenizer, 2)
    engine = EngineCache(block_size=ENGINE_BLOCK)
    # One engine step at a time, 5 engine blocks each (not aligned to router blocks).
    for end in range(5 * ENGINE_BLOCK, len(tokens) + 5 * ENGINE_BLOCK, 5 * ENGINE_BLOCK):
        _, events = engine.admit(tokens[:end])
        pub.publish(events)
    assert await wait_for(lambda: h.matched(tokens, "pod-a"), what="blocks indexed") == len(tokens) // ROUTER_BLOCK


async def test_removing_one_middle_engine_block_cuts_the_match_there(h, tokenizer):
    pub = h.publisher()
    ing = await h.ingester(make_config(h.redis_url, [{"id": "pod-a", "kvEvents": pub.endpoint}]))
    await h.connect(pub, ing, "pod-a")
    tokens = prompt_tokens(tokenizer, 3)
    engine = EngineCache(block_size=ENGINE_BLOCK)
    pub.publish(engine.admit(tokens)[1])
    await wait_for(lambda: h.matched(tokens, "pod-a"), what="blocks indexed")
    engine_hashes = engine.hashes(tokens)
    pub.publish([removed_event([engine_hashes[9]])])  # engine block 9 lies in router block 2
    assert await wait_for(lambda: _eq(h.matched(tokens, "pod-a"), 2), what="match cut")


async def _eq(coro, value):
    return (await coro) == value


async def test_all_blocks_cleared_empties_the_pod(h, tokenizer):
    pub = h.publisher()
    ing = await h.ingester(make_config(h.redis_url, [{"id": "pod-a", "kvEvents": pub.endpoint}]))
    await h.connect(pub, ing, "pod-a")
    engine = EngineCache(block_size=ENGINE_BLOCK)
    a, b = prompt_tokens(tokenizer, 4), prompt_tokens(tokenizer, 5)
    pub.publish(engine.admit(a)[1])
    pub.publish(engine.admit(b)[1])
    await wait_for(lambda: h.matched(b, "pod-a"), what="blocks indexed")
    pub.publish(engine.clear())
    await wait_for(lambda: _eq(h.matched(a, "pod-a"), 0), what="pod a cleared")
    assert await h.matched(b, "pod-a") == 0
    assert await h.index.pods() == set()


async def test_a_sequence_gap_without_replay_drops_the_pod_and_rebuilds_from_new_events(h, tokenizer):
    pub = h.publisher()
    ing = await h.ingester(make_config(h.redis_url, [{"id": "pod-a", "kvEvents": pub.endpoint}]))
    await h.connect(pub, ing, "pod-a")
    engine = EngineCache(block_size=ENGINE_BLOCK)
    a, lost, c = (prompt_tokens(tokenizer, s) for s in (6, 7, 8))
    pub.publish(engine.admit(a)[1])
    await wait_for(lambda: h.matched(a, "pod-a"), what="a indexed")
    pub.publish(engine.admit(lost)[1], send=False)  # lost on the wire
    pub.publish(engine.admit(c)[1])
    assert await wait_for(lambda: h.matched(c, "pod-a"), what="c indexed")
    assert await h.matched(a, "pod-a") == 0, "entries from before the gap may be stale: dropped"
    assert await h.matched(lost, "pod-a") == 0
    assert ing.metrics.sequence_gaps.labels("pod-a")._value.get() == 1


async def test_a_sequence_gap_with_replay_is_filled_from_the_pods_buffer(h, tokenizer):
    pub = h.publisher(replay=True)
    conf = make_config(h.redis_url, [{"id": "pod-a", "kvEvents": pub.endpoint, "kvReplay": pub.replay_endpoint}])
    ing = await h.ingester(conf)
    await h.connect(pub, ing, "pod-a")
    engine = EngineCache(block_size=ENGINE_BLOCK)
    a, lost, c = (prompt_tokens(tokenizer, s) for s in (9, 10, 11))
    pub.publish(engine.admit(a)[1])
    pub.publish(engine.admit(lost)[1], send=False)
    pub.publish(engine.admit(c)[1])
    await wait_for(lambda: h.matched(c, "pod-a"), what="c indexed")
    assert await h.matched(lost, "pod-a") == len(lost) // ROUTER_BLOCK, "the lost batch came back by replay"
    assert await h.matched(a, "pod-a") == len(a) // ROUTER_BLOCK
    assert ing.metrics.replays.labels("ok")._value.get() >= 1


async def test_a_restarted_ingester_still_applies_removals(h, tokenizer):
    pub = h.publisher()
    conf = make_config(h.redis_url, [{"id": "pod-a", "kvEvents": pub.endpoint}])
    first = await h.ingester(conf)
    await h.connect(pub, first, "pod-a")
    engine = EngineCache(block_size=ENGINE_BLOCK)
    tokens = prompt_tokens(tokenizer, 12)
    pub.publish(engine.admit(tokens)[1])
    full = await wait_for(lambda: h.matched(tokens, "pod-a"), what="indexed")
    await first.stop()
    h.ingesters.remove(first)
    await first.index.close()

    second = await h.ingester(conf)
    await h.connect(pub, second, "pod-a")
    pub.publish([removed_event([engine.hashes(tokens)[13]])])  # router block 3
    assert await wait_for(lambda: _eq(h.matched(tokens, "pod-a"), 3), what="removal applied") and full > 3


async def test_an_engine_restart_drops_its_old_entries_first(h, tokenizer):
    pub = h.publisher()
    ing = await h.ingester(make_config(h.redis_url, [{"id": "pod-a", "kvEvents": pub.endpoint}]))
    await h.connect(pub, ing, "pod-a")
    old, new = prompt_tokens(tokenizer, 13), prompt_tokens(tokenizer, 14)
    pub.publish(EngineCache(block_size=ENGINE_BLOCK).admit(old)[1])
    await wait_for(lambda: h.matched(old, "pod-a"), what="old indexed")
    pub.restart()  # new process: sequence from 0, empty cache
    pub.publish(EngineCache(block_size=ENGINE_BLOCK).admit(new)[1])
    await wait_for(lambda: h.matched(new, "pod-a"), what="new indexed")
    assert await h.matched(old, "pod-a") == 0


async def test_central_mode_takes_the_pod_from_the_topic_for_configured_pods_only(h, tokenizer):
    port = launcher.free_port()
    conf = make_config(h.redis_url, [{"id": "pod-x"}], bind=f"tcp://127.0.0.1:{port}")
    ing = await h.ingester(conf)
    pub = h.publisher(endpoint=f"tcp://127.0.0.1:{port}", topic=f"kv@pod-x@{MODEL}")
    stranger = h.publisher(endpoint=f"tcp://127.0.0.1:{port}", topic=f"kv@pod-y@{MODEL}")
    await h.connect(pub, ing, "pod-x")
    tokens = prompt_tokens(tokenizer, 15)
    pub.publish(EngineCache(block_size=ENGINE_BLOCK).admit(tokens)[1])
    assert await wait_for(lambda: h.matched(tokens, "pod-x"), what="indexed") == len(tokens) // ROUTER_BLOCK

    async def dropped():
        stranger.publish(EngineCache(block_size=ENGINE_BLOCK).admit(tokens)[1])
        return ing.metrics.unknown_topics._value.get() > 0
    await wait_for(dropped, what="the stranger's messages counted and dropped")
    assert await h.matched(tokens, "pod-y") == 0 and set(ing.feeds) == {"pod-x"}


async def test_malformed_frames_are_counted_and_skipped(h, tokenizer):
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.PUB)
    port = raw.bind_to_random_port("tcp://127.0.0.1")
    ing = await h.ingester(make_config(h.redis_url, [{"id": "pod-a", "kvEvents": f"tcp://127.0.0.1:{port}"}]))
    tokens = prompt_tokens(tokenizer, 16)
    engine = EngineCache(block_size=ENGINE_BLOCK)
    import msgspec

    good = msgspec.msgpack.encode([time.time(), engine.admit(tokens)[1], None])
    try:
        async def delivered():
            raw.send_multipart([b"kv-events", b"\x00" * 8, b"\xc1garbage"])
            raw.send_multipart([b"kv-events", b"short"])
            raw.send_multipart([b"kv-events", (0).to_bytes(8, "big"), good])
            await asyncio.sleep(0.05)
            return await h.matched(tokens, "pod-a")
        assert await wait_for(delivered, what="good batch applied") == len(tokens) // ROUTER_BLOCK
        assert ing.metrics.event_decode_errors._value.get() >= 2
        assert not ing.supervisor.get("feed pod-a").task.done(), "the listener keeps running"
        assert ing.metrics.task_restarts.labels("feed")._value.get() == 0
    finally:
        raw.close(linger=0)


async def test_removals_are_announced_to_every_serve_replica(h, tokenizer):
    pub = h.publisher()
    ing = await h.ingester(make_config(h.redis_url, [{"id": "pod-a", "kvEvents": pub.endpoint}]))
    await h.connect(pub, ing, "pod-a")
    received = []
    replica = RedisIndex.from_config(config_mod.IndexConfig(backend="redis", redis_url=h.redis_url))
    await replica.subscribe(received.append)
    try:
        tokens = prompt_tokens(tokenizer, 17)
        engine = EngineCache(block_size=ENGINE_BLOCK)
        pub.publish(engine.admit(tokens)[1])
        await wait_for(lambda: h.matched(tokens, "pod-a"), what="indexed")
        pub.publish([removed_event([engine.hashes(tokens)[5]])])  # router block 1
        key = block_keys(tokens, ROUTER_BLOCK, 128)[1]

        async def announced():
            return any(m.pod == "pod-a" and (MODEL, key) in [tuple(r) for r in m.removed] for m in received)
        await wait_for(announced, what="invalidation received")
    finally:
        await replica.close()


async def test_pods_no_longer_configured_are_dropped_at_start(h, tokenizer):
    from extproc.index import Writes

    await h.index.apply("gone", Writes(stored={(MODEL, 123): time.time()}))
    assert "gone" in await h.index.pods()
    await h.ingester(make_config(h.redis_url, [{"id": "pod-a", "kvEvents": "tcp://127.0.0.1:9"}]))
    assert await h.index.lookup(MODEL, [123]) == [{}]
    assert "gone" not in await h.index.pods()


async def test_a_silent_pod_is_dropped_after_the_configured_time(h, tokenizer):
    pub = h.publisher()
    conf = make_config(h.redis_url, [{"id": "pod-a", "kvEvents": pub.endpoint}],
                       podSilenceTimeout="300ms", janitorInterval="100ms")
    ing = await h.ingester(conf)
    await h.connect(pub, ing, "pod-a")
    tokens = prompt_tokens(tokenizer, 18)
    pub.publish(EngineCache(block_size=ENGINE_BLOCK).admit(tokens)[1])
    await wait_for(lambda: h.matched(tokens, "pod-a"), what="indexed")
    await wait_for(lambda: _eq(h.matched(tokens, "pod-a"), 0), timeout=3, what="silent pod dropped")


async def test_entries_older_than_max_entry_age_are_expired(h, tokenizer):
    pub = h.publisher()
    conf = config_mod.from_dict({
        "index": {"backend": "redis", "redisUrl": h.redis_url, "maxEntryAge": "60s"},
        "blockSizeToHash": ROUTER_BLOCK, "models": [{"name": MODEL}],
        "pods": [{"id": "pod-a", "address": "127.0.0.1:1", "kvEvents": pub.endpoint}],
        "ingest": {"janitorInterval": "100ms"},
    })
    ing = await h.ingester(conf)
    await h.connect(pub, ing, "pod-a")
    old, fresh = prompt_tokens(tokenizer, 19), prompt_tokens(tokenizer, 20)
    engine = EngineCache(block_size=ENGINE_BLOCK)
    pub.publish(engine.admit(old)[1], ts=time.time() - 3600)
    pub.publish(engine.admit(fresh)[1])
    await wait_for(lambda: h.matched(fresh, "pod-a"), what="fresh indexed")
    await wait_for(lambda: _eq(h.matched(old, "pod-a"), 0), timeout=3, what="old expired")
    assert await h.matched(fresh, "pod-a") == len(fresh) // ROUTER_BLOCK


async def test_every_serve_replica_updates_its_cached_owners_when_a_block_is_removed(h, tokenizer, tokenizer_dir):
    """Two serve replicas cache the same blocks' owners; a removal on the shared index reaches both."""
    from extproc.config import PrefixStoreConfig
    from extproc.indexer import Indexer, build_cache
    from extproc.requests import RoutingRequest
    from extproc.tokenization import TokenizerManager

    tokenizers = TokenizerManager({MODEL: tokenizer_dir})
    replicas = []
    for _ in range(2):
        index = RedisIndex.from_config(config_mod.IndexConfig(backend="redis", redis_url=h.redis_url))
        cache = build_cache(PrefixStoreConfig(), block_size=ROUTER_BLOCK, max_blocks=128, scheme="chained")
        indexer = Indexer(tokenizers, index, block_size=ROUTER_BLOCK, max_blocks=128, scheme="chained", cache=cache)
        await index.subscribe(indexer.on_invalidation)
        replicas.append(indexer)
    pub = h.publisher()
    ing = await h.ingester(make_config(h.redis_url, [{"id": "pod-a", "kvEvents": pub.endpoint}]))
    try:
        await h.connect(pub, ing, "pod-a")
        text = "Tenant 21: " + " ".join(f"rule{i} applies" for i in range(400))
        request = RoutingRequest(model=MODEL, kind="chat", messages=[{"role": "system", "content": text},
                                                                     {"role": "user", "content": "q"}])
        tokens = list(tokenizer.apply_chat_template(request.messages, tokenize=True, add_generation_prompt=True)["input_ids"])
        engine = EngineCache(block_size=ENGINE_BLOCK)
        pub.publish(engine.admit(tokens)[1])
        full = len(tokens) // ROUTER_BLOCK
        await wait_for(lambda: _eq(h.matched(tokens, "pod-a"), full), what="indexed")
        for indexer in replicas:
            assert (await indexer.get_pod_scores(request, ["pod-a"])).matched == {"pod-a": full}
            assert (await indexer.get_pod_scores(request, ["pod-a"])).cache == "hit"
        block_2 = replicas[0].keys(tokens)[2]
        pub.publish([removed_event([engine.hashes(tokens)[9]])])  # router block 2

        async def both_updated():
            return all(r.cache.owners.get(MODEL, [block_2]) == [{}] for r in replicas)
        await wait_for(both_updated, what="both replicas' cached owners updated")
        for indexer in replicas:
            again = await indexer.get_pod_scores(request, ["pod-a"])
            assert again.cache == "hit" and again.matched == {"pod-a": 2}
    finally:
        for indexer in replicas:
            await indexer.index.close()
        tokenizers.close()


async def test_a_restarted_pod_is_picked_up_again_on_the_same_endpoint(h, tokenizer):
    pub = h.publisher()
    endpoint = pub.endpoint
    ing = await h.ingester(make_config(h.redis_url, [{"id": "pod-a", "kvEvents": endpoint}]))
    await h.connect(pub, ing, "pod-a")
    before = prompt_tokens(tokenizer, 22)
    pub.publish(EngineCache(block_size=ENGINE_BLOCK).admit(before)[1])
    await wait_for(lambda: h.matched(before, "pod-a"), what="indexed")
    pub.close()
    h.publishers.remove(pub)
    await asyncio.sleep(0.3)
    restarted = h.publisher(endpoint=endpoint, bind=True)
    # Same address, new process: ZMQ reconnects by itself; the sequence starts again at 0.
    after = prompt_tokens(tokenizer, 23)

    async def reindexed():  # what is published before the reconnect is lost, so keep publishing
        restarted.publish(EngineCache(block_size=ENGINE_BLOCK, seed=1).admit(after)[1])
        await asyncio.sleep(0.05)
        return await h.matched(after, "pod-a")
    await wait_for(reindexed, timeout=10, what="events from the restarted pod")
    assert await h.matched(before, "pod-a") == 0, "what the old process held is gone"


async def test_a_restarted_kv_extproc_with_the_memory_index_is_cache_aware_again_from_the_replay_buffer(tokenizer):
    """Everything the pod published before we (re)started comes back from its replay buffer."""
    from extproc.index.memory import MemoryIndex

    pub = KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*")
    engine = EngineCache(block_size=ENGINE_BLOCK)
    prompts = [prompt_tokens(tokenizer, s) for s in (24, 25)]
    for tokens in prompts:
        pub.publish(engine.admit(tokens)[1])  # nobody listening yet
    conf = config_mod.from_dict({
        "index": {"backend": "memory"}, "blockSizeToHash": ROUTER_BLOCK, "models": [{"name": MODEL}],
        "pods": [{"id": "pod-a", "address": "127.0.0.1:1", "kvEvents": pub.endpoint, "kvReplay": pub.replay_endpoint}],
    })
    index = MemoryIndex()
    ingester = Ingester(index, conf, Metrics())
    started = time.monotonic()
    await ingester.start()
    try:
        async def warm():
            hits = await index.lookup(MODEL, block_keys(prompts[1], ROUTER_BLOCK, 128))
            return matched_prefix(hits, ["pod-a"]).get("pod-a", 0) == len(prompts[1]) // ROUTER_BLOCK
        await wait_for(warm, timeout=5, what="rebuilt from the replay buffer")
        assert time.monotonic() - started < 5
        first = await index.lookup(MODEL, block_keys(prompts[0], ROUTER_BLOCK, 128))
        assert matched_prefix(first, ["pod-a"])["pod-a"] == len(prompts[0]) // ROUTER_BLOCK
    finally:
        await ingester.stop()
        pub.close()


async def test_an_index_lost_with_redis_is_rebuilt_from_the_replay_buffers(h, tokenizer, index):
    """Redis restarted without persistence looks like this: every key gone at once."""
    pub = h.publisher(replay=True)
    ing = await h.ingester(make_config(h.redis_url, [{"id": "pod-a", "kvEvents": pub.endpoint,
                                                      "kvReplay": pub.replay_endpoint}]))
    await h.connect(pub, ing, "pod-a")
    tokens = prompt_tokens(tokenizer, 21)
    pub.publish(EngineCache(block_size=ENGINE_BLOCK).admit(tokens)[1])
    full = len(tokens) // ROUTER_BLOCK
    assert await wait_for(lambda: h.matched(tokens, "pod-a"), what="indexed") == full
    index.flushall()
    started = time.monotonic()
    assert await wait_for(lambda: h.matched(tokens, "pod-a"), what="rebuilt") == full
    assert time.monotonic() - started < 3.0, "noticed within the index watch interval"
    assert ing.metrics.index_lost._value.get() == 1
