"""KV tiers: presence per (pod, block, medium) in both index backends, removals and clears
that touch only what they name, offloaded chunks announced with or without their tokens,
and a prefix score that weighs each block by where it is held."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc import config as config_mod
from extproc import endpoints
from extproc.blocks import block_keys
from extproc.config import IndexConfig
from extproc.events.sequencing import Sequencer
from extproc.index.memory import MemoryIndex
from extproc.index.redis import RedisIndex
from tests.harness import runs as reference
from extproc.metrics import Metrics
from extproc.sim import launcher
from extproc.sim.engine import CLEARED_EVENT, placeholder_event, removed_event, stored_event

BLOCK = 4
MODEL = "m"
KEY_PREFIX = "matrix:kv:block:"
WEIGHTS = {"GPU": 1.0, "CPU": 0.8, "STORAGE": 0.25}
_encode = msgspec.msgpack.Encoder().encode


def make_config(router: int = BLOCK, chunk: int = 1) -> config_mod.Config:
    return config_mod.from_dict({
        "blockSizeToHash": router, "ingest": {"engineBlockSize": BLOCK, "offloadChunkBlocks": chunk},
        "models": [{"name": MODEL}],
        "pods": [{"id": "pod-a", "address": "10.0.0.1:8000", "kvEvents": "tcp://10.0.0.1:5557"}],
    })


def frame(seq: int, *events: dict) -> list[bytes]:
    return [b"kv-events", seq.to_bytes(8, "big"), _encode([1_700_000_000.0, list(events), None])]


def tokens(n: int) -> list[int]:
    return list(range(BLOCK * n))


def prefix(k: int, medium: str = "GPU") -> dict:
    """Engine blocks 0..k-1 (hash 100 + i, tokens 4i..4i+3) in one BlockStored from the prompt start."""
    return stored_event([100 + i for i in range(k)], None, tokens(k), BLOCK, medium=medium)


def block(n: int, medium: str = "GPU") -> dict:
    """Engine block n alone, child of block n-1."""
    return stored_event([100 + n], 100 + n - 1 if n else None, range(BLOCK * n, BLOCK * n + BLOCK), BLOCK,
                        medium=medium)


@pytest.fixture(scope="module")
def redis_url():
    server = launcher.start_redis(launcher.workdir("kv-extproc-tiers-"))
    yield server.url
    server.proc.stop()


@pytest.fixture(params=["memory", "redis"])
async def index(request):
    if request.param == "memory":
        made = MemoryIndex()
    else:
        url = request.getfixturevalue("redis_url")
        client = aioredis.from_url(url)
        await client.flushall()
        await client.aclose()
        made = RedisIndex.from_config(IndexConfig(backend="redis", redis_url=url, key_prefix=KEY_PREFIX))
    yield made
    await made.close()


class Pod:
    """One simulated engine's feed into the index, message by message."""

    def __init__(self, index, config: config_mod.Config | None = None, router: int = BLOCK):
        self.index = index
        self.router = router
        self.metrics = Metrics()
        self.seq = Sequencer(index, config or make_config(router), self.metrics, self._no_replay)
        self.feed = self.seq.new_feed("pod-a", MODEL, "tcp://10.0.0.1:5557")
        self.next = 0

    async def _no_replay(self, feed, start):
        return None

    async def send(self, *events: dict) -> None:
        await self.seq.process(self.feed, [frame(self.next, *events)])
        self.next += 1

    async def holders(self, n: int) -> list[set[str]]:
        """Endpoint ids holding each of the first n router blocks."""
        keys = block_keys(tokens(n * self.router // BLOCK), self.router, 100)
        return [set(owners) for owners in await self.index.lookup(MODEL, keys)]


# -- endpoint ids ---------------------------------------------------------------------


def test_endpoint_ids_name_pods_ranks_and_tiers():
    assert endpoints.endpoint("pod-a") == "pod-a"
    assert endpoints.endpoint("pod-a", "CPU") == "pod-a|CPU"
    assert endpoints.endpoint("pod-a#1", "STORAGE") == "pod-a#1|STORAGE"
    assert endpoints.split("pod-a#1|CPU") == ("pod-a#1", "CPU")
    assert endpoints.split("pod-a#1") == ("pod-a#1", "GPU")
    assert endpoints.pod_of("pod-a#1|CPU") == "pod-a"
    assert endpoints.belongs_to("pod-a|CPU", "pod-a") and endpoints.belongs_to("pod-a", "pod-a")
    assert not endpoints.belongs_to("pod-ab|CPU", "pod-a") and not endpoints.belongs_to("pod-a#1", "pod-a")
    assert endpoints.medium_of(None) == "GPU" and endpoints.medium_of("cpu") == "CPU"
    # vLLM's offset_endpoint_port: tcp port + rank, port 0 left alone, _dp{rank} otherwise.
    assert endpoints.rank_endpoint("tcp://10.0.0.5:5557", 0) == "tcp://10.0.0.5:5557"
    assert endpoints.rank_endpoint("tcp://10.0.0.5:5557", 3) == "tcp://10.0.0.5:5560"
    assert endpoints.rank_endpoint("tcp://*:0", 1) == "tcp://*:0"
    assert endpoints.rank_endpoint("inproc://cache", 2) == "inproc://cache_dp2"
    assert endpoints.candidates_of("pod-a", 1) == [("pod-a", None)]
    assert endpoints.candidates_of("pod-a", 2) == [("pod-a#0", 0), ("pod-a#1", 1)]


def test_pod_ids_may_not_contain_the_separators():
    for bad in ("pod#1", "pod|CPU"):
        with pytest.raises(config_mod.ConfigError):
            config_mod.from_dict({"pods": [{"id": bad, "address": "10.0.0.1:8000"}]})
    with pytest.raises(config_mod.ConfigError):
        config_mod.from_dict({"tiers": {"mediumWeights": {"GPU": 1.0, "CPU": 1.5}}})
    with pytest.raises(config_mod.ConfigError):
        config_mod.from_dict({"tiers": {"mediumWeights": {"CPU": 0.8}}})
    assert config_mod.from_dict({}).tiers.medium_weights == config_mod.DEFAULT_MEDIUM_WEIGHTS


# -- the weighted run -----------------------------------------------------------------


def tiered_prefix(hits, candidates, weights, not_before=0.0):
    """The decision's runs and weighted sums over owners that are all known."""
    runs = endpoints.PrefixRuns(candidates, weights, not_before)
    assert not runs.walk(hits)
    return runs.matched, runs.weighted


def test_the_run_continues_across_tiers_and_each_block_counts_by_its_tier():
    hits = [{"a": 5.0, "b|CPU": 5.0}, {"a|CPU": 5.0, "b": 5.0}, {"a": 5.0, "a|CPU": 5.0}, {"b|DISK": 5.0}]
    matched, weighted = tiered_prefix(hits, ["a", "b", "c"], WEIGHTS)
    assert matched == {"a": 3, "b": 2}  # b's run stops at an unweighted medium
    assert weighted == pytest.approx({"a": 1.0 + 0.8 + 1.0, "b": 0.8 + 1.0})
    # A GPU run beats the same run held in CPU memory; a longer CPU run beats a short GPU one.
    matched, weighted = tiered_prefix([{"a": 1.0, "b|CPU": 1.0}] * 4 + [{"b|CPU": 1.0}] * 2, ["a", "b"],
                                                WEIGHTS)
    assert weighted["a"] == pytest.approx(4.0) and weighted["b"] == pytest.approx(4.8)
    # Entries stored before not_before do not count, on any tier.
    matched, _ = tiered_prefix([{"a": 1.0, "a|CPU": 9.0}, {"a": 1.0}], ["a"], WEIGHTS, not_before=5.0)
    assert matched == {"a": 1}


holders = st.dictionaries(st.sampled_from(["a", "b", "c", "a|CPU", "b|CPU", "c|STORAGE", "b|DISK"]),
                          st.floats(0, 10), max_size=5)


@given(st.lists(holders, max_size=12), st.floats(0, 10))
def test_gpu_only_weights_give_the_plain_run(hits, not_before):
    gpu_only = [{p: at for p, at in h.items() if "|" not in p} for h in hits]
    matched, weighted = tiered_prefix(gpu_only, ["a", "b", "c"], {"GPU": 1.0}, not_before)
    assert matched == reference.matched_prefix(gpu_only, ["a", "b", "c"], not_before)
    assert weighted == {p: float(n) for p, n in matched.items()}
    # Tiers weighted 0 are no presence at all.
    assert tiered_prefix(hits, ["a", "b", "c"], {"GPU": 1.0, "CPU": 0.0}, not_before)[0] == matched


@given(st.lists(holders, max_size=12))
def test_a_tier_only_adds_and_counts_less_than_the_gpu(hits):
    gpu_matched, gpu_weighted = tiered_prefix(hits, ["a", "b", "c"], {"GPU": 1.0})
    matched, weighted = tiered_prefix(hits, ["a", "b", "c"], WEIGHTS)
    for pod, n in gpu_matched.items():
        assert matched[pod] >= n and weighted[pod] >= gpu_weighted[pod] - 1e-9
    for pod, n in matched.items():
        assert 0.25 * n - 1e-9 <= weighted[pod] <= n + 1e-9


weights = st.one_of(st.none(), st.fixed_dictionaries({"GPU": st.sampled_from([0.5, 1.0])},
                                                      optional={"CPU": st.sampled_from([0.0, 0.8, 1.0]),
                                                                "STORAGE": st.sampled_from([0.25, 0.7])}))


@given(st.lists(st.tuples(holders, st.booleans()), max_size=12), weights, st.floats(0, 10))
def test_runs_walked_candidate_by_candidate_are_the_runs_of_the_whole_list(blocks, weights, not_before):
    """PrefixRuns (the decision's single walk) answers what the plain statements of a run
    (tests/harness/runs.py) give over the true owners, whichever blocks are still unknown when it starts: each unknown block the
    runs reach is learned from the index (its true owners) and the walk goes on from there."""
    truth = [owners for owners, _ in blocks]
    known: list = [None if unknown else owners for owners, unknown in blocks]
    runs = endpoints.PrefixRuns(["a", "b", "c", "a"], weights, not_before)  # "a" twice is one candidate
    asked = 0
    while runs.walk(known):
        assert known[runs.depth] is None
        known[runs.depth] = truth[runs.depth]  # the index's answer for the block the runs wait on
        asked += 1
    assert asked <= sum(unknown for _, unknown in blocks)
    if not truth:
        return
    if weights is None:
        assert runs.matched == reference.matched_prefix(truth, ["a", "b", "c"], not_before) and runs.weighted is None
    else:
        matched, weighted = reference.tiered_prefix(truth, ["a", "b", "c"], weights, not_before)
        assert runs.matched == matched
        assert runs.weighted == pytest.approx(weighted)


def test_when_the_index_fails_the_runs_still_going_end_at_the_first_unknown_block():
    runs = endpoints.PrefixRuns(["a", "b", "c"], WEIGHTS)
    known = [{"a": 1.0, "b|CPU": 1.0}, {"a": 1.0, "b|CPU": 1.0}, None, {"a": 1.0}]
    assert runs.walk(known) and runs.depth == 2
    runs.stop()
    assert runs.matched == {"a": 2, "b": 2} and runs.weighted == pytest.approx({"a": 2.0, "b": 1.6})


def test_a_block_held_on_several_media_counts_at_the_best_even_when_that_is_not_the_gpu():
    hits = [{"a": 1.0, "a|CPU": 1.0}, {"a": 1.0}]
    for weights in ({"GPU": 0.5, "CPU": 1.0}, WEIGHTS):
        runs = endpoints.PrefixRuns(["a"], weights)
        assert not runs.walk(hits)
        assert runs.weighted == pytest.approx(reference.tiered_prefix(hits, ["a"], weights)[1])
    assert runs.weighted == pytest.approx({"a": 2.0})
    runs = endpoints.PrefixRuns(["a"], {"GPU": 0.5, "CPU": 1.0})
    runs.walk(hits)
    assert runs.weighted == pytest.approx({"a": 1.5})
    nothing = endpoints.PrefixRuns(["a"], {"GPU": 1.0, "CPU": 1.0})
    nothing.walk([{"a|DISK": 1.0}])
    assert nothing.matched == {} == reference.tiered_prefix([{"a|DISK": 1.0}], ["a"], WEIGHTS)[0]


# -- the index, both backends ---------------------------------------------------------


async def test_a_gpu_removal_leaves_the_cpu_copy_and_a_cpu_removal_the_gpu_one(index):
    pod = Pod(index)
    await pod.send(prefix(4), prefix(4, "CPU"))
    assert await pod.holders(4) == [{"pod-a", "pod-a|CPU"}] * 4
    await pod.send(removed_event([102, 103]))  # the GPU evicts; the blocks stay in CPU memory
    assert await pod.holders(4) == [{"pod-a", "pod-a|CPU"}] * 2 + [{"pod-a|CPU"}] * 2
    await pod.send(removed_event([100], "CPU"))
    assert await pod.holders(4) == [{"pod-a"}, {"pod-a", "pod-a|CPU"}, {"pod-a|CPU"}, {"pod-a|CPU"}]
    # Scored against a pod holding all four on its GPU: below it, above nobody.
    hits = [dict.fromkeys(h, 1.0) | {"pod-b": 1.0} for h in await pod.holders(4)]
    matched, weighted = tiered_prefix(hits, ["pod-a", "pod-b", "pod-c"], WEIGHTS)
    assert matched == {"pod-a": 4, "pod-b": 4}
    assert weighted["pod-b"] == 4.0 and weighted["pod-a"] == pytest.approx(1 + 1 + 0.8 + 0.8)


async def test_all_blocks_cleared_clears_the_gpu_and_a_restart_everything(index):
    pod = Pod(index)
    await pod.send(prefix(3), prefix(2, "CPU"), prefix(1, "STORAGE"))
    await pod.send(CLEARED_EVENT)
    assert await pod.holders(3) == [{"pod-a|CPU", "pod-a|STORAGE"}, {"pod-a|CPU"}, set()]
    assert await index.pods() >= {"pod-a|CPU", "pod-a|STORAGE"}
    # The GPU refills after the clear; the tiers were never touched.
    await pod.send(prefix(1))
    assert await pod.holders(1) == [{"pod-a", "pod-a|CPU", "pod-a|STORAGE"}]
    # A new engine process (the sequence starts over): nothing of the old one is true.
    await pod.seq.process(pod.feed, [frame(0, prefix(1, "CPU"))])
    assert await pod.holders(3) == [{"pod-a|CPU"}, set(), set()]
    assert pod.metrics.pod_purges.labels("restart")._value.get() == 1


async def test_the_redis_layout_keeps_kthena_fields_for_the_gpu(redis_url):
    index = RedisIndex.from_config(IndexConfig(backend="redis", redis_url=redis_url, key_prefix=KEY_PREFIX))
    client = aioredis.from_url(redis_url)
    try:
        await client.flushall()
        pod = Pod(index)
        await pod.send(prefix(2), prefix(1, "CPU"))
        key = block_keys(tokens(2), BLOCK, 100)
        first = await client.hgetall(f"{KEY_PREFIX}{MODEL}@{key[0]}")
        second = await client.hgetall(f"{KEY_PREFIX}{MODEL}@{key[1]}")
        assert set(first) == {b"pod-a", b"pod-a|CPU"} and set(second) == {b"pod-a"}
        assert float(first[b"pod-a"]) == float(first[b"pod-a|CPU"]) == 1_700_000_000.0
        # Each endpoint keeps its own record and engine map, so one can go without the other.
        assert await client.smembers("matrix:kv:pod:pod-a|CPU") == {f"{MODEL}@{key[0]}".encode()}
        assert await client.hlen("matrix:kv:engine:pod-a|CPU") == 1
    finally:
        await client.aclose()
        await index.close()


async def test_a_purge_drops_every_tier_and_a_restarted_ingester_reloads_them(index):
    pod = Pod(index)
    await pod.send(prefix(2), prefix(2, "CPU"))
    # A new ingester over the same index: the tier's engine map comes back, so its removals apply.
    again = Pod(index)
    await again.seq.load(again.feed)
    assert set(again.feed.tiers) == {"CPU"}
    await again.seq.process(again.feed, [frame(5, removed_event([101], "CPU"))])
    assert await again.holders(2) == [{"pod-a", "pod-a|CPU"}, {"pod-a"}]
    assert await again.seq.purge("pod-a", "test")
    assert await again.holders(2) == [set(), set()]
    assert not {p for p in await index.pods() if endpoints.belongs_to(p, "pod-a")}


async def test_an_offloaded_chunk_named_by_its_last_block_is_expanded_from_the_gpu(index):
    pod = Pod(index, make_config(chunk=2))
    await pod.send(prefix(4))
    await pod.send(placeholder_event(101), placeholder_event(103))  # chunks [0, 1] and [2, 3]
    await pod.send(removed_event([100, 101, 102, 103]))
    assert await pod.holders(4) == [{"pod-a|CPU"}] * 4
    await pod.send(removed_event([103], "CPU"))  # the chunk goes as a whole
    assert await pod.holders(4) == [{"pod-a|CPU"}] * 2 + [set()] * 2
    # A chunk whose blocks the GPU never announced is counted and skipped.
    await pod.send(placeholder_event(999))
    assert pod.metrics.events_rejected.labels("unknown_chunk")._value.get() == 1


async def test_repeated_announcements_of_a_tier_block_are_counted(index):
    # vLLM re-announces blocks shared by overlapping chunks, and fans each chunk's eviction
    # out to them: the block is gone with the last removal only.
    pod = Pod(index)
    await pod.send(prefix(2, "CPU"), prefix(1, "CPU"))
    await pod.send(removed_event([100], "CPU"))
    assert await pod.holders(2) == [{"pod-a|CPU"}, {"pod-a|CPU"}]
    await pod.send(removed_event([100, 101], "CPU"))
    assert await pod.holders(2) == [set(), set()]


async def test_a_tier_block_chains_from_a_parent_only_the_gpu_announced(index):
    # Router blocks of two engine blocks; the CPU holds only the second router block: its key
    # chains from the first, which only the GPU's events describe.
    pod = Pod(index, router=2 * BLOCK)
    await pod.send(prefix(4))
    await pod.send(stored_event([102, 103], 101, range(8, 16), BLOCK, medium="CPU"))
    assert await pod.holders(2) == [{"pod-a"}, {"pod-a", "pod-a|CPU"}]
    # Half a router block in the CPU is no presence there.
    await pod.send(removed_event([102], "CPU"))
    assert await pod.holders(2) == [{"pod-a"}, {"pod-a"}]
    await pod.send(block(3, "CPU"))
    assert await pod.holders(2) == [{"pod-a"}, {"pod-a"}]


# -- property: the index is what the events say, per medium ---------------------------

MEDIA = ["GPU", "CPU"]
N = 5
ops = st.lists(st.one_of(
    st.tuples(st.just("store"), st.sampled_from(MEDIA), st.integers(1, N)),
    st.tuples(st.just("remove"), st.sampled_from(MEDIA), st.integers(0, N - 1)),
    st.tuples(st.just("clear"), st.just("GPU"), st.just(0)),
    st.tuples(st.just("purge"), st.just(""), st.just(0)),
), max_size=25)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_presence_per_medium_follows_any_run_of_events(run):
    async def check():
        pod = Pod(MemoryIndex())
        gpu: set[int] = set()
        cpu: dict[int, int] = {}  # announcements not yet removed
        for op, medium, n in run:
            if op == "store":
                await pod.send(prefix(n, medium))
                for i in range(n):
                    if medium == "GPU":
                        gpu.add(i)
                    else:
                        cpu[i] = cpu.get(i, 0) + 1
            elif op == "remove":
                await pod.send(removed_event([100 + n], medium))
                if medium == "GPU":
                    gpu.discard(n)
                elif cpu.get(n):
                    cpu[n] -= 1
            elif op == "clear":
                await pod.send(CLEARED_EVENT)
                gpu.clear()
            else:
                await pod.seq.purge("pod-a", "test")
                gpu.clear()
                cpu.clear()
            expected = [{"pod-a"} if i in gpu else set() for i in range(N)]
            for i in range(N):
                if cpu.get(i):
                    expected[i].add("pod-a|CPU")
            assert await pod.holders(N) == expected, (op, medium, n)

    asyncio.run(check())


def test_events_name_their_medium_and_placeholders_decode_off_the_gpu_only():
    from extproc.events.decode import BlockStored, RejectedEvent, decode_payload

    def one(event: dict):
        return decode_payload(_encode([1.0, [event], None])).events[0]

    cpu = one(stored_event([1], None, range(4), BLOCK, medium="cpu"))
    assert isinstance(cpu, BlockStored) and cpu.medium == "CPU" and not cpu.placeholder
    gpu = one({k: v for k, v in stored_event([1], None, range(4), BLOCK).items() if k != "medium"})
    assert gpu.medium is None  # older releases: the GPU
    chunk = one(placeholder_event(7))
    assert isinstance(chunk, BlockStored) and chunk.placeholder and chunk.block_hashes == [7]
    assert isinstance(one(placeholder_event(7, medium="GPU")), RejectedEvent)  # the GPU always sends tokens
    bad = one(stored_event([1], None, range(4), BLOCK, medium="C|PU"))
    assert isinstance(bad, RejectedEvent) and bad.reason == "medium"


# -- data-parallel ranks ----------------------------------------------------------------


def test_a_pod_with_ranks_is_a_candidate_and_a_feed_per_rank():
    from extproc.events.ingest import feeds_of
    from extproc.pods import PodPool

    conf = config_mod.from_dict({
        "models": [{"name": MODEL}],
        "pods": [{"id": "pod-a", "address": "10.0.0.1:8000", "kvEvents": "tcp://10.0.0.1:5557",
                  "kvReplay": "tcp://10.0.0.1:5600", "dataParallelSize": 2},
                 {"id": "pod-b", "address": "10.0.0.2:8000", "kvEvents": "tcp://10.0.0.2:5557"}],
    })
    pool = PodPool(conf.pods)
    assert [(p.id, p.address, p.rank) for p in pool.all()] == [
        ("pod-a#0", "10.0.0.1:8000", 0), ("pod-a#1", "10.0.0.1:8000", 1), ("pod-b", "10.0.0.2:8000", None)]
    rank1 = pool.get("pod-a#1")
    rank1.in_flight = 3
    pool.update(conf.pods)
    assert pool.get("pod-a#1") is rank1 and rank1.in_flight == 3  # a reload keeps each rank's state
    feeds = {c: (events, replay, rank) for c, (_, events, replay, rank) in feeds_of(conf).items()}
    assert feeds == {"pod-a#0": ("tcp://10.0.0.1:5557", "tcp://10.0.0.1:5600", 0),
                     "pod-a#1": ("tcp://10.0.0.1:5558", "tcp://10.0.0.1:5601", 1),
                     "pod-b": ("tcp://10.0.0.2:5557", "", None)}


async def test_a_rank_feed_takes_its_own_rank_only():
    conf = config_mod.from_dict({
        "blockSizeToHash": BLOCK, "ingest": {"engineBlockSize": BLOCK}, "models": [{"name": MODEL}],
        "pods": [{"id": "pod-a", "address": "10.0.0.1:8000", "kvEvents": "tcp://10.0.0.1:5557", "dataParallelSize": 2}],
    })
    index = MemoryIndex()
    metrics = Metrics()
    seq = Sequencer(index, conf, metrics, None)
    feed = seq.new_feed("pod-a#1", MODEL, "tcp://10.0.0.1:5558", rank=1)

    def ranked(n: int, rank: int | None, *events: dict) -> list[bytes]:
        return [b"kv-events", n.to_bytes(8, "big"), _encode([1_700_000_000.0, list(events), rank])]

    await seq.process(feed, [ranked(0, 1, prefix(1)), ranked(1, None, prefix(2, "CPU"))])
    await seq.process(feed, [ranked(2, 0, prefix(3))])  # rank 0's events on rank 1's port: refused
    keys = block_keys(tokens(3), BLOCK, 100)
    assert [set(h) for h in await index.lookup(MODEL, keys)] == [{"pod-a#1", "pod-a#1|CPU"}, {"pod-a#1|CPU"}, set()]
    assert metrics.events_rejected.labels("rank")._value.get() == 1
    assert await seq.purge("pod-a#1", "test")
    assert await index.pods() == set()


async def test_the_rank_header_goes_with_the_route_and_a_clients_is_dropped():
    from envoy_data_plane.envoy.service.ext_proc.v3 import ProcessingResponse

    from extproc import responses

    answer = ProcessingResponse.parse(responses.body_route("x-gateway-destination-endpoint", "10.0.0.1:8000,10.0.0.2:8000",
                                                           (("x-data-parallel-rank", "1"),)))
    mutation = answer.request_body.response.header_mutation
    assert {h.header.key: h.header.raw_value for h in mutation.set_headers} == {
        "x-gateway-destination-endpoint": b"10.0.0.1:8000,10.0.0.2:8000", "x-data-parallel-rank": b"1"}
    held = ProcessingResponse.parse(responses.headers_route("x-gateway-destination-endpoint", "10.0.0.1:8000",
                                                            ("x-data-parallel-rank", "x-kv-foo"),
                                                            (("x-data-parallel-rank", "0"),)))
    mutation = held.request_headers.response.header_mutation
    assert mutation.remove_headers == ["x-kv-foo"]  # the rank is set, not removed
    assert {h.header.key: h.header.raw_value for h in mutation.set_headers}["x-data-parallel-rank"] == b"0"


# -- hybrid models --------------------------------------------------------------------


def grouped(event: dict, group: int, kind: str | None = None, offset: int = 0) -> dict:
    """The event for KV cache group ``group`` (its own hashes: offset), as hybrid models send them."""
    out = dict(event, group_idx=group, block_hashes=[h + offset for h in event["block_hashes"]])
    if event.get("parent_block_hash") is not None:
        out["parent_block_hash"] = event["parent_block_hash"] + offset
    if kind is not None:
        out["kv_cache_spec_kind"] = kind
    return out


async def test_a_hybrid_models_prefix_is_its_full_attention_groups():
    pod = Pod(MemoryIndex())
    await pod.send(grouped(prefix(3), 0, "sliding_window"), grouped(prefix(3), 1, "full_attention", 1000),
                   grouped(prefix(3), 2, "mamba", 2000), grouped(prefix(3), 3, "full_attention", 3000))
    assert await pod.holders(3) == [{"pod-a"}] * 3
    # The window slides and the mamba states go: removals name the group only; the prefix stays.
    await pod.send(grouped(removed_event([100, 101]), 0), grouped(removed_event([2100, 2102]), 2))
    assert await pod.holders(3) == [{"pod-a"}] * 3
    # A block missing from any full-attention group is no hit (vLLM needs every group).
    await pod.send(grouped(removed_event([3101]), 3))
    assert await pod.holders(3) == [{"pod-a"}, set(), {"pod-a"}]
    # Placeholders of a sliding-window group (vLLM sends no tokens for them) are ignored quietly.
    await pod.send(grouped(placeholder_event(102), 0))
    assert pod.metrics.events_rejected.labels("unknown_chunk")._value.get() == 0
