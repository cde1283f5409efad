"""msgspec structs that mirror vLLM's own KV event declarations, one set per wire layout.

Tests encode with these exactly as the engine does, so the decoder is checked against
what vLLM really sends, not against our reading of it.
"""

from __future__ import annotations

from typing import Any

import msgspec


# v0.9-era: batch and events are arrays; an event is ["BlockStored", field1, ...].
class V09Event(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class V09BlockStored(V09Event, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None


class V09BlockRemoved(V09Event, tag="BlockRemoved"):
    block_hashes: list[int]


class V09AllBlocksCleared(V09Event, tag="AllBlocksCleared"):
    pass


class V09Batch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[V09BlockStored | V09BlockRemoved | V09AllBlocksCleared]
    data_parallel_rank: int | None = None


# 0.32/0.33: the batch is an array, events are maps tagged "type".
class V032Event(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class V032BlockStored(V032Event, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None = None


class V032BlockRemoved(V032Event, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None


class V032AllBlocksCleared(V032Event, tag="AllBlocksCleared"):
    pass


class V032Batch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[V032BlockStored | V032BlockRemoved | V032AllBlocksCleared]
    data_parallel_rank: int | None = None


# main: batch and events are maps; stored events carry more optional fields.
class MainEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class MainBlockStored(MainEvent, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class MainBlockRemoved(MainEvent, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class MainAllBlocksCleared(MainEvent, tag="AllBlocksCleared"):
    pass


class MainBatch(msgspec.Struct, omit_defaults=True, gc=False):
    ts: float
    events: list[MainBlockStored | MainBlockRemoved | MainAllBlocksCleared]
    data_parallel_rank: int | None = None


def encode(batch: msgspec.Struct) -> bytes:
    return msgspec.msgpack.encode(batch)


def frames(batch: msgspec.Struct, seq: int, topic: bytes = b"kv-events") -> list[bytes]:
    return [topic, seq.to_bytes(8, "big"), encode(batch)]
