"""Engine blocks -> router blocks: chaining, removals, restarts (engine 4 tokens, router 8)."""

import pytest

from extproc.blocks import block_keys
from extproc.events.decode import BlockRemoved, BlockStored
from extproc.events.tracker import PodTracker
from extproc.index import Writes

TOKENS = list(range(100, 132))  # 8 engine blocks, 4 router blocks


def tracker(**kw) -> PodTracker:
    return PodTracker("pod-a", "m", router_block=8, max_blocks=128, **kw)


def stored(hashes, parent, tokens, size=4, **kw):
    return BlockStored(list(hashes), parent, list(tokens), size, **kw)


def test_router_blocks_are_recorded_once_all_their_engine_blocks_are_stored():
    t, w = tracker(), Writes()
    assert t.stored(stored([1, 2, 3], None, TOKENS[:12]), w) == 1
    assert list(w.stored) == [("m", block_keys(TOKENS, 8, 128)[0])]
    w2 = Writes()
    assert t.stored(stored([4, 5, 6, 7, 8], 3, TOKENS[12:32]), w2) == 3
    assert [k for _, k in w2.stored] == block_keys(TOKENS, 8, 128)[1:]


def test_the_kthena_scheme_writes_kthena_keys():
    t, w = tracker(scheme="kthena"), Writes()
    t.stored(stored(range(1, 9), None, TOKENS), w)
    assert [k for _, k in w.stored] == block_keys(TOKENS, 8, 128, "kthena")


def test_only_up_to_max_blocks_are_written():
    t, w = PodTracker("pod-a", "m", router_block=8, max_blocks=2), Writes()
    t.stored(stored(range(1, 9), None, TOKENS), w)
    assert [k for _, k in w.stored] == block_keys(TOKENS, 8, 2)


def test_a_block_whose_parent_is_unknown_is_never_keyed():
    t, w = tracker(), Writes()
    assert t.stored(stored([5, 6], 999, TOKENS[16:24]), w) == 0
    assert not w.stored and set(w.engine_put) == {"5", "6"}


def test_removing_a_middle_engine_block_removes_the_router_block_it_was_part_of():
    t, w = tracker(), Writes()
    t.stored(stored(range(1, 9), None, TOKENS), w)
    keys = block_keys(TOKENS, 8, 128)
    removed = Writes()
    t.removed(BlockRemoved([4]), removed)  # engine block 4 is the second half of router block 1
    assert removed.removed == {("m", keys[1])}
    assert removed.engine_del == {"4"}


def test_a_shared_engine_block_belongs_to_every_router_block_built_on_it():
    t = tracker()
    a, b = TOKENS[:8], TOKENS[:4] + list(range(900, 904))
    t.stored(stored([1, 2], None, a), Writes())
    t.stored(stored([3], 1, b[4:]), Writes())  # branch after engine block 1
    removed = Writes()
    t.removed(BlockRemoved([1]), removed)
    assert sorted(k for _, k in removed.removed) == sorted([block_keys(a, 8, 128)[0], block_keys(b, 8, 128)[0]])


def test_blocks_stored_after_a_hole_are_true_holdings_but_the_match_stops_at_the_hole():
    """Later blocks are recorded (the pod holds them; refilling the hole makes them usable),
    while the router block with the hole is gone, so prefix scoring stops there."""
    keys = block_keys(TOKENS, 8, 128)
    t = tracker()
    t.stored(stored([1, 2, 3], None, TOKENS[:12]), Writes())
    hole = Writes()
    t.removed(BlockRemoved([2]), hole)
    assert hole.removed == {("m", keys[0])}
    w = Writes()
    t.stored(stored([4, 5, 6], 3, TOKENS[12:24]), w)
    assert [k for _, k in w.stored] == keys[1:3]


def test_lora_blocks_belong_to_the_adapter_model():
    t, w = tracker(), Writes()
    t.stored(stored([1, 2], None, TOKENS[:8], lora_name="sql-adapter"), w)
    assert [m for m, _ in w.stored] == ["sql-adapter"]


def test_an_engine_block_size_that_does_not_divide_the_router_block_is_refused():
    with pytest.raises(ValueError, match="does not divide"):
        tracker().stored(stored([1], None, TOKENS[:3], size=3), Writes())


def test_a_restarted_tracker_rebuilds_from_the_persisted_engine_map():
    first, w = tracker(), Writes()
    first.stored(stored(range(1, 9), None, TOKENS), w)
    second = tracker()
    second.load(dict(w.engine_put))
    removed = Writes()
    second.removed(BlockRemoved([6]), removed)
    assert removed.removed == {("m", block_keys(TOKENS, 8, 128)[2])}
    more = Writes()
    second.stored(stored([9, 10], 8, list(range(500, 508))), more)
    assert [k for _, k in more.stored] == block_keys(TOKENS + list(range(500, 508)), 8, 128)[4:]


def test_a_block_removed_then_stored_again_in_one_run_stays_stored():
    t, w = tracker(), Writes()
    t.stored(stored([1, 2], None, TOKENS[:8]), w)
    t.removed(BlockRemoved([2]), w)
    t.stored(stored([2], 1, TOKENS[4:8]), w)
    assert list(w.stored) == [("m", block_keys(TOKENS, 8, 128)[0])] and not w.removed
    assert "2" in w.engine_put and not w.engine_del


def test_group_index_keeps_engine_ids_apart():
    t, w = tracker(), Writes()
    t.stored(stored([1, 2], None, TOKENS[:8], group_idx=1), w)
    assert set(w.engine_put) == {"1/1", "1/2"}
