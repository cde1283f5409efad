"""KV event decoding: every layout vLLM has shipped, and garbage never gets through."""

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.events.decode import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodeError,
    RejectedEvent,
    decode_frames,
    decode_payload,
    decode_replay,
)
from tests.harness import vllm_events as v

BIG = 2**64 - 5  # above 2**63: must stay unsigned
TOKENS = list(range(32))


def expected_stored(**kw):
    base = dict(block_hashes=[BIG, 7], parent_block_hash=None, token_ids=TOKENS, block_size=16)
    return BlockStored(**{**base, **kw})


def test_v09_array_layout():
    batch = v.V09Batch(1.5, [v.V09BlockStored([BIG, 7], None, TOKENS, 16, None),
                             v.V09BlockRemoved([7]), v.V09AllBlocksCleared()], 0)
    decoded = decode_payload(v.encode(batch))
    assert decoded.ts == 1.5 and decoded.data_parallel_rank == 0
    assert decoded.events == [expected_stored(), BlockRemoved([7]), AllBlocksCleared()]


def test_v032_array_batch_with_map_events():
    batch = v.V032Batch(2.0, [v.V032BlockStored([BIG, 7], 99, TOKENS, 16, None, "GPU", "adapter-1"),
                              v.V032BlockRemoved([BIG], "GPU")])
    decoded = decode_payload(v.encode(batch))
    assert decoded.data_parallel_rank is None
    assert decoded.events == [expected_stored(parent_block_hash=99, medium="GPU", lora_name="adapter-1"),
                              BlockRemoved([BIG], "GPU")]


def test_main_map_layout_with_new_optional_fields():
    batch = v.MainBatch(3.0, [
        v.MainBlockStored([BIG, 7], None, TOKENS, 16, None, "GPU", None, extra_keys=[None, None], group_idx=1,
                          kv_cache_spec_kind="full_attention"),
        v.MainBlockRemoved([7], "GPU", group_idx=1), v.MainAllBlocksCleared()], data_parallel_rank=2)
    decoded = decode_payload(v.encode(batch))
    assert decoded.data_parallel_rank == 2
    assert decoded.events[0] == expected_stored(medium="GPU", group_idx=1, kv_cache_spec_kind="full_attention")
    assert decoded.events[1:] == [BlockRemoved([7], "GPU", 1), AllBlocksCleared()]


def test_bytes_block_hashes():
    h = bytes(range(32))
    batch = v.MainBatch(1.0, [v.MainBlockStored([h], None, TOKENS[:16], 16, None, "GPU", None)])
    assert decode_payload(v.encode(batch)).events[0].block_hashes == [h]


def test_omitted_defaults_and_unknown_fields_are_accepted():
    stored = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None, "token_ids": TOKENS[:16],
              "block_size": 16, "a_field_from_the_future": {"x": 1}}
    decoded = decode_payload(msgspec.msgpack.encode({"ts": 1, "events": [stored], "also_new": True}))
    assert decoded.events == [BlockStored([1], None, TOKENS[:16], 16)]
    # Array events with trailing fields we do not know yet.
    array_event = ["BlockStored", [1], None, TOKENS[:16], 16, None, "GPU", None, None, 0, "full", "new1", "new2"]
    decoded = decode_payload(msgspec.msgpack.encode([1.0, [array_event]]))
    assert decoded.events[0].block_hashes == [1] and decoded.events[0].group_idx == 0


def test_signed_view_of_a_hash_is_read_as_unsigned():
    stored = ["BlockStored", [-1], None, TOKENS[:16], 16]
    assert decode_payload(msgspec.msgpack.encode([1.0, [stored]])).events[0].block_hashes == [2**64 - 1]


def test_frames_carry_topic_and_big_endian_sequence():
    message = decode_frames(v.frames(v.MainBatch(1.0, []), 2**40 + 3, topic=b"kv@pod-a@m"))
    assert (message.topic, message.seq, message.batch.events) == (b"kv@pod-a@m", 2**40 + 3, [])


@pytest.mark.parametrize("frames", [
    [b"kv", b"\x00" * 8],
    [b"kv", b"\x00" * 7, b"\x90"],
    [b"kv", b"\x00" * 8, b"\xc1"],
    [b"kv", b"\x00" * 8, msgspec.msgpack.encode("hello")],
    [b"kv", b"\x00" * 8, msgspec.msgpack.encode({"ts": "now", "events": []})],
    [b"kv", b"\x00" * 8, msgspec.msgpack.encode({"ts": 1.0, "events": "none"})],
])
def test_garbage_frames_are_decode_errors(frames):
    with pytest.raises(DecodeError):
        decode_frames(frames)


GOOD = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None, "token_ids": list(range(16)),
        "block_size": 16}


@pytest.mark.parametrize("event, reason", [
    (["Bogus", 1], "unknown_type"),
    (42, "malformed"),
    ({**GOOD, "block_hashes": [1.5]}, "hash_type"),
    ({**GOOD, "block_hashes": [b""]}, "hash_type"),
    ({**GOOD, "block_hashes": [b"x" * 65]}, "hash_type"),
    ({**GOOD, "block_hashes": []}, "empty"),
    ({**GOOD, "block_hashes": [1, 1], "token_ids": list(range(32))}, "duplicate_hash"),
    ({**GOOD, "parent_block_hash": 1}, "parent"),
    ({**GOOD, "parent_block_hash": "x"}, "hash_type"),
    ({**GOOD, "token_ids": ["a"] * 16}, "token_ids"),
    ({**GOOD, "token_ids": [2**32] + list(range(15))}, "token_ids"),
    ({**GOOD, "token_ids": [-1] + list(range(15))}, "token_ids"),
    ({**GOOD, "token_ids": list(range(15))}, "block_count"),
    ({**GOOD, "block_size": 0}, "block_size"),
    ({**GOOD, "block_size": 8, "token_ids": list(range(8))}, "block_size"),  # not engineBlockSize
    ({**GOOD, "lora_name": "a@b"}, "lora_name"),
    ({**GOOD, "lora_name": "ns:adapter"}, "lora_name"),
    ({**GOOD, "lora_name": 7}, "lora_name"),
    ({**GOOD, "lora_id": 3}, "lora_name"),  # an adapter known only by id: not the base model's blocks
    ({**GOOD, "group_idx": "0"}, "group_idx"),
])
def test_a_bad_event_is_rejected_with_a_reason_and_the_rest_of_the_batch_stays(event, reason):
    batch = decode_payload(msgspec.msgpack.encode([1.0, [GOOD, event, {"type": "AllBlocksCleared"}]]), block_size=16)
    first, bad, last = batch.events
    assert isinstance(first, BlockStored) and isinstance(last, AllBlocksCleared)
    assert isinstance(bad, RejectedEvent) and bad.reason == reason


def test_an_unreadable_removal_is_lossy_and_bad_hashes_in_a_removal_are_left_out():
    batch = decode_payload(msgspec.msgpack.encode([1.0, [{"type": "BlockRemoved", "block_hashes": "all"},
                                                         {"type": "BlockRemoved", "block_hashes": [1, 2.5, b"", 3]}]]))
    assert isinstance(batch.events[0], RejectedEvent) and batch.events[0].lossy
    assert batch.events[1] == BlockRemoved([1, 3])


def test_a_batch_with_a_non_finite_time_keeps_its_events():
    batch = decode_payload(msgspec.msgpack.encode([float("nan"), [GOOD]]))
    assert batch.ts == pytest.approx(__import__("time").time(), abs=5) and batch.events[0].block_hashes == [1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_random_frames_never_raise_anything_but_decode_error(frames):
    try:
        decode_frames(frames)
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text() | st.binary(),
                    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6),
                    max_leaves=30))
def test_random_msgpack_documents_never_raise_anything_but_decode_error(document):
    try:
        decode_payload(msgspec.msgpack.encode(document))
    except DecodeError:
        pass


def test_replay_answers_with_and_without_topic_frame():
    assert decode_replay([b"", (5).to_bytes(8, "big"), b"p"]) == (5, b"p")
    assert decode_replay([b"", b"kv-events", (5).to_bytes(8, "big"), b"p"]) == (5, b"p")
    assert decode_replay([b"", b"\xff" * 8, b""]) == (2**64 - 1, b"")


def test_a_string_with_invalid_utf8_is_a_decode_error_not_a_crash():
    """Found by the fuzzer: msgspec raises UnicodeDecodeError for a msgpack str of bad UTF-8."""
    with pytest.raises(DecodeError):
        decode_frames([b"", b"\x00" * 8, b"\xa3\x00\x00\x80"])
