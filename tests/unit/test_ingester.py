"""The ingester's tasks through real ZMQ sockets on loopback, into the memory index: feeds
that fail are restarted and resynced, central mode takes configured pods only, removed pods
stay removed, and task lists stay bounded across reloads."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from extproc import config as config_mod
from extproc.blocks import block_keys
from extproc.events.ingest import Ingester
from extproc.index import IndexUnavailable
from extproc.index.memory import MemoryIndex
from extproc.metrics import Metrics
from extproc.sim import launcher
from extproc.sim.engine import KVEventPublisher, stored_event
from extproc.supervise import Supervisor

BLOCK = 4
ROUTER = 8
MODEL = "m"


def make_config(pods: list[dict], **ingest) -> config_mod.Config:
    return config_mod.from_dict({
        "blockSizeToHash": ROUTER, "models": [{"name": MODEL}],
        "ingest": {"engineBlockSize": BLOCK, "replayTimeout": "1s", **ingest},
        "pods": [{"address": "127.0.0.1:1", "models": [MODEL], **p} for p in pods],
    })


def counter(metric, *labels) -> float:
    return (metric.labels(*labels) if labels else metric)._value.get()


async def eventually(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def held(index: MemoryIndex, pod: str, tokens: list[int]) -> list[bool]:
    return [pod in owners for owners in await index.lookup(MODEL, block_keys(tokens, ROUTER, 100))]


async def holds(index: MemoryIndex, pod: str, tokens: list[int]) -> bool:
    """Every router block of the prompt is indexed for the pod."""
    return all(await held(index, pod, tokens))


def prefix(n: int) -> tuple[list[int], dict]:
    """A fresh 2-router-block prompt and the BlockStored that caches it (hashes unique per n)."""
    tokens = list(range(100 * n, 100 * n + 16))
    return tokens, stored_event([n * 10 + i for i in range(4)], None, tokens, BLOCK)


@pytest.fixture()
async def fleet():
    made: list = []

    def publisher(endpoint: str = "tcp://127.0.0.1:*", **kw) -> KVEventPublisher:
        pub = KVEventPublisher(endpoint, **kw)
        made.append(pub)
        return pub

    async def ingester(conf: config_mod.Config, index=None) -> Ingester:
        metrics = Metrics()
        ing = Ingester(index or MemoryIndex(), conf, metrics, supervisor=Supervisor(metrics, backoff=0.05))
        await ing.start()
        made.append(ing)
        return ing

    yield publisher, ingester
    for item in reversed(made):
        if isinstance(item, Ingester):
            await item.stop()
        else:
            item.close()


async def connect(pub: KVEventPublisher, ing: Ingester, pod: str) -> None:
    """ZMQ drops what is published before the subscription lands: publish empty batches until one arrives."""
    def seen():
        feed = ing.feeds.get(pod)
        if feed is not None and feed.last_seq is not None:
            return True
        pub.publish([])
        return False
    await eventually(seen, what=f"{pod} connected")


async def test_a_feed_task_that_fails_is_restarted_and_rebuilds_its_pod(fleet):
    publisher, ingester = fleet
    pub = publisher(replay_endpoint="tcp://127.0.0.1:*")
    ing = await ingester(make_config([{"id": "pod-a", "kvEvents": pub.endpoint, "kvReplay": pub.replay_endpoint}]))
    await connect(pub, ing, "pod-a")
    first, stored_first = prefix(1)
    pub.publish([stored_first])
    await eventually(lambda: holds(ing.index, "pod-a", first), what="first prefix indexed")

    # A bug of ours on one event: before the supervisor, the feed task died here, silently.
    feed = ing.feeds["pod-a"]
    real = feed.tracker.stored
    calls = []

    def stored_once_broken(event, writes):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug of ours")
        return real(event, writes)

    feed.tracker.stored = stored_once_broken
    second, stored_second = prefix(2)
    pub.publish([stored_second])
    await eventually(lambda: counter(ing.metrics.pod_purges, "task_restart") == 1, what="resynced as on a gap")
    assert counter(ing.metrics.task_restarts, "feed") == 1
    # Rebuilt from the replay buffer (it holds the whole history), and the feed goes on.
    await eventually(lambda: holds(ing.index, "pod-a", second), what="the failed event's blocks, from the replay")
    assert await held(ing.index, "pod-a", first) == [True, True]
    third, stored_third = prefix(3)
    pub.publish([stored_third])
    await eventually(lambda: holds(ing.index, "pod-a", third), what="later events still apply")


async def test_central_mode_takes_configured_pods_only(fleet):
    publisher, ingester = fleet
    port = launcher.free_port()
    ing = await ingester(make_config([{"id": "pod-a"}], bind=f"tcp://127.0.0.1:{port}"))
    good = publisher(endpoint=f"tcp://127.0.0.1:{port}", topic=f"kv@pod-a@{MODEL}", bind=False)
    strangers = [publisher(endpoint=f"tcp://127.0.0.1:{port}", topic=f"kv@intruder-{i}@{MODEL}", bind=False)
                 for i in range(20)]
    await connect(good, ing, "pod-a")

    def flood():
        for pub in strangers:
            pub.publish([prefix(7)[1]])
        return counter(ing.metrics.unknown_topics) >= 20
    await eventually(flood, what="strangers counted")
    tokens, stored = prefix(4)
    good.publish([stored])
    await eventually(lambda: holds(ing.index, "pod-a", tokens), what="the configured pod's events apply")
    assert set(ing.feeds) == {"pod-a"}
    assert set(ing.sequencer._locks) <= {"pod-a"}, "no lock per stranger"
    assert await ing.index.pods() == {"pod-a"}, "nothing indexed for a stranger"
    gaps = {s.labels["pod"] for m in ing.metrics.sequence_gaps.collect() for s in m.samples}
    assert gaps <= {"pod-a"}, "no metric label per stranger"


@pytest.mark.parametrize("swallow_cancel", [False, True], ids=["cancelled", "finishes-anyway"])
async def test_a_pod_removed_by_a_reload_is_not_written_back_by_a_catch_up_in_flight(fleet, swallow_cancel):
    """Central mode, so the feed has no socket of its own: its catch-up is the only thing in flight."""
    publisher, ingester = fleet
    port = launcher.free_port()
    history = [(0, msgspec.msgpack.encode([time.time(), [prefix(5)[1]], None]))]
    gate = asyncio.Event()
    asked = asyncio.Event()

    async def slow_replay(feed, start):
        asked.set()
        try:
            await gate.wait()
        except asyncio.CancelledError:
            if not swallow_cancel:
                raise
            await gate.wait()  # a fetch that completes whatever we do (think: bytes already sent)
        return [(s, p) for s, p in history if s >= start]

    conf = make_config([{"id": "pod-a", "kvReplay": "tcp://127.0.0.1:9"}], bind=f"tcp://127.0.0.1:{port}")
    metrics = Metrics()
    ing = Ingester(MemoryIndex(), conf, metrics, supervisor=Supervisor(metrics, backoff=0.05))
    ing.sequencer.fetch_replay = slow_replay
    await ing.start()
    try:
        await asyncio.wait_for(asked.wait(), 5)
        reload = asyncio.ensure_future(ing.reconfigure(make_config([], bind=f"tcp://127.0.0.1:{port}")))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.wait_for(reload, 10)
        await asyncio.sleep(0.1)
        assert await ing.index.pods() == set(), "the removed pod came back"
        assert "pod-a" not in ing.feeds
    finally:
        await ing.stop()


async def test_reloads_leave_no_growing_task_lists(fleet):
    publisher, ingester = fleet
    pub = publisher(replay_endpoint="tcp://127.0.0.1:*")
    with_pod = make_config([{"id": "pod-a", "kvEvents": pub.endpoint, "kvReplay": pub.replay_endpoint}])
    without = make_config([])
    ing = await ingester(with_pod)
    baseline = len(ing.supervisor)
    for _ in range(30):
        await ing.reconfigure(without)
        await ing.reconfigure(with_pod)
    await asyncio.sleep(0.2)
    assert len(ing.supervisor) == baseline, ing.supervisor.names()
    assert len(ing._tasks) == baseline
    assert set(ing.sequencer._locks) <= {"pod-a"}


class FlakyIndex(MemoryIndex):
    """The memory index with a switch that makes every write fail, as a Redis outage does."""

    down = False

    async def apply(self, pod, writes):
        if self.down:
            raise IndexUnavailable("down")
        await super().apply(pod, writes)

    async def purge_pod(self, pod):
        if self.down:
            raise IndexUnavailable("down")
        return await super().purge_pod(pod)


async def test_writes_lost_in_an_outage_are_rebuilt_once_the_index_is_back(fleet):
    publisher, ingester = fleet
    pub = publisher(replay_endpoint="tcp://127.0.0.1:*")
    index = FlakyIndex()
    ing = await ingester(make_config([{"id": "pod-a", "kvEvents": pub.endpoint, "kvReplay": pub.replay_endpoint}]),
                         index)
    await connect(pub, ing, "pod-a")
    index.down = True
    tokens, stored = prefix(6)
    pub.publish([stored])
    await eventually(lambda: ing.feeds["pod-a"].unsynced is not None, what="the failed write noticed")
    index.down = False
    await eventually(lambda: holds(index, "pod-a", tokens), what="rebuilt from the replay buffer")
    assert ing.feeds["pod-a"].unsynced is None


async def test_janitor_and_pod_silence_settings_follow_a_reload(fleet):
    publisher, ingester = fleet
    pub = publisher()
    pods = [{"id": "pod-a", "kvEvents": pub.endpoint}]
    ing = await ingester(make_config(pods, janitorInterval="60s"))
    await connect(pub, ing, "pod-a")
    tokens, stored = prefix(8)
    pub.publish([stored])
    await eventually(lambda: holds(ing.index, "pod-a", tokens), what="indexed")
    # The janitor sleeps 60 s under the old settings; the new ones must not wait for that.
    await ing.reconfigure(make_config(pods, janitorInterval="100ms", podSilenceTimeout="300ms"))
    await eventually(lambda: counter(ing.metrics.pod_purges, "silent") == 1, timeout=3, what="silent pod dropped")
    assert await held(ing.index, "pod-a", tokens) == [False, False]


async def test_a_big_purge_reaches_listeners_in_bounded_messages():
    from extproc.index import Writes
    from extproc.index.invalidation import CHUNK as INVALIDATION_CHUNK

    index = MemoryIndex()
    heard: list = []
    await index.subscribe(heard.append)
    writes = Writes(at=1.0)
    for key in range(5 * INVALIDATION_CHUNK + 7):
        writes.store((MODEL, key))
    await index.apply("pod-a", writes)
    assert max(len(m.stored) for m in heard) <= INVALIDATION_CHUNK and sum(len(m.stored) for m in heard) == 5007
    heard.clear()
    assert await index.purge_pod("pod-a") == 5007
    assert len(heard) == 6 and max(len(m.removed) for m in heard) <= INVALIDATION_CHUNK
    assert [m.cleared for m in heard] == [False] * 5 + [True], "cleared comes with the last part"
