"""ZMQ frames from a vLLM publisher -> typed events.

vLLM has shipped three encodings of the same messages, and all must be read:
- v0.9-era: the batch and each event are msgpack arrays (``["BlockStored", hashes, ...]``);
- 0.32/0.33: the batch is an array ``[ts, events, rank]``, events are maps tagged ``"type"``;
- main: batch and events are maps.
Fields with defaults may be omitted and new fields keep appearing, so events are decoded
generically (msgspec, in C) and read by position or by name, never by exact shape.
Block hashes are unsigned 64-bit ints (can exceed 2**63) or 32 raw bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import msgspec

EngineHash = Union[int, bytes]

END_OF_REPLAY = 0xFFFF_FFFF_FFFF_FFFF
"""Sequence number (-1 as signed) that ends a replay answer."""


class DecodeError(ValueError):
    """A frame that is not a vLLM KV event batch; counted and skipped."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    lora_name: str | None = None
    medium: str | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: list[EngineHash]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


Event = Union[BlockStored, BlockRemoved, AllBlocksCleared]


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


@dataclass(frozen=True, slots=True)
class Message:
    topic: bytes
    seq: int
    batch: EventBatch


# Positional field order of the array-encoded events (v0.9-era), after the tag.
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
                  "extra_keys", "group_idx", "kv_cache_spec_kind")
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")

_decoder = msgspec.msgpack.Decoder()


def decode_payload(payload: bytes) -> EventBatch:
    try:
        raw = _decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # invalid UTF-8 inside a msgpack str too
        raise DecodeError(f"not msgpack: {exc}") from None
    if isinstance(raw, dict):
        ts, events, rank = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    elif isinstance(raw, list) and len(raw) >= 2:
        ts, events, rank = raw[0], raw[1], raw[2] if len(raw) > 2 else None
    else:
        raise DecodeError("batch is neither a map nor an array of [ts, events, ...]")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not isinstance(events, list):
        raise DecodeError("batch needs a numeric ts and a list of events")
    if rank is not None and not isinstance(rank, int):
        raise DecodeError("data_parallel_rank must be an int")
    return EventBatch(float(ts), [_event(e) for e in events], rank)


def _fields(raw: Any, names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    if isinstance(raw, dict):
        tag = raw.get("type")
        return tag, raw
    if isinstance(raw, list) and raw and isinstance(raw[0], str):
        tag = raw[0]
        return tag, dict(zip(names, raw[1:]))
    raise DecodeError("event is neither a tagged map nor a tagged array")


def _hash(value: Any) -> EngineHash:
    if isinstance(value, bool) or not isinstance(value, (int, bytes)):
        raise DecodeError(f"block hash must be an int or bytes, got {type(value).__name__}")
    if isinstance(value, int) and not 0 <= value < 2**64:
        value &= 0xFFFF_FFFF_FFFF_FFFF  # a signed encoder's view of the same 64 bits
    return value


def _hashes(value: Any) -> list[EngineHash]:
    if not isinstance(value, list):
        raise DecodeError("block_hashes must be a list")
    return [_hash(h) for h in value]


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _event(raw: Any) -> Event:
    tag = raw.get("type") if isinstance(raw, dict) else (raw[0] if isinstance(raw, list) and raw else None)
    if tag == "BlockStored":
        _, f = _fields(raw, _STORED_FIELDS)
        tokens = f.get("token_ids")
        size = f.get("block_size")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise DecodeError("BlockStored.token_ids must be a list of ints")
        if not isinstance(size, int) or size <= 0:
            raise DecodeError("BlockStored.block_size must be a positive int")
        parent = f.get("parent_block_hash")
        return BlockStored(
            block_hashes=_hashes(f.get("block_hashes")),
            parent_block_hash=None if parent is None else _hash(parent),
            token_ids=tokens,
            block_size=size,
            lora_name=_opt_str(f.get("lora_name")),
            medium=_opt_str(f.get("medium")),
            group_idx=_opt_int(f.get("group_idx")),
            kv_cache_spec_kind=_opt_str(f.get("kv_cache_spec_kind")),
        )
    if tag == "BlockRemoved":
        _, f = _fields(raw, _REMOVED_FIELDS)
        return BlockRemoved(_hashes(f.get("block_hashes")), _opt_str(f.get("medium")), _opt_int(f.get("group_idx")))
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    raise DecodeError(f"unknown event type {tag!r}")


def decode_frames(frames: list[bytes]) -> Message:
    """A PUB message: [topic, seq (8 bytes big-endian), payload]."""
    if len(frames) != 3:
        raise DecodeError(f"expected 3 frames (topic, seq, payload), got {len(frames)}")
    topic, seq, payload = frames
    if len(seq) != 8:
        raise DecodeError("sequence frame must be 8 bytes")
    return Message(topic, int.from_bytes(seq, "big"), decode_payload(payload))


def decode_replay(frames: list[bytes]) -> tuple[int, bytes]:
    """A replay answer (after the DEALER's empty delimiter): (seq, payload); topic frame optional."""
    if frames and frames[0] == b"":
        frames = frames[1:]
    if len(frames) == 3:
        frames = frames[1:]
    if len(frames) != 2 or len(frames[0]) != 8:
        raise DecodeError("replay answer must be [seq, payload] or [topic, seq, payload]")
    return int.from_bytes(frames[0], "big"), frames[1]
