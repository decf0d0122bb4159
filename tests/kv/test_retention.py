"""Retention levels: the pool evicts the lowest level first (LRU within it), and the KV manager
keeps every device block at the highest level of its owners, as owners set levels, claim blocks
and have their runs released."""

from __future__ import annotations

import pytest

from kvrt.runtime.kv.block_pool import DEFAULT_RETENTION, BlockPool
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import KVManager
from kvrt.runtime.kv.owners import Owner
from tests.kv.helpers import adopt_prefix

BLOCK = 4
A, B = ("run-a", "planner"), ("run-b", "coder")


def cached(pool: BlockPool, count: int) -> list[int]:
    """`count` keyed blocks, released in order: cached, the first the least recent."""
    blocks = pool.allocate(count)
    for block in blocks:
        assert pool.register(block, f"k{block}".encode(), (block,))
    pool.release(blocks)
    return blocks


def test_eviction_takes_the_lowest_level_first_and_lru_within_it() -> None:
    pool = BlockPool(6)
    b0, b1, b2, b3, b4, b5 = cached(pool, 6)
    pool.set_retention(b0, 5)
    pool.set_retention(b3, 0)
    pool.set_retention(b5, 0)
    pool.set_retention(b1, 7)
    # Level 0 (b3 then b5: set in that order), default 2 (b2, b4 by release), 5 (b0), 7 (b1).
    assert [pool.allocate(1)[0] for _ in range(6)] == [b3, b5, b2, b4, b0, b1]
    assert all(pool.blocks[b].retention == DEFAULT_RETENTION for b in range(6))
    pool.check_integrity()


def test_without_levels_eviction_is_plain_lru() -> None:
    pool = BlockPool(4)
    blocks = cached(pool, 4)
    pool.set_recency(blocks[2], recent=False)
    assert pool.allocate(4) == [blocks[2], blocks[0], blocks[1], blocks[3]]
    pool.check_integrity()


def test_a_cached_block_joins_its_new_level_as_the_most_recent() -> None:
    pool = BlockPool(4)
    b0, b1, b2, b3 = cached(pool, 4)
    pool.set_retention(b1, 4)
    pool.set_retention(b0, 4)  # after b1 in level 4, though released before it
    pool.set_retention(b1, 4)  # the same level again: b1 keeps its place
    pool.set_recency(b3, recent=False)  # within level 2: b3 before b2
    assert pool.num_evictable_below(4) == 2 and pool.num_evictable_below(5) == 4
    assert pool.num_evictable_below(0) == 0
    assert pool.allocate(4) == [b3, b2, b1, b0]
    pool.check_integrity()


def test_a_level_set_in_use_applies_when_the_block_is_cached() -> None:
    pool = BlockPool(3)
    in_use = pool.allocate(1)[0]
    assert pool.register(in_use, b"used", (1,))
    pool.set_retention(in_use, 6)
    others = cached(pool, 2)
    assert pool.num_evictable_below(3) == 2 and pool.usage().in_use == 1
    pool.release([in_use])  # released last, yet evicted last: its level is above theirs
    assert pool.num_evictable_below(7) == 3 and pool.num_evictable_below(6) == 2
    assert pool.allocate(3) == [*others, in_use]
    pool.check_integrity()


def test_a_level_set_in_flight_applies_when_the_block_lands() -> None:
    pool = BlockPool(2)
    landing = pool.begin_move_in(1)[0]
    pool.set_retention(landing, 0)
    other = cached(pool, 1)[0]
    assert pool.finish_move_in(landing, b"up", (9,), ok=True)
    assert pool.allocate(1) == [landing]  # level 0: before the older default block
    assert pool.blocks[other].retention == DEFAULT_RETENTION
    pool.check_integrity()


def test_a_freed_or_evicted_block_forgets_its_level() -> None:
    pool = BlockPool(2)
    unkeyed = pool.allocate(1)[0]
    pool.set_retention(unkeyed, 7)
    pool.release([unkeyed])  # unkeyed: free, its level back to the default
    assert pool.blocks[unkeyed].retention == DEFAULT_RETENTION
    pool.set_retention(unkeyed, 5)  # a free block has no content to retain
    assert pool.blocks[unkeyed].retention == DEFAULT_RETENTION
    kept = cached(pool, 2)
    pool.set_retention(kept[0], 6)
    pool.drop_cached(kept[0])
    assert pool.blocks[kept[0]].retention == DEFAULT_RETENTION
    pool.check_integrity()


@pytest.mark.parametrize("level", [-1, 8, 2.5])
def test_a_level_outside_0_to_7_is_a_value_error(level) -> None:
    kv = KVManager(4, BLOCK)
    with pytest.raises(ValueError, match="retention level"):
        kv.set_retention(A, level)
    assert kv.retention_of(A) == DEFAULT_RETENTION
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="retention level"):
        pool.set_retention(0, -1)


# -- the KV manager: a block's level is its owners' highest -----------------------------------


def compute(kv: KVManager, owner: Owner, tokens: list[int]) -> list[int]:
    """Computes `tokens` for `owner`, keys the full blocks and frees the table: they sit cached
    (a prefix already cached is adopted, and so shared)."""
    table = BlockTable(BLOCK, owner=owner)
    match = kv.match_prefix(tokens, b"")
    adopt_prefix(kv, table, match)
    kv.grow(table, len(tokens))
    kv.key_full_blocks(table, tokens, len(tokens), b"")
    blocks = table.block_ids()[: len(tokens) // BLOCK]
    kv.free(table)
    return blocks


def levels(kv: KVManager, blocks: list[int]) -> list[int]:
    return [kv.pool.blocks[b].retention for b in blocks]


def test_an_owners_level_applies_to_its_blocks_now_and_later() -> None:
    kv = KVManager(8, BLOCK)
    first = compute(kv, A, list(range(1, 9)))  # 2 blocks
    kv.set_retention(A, 6)
    assert kv.retention_of(A) == 6 and levels(kv, first) == [6, 6]
    later = compute(kv, A, list(range(20, 29)))  # claimed after the level was set
    assert levels(kv, later) == [6, 6]
    other = compute(kv, B, list(range(40, 45)))
    assert levels(kv, other) == [DEFAULT_RETENTION]
    kv.check_integrity()
    # Under pressure B's block goes first (after the 3 free ones), though A's are older.
    assert kv.usage().free == 3
    taken = kv.pool.allocate(4)
    assert taken[3] == other[0] and kv.match_prefix(list(range(40, 45)), b"").block_ids == []
    assert kv.match_prefix(list(range(1, 9)), b"").block_ids == first[:1]
    kv.pool.release(taken)
    for run in ("run-a", "run-b"):
        kv.release_run(run)
    assert kv.usage().in_use == 0 and kv.owners.is_empty()
    kv.check_integrity()


def test_a_shared_block_takes_its_owners_highest_level_and_drops_back_at_release() -> None:
    kv = KVManager(8, BLOCK)
    blocks = compute(kv, A, list(range(1, 10)))  # 2 full blocks
    shared = compute(kv, B, list(range(1, 5)) + list(range(60, 65)))  # adopts A's first
    assert shared[0] == blocks[0] and shared[1] != blocks[1]
    kv.set_retention(A, 1)
    # blocks[0]: max(A 1, B default 2); blocks[1]: A's alone.
    assert levels(kv, blocks) == [DEFAULT_RETENTION, 1]
    kv.set_retention(B, 7)
    assert levels(kv, blocks) == [7, 1] and levels(kv, shared) == [7, 7]
    kv.set_retention(A, 5)
    assert levels(kv, blocks) == [7, 5]
    kv.check_integrity()
    # B's own block, now nobody's, stays cached at the default; the shared one falls back to
    # A's level.
    kv.release_run("run-b")
    assert kv.retention_of(B) == DEFAULT_RETENTION and kv.retention_of(A) == 5
    assert levels(kv, shared) == [5, DEFAULT_RETENTION] and levels(kv, blocks) == [5, 5]
    assert kv.pool.is_cached(shared[1])
    kv.check_integrity()
    kv.release_run("run-a")
    assert levels(kv, blocks) == [DEFAULT_RETENTION] * 2
    assert kv.retention_of(A) == DEFAULT_RETENTION
    kv.check_integrity()


def test_a_block_a_request_still_reads_goes_back_to_the_default_when_its_run_ends() -> None:
    kv = KVManager(4, BLOCK)
    tokens = list(range(1, 10))
    reader = BlockTable(BLOCK, owner=A)
    kv.grow(reader, len(tokens))
    kv.key_full_blocks(reader, tokens, len(tokens), b"")
    kv.set_retention(A, 0)
    assert levels(kv, reader.block_ids()) == [0, 0, 0]
    kv.release_run("run-a")  # the table still reads them: they stay, unowned, at the default
    assert levels(kv, reader.block_ids()) == [DEFAULT_RETENTION] * 3
    kv.check_integrity()
    kv.free(reader)
    assert kv.usage().cached == 2
    kv.pool.release(kv.pool.allocate(4))  # nobody's cache: evicted, then freed
    assert kv.usage().free == 4
    kv.check_integrity()


def test_setting_the_default_level_back_forgets_the_owners_level() -> None:
    kv = KVManager(4, BLOCK)
    blocks = compute(kv, A, list(range(1, 10)))
    kv.set_retention(A, 4)
    assert kv.owners.has_levels and levels(kv, blocks) == [4, 4]
    kv.set_retention(A, DEFAULT_RETENTION)
    assert not kv.owners.has_levels and levels(kv, blocks) == [DEFAULT_RETENTION] * 2
    kv.release_run("run-a")
    kv.check_integrity()


def test_an_owners_blocks_join_their_new_level_tail_first() -> None:
    """So a chain loses its last blocks before its first: what is left stays a usable prefix."""
    kv = KVManager(4, BLOCK)
    blocks = compute(kv, A, list(range(1, 14)))  # 3 full blocks, released head first
    assert blocks == sorted(blocks)
    kv.set_retention(A, 3)
    assert kv.pool.allocate(4)[1:] == blocks[::-1]  # after the one free block
    kv.release_run("run-a")
    kv.pool.release(list(range(4)))
    kv.check_integrity()
