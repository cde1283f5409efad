"""Token ids -> block keys, the names the index is written and read under.

Only full blocks are keyed: the engine caches whole blocks, so a trailing partial block
can never be a cache hit. Keys are 63-bit integers (so they read the same in every
language that stores them as a signed 64-bit value), written in decimal in Redis keys.

Schemes:
- ``chained`` (default): key[i] = H(key[i-1] as 8 bytes big-endian || tokens of block i),
  with no parent for block 0. A key names the whole prefix up to its block, so a match on
  block i implies the same tokens before it.
- ``kthena``: key[i] = H(tokens of block i) for every block, as the Kthena runtime writes
  it; blocks are independent, so only the prefix scoring keeps a match honest.

H(data) = first 8 bytes of SHA-256(data) as a big-endian integer, top bit cleared.
Token ids are packed as 4-byte big-endian unsigned integers.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Literal

HashScheme = Literal["chained", "kthena"]

_MASK63 = 0x7FFF_FFFF_FFFF_FFFF


def _h(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") & _MASK63


def block_key(tokens: Sequence[int], parent: int | None, scheme: HashScheme = "chained") -> int:
    """The key of one block given its parent's key (None for the first block)."""
    packed = struct.pack(f">{len(tokens)}I", *tokens)
    if scheme == "chained" and parent is not None:
        return _h(parent.to_bytes(8, "big") + packed)
    return _h(packed)


def block_keys(
    tokens: Sequence[int],
    block_size: int,
    max_blocks: int,
    scheme: HashScheme = "chained",
    parent: int | None = None,
) -> list[int]:
    """Keys of the full blocks of ``tokens`` (at most ``max_blocks``), from the start."""
    count = min(len(tokens) // block_size, max_blocks)
    keys: list[int] = []
    for i in range(count):
        parent = block_key(tokens[i * block_size : (i + 1) * block_size], parent, scheme)
        keys.append(parent)
    return keys
