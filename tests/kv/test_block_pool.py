import pytest

from kvrt.runtime.kv.block_pool import BlockPool, OutOfBlocks


def test_allocate_takes_free_blocks_in_order_then_refuses():
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(1) == [3]
    with pytest.raises(OutOfBlocks):
        pool.allocate(1)
    pool.check_integrity()


def test_released_unkeyed_blocks_return_to_the_free_list():
    pool = BlockPool(2)
    blocks = pool.allocate(2)
    pool.release(blocks)
    usage = pool.usage()
    assert (usage.free, usage.cached, usage.in_use) == (2, 0, 0)
    pool.check_integrity()


def test_keyed_block_stays_findable_after_release_until_evicted():
    pool = BlockPool(2)
    [a, b] = pool.allocate(2)
    assert pool.register(a, b"key-a", (1, 2))
    pool.release([a, b])
    assert pool.usage().cached == 1
    assert pool.lookup(b"key-a", (1, 2)) == a
    # The free block goes first; only then is the cached one evicted.
    assert pool.allocate(1) == [b]
    assert pool.lookup(b"key-a", (1, 2)) == a
    assert pool.allocate(1) == [a]
    assert pool.lookup(b"key-a", (1, 2)) is None
    assert pool.evictions == 1
    pool.check_integrity()


def test_eviction_is_least_recently_released_first():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, block in enumerate(blocks):
        pool.register(block, bytes([i]), (i,))
    pool.release([blocks[1]])
    pool.release([blocks[0]])
    pool.release([blocks[2]])
    assert pool.allocate(2) == [blocks[1], blocks[0]]
    pool.check_integrity()


def test_acquire_takes_a_cached_block_out_of_the_lru():
    pool = BlockPool(2)
    [a, _] = pool.allocate(2)
    pool.register(a, b"k", (7,))
    pool.release([a])
    pool.acquire(a)
    assert pool.usage().in_use == 2
    with pytest.raises(OutOfBlocks):
        pool.allocate(1)
    pool.check_integrity()


def test_hash_hit_with_different_tokens_is_not_trusted():
    pool = BlockPool(1)
    [a] = pool.allocate(1)
    pool.register(a, b"k", (1, 2))
    assert pool.lookup(b"k", (1, 3)) is None


def test_second_block_with_the_same_key_stays_unkeyed():
    pool = BlockPool(2)
    [a, b] = pool.allocate(2)
    assert pool.register(a, b"k", (1,))
    assert not pool.register(b, b"k", (1,))
    pool.release([a, b])
    assert (pool.usage().free, pool.usage().cached) == (1, 1)
    pool.check_integrity()


def test_double_release_is_an_error():
    pool = BlockPool(1)
    [a] = pool.allocate(1)
    pool.release([a])
    with pytest.raises(RuntimeError):
        pool.release([a])


def test_on_drop_fires_for_unkeyed_release_but_not_for_keyed_release():
    dropped: list[int] = []
    pool = BlockPool(3, on_drop=dropped.append)
    [a, b, c] = pool.allocate(3)
    pool.register(b, b"k", (1,))
    pool.release([a, b, c])
    assert dropped == [a, c]
    pool.check_integrity()


def test_on_drop_fires_when_allocate_evicts_a_cached_block():
    dropped: list[int] = []
    pool = BlockPool(2, on_drop=dropped.append)
    [a, b] = pool.allocate(2)
    pool.register(a, b"k", (1,))
    pool.release([a])
    assert dropped == []
    assert pool.allocate(1) == [a]
    assert dropped == [a]
    pool.check_integrity()


def test_drop_cached_unkeys_and_frees_a_cached_block():
    dropped: list[int] = []
    pool = BlockPool(3, on_drop=dropped.append)
    [a, b, c] = pool.allocate(3)
    pool.register(a, b"ka", (1,))
    pool.register(b, b"kb", (2,))
    pool.release([a, b])
    pool.drop_cached(b)
    assert dropped == [b]
    assert pool.lookup(b"kb", (2,)) is None
    assert pool.lookup(b"ka", (1,)) == a
    assert (pool.usage().free, pool.usage().cached, pool.usage().in_use) == (1, 1, 1)
    # The dropped block is free now, so it goes before the cached one is evicted.
    assert pool.allocate(1) == [b]
    assert pool.evictions == 0
    pool.check_integrity()


def test_drop_cached_refuses_blocks_that_are_not_cached():
    pool = BlockPool(3)
    [used, keyed_used, _] = pool.allocate(3)
    pool.register(keyed_used, b"k", (1,))
    with pytest.raises(ValueError):
        pool.drop_cached(used)
    with pytest.raises(ValueError):
        pool.drop_cached(keyed_used)  # a reader holds it
    pool.release([used])
    with pytest.raises(ValueError):
        pool.drop_cached(used)  # free already
    pool.check_integrity()
