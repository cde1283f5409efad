"""Block keys: full blocks only, capped, and stable across releases (published vectors)."""

import hashlib

import pytest

from extproc.blocks import block_key, block_keys

TOKENS = list(range(1, 13))

# Published vectors: tokens 1..12, block size 4. Changing these breaks every index in a
# fleet, so they are fixed here, not derived from the code under test.
CHAINED_VECTORS = [4233425515844289900, 985632545371803485, 3914675201229998038]
KTHENA_VECTORS = [4233425515844289900, 929962052233473060, 2504572680980851614]


def test_chained_keys_match_published_vectors():
    assert block_keys(TOKENS, 4, 128, "chained") == CHAINED_VECTORS


def test_kthena_keys_match_published_vectors():
    assert block_keys(TOKENS, 4, 128, "kthena") == KTHENA_VECTORS


def test_kthena_scheme_is_the_kthena_runtime_formula():
    """Kthena hashes each block's tokens alone: sha256 of 4-byte big-endian ids, 63 bits."""
    tokens = [151644, 8948, 198, 2610, 525, 10950, 13, 151645]
    expected = [
        int.from_bytes(hashlib.sha256(b"".join(t.to_bytes(4, "big") for t in block)).digest()[:8], "big")
        & 0x7FFFFFFFFFFFFFFF
        for block in (tokens[:4], tokens[4:])
    ]
    assert block_keys(tokens, 4, 128, "kthena") == expected == [7440364300204563411, 278515855718668543]


def test_a_chained_key_names_the_whole_prefix():
    a = block_keys([9, 9, 9, 9, 1, 2, 3, 4], 4, 128)
    b = block_keys([8, 8, 8, 8, 1, 2, 3, 4], 4, 128)
    assert a[1] != b[1], "same second block after a different first block must get another key"
    assert block_keys([9, 9, 9, 9, 1, 2, 3, 4], 4, 128, "kthena")[1] == block_keys([8, 8, 8, 8, 1, 2, 3, 4], 4, 128, "kthena")[1]


def test_trailing_partial_block_is_never_keyed():
    assert len(block_keys(list(range(11)), 4, 128)) == 2
    assert block_keys(list(range(3)), 4, 128) == []


def test_at_most_max_blocks_are_keyed():
    keys = block_keys(list(range(100)), 4, 5)
    assert keys == block_keys(list(range(20)), 4, 128)


def test_keys_fit_a_signed_64_bit_integer():
    keys = block_keys(list(range(4096)), 16, 256)
    assert all(0 <= k < 2**63 for k in keys)


@pytest.mark.parametrize("scheme", ["chained", "kthena"])
def test_block_key_continues_a_chain_from_its_parent(scheme):
    keys = block_keys(TOKENS, 4, 128, scheme)
    assert block_key(TOKENS[8:12], keys[1], scheme) == keys[2]
    assert block_keys(TOKENS[4:], 4, 128, scheme, parent=keys[0]) == keys[1:]
