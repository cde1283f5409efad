"""ZMQ frames from a vLLM publisher -> typed events.

vLLM has shipped three encodings of the same messages, and all must be read:
- v0.9-era: the batch and each event are msgpack arrays (``["BlockStored", hashes, ...]``);
- 0.32/0.33: the batch is an array ``[ts, events, rank]``, events are maps tagged ``"type"``;
- main: batch and events are maps.
Fields with defaults may be omitted and new fields keep appearing, so events are decoded
generically (msgspec, in C) and read by position or by name, never by exact shape.
Block hashes are unsigned 64-bit ints (can exceed 2**63) or 32 raw bytes.

Tiers: ``medium`` (None = GPU; upper-cased) says which cache an event is about. vLLM's
offloading connector announces offloaded chunks either with their tokens (``self_describing_kv_events``)
or as placeholders (no tokens, ``block_size`` 0, the chunk's last block hash only); both are
read, only off the GPU.

Events are also validated here, so nothing past this module meets a value it cannot use
(a token id that does not fit 32 bits once stopped a pod's feed for good): an event that
is well-formed msgpack but not a usable vLLM event becomes a ``RejectedEvent`` with a
reason, which the sequencer counts and skips while the rest of its batch applies.
"""

from __future__ import annotations

import math
import time
from array import array
from dataclasses import dataclass
from typing import Any, Union

import msgspec

from ..endpoints import GPU, MEDIUM_PATTERN, medium_of

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

    @property
    def placeholder(self) -> bool:
        """An offloaded chunk named by its last block only (no tokens): the blocks are known
        from the GPU's own events, if at all."""
        return not self.token_ids


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: list[EngineHash]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


@dataclass(frozen=True, slots=True)
class RejectedEvent:
    """An event that cannot be used as it is; counted (by ``reason``) and skipped."""

    kind: str
    """The event type it claimed to be (or ``?``)."""
    reason: str
    """A short fixed word, used as a metric label: never text from the event."""
    detail: str = ""
    lossy: bool = False
    """Skipping it may leave the index claiming blocks the pod dropped (an unreadable
    removal): the sequencer then drops the pod's entries instead."""


Event = Union[BlockStored, BlockRemoved, AllBlocksCleared, RejectedEvent]

MAX_TOKEN_ID = 2**32 - 1
"""Token ids are packed as 4-byte unsigned ints into block keys."""
MAX_HASH_BYTES = 64
"""vLLM's bytes hashes are 32 bytes; anything much longer is not an engine hash."""
MAX_NAME_CHARS = 256
_NAME_FORBIDDEN = frozenset("@:") | {chr(c) for c in range(0x20)} | {chr(0x7F)}
"""``@`` and ``:`` separate the parts of index keys and central-mode topics."""

assert array("I").itemsize == 4, "token ids are validated as 32-bit unsigned ints"


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


def decode_payload(payload: bytes, *, block_size: int | None = None) -> EventBatch:
    """One batch; ``block_size`` (ingest.engineBlockSize) rejects events of another block size."""
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
    ts = float(ts)
    if not math.isfinite(ts):
        ts = time.time()  # the events are still good; only their time is not
    return EventBatch(ts, [_event(e, block_size) for e in events], rank)


class _Reject(Exception):
    def __init__(self, reason: str, detail: str, *, lossy: bool = False):
        super().__init__(detail)
        self.reason, self.detail, self.lossy = reason, detail, lossy


def _fields(raw: Any, names: tuple[str, ...]) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    return dict(zip(names, raw[1:]))


def _hash(value: Any, what: str = "block hash") -> EngineHash:
    if isinstance(value, bool) or not isinstance(value, (int, bytes)):
        raise _Reject("hash_type", f"{what} must be an int or bytes, got {type(value).__name__}")
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise _Reject("hash_type", f"{what} does not fit 64 bits")
        return value & 0xFFFF_FFFF_FFFF_FFFF  # a signed encoder's view of the same 64 bits
    if not 0 < len(value) <= MAX_HASH_BYTES:
        raise _Reject("hash_type", f"{what} of {len(value)} bytes")
    return value


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _medium(f: dict[str, Any], *, lossy: bool = False) -> str | None:
    """None when omitted (the GPU); upper case otherwise, and id-safe (it becomes part of an
    endpoint id)."""
    value = f.get("medium")
    if value is None:
        return None
    if not isinstance(value, str) or not MEDIUM_PATTERN.match(value):
        raise _Reject("medium", "medium must be a short name of letters, digits, '_', '.' or '-'", lossy=lossy)
    return medium_of(value)


def _opt_int(f: dict[str, Any], name: str, *, lossy: bool = False) -> int | None:
    value = f.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Reject(name, f"{name} must be an int", lossy=lossy)
    return value


def _lora_name(f: dict[str, Any]) -> str | None:
    name, lora_id = f.get("lora_name"), f.get("lora_id")
    if name is None or name == "":
        if lora_id is not None:
            # v0.9-era engines name the adapter only by id: its blocks are not the base model's.
            raise _Reject("lora_name", "a LoRA block without lora_name")
        return None
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or not _NAME_FORBIDDEN.isdisjoint(name):
        raise _Reject("lora_name", "lora_name must be a short name without '@', ':' or control characters")
    return name


def _stored(f: dict[str, Any], block_size: int | None) -> BlockStored:
    raw_hashes = f.get("block_hashes")
    if not isinstance(raw_hashes, list):
        raise _Reject("hash_type", "block_hashes must be a list")
    if not raw_hashes:
        raise _Reject("empty", "BlockStored without blocks")
    hashes = [_hash(h) for h in raw_hashes]
    if len(set(hashes)) != len(hashes):
        raise _Reject("duplicate_hash", "the same block hash twice in one event")
    parent = f.get("parent_block_hash")
    if parent is not None:
        parent = _hash(parent, "parent_block_hash")
        if parent in hashes:
            raise _Reject("parent", "a block is its own ancestor")
    medium = _medium(f)
    tokens = f.get("token_ids")
    if not isinstance(tokens, list):
        raise _Reject("token_ids", "token_ids must be a list")
    size = f.get("block_size")
    if not tokens and medium_of(medium) != GPU:
        # vLLM's offloading placeholder: block_size 0, no tokens, no parent worth reading.
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _Reject("block_size", "block_size must be an int")
        return BlockStored(hashes, None, [], size, _lora_name(f), medium, _opt_int(f, "group_idx"),
                           _opt_str(f.get("kv_cache_spec_kind")))
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise _Reject("block_size", "block_size must be a positive int")
    if block_size is not None and size != block_size:
        raise _Reject("block_size", f"block_size {size}, configured engineBlockSize {block_size}")
    try:
        array("I", tokens)  # C-speed check: ints in 0..2**32-1
    except (OverflowError, TypeError) as exc:
        raise _Reject("token_ids", f"token_ids must be ints in 0..{MAX_TOKEN_ID}: {exc}") from None
    kind = _opt_str(f.get("kv_cache_spec_kind"))
    if len(tokens) != len(hashes) * size and kind in (None, "full_attention"):
        # (Other cache kinds may skip null blocks in block_hashes but not in token_ids.)
        raise _Reject("block_count", f"{len(hashes)} blocks of {size} tokens but {len(tokens)} token ids")
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=size,
        lora_name=_lora_name(f),
        medium=medium,
        group_idx=_opt_int(f, "group_idx"),
        kv_cache_spec_kind=kind,
    )


def _removed(f: dict[str, Any]) -> BlockRemoved:
    """The removal; hashes no engine could send are left out (they name no block we keep)."""
    raw = f.get("block_hashes")
    if not isinstance(raw, list):
        raise _Reject("hash_type", "BlockRemoved.block_hashes must be a list", lossy=True)
    hashes: list[EngineHash] = []
    for value in raw:
        try:
            hashes.append(_hash(value))
        except _Reject:
            pass  # no stored block has such a hash, so none is left behind
    return BlockRemoved(hashes, _medium(f, lossy=True), _opt_int(f, "group_idx", lossy=True))


def _event(raw: Any, block_size: int | None = None) -> Event:
    if isinstance(raw, dict):
        tag = raw.get("type")
    elif isinstance(raw, list) and raw and isinstance(raw[0], str):
        tag = raw[0]
    else:
        return RejectedEvent("?", "malformed", "an event is neither a tagged map nor a tagged array")
    kind = tag if tag in ("BlockStored", "BlockRemoved", "AllBlocksCleared") else "?"
    try:
        if tag == "BlockStored":
            return _stored(_fields(raw, _STORED_FIELDS), block_size)
        if tag == "BlockRemoved":
            return _removed(_fields(raw, _REMOVED_FIELDS))
        if tag == "AllBlocksCleared":
            return AllBlocksCleared()
    except _Reject as bad:
        return RejectedEvent(kind, bad.reason, bad.detail, bad.lossy)
    return RejectedEvent(kind, "unknown_type", "an event type this release does not know")


def decode_frames(frames: list[bytes], *, block_size: int | None = None) -> Message:
    """A PUB message: [topic, seq (8 bytes big-endian), payload]."""
    if len(frames) != 3:
        raise DecodeError(f"expected 3 frames (topic, seq, payload), got {len(frames)}")
    topic, seq, payload = frames
    if len(seq) != 8:
        raise DecodeError("sequence frame must be 8 bytes")
    return Message(topic, int.from_bytes(seq, "big"), decode_payload(payload, block_size=block_size))


def decode_replay(frames: list[bytes]) -> tuple[int, bytes]:
    """A replay answer (after the DEALER's empty delimiter): (seq, payload); topic frame optional."""
    if frames and frames[0] == b"":
        frames = frames[1:]
    if len(frames) == 3:
        frames = frames[1:]
    if len(frames) != 2 or len(frames[0]) != 8:
        raise DecodeError("replay answer must be [seq, payload] or [topic, seq, payload]")
    return int.from_bytes(frames[0], "big"), frames[1]
