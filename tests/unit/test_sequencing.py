"""Per-pod sequencing without sockets: order, gaps, replays and restarts decide what the
index may believe. Frames are built as vLLM 0.32 sends them; the replay buffer is a list."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# -- validated events: a bad event is counted and skipped, the feed goes on (issue 14) ----

ROUTER = 8  # two engine blocks of 4 tokens per router block, so chains matter
CHAIN_CONFIG = config_mod.from_dict({
    "blockSizeToHash": ROUTER, "ingest": {"engineBlockSize": BLOCK}, "models": [{"name": MODEL}],
    "pods": [{"id": "pod-a", "address": "10.0.0.1:8000", "kvEvents": "tcp://10.0.0.1:5557"}],
})


def chain_fleet() -> Fleet:
    f = Fleet()
    f.seq = Sequencer(f.index, CHAIN_CONFIG, f.metrics, f.fetch)
    f.feed = f.seq.new_feed("pod-a", MODEL, "tcp://10.0.0.1:5557")
    return f


async def prefix_held(f: Fleet, tokens: list[int]) -> list[bool]:
    keys = block_keys(tokens, ROUTER, 100)
    return ["pod-a" in owners for owners in await f.index.lookup(MODEL, keys)]


async def test_token_ids_beyond_32_bits_do_not_stop_the_feed():
    """The issue's reproduction: one well-formed BlockStored whose token ids do not fit 32 bits
    (four engine blocks, two router blocks) once raised struct.error out of the feed task."""
    f = chain_fleet()
    huge = stored_event([1, 2, 3, 4], None, [2**32 + i for i in range(16)], BLOCK)
    good_tokens = list(range(500, 516))
    good = stored_event([11, 12, 13, 14], None, good_tokens, BLOCK)
    await f.seq.process(f.feed, [frame(0, huge, good)])
    await f.seq.process(f.feed, [frame(1, stored_event([15, 16], 14, range(516, 524), BLOCK))])
    assert await prefix_held(f, good_tokens + list(range(516, 524))) == [True, True, True]
    assert f.counter(f.metrics.events_rejected, "token_ids") == 1
    assert f.feed.last_seq == 1


async def test_an_unreadable_removal_drops_the_pod_rather_than_keep_what_it_may_have_removed():
    f = chain_fleet()
    tokens = list(range(16))
    await f.seq.process(f.feed, [frame(0, stored_event([1, 2, 3, 4], None, tokens, BLOCK))])
    assert await prefix_held(f, tokens) == [True, True]
    await f.seq.process(f.feed, [frame(1, {"type": "BlockRemoved", "block_hashes": "everything"})])
    assert await prefix_held(f, tokens) == [False, False]
    assert f.counter(f.metrics.pod_purges, "bad_event") == 1


async def test_a_hash_stored_again_with_other_tokens_takes_back_what_was_built_on_it():
    f = chain_fleet()
    tokens = list(range(8))
    await f.seq.process(f.feed, [frame(0, stored_event([1, 2], None, tokens, BLOCK))])
    assert await prefix_held(f, tokens) == [True]
    await f.seq.process(f.feed, [frame(1, stored_event([2], 1, range(900, 904), BLOCK))])
    assert await prefix_held(f, tokens) == [False]
    assert await prefix_held(f, tokens[:4] + list(range(900, 904))) == [True]


# Well-typed but adversarial events: every field has the right msgpack type (or nearly), the
# values are hostile. A small pool of hashes makes duplicates, cycles and unknown parents likely.
_pool = st.sampled_from([1, 2, 3, 4, 5, 2**64 - 1, b"\x01" * 32])
_hash = _pool | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=70) | st.floats() | st.text(max_size=3)
_token = st.integers(0, 2**32 - 1) | st.integers(-(2**63), 2**64 - 1)
_tokens = st.one_of(
    st.integers(1, 4).flatmap(lambda n: st.lists(st.integers(0, 50), min_size=n * BLOCK, max_size=n * BLOCK)),
    st.lists(_token, max_size=24),
)
_name = st.none() | st.text(max_size=8) | st.sampled_from(["", "a@b", "x:y", "\x00", MODEL, "lora-1"]) | st.integers(-(2**63), 2**64 - 1)
_stored = st.fixed_dictionaries({
    "type": st.just("BlockStored"),
    "block_hashes": st.lists(_hash, max_size=6) | _hash,
    "parent_block_hash": st.none() | _hash,
    "token_ids": _tokens,
    "block_size": st.sampled_from([BLOCK, BLOCK, 0, -1, 2, 8, 2**31]) | st.booleans(),
}, optional={"lora_name": _name, "lora_id": st.none() | st.integers(-1, 3), "group_idx": st.none() | st.integers(-2, 2**64 - 1) | st.text(max_size=2),
             "kv_cache_spec_kind": st.none() | st.sampled_from(["full_attention", "sliding_window", "mamba"]),
             "medium": st.none() | st.text(max_size=4)})
_removed = st.fixed_dictionaries({"type": st.just("BlockRemoved"), "block_hashes": st.lists(_hash, max_size=6) | _hash},
                                 optional={"group_idx": st.none() | st.integers(-2, 5) | st.text(max_size=2)})
_event = st.one_of(_stored, _stored, _removed, st.just({"type": "AllBlocksCleared"}),
                   st.fixed_dictionaries({"type": st.text(max_size=12)}))


def _as_array(event: dict) -> list:
    if event.get("type") == "BlockStored":
        return ["BlockStored", event["block_hashes"], event["parent_block_hash"], event["token_ids"], event["block_size"],
                event.get("lora_id"), event.get("medium"), event.get("lora_name")]
    return [event.get("type"), *[v for k, v in event.items() if k != "type"]]


@settings(max_examples=int(__import__("os").environ.get("PROPERTY_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(_event, max_size=6), min_size=1, max_size=4), arrays=st.booleans())
async def test_adversarial_events_never_stop_the_feed_or_outlive_a_clear(batches, arrays):
    f = chain_fleet()
    frames = [[b"kv-events", seq.to_bytes(8, "big"),
               _encode([1_700_000_000.0, [_as_array(e) if arrays else e for e in events], None])]
              for seq, events in enumerate(batches)]
    await f.seq.process(f.feed, frames)  # must not raise, whatever the events say
    # The feed still works: a good prefix (fresh hashes) is indexed in full.
    seq = len(batches)
    tokens = list(range(1000, 1016))
    await f.seq.process(f.feed, [frame(seq, stored_event([9001, 9002, 9003, 9004], None, tokens, BLOCK))])
    assert await prefix_held(f, tokens) == [True, True]
    # And nothing of the pod's GPU survives its engine clearing it (AllBlocksCleared comes from
    # the GPU's block pool: blocks an event put in another medium stay, see test_tiers).
    await f.seq.process(f.feed, [frame(seq + 1, {"type": "AllBlocksCleared"})])
    assert {p for p in await f.index.pods() if "|" not in p} == set()
    assert not f.feed.tracker.blocks
