"""One pod's engine blocks -> our router block keys, and back for removals.

The engine's block hashes depend on its own hash function and seed, so we never try to
recompute them. Instead every BlockStored carries the token ids and the parent engine
block; we keep, per engine block, its tokens, its depth from the prompt start and the
router key of the last complete router block before it. A router block (``router_block``
tokens, a multiple of the engine block size) is recorded for the pod once all engine
blocks covering it are stored, chained from the prompt start. A removed engine block
takes with it every router block it was part of.

Pure state: the caller turns the returned Writes into index writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from ..blocks import HashScheme, block_key
from ..index import Writes
from .decode import BlockRemoved, BlockStored, EngineHash

BROKEN = -1
"""router_parent of blocks whose prefix is not known in full: they never complete a router block."""


class EngineBlock(msgspec.Struct, array_like=True, frozen=True):
    """What one engine block contributes; persisted so a restarted ingester can go on."""

    parent: str | None
    tokens: list[int]
    depth: int
    """Engine blocks before this one, from the prompt start."""
    router_parent: int | None
    """Key of the last complete router block at or before this block (None: none yet)."""
    model: str


_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder(EngineBlock).decode


def engine_id(block_hash: EngineHash, group_idx: int | None = None) -> str:
    text = block_hash.hex() if isinstance(block_hash, bytes) else str(block_hash)
    return f"{group_idx}/{text}" if group_idx else text


@dataclass
class PodTracker:
    pod: str
    model: str
    router_block: int
    max_blocks: int
    scheme: HashScheme = "chained"
    blocks: dict[str, EngineBlock] = field(default_factory=dict)
    member_of: dict[str, list[int]] = field(default_factory=dict)
    """engine id -> router keys of the blocks it is part of."""

    def stored(self, event: BlockStored, writes: Writes) -> int:
        """Track the event's blocks; returns how many router blocks it completed."""
        size = event.block_size
        if size <= 0 or self.router_block % size:
            raise ValueError(f"engine block size {size} does not divide blockSizeToHash {self.router_block}")
        model = event.lora_name or self.model
        if event.parent_block_hash is None:
            parent_id, depth, router_parent = None, -1, None
        else:
            parent_id = engine_id(event.parent_block_hash, event.group_idx)
            parent = self.blocks.get(parent_id)
            # An unknown parent (stored before we listened, or removed) leaves the prefix
            # unknown: keep the blocks so removals still apply, but never key them.
            depth, router_parent = (parent.depth, parent.router_parent) if parent else (-1, BROKEN)
        completed = 0
        for i, block_hash in enumerate(event.block_hashes):
            tokens = event.token_ids[i * size : (i + 1) * size]
            if len(tokens) != size:
                break  # a partial trailing block is never cached by the engine
            depth += 1
            eid = engine_id(block_hash, event.group_idx)
            node = EngineBlock(parent_id, tokens, depth, router_parent, model)
            known = self.blocks.get(eid)
            if known is not None and (known.parent, known.tokens, known.model) != (parent_id, tokens, model):
                # The same engine hash with other content (never from a sane engine): what
                # was built on the old block is no longer known to be held.
                self._forget(eid, known, writes)
            if router_parent != BROKEN and (depth + 1) * size % self.router_block == 0:
                key = self._complete(node, eid, size)
                if key is None:
                    router_parent = BROKEN
                else:
                    router_parent = key
                    if (depth + 1) * size // self.router_block <= self.max_blocks:
                        writes.store((model, key))
                        completed += 1
                node = EngineBlock(parent_id, tokens, depth, router_parent, model)
            self.blocks[eid] = node
            writes.put_engine(eid, _pack(node))
            parent_id = eid
        return completed

    def _complete(self, last: EngineBlock, last_id: str, size: int) -> int | None:
        """Key of the router block ending at ``last``, if all its engine blocks are here."""
        chain = self._chain(last_id, last, self.router_block // size)
        if chain is None:
            return None
        tokens = [t for _, block in reversed(chain) for t in block.tokens]
        key = block_key(tokens, last.router_parent, self.scheme)
        self._add_member([eid for eid, _ in chain], key)
        return key

    def _chain(self, last_id: str, last: EngineBlock, count: int) -> list[tuple[str, EngineBlock]] | None:
        """The ``count`` engine blocks ending at ``last`` (last first), or None if one is unknown."""
        chain = [(last_id, last)]
        node = last
        for _ in range(count - 1):
            parent = self.blocks.get(node.parent) if node.parent is not None else None
            if parent is None:
                return None
            chain.append((node.parent, parent))
            node = parent
        return chain

    def _add_member(self, engine_ids: list[str], key: int) -> None:
        for eid in engine_ids:
            keys = self.member_of.setdefault(eid, [])
            if key not in keys:
                keys.append(key)

    def removed(self, event: BlockRemoved, writes: Writes) -> None:
        for block_hash in event.block_hashes:
            eid = engine_id(block_hash, event.group_idx)
            node = self.blocks.pop(eid, None)
            if node is None:
                continue
            writes.del_engine(eid)
            self._forget(eid, node, writes)

    def _forget(self, eid: str, node: EngineBlock, writes: Writes) -> None:
        for key in self.member_of.pop(eid, ()):
            writes.remove((node.model, key))

    def clear(self) -> None:
        self.blocks.clear()
        self.member_of.clear()

    def load(self, engine_map: dict[str, bytes]) -> None:
        """Adopt a persisted engine map and rebuild which router blocks each block is in."""
        self.clear()
        for eid, packed in engine_map.items():
            try:
                self.blocks[eid] = _unpack(packed)
            except msgspec.DecodeError:
                continue
        for eid, node in self.blocks.items():
            size = len(node.tokens)
            if size and node.router_parent not in (None, BROKEN) and (node.depth + 1) * size % self.router_block == 0:
                # This block completed a router block; its key is the router_parent it carries.
                chain = self._chain(eid, node, self.router_block // size)
                if chain is not None:
                    self._add_member([member for member, _ in chain], node.router_parent)
