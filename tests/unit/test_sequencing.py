"""Per-pod sequencing without sockets: order, gaps, replays and restarts decide what the
index may believe. Frames are built as vLLM 0.32 sends them; the replay buffer is a list."""

from __future__ import annotations

import msgspec
import pytest

from extproc import config as config_mod
from extproc.blocks import block_keys
from extproc.events.sequencing import Sequencer
from extproc.index.memory import MemoryIndex
from extproc.metrics import Metrics
from extproc.sim.engine import removed_event, stored_event

BLOCK = 4
MODEL = "m"
CONFIG = config_mod.from_dict({
    "blockSizeToHash": BLOCK, "ingest": {"engineBlockSize": BLOCK}, "models": [{"name": MODEL}],
    "pods": [{"id": "pod-a", "address": "10.0.0.1:8000", "kvEvents": "tcp://10.0.0.1:5557",
              "kvReplay": "tcp://10.0.0.1:5558"}],
})
_encode = msgspec.msgpack.Encoder().encode


def payload(*events: dict) -> bytes:
    return _encode([1_700_000_000.0, list(events), None])


def frame(seq: int, *events: dict) -> list[bytes]:
    return [b"kv-events", seq.to_bytes(8, "big"), payload(*events)]


def store(n: int) -> dict:
    """Engine block n: tokens 4n..4n+3, child of block n-1."""
    return stored_event([100 + n], 100 + n - 1 if n else None, range(4 * n, 4 * n + 4), BLOCK)


class Fleet:
    def __init__(self, replay: list[tuple[int, bytes]] | None = None):
        self.index = MemoryIndex()
        self.metrics = Metrics()
        self.replay = replay
        self.replay_asked: list[int] = []
        self.seq = Sequencer(self.index, CONFIG, self.metrics, self.fetch)
        self.feed = self.seq.new_feed("pod-a", MODEL, "tcp://10.0.0.1:5557", "tcp://10.0.0.1:5558" if replay is not None else "")

    async def fetch(self, feed, start):
        self.replay_asked.append(start)
        return [(s, p) for s, p in self.replay or () if s >= start]

    async def held(self, n: int) -> list[bool]:
        keys = block_keys(list(range(4 * n)), BLOCK, 100)
        return ["pod-a" in owners for owners in await self.index.lookup(MODEL, keys)]

    def counter(self, metric, *labels) -> float:
        return (metric.labels(*labels) if labels else metric)._value.get()


async def test_messages_in_order_build_the_prefix():
    f = Fleet()
    await f.seq.process(f.feed, [frame(0, store(0), store(1)), frame(1, store(2))])
    assert await f.held(3) == [True, True, True]
    assert f.feed.last_seq == 1


async def test_a_gap_without_a_replay_endpoint_drops_the_pod_and_rebuilds_from_new_events():
    f = Fleet()
    await f.seq.process(f.feed, [frame(0, store(0)), frame(1, store(1))])
    await f.seq.process(f.feed, [frame(3, store(2))])  # seq 2 was lost
    assert await f.held(3) == [False, False, False], "nothing half true is kept"
    assert f.counter(f.metrics.sequence_gaps, "pod-a") == 1
    assert f.counter(f.metrics.pod_purges, "gap") == 1


async def test_a_gap_is_filled_from_the_replay_buffer():
    history = [(0, payload(store(0))), (1, payload(store(1))), (2, payload(store(2)))]
    f = Fleet(replay=history)
    await f.seq.process(f.feed, [frame(0, store(0))])
    await f.seq.process(f.feed, [frame(2, store(2)), frame(3, store(3))])  # seq 1 lost on the wire
    assert f.replay_asked == [1]
    assert await f.held(4) == [True, True, True, True]
    assert f.counter(f.metrics.replays, "ok") == 1
    assert f.counter(f.metrics.pod_purges, "gap") == 0


async def test_a_replay_that_cannot_cover_the_gap_drops_the_pod():
    f = Fleet(replay=[(2, payload(store(2)))])  # the buffer no longer holds seq 1
    await f.seq.process(f.feed, [frame(0, store(0))])
    await f.seq.process(f.feed, [frame(2, store(2))])
    assert await f.held(1) == [False]
    assert f.counter(f.metrics.replays, "incomplete") == 1


async def test_a_sequence_that_starts_again_is_a_restarted_engine_with_an_empty_cache():
    f = Fleet()
    await f.seq.process(f.feed, [frame(0, store(0)), frame(1, store(1)), frame(2, store(2))])
    await f.seq.process(f.feed, [frame(0, store(5))])  # a new process: its block 5 has no known parent
    assert await f.held(3) == [False, False, False]
    assert f.counter(f.metrics.pod_purges, "restart") == 1


async def test_a_reconnect_that_does_not_continue_the_sequence_is_a_restart():
    f = Fleet()
    await f.seq.process(f.feed, [frame(0, store(0)), frame(1, store(1))])
    f.feed.reconnected = True
    await f.seq.process(f.feed, [frame(7, store(0))])
    assert f.counter(f.metrics.pod_purges, "restart") == 1
    assert await f.held(2) == [True, False], "the new process's own block 0 is kept"


async def test_a_reconnect_that_continues_the_sequence_keeps_everything():
    f = Fleet()
    await f.seq.process(f.feed, [frame(0, store(0))])
    f.feed.reconnected = True
    await f.seq.process(f.feed, [frame(1, store(1))])
    assert await f.held(2) == [True, True]
    assert f.counter(f.metrics.pod_purges, "restart") == 0


async def test_removals_and_malformed_frames_in_one_run():
    f = Fleet()
    bad = [b"kv-events", (1).to_bytes(8, "big"), b"\xc1not msgpack"]
    await f.seq.process(f.feed, [frame(0, store(0), store(1)), bad, frame(1, removed_event([101]))])
    assert await f.held(2) == [True, False]
    assert f.counter(f.metrics.event_decode_errors) == 1


@pytest.mark.parametrize("history_starts_at", [0, 3])
async def test_catch_up_rebuilds_only_from_a_whole_history(history_starts_at):
    history = [(s, payload(store(s))) for s in range(history_starts_at, 5)]
    f = Fleet(replay=history)
    await f.seq.catch_up(f.feed)
    held = await f.held(5)
    assert held == ([True] * 5 if history_starts_at == 0 else [False] * 5)
