"""Scoring: only a run of blocks from the first counts; ties and zeros go by load."""

from extproc.config import PodConfig
from extproc.pods import PodPool
from extproc.scoring import choose, matched_prefix


def pool(*ids):
    return PodPool([PodConfig(id=i, address=f"10.0.0.{n + 1}:8000") for n, i in enumerate(ids)])


def test_matched_prefix_counts_consecutive_blocks_from_the_first():
    hits = [{"a": 1.0, "b": 1.0}, {"a": 1.0}, {"a": 1.0, "b": 1.0}, {"b": 1.0}]
    assert matched_prefix(hits, ["a", "b", "c"]) == {"a": 3, "b": 1}


def test_a_pod_missing_the_first_block_scores_nothing():
    hits = [{"a": 1.0}, {"a": 1.0, "b": 1.0}, {"b": 1.0}]
    assert matched_prefix(hits, ["a", "b"]) == {"a": 2}


def test_only_candidate_pods_are_scored():
    assert matched_prefix([{"a": 1.0, "x": 1.0}], ["a"]) == {"a": 1}


def test_entries_older_than_not_before_do_not_count():
    hits = [{"a": 100.0, "b": 5.0}, {"a": 100.0, "b": 100.0}]
    assert matched_prefix(hits, ["a", "b"], not_before=50.0) == {"a": 2}


def test_score_is_percent_of_prompt_blocks():
    p = pool("a", "b")
    assert choose(p.all(), {"a": 3, "b": 1}, 4, p).score == 75.0
    assert choose(p.all(), {}, 0, p).score == 0.0


def test_longest_prefix_wins():
    p = pool("a", "b", "c")
    d = choose(p.all(), {"a": 1, "b": 3}, 4, p)
    assert (d.pod.id, d.score, d.matched_blocks, d.by_cache) == ("b", 75.0, 3, True)


def test_ties_go_to_the_pod_with_fewer_requests_in_flight():
    p = pool("a", "b", "c")
    p.get("a").in_flight = 3
    d = choose(p.all(), {"a": 2, "b": 2}, 4, p)
    assert d.pod.id == "b"


def test_no_match_spreads_by_load_then_round_robin():
    p = pool("a", "b", "c")
    picked = [choose(p.all(), {}, 4, p).pod.id for _ in range(6)]
    assert sorted(picked) == ["a", "a", "b", "b", "c", "c"]
    p.get("c").in_flight = 0
    p.get("a").in_flight = 1
    p.get("b").in_flight = 1
    assert {choose(p.all(), {}, 4, p).pod.id for _ in range(4)} == {"c"}


async def test_a_pod_removed_while_a_decision_is_in_flight_is_not_chosen():
    import asyncio

    from extproc.indexer import PrefixMatch
    from extproc.metrics import Metrics
    from extproc.requests import RoutingRequest
    from extproc.routing import Router

    p = pool("a", "b")

    class SlowIndexer:
        async def get_pod_scores(self, request, pod_ids):
            await asyncio.sleep(0.05)
            return PrefixMatch({"b": 4}, 4)  # b holds the whole prompt...

    router = Router(p, SlowIndexer(), Metrics(), decision_timeout=5)
    pending = asyncio.ensure_future(router.route(RoutingRequest(model="m", kind="completion", prompt="x")))
    await asyncio.sleep(0.01)
    p.update([PodConfig(id="a", address="10.0.0.1:8000")])  # ...but is removed meanwhile
    decision = await pending
    assert decision.pod.id == "a"


async def test_a_prompt_over_max_prompt_tokens_is_routed_by_load(tokenizer_dir):
    from extproc.index.memory import MemoryIndex
    from extproc.indexer import Indexer
    from extproc.metrics import Metrics
    from extproc.requests import RoutingRequest
    from extproc.routing import Router
    from extproc.tokenization import TokenizerManager

    tokenizers = TokenizerManager({"m": tokenizer_dir})
    metrics = Metrics()
    router = Router(pool("a", "b"), Indexer(tokenizers, MemoryIndex(), block_size=4, max_blocks=8, scheme="chained",
                                             max_prompt_tokens=10), metrics, decision_timeout=10)
    try:
        decision = await router.route(RoutingRequest(model="m", kind="completion", prompt="word " * 50))
        by_ids = await router.route(RoutingRequest(model="m", kind="completion", token_ids=list(range(11))))
    finally:
        tokenizers.close()
    assert decision is not None and not decision.by_cache and by_ids is not None
    assert metrics.fallbacks.labels("prompt_too_long")._value.get() == 2
