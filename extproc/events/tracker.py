"""One pod's engine blocks -> our router block keys, and back for removals.

The engine's block hashes depend on its own hash function and seed, so we never try to
recompute them. Instead every BlockStored carries the token ids and the parent engine
block; we keep, per engine block, its tokens, its depth from the prompt start and the
router key of the last complete router block before it. A router block (``router_block``
tokens, a multiple of the engine block size) is recorded for the pod once all engine
blocks covering it are stored, chained from the prompt start. A removed engine block
takes with it every router block it was part of.

Tiers: a pod's engine keeps one tracker for its GPU blocks and one per tier it offloads to
(CPU, STORAGE: vLLM's offloading connector). Engine hashes are the same in every tier, so a
tier's tracker finds a parent it does not hold in the GPU's (``fallback``), and router keys,
computed from tokens alone, are the same in every tier. A tier's tracker counts repeated
announcements of a block (vLLM re-announces blocks shared by overlapping chunks and fans a
chunk's eviction out to them: consumers are to reference-count), and expands a chunk
announced by its last block alone (no ``self_describing_kv_events``) from the GPU's blocks.

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
    fallback: "PodTracker | None" = None
    """A tier's tracker: the GPU's, where a parent this tier does not hold is looked up."""
    refcounted: bool = False
    """Count repeated stores of a block; a removal takes one (offloading tiers)."""
    refs: dict[str, int] = field(default_factory=dict)
    """engine id -> announcements beyond the first (refcounted trackers)."""
    chunks: dict[str, list[str]] = field(default_factory=dict)
    """last engine id of a chunk announced by it alone -> the chunk's engine ids."""

    def stored(self, event: BlockStored, writes: Writes) -> int:
        """Track the event's blocks; returns how many router blocks it completed."""
        size = event.block_size
        if size <= 0 or self.router_block % size:
            raise ValueError(f"engine block size {size} does not divide blockSizeToHash {self.router_block}")
        blocks = []
        for i, block_hash in enumerate(event.block_hashes):
            tokens = event.token_ids[i * size : (i + 1) * size]
            if len(tokens) != size:
                break  # a partial trailing block is never cached by the engine
            blocks.append((engine_id(block_hash, event.group_idx), tokens))
        parent_id = None if event.parent_block_hash is None else engine_id(event.parent_block_hash, event.group_idx)
        return self._store(parent_id, blocks, size, event.lora_name or self.model, writes)

    def stored_chunk(self, block_hash: EngineHash, group_idx: int | None, chunk_blocks: int, writes: Writes) -> bool:
        """A tier's chunk announced by its last engine block only (vLLM's placeholder: no
        tokens): its ``chunk_blocks`` blocks are taken from the GPU's tracker. False if the
        GPU's tracker does not know them all (then nothing is recorded)."""
        source = self.fallback
        last = engine_id(block_hash, group_idx)
        node = source.blocks.get(last) if source is not None else None
        if node is None:
            return False
        chain = source._chain(last, node, chunk_blocks)
        if chain is None:
            return False
        chain.reverse()
        first = chain[0][1]
        self._store(first.parent, [(eid, block.tokens) for eid, block in chain], len(first.tokens), first.model,
                    writes)
        if chunk_blocks > 1:
            self.chunks[last] = [eid for eid, _ in chain]
        return True

    def _parent(self, parent_id: str) -> EngineBlock | None:
        parent = self.blocks.get(parent_id)
        if parent is None and self.fallback is not None:
            parent = self.fallback.blocks.get(parent_id)
        return parent

    def _store(self, parent_id: str | None, blocks: list[tuple[str, list[int]]], size: int, model: str,
               writes: Writes) -> int:
        if parent_id is None:
            depth, router_parent = -1, None
        else:
            parent = self._parent(parent_id)
            # An unknown parent (stored before we listened, or removed) leaves the prefix
            # unknown: keep the blocks so removals still apply, but never key them.
            depth, router_parent = (parent.depth, parent.router_parent) if parent else (-1, BROKEN)
        completed = 0
        for eid, tokens in blocks:
            depth += 1
            node = EngineBlock(parent_id, tokens, depth, router_parent, model)
            known = self.blocks.get(eid)
            if known is not None and (known.parent, known.tokens, known.model) != (parent_id, tokens, model):
                # The same engine hash with other content (never from a sane engine): what
                # was built on the old block is no longer known to be held.
                self._forget(eid, known, writes)
                self.refs.pop(eid, None)
            elif known is not None and self.refcounted:
                self.refs[eid] = self.refs.get(eid, 0) + 1
            if router_parent != BROKEN and (depth + 1) * size % self.router_block == 0:
                key = self._complete(node, eid, size)
                if key is None and self.fallback is not None:
                    # Not all of it in this tier (the rest is on the GPU): no presence here, but
                    # its key chains the next router block, which may be.
                    router_parent = self._key_across(node, eid, size)
                elif key is None:
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

    def _key_across(self, last: EngineBlock, last_id: str, size: int) -> int:
        """Key of the router block ending at ``last``, its blocks taken from this tier or the
        GPU's; BROKEN if neither knows them all."""
        chain = self._chain(last_id, last, self.router_block // size, across=True)
        if chain is None:
            return BROKEN
        return block_key([t for _, block in reversed(chain) for t in block.tokens], last.router_parent, self.scheme)

    def _chain(self, last_id: str, last: EngineBlock, count: int, *,
               across: bool = False) -> list[tuple[str, EngineBlock]] | None:
        """The ``count`` engine blocks ending at ``last`` (last first), or None if one is unknown
        (``across``: a block this tier does not hold may come from the GPU's tracker)."""
        chain = [(last_id, last)]
        node = last
        find = self._parent if across else self.blocks.get
        for _ in range(count - 1):
            parent = find(node.parent) if node.parent is not None else None
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
            for member in self.chunks.pop(eid, None) or (eid,):
                self._remove(member, writes)

    def _remove(self, eid: str, writes: Writes) -> None:
        more = self.refs.get(eid)
        if more:
            if more == 1:
                del self.refs[eid]
            else:
                self.refs[eid] = more - 1
            return
        node = self.blocks.pop(eid, None)
        if node is None:
            return
        writes.del_engine(eid)
        self._forget(eid, node, writes)

    def _forget(self, eid: str, node: EngineBlock, writes: Writes) -> None:
        for key in self.member_of.pop(eid, ()):
            writes.remove((node.model, key))

    def clear(self) -> None:
        self.blocks.clear()
        self.member_of.clear()
        self.refs.clear()
        self.chunks.clear()

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
