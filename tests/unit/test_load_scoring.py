"""Load-aware scoring: engine readings, the time-to-first-token cost, the load scorers, the
weighted-random picker and speculative owners."""

from __future__ import annotations

import asyncio
import collections
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc import scoring
from extproc.config import PodConfig, from_dict
from extproc.index import Invalidation
from extproc.index.memory import MemoryIndex
from extproc.indexer import Indexer
from extproc.load import EngineLoad, LoadScraper, parse_metrics, parse_ranks, record
from extproc.metrics import Metrics
from extproc.pods import PodPool, load_of
from extproc.prefixcache.speculation import Speculation
from extproc.requests import RoutingRequest
from extproc.routing import Router
from extproc.scoring import Context
from extproc.tokenization import TokenizerManager

REQUEST = RoutingRequest(model="m", kind="completion", prompt="x")
VLLM_METRICS = """# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.42
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 123.0
"""


def pool(*ids):
    return PodPool([PodConfig(id=i, address=f"10.0.0.{n + 1}:8000") for n, i in enumerate(ids)])


def profile(**scoring_config):
    return scoring.build(from_dict({"scoring": scoring_config}).scoring)


def engine(pod, waiting=0.0, running=0.0, kv=0.0):
    record(pod, EngineLoad(waiting, running, kv, time.monotonic()))


def serving_one_at_a_time(*pods):
    """Engines that have shown requests waiting beside a single one running: they may serve one
    at a time, decode included, and the ttft scorer counts each open request's decode there."""
    for pod in pods:
        engine(pod, waiting=1, running=1)
    assert all(pod.serial for pod in pods)


def decide(prof, pods, matched, *, total_blocks=8, block=16, prompt_tokens=128, now=None):
    context = Context(REQUEST, matched, total_blocks, block, prompt_tokens)
    if now is not None:
        context.now = now
    return prof.decide(context, pods)


def test_vllm_metrics_are_summed_over_engines():
    load = parse_metrics(VLLM_METRICS, 5.0)
    assert (load.waiting, load.running, load.kv_usage, load.at) == (4.0, 2.0, 0.42, 5.0)
    assert parse_metrics("# nothing of vLLM\nfoo 1\n", 1.0) is None
    rank1 = parse_metrics(VLLM_METRICS, 5.0, engine=1)  # a data-parallel rank reads its own series
    assert (rank1.waiting, rank1.running) == (1.0, 0.0)


def test_the_default_profile_is_the_time_to_first_token_scorer():
    assert [type(s).__name__ for s, _ in profile().scorers] == ["TtftScorer"]


def test_an_idle_fleet_goes_to_the_pod_holding_the_prefix():
    p = pool("a", "b", "c")
    for pod in p.all():
        engine(pod)
    d = decide(profile(), p.all(), {"b": 8, "c": 2})
    assert d.pod.id == "b" and d.by_cache
    assert d.raw["ttft"] == {"a": 128.0, "b": 0.0, "c": 96.0}


def test_a_busy_cache_holder_loses_to_a_pod_that_starts_sooner():
    p = pool("a", "b")
    engine(p.get("a"), waiting=3, running=1)  # four requests ahead: 4 x 1536 token-equivalents
    engine(p.get("b"))
    assert decide(profile(), p.all(), {"a": 8}).pod.id == "b"
    engine(p.get("a"), waiting=0, running=0)
    assert decide(profile(), p.all(), {"a": 8}).pod.id == "a"


def test_an_engine_reporting_two_requests_running_at_once_batches():
    p = pool("a", "b")
    engine(p.get("a"), waiting=3, running=1)
    assert not p.get("a").batching and p.get("a").serial, "one at a time: it may serve serially"
    engine(p.get("a"), waiting=0, running=2)
    engine(p.get("a"), waiting=0, running=0)
    assert p.get("a").batching, "seen once is enough: an engine does not stop batching"
    assert not p.get("b").batching


def test_engines_are_taken_to_batch_until_one_shows_a_queue_beside_a_single_running_request():
    """vLLM batches, and a fleet at light load may never show two running at once: until an
    engine shows it serves one at a time, a request of ours decoding holds no one back."""
    now = time.monotonic()
    p = pool("a", "b", "c")
    a, b, c = p.get("a"), p.get("b"), p.get("c")
    for pod in p.all():
        engine(pod)
    a.opened(0, now)  # one of ours on a, its prefill done (nothing uncached): decoding
    record(a, EngineLoad(0.0, 1.0, 0.0, time.monotonic()), ours=1)
    assert not any(pod.batching or pod.serial for pod in p.all())
    d = decide(profile(), p.all(), {"a": 8}, now=now)
    assert d.raw["ttft"]["a"] == 0.0 and d.pod.id == "a", "taken to batch: the decode costs no one a wait"
    engine(b, waiting=2, running=1)  # a queue beside one running: b may serve serially
    engine(b)
    assert b.serial and not b.batching
    d = decide(profile(), p.all(), {"a": 8}, now=now)
    assert d.raw["ttft"]["a"] > 1536, "one engine of the release serves serially: a's decode counts"
    engine(c, running=2)  # another was seen batching: that settles it
    engine(c)
    d = decide(profile(), p.all(), {"a": 8}, now=now)
    assert d.raw["ttft"]["a"] == 0.0 and d.pod.id == "a"


def test_with_engines_that_batch_a_decoding_request_holds_no_one_back():
    """A serial engine makes a new request wait for each open request's decode; one that batches
    runs the decodes beside the new prefill, so only prefills and others' queued requests count."""
    now = time.monotonic()
    for batching in (False, True):
        p = pool("a", "b")
        a, b = p.get("a"), p.get("b")
        if not batching:
            serving_one_at_a_time(a, b)
        engine(a, running=1)
        engine(b, running=2 if batching else 1)
        for pod in (a, b):  # one request of ours each, its prefill done (nothing uncached)
            pod.opened(0, now)
            record(pod, EngineLoad(0.0, 2.0 if batching else 1.0, 0.0, time.monotonic()), ours=1)
        d = decide(profile(), p.all(), {"a": 8}, now=now)
        if batching:
            assert d.raw["ttft"]["a"] == 0.0 and d.pod.id == "a", "the decodes cost no one a wait"
        else:
            assert d.raw["ttft"]["a"] > 1536, "a's decode (requestTokens) and one request ahead"


def test_the_other_replicas_share_of_the_queue_still_counts_where_engines_batch():
    p = pool("a", "b")
    a, b = p.get("a"), p.get("b")
    now = time.monotonic()
    a.opened(0, now)
    record(a, EngineLoad(4.0, 4.0, 0.0, time.monotonic()), ours=2)  # 8 held, 2 ours: 3 of the 4 waiting are others'
    engine(b, running=2)
    assert a.waiting_others() == 3.0
    d = decide(profile(queuedRequestTokens=100), p.all(), {"a": 8}, now=now)
    assert d.raw["ttft"]["a"] == 300.0, "a holds the prompt: its cost is the 3 others' requests queued ahead"


def test_one_engine_seen_batching_is_enough_for_every_candidate():
    """A fleet runs one engine release: a pod not yet seen with two running is scored as batching
    too, or it would look busier than the pods that have shown it and draw less than its share."""
    now = time.monotonic()
    p = pool("a", "b")
    a, b = p.get("a"), p.get("b")
    a.opened(0, now)
    record(a, EngineLoad(0.0, 1.0, 0.0, time.monotonic()), ours=1)  # one of ours, decoding
    engine(b, running=2)
    assert not a.batching and b.batching
    d = decide(profile(), p.all(), {"a": 8}, now=now)
    assert d.raw["ttft"]["a"] == 0.0 and d.pod.id == "a", "a's decode holds no one back"


def test_where_engines_batch_a_prefix_queued_on_the_one_pod_holding_it_spreads():
    """L is the median pod's queue there: one pod's pile (a hot tenant's prefills queued where
    its prompt is cached) does not make the cache worth more everywhere. With the mean (8/3),
    b's cold prefill would cost 2048 x (1 + 8/3) and the prompt would stay on a."""
    p = pool("a", "b", "c")
    a, b, c = p.get("a"), p.get("b"), p.get("c")
    record(a, EngineLoad(6.0, 2.0, 0.0, time.monotonic()), ours=0)  # six others' requests queued
    engine(b, running=2)  # seen batching once
    engine(b)
    engine(c)
    d = decide(profile(), p.all(), {"a": 128}, total_blocks=128, prompt_tokens=2048)
    assert d.raw["ttft"]["a"] == 6 * 512, "a holds it all: its cost is the queue ahead"
    assert d.raw["ttft"]["b"] == 2048, "b computes it all, and the median pod queues nothing"
    assert d.pod.id in ("b", "c")


def test_where_engines_batch_of_two_candidates_the_less_busy_one_sets_l():
    """Of two, the median would be their mean: a holds the prompt with eight requests ahead,
    b is idle. L is b's queue (none), so b's cold prefill costs only itself."""
    p = pool("a", "b")
    a, b = p.get("a"), p.get("b")
    record(a, EngineLoad(6.0, 2.0, 0.0, time.monotonic()), ours=0)
    engine(b, running=2)
    engine(b)
    d = decide(profile(), p.all(), {"a": 128}, total_blocks=128, prompt_tokens=2048)
    assert d.raw["ttft"]["b"] == 2048 and d.pod.id == "b"


def test_without_a_fresh_reading_our_open_requests_decodes_count_even_where_engines_batch():
    """With no engine reading, our open requests are all that shows a pod's load: counting
    only their prefill, a cached prefix would draw every request, however many are open."""
    now = time.monotonic()
    p = pool("a", "b")
    a, b = p.get("a"), p.get("b")
    engine(a, running=2)
    engine(b)
    for _ in range(4):
        a.opened(0, now)
    a.engine = b.engine = None  # stale: forgotten (LoadScraper.expire)
    assert a.batching
    d = decide(profile(), p.all(), {"a": 8}, now=now)
    assert d.raw["ttft"]["a"] >= 4 * 1536, "four requests of ours decoding, each counted"
    assert d.pod.id == "b"


def test_the_queue_of_other_replicas_is_never_negative_nor_made_up():
    p = pool("a")
    a = p.get("a")
    assert a.waiting_others() == 0.0, "no reading"
    record(a, EngineLoad(0.0, 3.0, 0.0, time.monotonic()), ours=1)
    assert a.waiting_others() == 0.0, "nothing waiting"
    record(a, EngineLoad(2.0, 1.0, 0.0, time.monotonic()), ours=5)  # more of ours than it held
    assert a.waiting_others() == 0.0


def test_where_engines_batch_a_pod_without_a_reading_is_not_idle():
    p = pool("a", "b", "c")
    a, b, c = p.get("a"), p.get("b"), p.get("c")
    record(a, EngineLoad(6.0, 2.0, 0.0, time.monotonic()), ours=0)  # six others' requests queued
    record(b, EngineLoad(2.0, 2.0, 0.0, time.monotonic()), ours=0)  # two
    d = decide(profile(queuedRequestTokens=100), p.all(), {"a": 8, "b": 8, "c": 8})
    assert c.engine is None
    assert d.raw["ttft"]["c"] == 400.0, "the mean of the others' queues (4 x 100), not an empty one"
    assert d.pod.id == "b"


def test_load_is_our_open_requests_now_plus_the_other_replicas_share_of_the_reading():
    p = pool("a", "b")
    a = p.get("a")
    a.in_flight = 1
    engine(a, waiting=2, running=2)  # four at the engine, one of them ours: three are others'
    assert load_of(a) == 4
    a.in_flight = 0  # ours ended since
    assert load_of(a) == 3
    engine(a)
    a.in_flight = 5  # sent since the reading, not yet counted by the engine
    assert load_of(a) == 5


def test_the_busier_the_fleet_the_more_a_cached_prefix_is_worth():
    """Recomputed tokens delay whoever queues behind them: they weigh 1 + the mean queue."""
    p = pool("a", "b")
    serving_one_at_a_time(*p.all())
    engine(p.get("a"), waiting=1)  # holds the whole prompt, one request ahead
    engine(p.get("b"))  # holds nothing, idle
    d = decide(profile(queuedRequestTokens=150), p.all(), {"a": 8})
    assert d.raw["ttft"] == {"a": 150.0, "b": 1.5 * 128}
    assert d.pod.id == "a", "150 < 1.5 x 128, though b alone would start its 128 tokens sooner"


def test_a_cached_pod_does_not_win_by_making_this_request_start_much_later():
    """The tail guard: a holds the whole 2048-token prompt with 6 requests ahead (3072 to
    wait); b, c and d hold nothing and are idle (2048 to compute). Weighed for the fleet
    (L = 1.5), a saves the others 1.5 x 2048; but this request would start 1.5x later there,
    past 1.25x + 256, so an idle pod takes it. Without the guard, a would."""
    p = pool("a", "b", "c", "d")
    serving_one_at_a_time(*p.all())
    engine(p.get("a"), waiting=6)
    for pod in ("b", "c", "d"):
        engine(p.get(pod))
    kwargs = dict(total_blocks=128, prompt_tokens=2048)
    d = decide(profile(), p.all(), {"a": 128}, **kwargs)
    assert d.raw["ttft"] == {"a": 6 * 512, "b": 2048 + 1.5 * 2048, "c": 2048 + 1.5 * 2048, "d": 2048 + 1.5 * 2048}
    assert d.pod.id != "a"
    assert decide(profile(maxStartRatio=0), p.all(), {"a": 128}, **kwargs).pod.id == "a"
    assert decide(profile(maxStartRatio=1.5), p.all(), {"a": 128}, **kwargs).pod.id == "a", "3072 <= 1.5 x 2048"


def test_pods_past_the_guard_still_rank_by_cost_in_the_retry_list():
    """The guard keeps a pod from being chosen, not from being the best retry: a holds the
    whole prompt and is idle; c holds a quarter of it, b nothing. Both start past a's 1.25x +
    256, so both rank below a, and c (less to compute) before b, whatever the pod order."""
    for order in (("a", "b", "c"), ("c", "b", "a"), ("b", "a", "c")):
        p = pool(*order)
        for pod in order:
            engine(p.get(pod))
        d = decide(profile(), p.all(), {"a": 128, "c": 32}, total_blocks=128, prompt_tokens=2048)
        assert [d.pod.id] + [x.id for x in d.alternates] == ["a", "c", "b"]
        assert d.raw["ttft"]["c"] < d.raw["ttft"]["b"], "the costs that order them"


def test_the_tail_guard_gives_way_once_the_fleet_has_a_deep_queue():
    """With 2 or more requests ahead per pod on average, everyone waits anyway: recomputing the
    prompt elsewhere would cost the requests queued behind it more than this one's extra wait.
    a holds the prompt with 8 ahead (start 4096), b nothing with 1 ahead (start 2560): a is
    past 1.25 x 2560 + 256, but L = 4.5."""
    p = pool("a", "b")
    serving_one_at_a_time(*p.all())
    engine(p.get("a"), waiting=8)
    engine(p.get("b"), waiting=1)
    kwargs = dict(total_blocks=128, prompt_tokens=2048)
    assert decide(profile(), p.all(), {"a": 128}, **kwargs).pod.id == "a"
    assert decide(profile(guardBelowQueue=5), p.all(), {"a": 128}, **kwargs).pod.id == "b", "guarded below 5"


def test_requests_sent_since_the_last_reading_count_as_queued():
    p = pool("a", "b")
    serving_one_at_a_time(*p.all())
    engine(p.get("a"))
    engine(p.get("b"))
    p.get("a").in_flight = 2
    assert load_of(p.get("a")) == 2
    # Mean load 1, so b's 128 uncached tokens weigh 2 x 128 = 256 prompt-token equivalents.
    assert decide(profile(queuedRequestTokens=200), p.all(), {"a": 8}).pod.id == "b", "2 x 200 > 256"
    assert decide(profile(queuedRequestTokens=10), p.all(), {"a": 8}).pod.id == "a"


def test_the_prefill_our_open_requests_still_need_counts_ahead():
    """Two pods with one of our requests each: the one whose request had a long prompt to
    compute starts this one later, by those tokens."""
    p = pool("a", "b")
    for pod in p.all():
        engine(pod)
    p.get("a").opened(4000, 0.0)
    p.get("b").opened(100, 0.0)
    d = decide(profile(), p.all(), {}, now=0.0)
    assert d.pod.id == "b"
    assert d.raw["ttft"]["a"] - d.raw["ttft"]["b"] == 3900
    assert d.uncached_tokens == 128, "the decision says what the chosen pod must compute"


def test_a_pod_whose_request_is_nearly_done_goes_before_one_whose_request_just_began():
    """Both pods run one of our requests of the same size, and ours take 1 s there. The one
    routed 0.9 s ago has a tenth of its work left; the one routed 0.1 s ago, nine tenths."""
    p = pool("a", "b")
    serving_one_at_a_time(*p.all())
    for pod in p.all():
        engine(pod)
        pod.closed(pod.opened(500, 0.0), 1.0)  # a request of ours took 1 s: the pod's lifetime
    p.get("a").opened(500, 9.1)
    p.get("b").opened(500, 9.9)
    d = decide(profile(requestTokens=1500), p.all(), {}, now=10.0)
    assert d.pod.id == "a"
    work = 500 + 1500  # prefill + decode, in prompt tokens
    assert d.raw["ttft"]["b"] - d.raw["ttft"]["a"] == pytest.approx(work * (0.9 - 0.1))
    assert p.get("a").owed(10.0, 1500) == pytest.approx(work * 0.1)
    assert p.get("a").owed(10.2, 1500) == 0.0, "older than a lifetime: done, as far as we can tell"
    assert p.get("a").in_flight == 1, "though its stream is still open (requests ahead still count it)"
    assert p.get("a").ledger.lifetime == pytest.approx(1.0)


def test_requests_the_engine_still_queues_count_whole():
    """An engine serves its queue first come, first served: the requests it reports waiting
    are our newest there, and none of their work is done, however long they have waited."""
    pod = pool("a").get("a")
    pod.closed(pod.opened(0, 0.0), 1.0)  # ours take 1 s here
    oldest, *_ = [pod.opened(500, at) for at in (9.1, 9.5, 9.9)]
    work = 500 + 1500
    assert pod.owed(10.0, 1500) == pytest.approx(work * (0.1 + 0.5 + 0.9)), "no queue reported: all shrink"
    record(pod, EngineLoad(2.0, 1.0, 0.0, 10.0))  # it runs the oldest, holds the two newest
    assert pod.waiting_ours() == 2
    assert pod.owed(10.0, 1500) == pytest.approx(work * 0.1 + 2 * work)
    pod.opened(500, 10.0)
    assert pod.waiting_ours() == 3, "one sent after a reading that showed a queue waits behind it"
    assert pod.owed(10.0, 1500) == pytest.approx(work * 0.1 + 3 * work)
    pod.closed(oldest, 10.0)
    assert pod.waiting_ours() == 2, "the one it ran ended: the next in line (routed at 9.5) runs now"
    life = pod.ledger.lifetime  # the end taught it 0.9 s
    assert pod.owed(10.0, 1500) == pytest.approx(work * (1 - 0.5 / life) + 2 * work)


def test_each_end_lets_the_next_of_ours_in_the_queue_start():
    pod = pool("a").get("a")
    pod.closed(pod.opened(0, 0.0), 1.0)
    oldest, *_ = [pod.opened(500, at) for at in (9.1, 9.5, 9.9)]
    record(pod, EngineLoad(2.0, 1.0, 0.0, 10.0))
    pod.closed(oldest, 10.0)
    assert pod.waiting_ours() == 1, "the one routed at 9.5 runs now; only 9.9 waits"


def test_never_more_of_ours_wait_than_are_open():
    """Sent after a reading and already ended: they wait nowhere, and the one still open, which
    the engine was running, keeps shrinking."""
    pod = pool("a").get("a")
    pod.closed(pod.opened(0, 0.0), 1.0)
    pod.opened(500, 9.5)
    record(pod, EngineLoad(1.0, 3.0, 0.0, 10.0))  # other replicas' request waits, ours runs
    for at in (10.0, 10.01):
        pod.closed(pod.opened(500, at), at + 0.02)
    assert pod.waiting_ours() == 0
    assert pod.owed(10.05, 0) == pytest.approx(pod.ledger.owed(10.05, 0, 0))


def test_queued_requests_older_than_the_lifetime_still_count_whole():
    """A long queue: ours have waited longer than ours used to take. Those the engine still
    queues are owed whole; the one it runs, past the lifetime, counts nothing."""
    pod = pool("a").get("a")
    pod.closed(pod.opened(0, 0.0), 1.0)
    for at in (7.0, 7.5, 8.0):
        pod.opened(500, at)
    record(pod, EngineLoad(2.0, 1.0, 0.0, 10.0))
    assert pod.owed(10.0, 100) == pytest.approx(2 * (500 + 100))
    record(pod, EngineLoad(0.0, 3.0, 0.0, 10.0))
    assert pod.owed(10.0, 100) == 0.0, "no queue: all three are past the lifetime"


def test_only_our_share_of_an_engines_queue_counts_whole():
    """Other replicas send to the same engine: of the 4 it holds in its queue (8 in all, 2 of
    them ours when it was read), our share is 1."""
    pod = pool("a").get("a")
    pod.closed(pod.opened(0, 0.0), 1.0)
    pod.opened(500, 9.5)
    pod.opened(500, 9.9)
    record(pod, EngineLoad(4.0, 4.0, 0.0, 10.0))
    assert pod.waiting_ours() == 1
    assert pod.owed(10.0, 1500) == pytest.approx(2000 * 0.5 + 2000)


def test_a_pod_whose_requests_wait_in_its_queue_is_not_taken_for_nearly_done():
    """Pod a got three of ours 0.8 s ago, and ours take 1 s: shrinking alone says a fifth of
    their work is left, less than the one request pod b began 0.2 s ago. But a's engine says two
    of them have not started: a is the busier, and the request goes to b."""
    p = pool("a", "b")
    for pod in p.all():
        pod.closed(pod.opened(0, 0.0), 1.0)
    a, b = p.get("a"), p.get("b")
    for _ in range(3):
        a.opened(500, 9.2)
    b.opened(500, 9.8)
    record(a, EngineLoad(0.0, 3.0, 0.0, 10.0))
    record(b, EngineLoad(0.0, 1.0, 0.0, 10.0))
    only_ours = profile(requestTokens=1500, queuedRequestTokens=0)  # what our own requests owe, nothing else
    assert decide(only_ours, p.all(), {}, now=10.0).pod.id == "a", "as if all three ran"
    record(a, EngineLoad(2.0, 1.0, 0.0, 10.0))
    assert decide(only_ours, p.all(), {}, now=10.0).pod.id == "b"


def test_without_a_finished_request_a_pod_owes_all_of_its_open_work():
    p = pool("a")
    pod = p.get("a")
    pod.opened(300, 0.0)
    pod.opened(200, 5.0)
    assert pod.ledger.lifetime is None
    assert pod.owed(100.0, 1000) == 300 + 200 + 2 * 1000


def test_what_a_pod_owes_stays_exact_after_a_year_of_uptime():
    """A pod that is never idle for a year: requests that take a millisecond, on a monotonic
    clock a year on, still give the work left to a fraction of a token (the sums are exact
    integers, not floats that grew with the clock)."""
    pod = pool("a").get("a")
    year = 365 * 86400.0
    pod.opened(0, 0.0)  # open all year: the sums are never empty
    pod.closed(pod.opened(0, 0.0), 0.001)
    pod.opened(3000, year + 0.0100)
    pod.opened(5000, year + 0.0104)
    now = year + 0.0106
    expected = (3000 + 1536) * (1 - 0.6) + (5000 + 1536) * (1 - 0.2)
    assert pod.owed(now, 1536) == pytest.approx(expected, abs=0.01)


def test_a_request_closed_twice_counts_once():
    pod = pool("a").get("a")
    entry = pod.opened(700, 0.0)
    pod.closed(entry, 1.0)
    pod.closed(entry, 5.0)
    assert (pod.in_flight, pod.open_tokens, pod.ledger.lifetime) == (0, 0, 1.0)


def test_the_tail_guard_settings_are_checked():
    for bad in ({"maxStartRatio": 0.5}, {"maxStartRatio": float("inf")}, {"maxStartRatio": float("nan")},
                {"guardBelowQueue": float("nan")}, {"startSlackTokens": -1}, {"requestTokens": -1}):
        with pytest.raises(Exception, match="maxStartRatio|guardBelowQueue|startSlackTokens|requestTokens"):
            profile(**bad)
    assert profile(maxStartRatio=0, guardBelowQueue=float("inf")) is not None


def test_a_pods_typical_lifetime_follows_its_requests():
    pod = pool("a").get("a")
    pod.closed(pod.opened(0, 0.0), 2.0)
    assert pod.ledger.lifetime == 2.0, "the first ended request sets it"
    pod.closed(pod.opened(0, 10.0), 11.0)
    assert 1.0 < pod.ledger.lifetime < 2.0, "later ones move it a step at a time"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["open", "close", "owed"]), st.integers(0, 4000),
                          st.floats(0.0, 0.5), st.integers(0, 10)), max_size=60))
def test_what_a_pod_owes_is_the_sum_of_its_open_requests_shrinking_work(steps):
    """Kept in O(1) sums, it equals the sum over open requests of work x (1 - age / lifetime),
    for each not yet found older than the lifetime at an earlier look; ages in whole
    nanoseconds, as the ledger keeps them (exact sums: a lifetime of microseconds shows the
    rounding)."""
    pod = pool("a").get("a")
    now, model, request_tokens = 0.0, [], 700  # model: [entry, tokens, at, expired]
    for action, tokens, step, pick in steps:
        now += step
        if action == "open":
            model.append([pod.opened(tokens, now), tokens, now, False])
        elif action == "close" and model:
            entry = model.pop(pick % len(model))
            pod.closed(entry[0], now)
        else:
            life = pod.ledger.lifetime
            expected = 0.0
            for item in model:
                if life is not None and now - item[2] >= life:
                    item[3] = True
                if not item[3]:
                    work = item[1] + request_tokens
                    age_ns = round(now * 1e9) - round(item[2] * 1e9)
                    expected += work * (1 - age_ns / (life * 1e9)) if life is not None else work
            assert pod.owed(now, request_tokens) == pytest.approx(expected, rel=1e-6, abs=1e-3)
        assert pod.in_flight == len(model)
        assert pod.open_tokens == sum(item[1] for item in model)
    pod.owed(now + 1e9, request_tokens)
    if pod.ledger.lifetime is None:  # nothing ended: nothing expires
        assert pod.ledger.held() == len(model)
    else:
        assert pod.ledger.held() == 0, "ended and expired requests leave the ledger"


def test_equally_loaded_pods_go_to_the_one_chosen_longest_ago():
    """Round-robin's virtue among equals: the pod picked longest ago has done the most since."""
    p = pool("a", "b", "c")
    for pod in p.all():
        engine(pod)
    first = [decide(profile(), p.all(), {}).pod.id for _ in range(3)]
    assert sorted(first) == ["a", "b", "c"]
    assert [decide(profile(), p.all(), {}).pod.id for _ in range(3)] == first
    assert p.least_loaded(p.all()).id == first[0], "load routing (fallbacks) follows the same order"


def test_a_pod_without_a_fresh_reading_is_taken_as_average_not_idle():
    p = pool("a", "b", "c")
    engine(p.get("a"), waiting=10)
    engine(p.get("b"), waiting=0)
    costs = decide(profile(), p.all(), {}).raw["ttft"]
    assert costs["c"] == pytest.approx((costs["a"] + costs["b"]) / 2)


def test_readings_older_than_stale_after_are_forgotten():
    p = pool("a")
    record(p.get("a"), EngineLoad(1, 1, 0.5, time.monotonic() - 10))
    LoadScraper(p, stale_after=2.0).expire(p.all(), time.monotonic())
    assert p.get("a").engine is None


def test_queue_kv_and_in_flight_scorers_follow_their_formulas():
    p = pool("a", "b", "c")
    engine(p.get("a"), waiting=4, kv=0.9)
    engine(p.get("b"), waiting=2, kv=0.5)
    engine(p.get("c"), waiting=0, kv=0.1)
    p.get("a").in_flight, p.get("b").in_flight = 4, 1
    d = decide(profile(scorers=[{"type": "queue", "weight": 2}, {"type": "kvCacheUtilization", "weight": 2},
                                {"type": "inFlight", "weight": 1}, {"type": "prefix", "weight": 3}]),
               p.all(), {"a": 8})
    assert d.raw["queue"] == {"a": 4, "b": 2, "c": 0}
    assert d.raw["kvCacheUtilization"] == {"a": 0.9, "b": 0.5, "c": 0.1}
    # a: 2*0 + 2*0.1 + 1*0 + 3*1 = 3.2; c: 2*1 + 2*0.9 + 1*1 + 0 = 4.8
    assert d.pod.id == "c"


def test_weighted_random_shares_near_equal_pods_in_proportion():
    p = pool("a", "b")
    picker = scoring.WeightedRandomPicker(seed=3)
    counts = collections.Counter(picker.pick(p.all(), {"a": 3.0, "b": 1.0}).id for _ in range(4000))
    assert 0.7 < counts["a"] / 4000 < 0.8
    assert picker.pick(p.all(), {"a": 0.0, "b": 1.0}).id == "b"


def test_speculation_counts_a_routed_pod_as_holder_until_its_ttl_ends():
    spec = Speculation(ttl=0.2)
    spec.routed("m", [1, 2, 3], "pod-a")
    hits = [{}, {"pod-b": 1.0}, None]
    spec.overlay("m", [1, 2, 3], hits)
    assert list(hits[0]) == ["pod-a"] and set(hits[1]) == {"pod-a", "pod-b"}
    assert hits[2] is None, "an unknown block stays unknown: the index must still answer for it"
    time.sleep(0.25)
    hits = [{}, {}, {}]
    spec.overlay("m", [1, 2, 3], hits)
    assert hits == [{}, {}, {}]
    bounded = Speculation(ttl=5, max_blocks=10)
    bounded.routed("m", list(range(50)), "pod-a")
    assert len(bounded) == 10


def test_a_guess_laid_over_the_owner_cache_never_changes_its_shared_dicts():
    spec = Speculation(ttl=5.0)
    spec.routed("m", [1, 2], "pod-a")
    held, other = {"pod-a": 7.0}, {"pod-b": 1.0}
    hits = [held, other]
    spec.overlay("m", [1, 2], hits)
    assert hits[0] is held and held == {"pod-a": 7.0}, "already held: the engine's own time stands"
    assert other == {"pod-b": 1.0}, "the owner cache's dict is shared: a guess goes on a copy"
    assert hits[1].keys() == {"pod-a", "pod-b"} and hits[1]["pod-b"] == 1.0


def test_blocks_nobody_holds_share_one_answer_per_guess():
    spec = Speculation(ttl=5.0)
    spec.routed("m", [1, 2, 3], "pod-a")
    spec.routed("m", [4], "pod-b")
    empty = [{}, {}, {}, {}, {}]
    hits = list(empty)
    spec.overlay("m", [1, 2, 3, 4, 5], hits)
    assert hits[0] is hits[1] is hits[2] and hits[0].keys() == {"pod-a"}, "a new prefix's blocks, routed together"
    assert hits[3].keys() == {"pod-b"} and hits[4] == {}
    assert empty == [{}, {}, {}, {}, {}], "the owner cache's empty answers are never filled in place"


def test_speculation_gives_way_to_the_engines_own_events():
    now = [100.0]
    spec = Speculation(ttl=2.0, clock=lambda: now[0])
    spec.routed("m", [1, 2, 3], "pod-a")
    spec.routed("m", [1], "pod-b")
    spec.apply(Invalidation("pod-a", stored=[("m", 1)], removed=[("m", 2)]))  # confirmed; evicted already
    hits = [{}, {}, {}]
    spec.overlay("m", [1, 2, 3], hits)
    assert hits == [{"pod-b": hits[0]["pod-b"]}, {}, {"pod-a": hits[2]["pod-a"]}]
    now[0] += 0.5
    spec.apply(Invalidation("pod-a", cleared=True))  # AllBlocksCleared: nothing guessed before holds
    hits = [{}, {}, {}]
    spec.overlay("m", [1, 2, 3], hits)
    assert hits == [{"pod-b": hits[0]["pod-b"]}, {}, {}]
    now[0] += 0.5
    spec.routed("m", [3], "pod-a")  # routed again after the clear: a fresh guess
    hits = [{}, {}, {}]
    spec.overlay("m", [1, 2, 3], hits)
    assert set(hits[2]) == {"pod-a"}


def test_a_guess_lives_exactly_its_ttl_however_the_routes_were_ordered():
    now = [100.0]
    spec = Speculation(ttl=2.0, clock=lambda: now[0])
    spec.routed("m", [1], "pod-a")
    now[0] = 99.0  # a later routed() that read the clock first: the newest guess stays the newest
    spec.routed("m", [2], "pod-b")
    now[0] = 101.9
    hits = [{}, {}]
    spec.overlay("m", [1, 2], hits)
    assert hits[0].keys() == {"pod-a"} and hits[1] == {}, "the guess at 100 lives until 102; the one at 99 is over"
    now[0] = 102.0
    hits = [{}, {}]
    spec.overlay("m", [1, 2], hits)
    assert hits == [{}, {}], "a guess exactly ttl old is over"


async def test_a_burst_with_a_new_prefix_stays_together_until_load_spreads_it(tokenizer_dir, tokenizer):
    """Before any KV event arrives, requests sharing a new prefix follow the first one; once the
    pod they pile on is busy (its engine says so), the rest go where they start sooner."""
    tokenizers = TokenizerManager({"m": tokenizer_dir})
    p = pool("a", "b", "c", "d")
    for pod in p.all():
        engine(pod)
    indexer = Indexer(tokenizers, MemoryIndex(), block_size=16, max_blocks=64, scheme="chained",
                      speculation=Speculation(2.0))
    router = Router(p, indexer, profile(queuedRequestTokens=256), Metrics(), decision_timeout=10)
    shared = "A new shared context that nobody has cached yet. " * 30
    try:
        first = [(await router.route(RoutingRequest(model="m", kind="completion", prompt=shared + f"q{i}"))).pod.id
                 for i in range(3)]
        assert len(set(first)) == 1, "the burst follows its first request"
        hot = p.get(first[0])
        engine(hot, waiting=6, running=1)
        later = (await router.route(RoutingRequest(model="m", kind="completion", prompt=shared + "q9"))).pod.id
        assert later != hot.id, "a queue of 7 costs more than recomputing the prefix"
    finally:
        tokenizers.close()


async def page_server(page: bytes) -> tuple[asyncio.Server, int, list[int]]:
    """An engine's /metrics: every GET answered with ``page``, and counted."""
    gets: list[int] = []

    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        gets.append(1)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n" % len(page) + page)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], gets


async def test_the_scraper_reads_every_pods_metrics_endpoint():
    server, port, _ = await page_server(VLLM_METRICS.encode())
    p = PodPool([PodConfig(id="a", address=f"127.0.0.1:{port}"), PodConfig(id="down", address="127.0.0.1:1")])
    metrics = Metrics()
    p.get("a").in_flight = 5
    task = asyncio.ensure_future(LoadScraper(p, interval=0.02, timeout=0.5, metrics=metrics).run())
    try:
        for _ in range(100):
            await asyncio.sleep(0.02)
            if p.get("a").engine is not None:
                break
    finally:
        task.cancel()
        server.close()
    assert (p.get("a").engine.waiting, p.get("a").engine.running) == (4.0, 2.0)
    assert p.get("a").in_flight_at_scrape == 5, "the reading counts the requests we had open then"
    assert p.get("down").engine is None
    assert metrics.load_scrape_errors.labels("down")._value.get() >= 1


async def test_our_request_that_came_and_went_during_a_scrape_is_not_taken_for_another_replicas():
    """The engine counted it while its reading was taken; by the time the reading arrives the
    request is done. It must not linger as someone else's load until the next scrape."""
    pod_ref = {}

    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        pod = pod_ref["pod"]
        ours = pod.opened(0, time.monotonic())  # our request is routed and runs while the engine answers
        body = b'vllm:num_requests_waiting{engine="0"} 0.0\nvllm:num_requests_running{engine="0"} 1.0\n'
        pod.closed(ours, time.monotonic())  # ... and ends before the reading is recorded
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    p = PodPool([PodConfig(id="a", address=f"127.0.0.1:{port}")])
    pod_ref["pod"] = p.get("a")
    scraper = LoadScraper(p, interval=10, timeout=1)
    try:
        await scraper._scrape_engine([p.get("a")], asyncio.Semaphore(1))
    finally:
        server.close()
    assert p.get("a").engine.running == 1.0
    assert load_of(p.get("a")) == 0, "the one running request was ours and is done"


def plain_parse(text: str, engine: int | None = None) -> tuple[float, float, float] | None:
    """What parse_metrics means, said line by line (Prometheus text format: a name, labels in
    braces or whitespace after the name, the value, maybe a timestamp): the three series,
    summed (KV usage: the largest), only the rank's own with ``engine``."""
    waiting = running = kv = 0.0
    seen = False
    for line in text.split("\n"):
        if not line.startswith("vllm:"):
            continue
        brace = line.find("{")
        cut = min((i for i in (line.find(" "), line.find("\t")) if i != -1), default=-1)
        if brace != -1 and (cut == -1 or brace < cut):
            name, labels, fields = line[:brace], line[brace:line.rfind("}") + 1], line[line.rfind("}") + 1:].split()
        elif cut != -1:
            name, labels, fields = line[:cut], "", line[cut:].split()
        else:
            continue
        if engine is not None and f'engine="{engine}"' not in labels:
            continue
        try:
            value = float(fields[0])
        except (IndexError, ValueError):
            continue
        if name == "vllm:num_requests_waiting":
            waiting, seen = waiting + value, True
        elif name == "vllm:num_requests_running":
            running, seen = running + value, True
        elif name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            kv = max(kv, value)
    return (waiting, running, min(1.0, max(0.0, kv))) if seen else None


NAMES = ["vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
         "vllm:gpu_cache_usage_perc", "vllm:num_requests_waiting_total", "vllm:prefix_cache_hits_total",
         "python_gc_objects_collected_total", "# HELP vllm:num_requests_waiting"]
VALUES = ["0", "3.0", "0.42", "1e3", "NaN", "+Inf", "-1", "x", ""]


@st.composite
def metrics_pages(draw):
    lines = []
    for _ in range(draw(st.integers(0, 30))):
        name = draw(st.sampled_from(NAMES))
        labels = draw(st.sampled_from(["", '{engine="0",model_name="m"}', '{engine="1",model_name="m"}',
                                       '{model_name="a} b"}', '{le="0.5",engine="0"}']))
        value = draw(st.sampled_from(VALUES))
        stamp = draw(st.sampled_from(["", " 1700000000000"]))
        gap = draw(st.sampled_from([" ", "\t", "  "] + ([""] if labels else [])))  # no space after a brace: valid
        lines.append(f"{name}{labels}{gap}{value}{stamp}")
    return "\n".join(lines) + draw(st.sampled_from(["", "\n"]))


@settings(max_examples=400, deadline=None)
@given(metrics_pages(), st.sampled_from([None, 0, 1]))
def test_the_metrics_page_is_read_as_its_lines_say(page, engine):
    as_read = [parse_metrics(page, 1.0, engine), *parse_ranks(page, 1.0, [engine])]
    want = plain_parse(page, engine)
    for load in as_read:
        got = None if load is None else (load.waiting, load.running, load.kv_usage)
        assert repr(got) == repr(want)  # repr: NaN equals NaN


def test_a_page_of_vllm_size_is_read_without_a_loop_over_its_lines():
    """~500 lines of histograms around the three series: they are still found."""
    noise = "\n".join(f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="{b}"}} 3.0' for b in range(500))
    page = f"{noise}\n{VLLM_METRICS}{noise}\n"
    load = parse_metrics(page, 2.0)
    assert (load.waiting, load.running, load.kv_usage) == (4.0, 2.0, 0.42)


async def test_one_read_of_an_engines_page_gives_each_data_parallel_rank_its_own_numbers():
    server, port, gets = await page_server(VLLM_METRICS.encode())
    p = PodPool([PodConfig(id="a", address=f"127.0.0.1:{port}", data_parallel_size=2)])
    ranks = sorted(p.all(), key=lambda pod: pod.rank)
    try:
        await LoadScraper(p, interval=10, timeout=1)._scrape_engine(ranks, asyncio.Semaphore(1))
    finally:
        server.close()
    assert len(gets) == 1
    assert (ranks[0].engine.waiting, ranks[0].engine.running, ranks[0].engine.kv_usage) == (3.0, 2.0, 0.42)
    assert (ranks[1].engine.waiting, ranks[1].engine.running) == (1.0, 0.0)
