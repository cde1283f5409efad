"""Scoring: only a run of blocks from the first counts; ties and zeros go by load."""

import pytest

from extproc import scoring
from extproc.config import ConfigError, PodConfig, ScoringConfig, from_dict
from extproc.endpoints import PrefixRuns
from extproc.pods import PodPool
from extproc.requests import RoutingRequest
from extproc.scoring import Context

REQUEST = RoutingRequest(model="m", kind="completion", prompt="x")


def pool(*ids):
    return PodPool([PodConfig(id=i, address=f"10.0.0.{n + 1}:8000") for n, i in enumerate(ids)])


def choose(profile, pods, matched, total):
    return profile.decide(Context(REQUEST, matched, total), pods)


def matched_prefix(hits, pod_ids, not_before=0.0):
    """The decision's GPU runs over owners that are all known."""
    runs = PrefixRuns(pod_ids, None, not_before)
    assert not runs.walk(hits)
    return runs.matched


@pytest.fixture()
def profile():
    """The seed's policy: the longest cached prefix wins, load breaks ties."""
    return scoring.build(from_dict({"scoring": {"scorers": [{"type": "prefix"}]}}).scoring)


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


def test_score_is_percent_of_prompt_blocks(profile):
    p = pool("a", "b")
    assert choose(profile, p.all(), {"a": 3, "b": 1}, 4).score == 75.0
    assert choose(profile, p.all(), {}, 0).score == 0.0


def test_longest_prefix_wins_and_raw_scores_are_kept(profile):
    p = pool("a", "b", "c")
    d = choose(profile, p.all(), {"a": 1, "b": 3}, 4)
    assert (d.pod.id, d.score, d.matched_blocks, d.by_cache) == ("b", 75.0, 3, True)
    assert d.raw == {"prefix": {"a": 1.0, "b": 3.0, "c": 0.0}}


def test_the_other_candidates_come_best_first_for_retries(profile):
    p = pool("a", "b", "c", "d")
    p.get("d").in_flight = 2
    d = choose(profile, p.all(), {"a": 1, "b": 3, "c": 2}, 4)
    assert d.pod.id == "b"
    assert [pod.id for pod in d.alternates] == ["c", "a", "d"]


def test_ties_go_to_the_pod_with_fewer_requests_in_flight(profile):
    p = pool("a", "b", "c")
    p.get("a").in_flight = 3
    d = choose(profile, p.all(), {"a": 2, "b": 2}, 4)
    assert d.pod.id == "b"


def test_no_match_spreads_by_load_then_round_robin(profile):
    p = pool("a", "b", "c")
    picked = [choose(profile, p.all(), {}, 4).pod.id for _ in range(6)]
    assert sorted(picked) == ["a", "a", "b", "b", "c", "c"]
    p.get("c").in_flight = 0
    p.get("a").in_flight = 1
    p.get("b").in_flight = 1
    assert {choose(profile, p.all(), {}, 4).pod.id for _ in range(4)} == {"c"}


def test_unhealthy_pods_are_filtered_out_before_scoring(profile):
    p = pool("a", "b")
    p.get("b").healthy = False
    assert [pod.id for pod in profile.filter(REQUEST, p.all())] == ["a"]


def test_a_scorer_is_a_class_plus_a_config_entry(monkeypatch):
    """Adding a policy: a class with name and score(), registered under the type the config names."""

    class Alphabetical:
        name = "alphabetical"

        def score(self, context, pods):
            values = {pod.id: 1.0 if pod.id == min(q.id for q in pods) else 0.0 for pod in pods}
            return scoring.Scores(values, values)

    monkeypatch.setitem(scoring.SCORERS, "alphabetical", lambda config: Alphabetical())
    config = from_dict({"scoring": {"scorers": [{"type": "prefix", "weight": 1}, {"type": "alphabetical", "weight": 2}]}})
    profile = scoring.build(config.scoring)
    d = choose(profile, pool("b", "a").all(), {"b": 4}, 4)
    assert d.pod.id == "a" and not d.by_cache  # 2 x 1.0 beats 1 x 1.0
    assert set(d.raw) == {"prefix", "alphabetical"}


def test_an_unknown_scorer_or_picker_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"unknown scorer type 'nope'.*scorers\[1\]"):
        scoring.build(from_dict({"scoring": {"scorers": [{"type": "prefix"}, {"type": "nope"}]}}).scoring)
    with pytest.raises(ConfigError, match="unknown picker 'best'"):
        scoring.build(from_dict({"scoring": {"picker": "best"}}).scoring)


async def test_a_pod_removed_while_a_decision_is_in_flight_is_not_chosen():
    import asyncio

    from extproc.indexer import PrefixMatch
    from extproc.metrics import Metrics
    from extproc.routing import Router

    p = pool("a", "b")

    class SlowIndexer:
        block_size = 16

        def routed(self, *args):
            pass

        async def get_pod_scores(self, request, pod_ids):
            await asyncio.sleep(0.05)
            return PrefixMatch({"b": 4}, 4)  # b holds the whole prompt...

    router = Router(p, SlowIndexer(), scoring.build(ScoringConfig()), Metrics(), decision_timeout=5)
    pending = asyncio.ensure_future(router.route(RoutingRequest(model="m", kind="completion", prompt="x")))
    await asyncio.sleep(0.01)
    p.update([PodConfig(id="a", address="10.0.0.1:8000")])  # ...but is removed meanwhile
    decision = await pending
    assert decision.pod.id == "a"


async def test_a_prompt_over_max_prompt_tokens_is_routed_by_load(tokenizer_dir):
    from extproc.index.memory import MemoryIndex
    from extproc.indexer import Indexer
    from extproc.metrics import Metrics
    from extproc.routing import Router
    from extproc.tokenization import TokenizerManager

    tokenizers = TokenizerManager({"m": tokenizer_dir})
    metrics = Metrics()
    router = Router(pool("a", "b"), Indexer(tokenizers, MemoryIndex(), block_size=4, max_blocks=8, scheme="chained",
                                             max_prompt_tokens=10), scoring.build(ScoringConfig()), metrics, decision_timeout=10)
    try:
        decision = await router.route(RoutingRequest(model="m", kind="completion", prompt="word " * 50))
        by_ids = await router.route(RoutingRequest(model="m", kind="completion", token_ids=list(range(11))))
    finally:
        tokenizers.close()
    assert decision is not None and not decision.by_cache and by_ids is not None
    assert metrics.fallbacks.labels("prompt_too_long")._value.get() == 2
