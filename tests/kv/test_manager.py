import hashlib
from array import array

from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import KVManager
from kvrt.runtime.kv.owners import AgentResidency
from kvrt.runtime.kv.prefix_hash import ROOT_KEY, block_key
from tests.kv.helpers import adopt_prefix, device_plan


def _fill(kv: KVManager, tokens: list[int], salt: bytes = b"") -> BlockTable:
    table = BlockTable(kv.block_size)
    kv.grow(table, len(tokens))
    kv.key_full_blocks(table, tokens, len(tokens), salt)
    return table


def test_block_key_is_chained_sha256_over_parent_salt_tokens():
    expected = hashlib.sha256(
        ROOT_KEY + (3).to_bytes(4, "little") + b"abc" + array("q", [5, 6]).tobytes()
    ).digest()
    assert block_key(ROOT_KEY, b"abc", (5, 6)) == expected
    assert block_key(expected, b"abc", (5, 6)) != expected


def test_slots_cover_each_position_of_the_table():
    kv = KVManager(num_blocks=8, block_size=4)
    table = BlockTable(4)
    kv.grow(table, 6)
    assert table.block_ids() == [0, 1]
    assert table.slots.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    kv.grow(table, 9)
    assert table.slots.tolist()[8:] == [8, 9, 10, 11]
    assert all(entry.shift == 0 for entry in table.entries)


def test_prefix_match_finds_full_blocks_and_leaves_a_token_to_compute():
    kv = KVManager(num_blocks=8, block_size=4)
    tokens = list(range(12))
    first = _fill(kv, tokens)
    first_ids = first.block_ids()
    kv.free(first)
    # The identical prompt: two of three blocks match, the last must be recomputed for logits.
    assert kv.match_prefix(tokens, b"").block_ids == first_ids[:2]
    # An extended prompt matches all three.
    assert kv.match_prefix(tokens + [99], b"").num_blocks == 3
    # A prompt that differs in the second block matches only the first.
    assert kv.match_prefix(tokens[:5] + [77] + tokens[6:], b"").num_blocks == 1
    kv.check_integrity()


def test_salt_separates_tenants():
    kv = KVManager(num_blocks=8, block_size=4)
    tokens = list(range(9))
    kv.free(_fill(kv, tokens, salt=b"tenant-a"))
    assert kv.match_prefix(tokens, b"tenant-b").num_blocks == 0
    assert kv.match_prefix(tokens, b"tenant-a").num_blocks == 2


def test_adopted_prefix_is_shared_and_freed_once_per_reader():
    kv = KVManager(num_blocks=8, block_size=4)
    tokens = list(range(9))
    owner = _fill(kv, tokens)
    reader = BlockTable(4)
    adopt_prefix(kv, reader, kv.match_prefix(tokens, b""))
    assert reader.block_ids() == owner.block_ids()[:2]
    assert [kv.pool.blocks[b].ref_count for b in reader.block_ids()] == [2, 2]
    kv.free(owner)
    kv.free(reader)
    usage = kv.usage()
    assert (usage.in_use, usage.cached, usage.free) == (0, 2, 6)
    kv.check_integrity()


def test_keying_takes_only_blocks_full_of_computed_tokens():
    kv = KVManager(num_blocks=8, block_size=4)
    table = BlockTable(4)
    tokens = list(range(10))
    kv.grow(table, 10)
    kv.key_full_blocks(table, tokens, 7, b"")
    assert table.num_keyed == 1
    kv.key_full_blocks(table, tokens, 10, b"")
    assert table.num_keyed == 2
    assert kv.pool.blocks[table.entries[2].block].key is None


def test_blocks_entering_an_owned_table_are_claimed_for_its_owner():
    kv = KVManager(num_blocks=8, block_size=4)
    tokens = list(range(9))
    planner = BlockTable(4, owner=("run-a", "planner"))
    kv.grow(planner, len(tokens))
    kv.key_full_blocks(planner, tokens, len(tokens), b"")
    assert planner.block_ids() == [0, 1, 2]
    coder = BlockTable(4, owner=("run-a", "coder"))
    adopt_prefix(kv, coder, kv.match_prefix(tokens, b""))
    kv.grow(coder, len(tokens))
    assert coder.block_ids() == [0, 1, 3]
    assert kv.residency("run-a") == {
        "planner": AgentResidency(device_blocks=3, shared_blocks=2),
        "coder": AgentResidency(device_blocks=3, shared_blocks=2),
    }
    assert sorted(kv.owners.held_counts()) == [3, 3]
    unowned = BlockTable(4)
    kv.grow(unowned, 4)
    assert kv.owners.block_ids() == {0, 1, 2, 3}
    kv.check_integrity()


def test_freeing_keeps_ownership_of_cached_blocks_and_drops_the_rest():
    kv = KVManager(num_blocks=4, block_size=4)
    tokens = list(range(10))
    table = BlockTable(4, owner=("run-a", "planner"))
    kv.grow(table, len(tokens))
    kv.key_full_blocks(table, tokens, len(tokens), b"")
    kv.free(table)
    # Blocks 0 and 1 are full and keyed (cached now); block 2 held two tokens and is free.
    assert kv.owners.block_ids() == {0, 1}
    # Allocating all four evicts the cached blocks: their content, and ownership, are gone.
    kv.grow(BlockTable(4), 16)
    assert kv.residency("run-a") == {}
    kv.check_integrity()


def test_release_run_leaves_what_only_it_held_cached_for_later_prompts():
    kv = KVManager(num_blocks=8, block_size=4)
    shared = list(range(8))
    a_table = BlockTable(4, owner=("run-a", "planner"))
    kv.grow(a_table, 12)
    kv.key_full_blocks(a_table, shared + [50, 51, 52, 53], 12, b"")  # blocks 0, 1 shared; 2 run-a's
    b_table = BlockTable(4, owner=("run-b", "planner"))
    adopt_prefix(kv, b_table, kv.match_prefix(shared + [60], b""))
    kv.grow(b_table, 9)
    assert b_table.block_ids() == [0, 1, 3]
    kv.free(a_table)
    # run-a alone held its cached block 2: released, yet a later prompt still finds it (as a
    # prefix cache keeps a finished request's blocks); 0 and 1 are run-b's too (and in use).
    assert kv.release_run("run-a") == 1
    assert kv.match_prefix(shared + [50, 51, 52, 53, 0], b"").block_ids == [0, 1, 2]
    assert kv.residency("run-a") == {}
    assert kv.residency("run-b") == {"planner": AgentResidency(3, 0)}
    assert kv.owners.held_counts() == [3]  # every owner left, run-a's gone
    assert (kv.usage().free, kv.usage().cached, kv.usage().in_use) == (4, 1, 3)
    kv.free(b_table)
    # Blocks still read by a live unowned table are not counted as released.
    reader = BlockTable(4)
    adopt_prefix(kv, reader, kv.match_prefix(shared + [60], b""))
    assert kv.release_run("run-b") == 0
    assert kv.owners.is_empty()
    kv.free(reader)
    assert (kv.usage().free, kv.usage().cached, kv.usage().in_use) == (5, 3, 0)
    kv.check_integrity()

def test_can_allocate_counts_the_cached_blocks_a_match_takes():
    kv = KVManager(num_blocks=4, block_size=4)
    tokens = list(range(9))
    kv.free(_fill(kv, tokens))  # blocks 0, 1 keyed and cached; 2 free (unkeyed); 3 free
    match = kv.match_prefix(tokens + [50] * 8, b"")
    assert match.block_ids == [0, 1]
    # 4 allocatable, but adopting takes the 2 cached ones: 2 more blocks fit, 3 do not.
    assert kv.can_allocate(device_plan(kv, match), 16)
    assert not kv.can_allocate(device_plan(kv, match), 17)
    kv.check_integrity()


# ---- pins ----------------------------------------------------------------------------------


def _owned(kv: KVManager, owner, tokens: list[int]) -> BlockTable:
    """An owned call of `tokens`, computed and finished: its full blocks stay cached."""
    table = BlockTable(kv.block_size, owner=owner)
    kv.grow(table, len(tokens))
    kv.key_full_blocks(table, tokens, len(tokens), b"")
    kv.free(table)
    return table


def _refs(kv: KVManager, block_ids) -> list[int]:
    return [kv.pool.blocks[b].ref_count for b in block_ids]


def test_pin_takes_one_reference_on_each_keyed_block_and_unpin_gives_it_back():
    kv = KVManager(num_blocks=8, block_size=4)
    a = ("run-a", "planner")
    _owned(kv, a, list(range(10)))  # blocks 0, 1 keyed and cached; 2 (two tokens) freed
    assert kv.owners.block_ids() == {0, 1}
    assert kv.pin(a) == 2
    assert _refs(kv, [0, 1]) == [1, 1]
    assert kv.is_pinned(a) and kv.num_pinned() == 2
    usage = kv.usage()
    assert (usage.in_use, usage.cached, usage.free) == (2, 0, 6)
    kv.check_integrity()
    # Pinned blocks are still hits; a reader adds its own reference on top of the pin.
    reader = BlockTable(4)
    adopt_prefix(kv, reader, kv.match_prefix(list(range(10)), b""))
    assert reader.block_ids() == [0, 1] and _refs(kv, [0, 1]) == [2, 2]
    assert kv.unpin(a) == 2
    assert _refs(kv, [0, 1]) == [1, 1] and not kv.is_pinned(a) and kv.num_pinned() == 0
    kv.free(reader)
    assert kv.usage().cached == 2 and kv.match_prefix(list(range(10)), b"").block_ids == [0, 1]
    assert kv.unpin(a) == 0  # nothing left to give back
    kv.check_integrity()


def test_a_pin_leaves_unkeyed_blocks_and_a_second_pin_takes_only_new_blocks():
    kv = KVManager(num_blocks=8, block_size=4)
    a = ("run-a", "coder")
    live = BlockTable(4, owner=a)
    tokens = list(range(12))
    kv.grow(live, 12)
    kv.key_full_blocks(live, tokens, 6, b"")  # a live call: block 0 keyed, 1 and 2 not yet
    assert kv.pin(a) == 1
    assert _refs(kv, [0, 1, 2]) == [2, 1, 1]
    kv.key_full_blocks(live, tokens, 12, b"")  # blocks 1 and 2 become keyed
    assert kv.pin(a) == 2  # re-pinning takes the new ones, never block 0 twice
    assert kv.pin(a) == 0
    assert _refs(kv, [0, 1, 2]) == [2, 2, 2] and kv.num_pinned() == 3
    kv.free(live)
    assert _refs(kv, [0, 1, 2]) == [1, 1, 1] and kv.usage().in_use == 3
    kv.check_integrity()
    assert kv.unpin(a) == 3
    assert kv.usage().cached == 3
    kv.check_integrity()


def test_an_owner_holding_no_keyed_block_pins_nothing():
    kv = KVManager(num_blocks=4, block_size=4)
    assert kv.pin(("run-a", "nobody")) == 0
    assert not kv.is_pinned(("run-a", "nobody"))
    _owned(kv, ("run-a", "short"), [1, 2, 3])  # a partial block only: freed, not owned
    assert kv.pin(("run-a", "short")) == 0 and kv.num_pinned() == 0
    kv.check_integrity()


def test_two_owners_pinning_a_shared_block_count_it_once():
    kv = KVManager(num_blocks=8, block_size=4)
    shared = list(range(8))
    _owned(kv, ("run-a", "x"), shared + [20, 21, 22, 23])  # blocks 0, 1, 2
    y = BlockTable(4, owner=("run-a", "y"))
    adopt_prefix(kv, y, kv.match_prefix(shared + [30], b""))
    kv.grow(y, 12)
    kv.key_full_blocks(y, shared + [30, 31, 32, 33], 12, b"")  # blocks 0, 1 shared; 3 its own
    kv.free(y)
    assert (kv.pin(("run-a", "x")), kv.pin(("run-a", "y"))) == (3, 3)
    assert _refs(kv, [0, 1, 2, 3]) == [2, 2, 1, 1]
    assert kv.num_pinned() == 4
    kv.check_integrity()
    assert kv.unpin(("run-a", "x")) == 3
    assert _refs(kv, [0, 1, 2, 3]) == [1, 1, 0, 1] and kv.num_pinned() == 3
    kv.check_integrity()


def test_a_pinned_cached_block_is_not_evicted_and_unpinned_it_is_the_newest_cached():
    kv = KVManager(num_blocks=4, block_size=4)
    a, b = ("run-a", "planner"), ("run-a", "coder")
    _owned(kv, a, list(range(4)))  # block 0
    _owned(kv, b, list(range(100, 104)))  # block 1
    # LRU order: 0, then 1. Pinning 0 leaves 1 the oldest (and only) evictable cached block.
    assert kv.pin(a) == 1
    kv.check_integrity()
    grabber = BlockTable(4)
    kv.grow(grabber, 12)  # 2 free blocks (2, 3), then one eviction
    assert grabber.block_ids() == [2, 3, 1]
    assert kv.pool.evictions == 1 and kv.residency("run-a") == {
        "planner": AgentResidency(device_blocks=1, shared_blocks=0)}
    assert not kv.can_grow(grabber, 13)  # the pinned block is not allocatable
    kv.check_integrity()
    assert kv.unpin(a) == 1
    assert kv.pool.is_cached(0) and kv.can_grow(grabber, 13)
    kv.free(grabber)  # 2, 3, 1 unkeyed: free; 0 stays cached
    kv.check_integrity()
    # Back in the LRU, block 0 goes when a later allocation needs every block.
    kv.grow(BlockTable(4), 16)
    assert kv.residency("run-a") == {} and kv.pool.evictions == 2
    kv.check_integrity()


def test_unpinned_blocks_join_the_lru_after_the_blocks_already_cached():
    kv = KVManager(num_blocks=3, block_size=4)
    a, b = ("run-a", "planner"), ("run-a", "coder")
    _owned(kv, a, list(range(4)))  # block 0
    kv.pin(a)
    _owned(kv, b, list(range(100, 104)))  # block 1, cached after 0 was pinned
    kv.unpin(a)  # 0 is now the most recently released
    taker = BlockTable(4)
    kv.grow(taker, 8)  # free block 2, then the oldest cached: 1, not 0
    assert taker.block_ids() == [2, 1]
    assert kv.pool.is_cached(0)
    kv.check_integrity()


def test_release_run_drops_the_runs_pins_and_releases_what_only_it_held():
    kv = KVManager(num_blocks=8, block_size=4)
    a = ("run-a", "planner")
    _owned(kv, a, list(range(12)))  # blocks 0, 1 cached; block 2 (full, keyed) too
    other = ("run-b", "planner")
    _owned(kv, other, list(range(100, 105)))  # block 3 cached; 4 freed
    assert (kv.pin(a), kv.pin(other)) == (3, 1)
    assert kv.release_run("run-a") == 3
    assert not kv.is_pinned(a) and kv.num_pinned() == 1
    usage = kv.usage()
    assert (usage.in_use, usage.cached, usage.free) == (1, 3, 4)  # 3 pinned by run-b
    # Unpinned and unowned, run-a's blocks are evictable: a pool that needs them takes them.
    taker = BlockTable(4)
    kv.grow(taker, 4 * 7)
    assert sorted(taker.block_ids()) == [0, 1, 2, 4, 5, 6, 7]
    kv.free(taker)
    kv.check_integrity()
    assert kv.release_run("run-b") == 1
    usage = kv.usage()
    assert (usage.in_use, usage.cached, usage.free) == (0, 1, 7)
    assert kv.owners.is_empty() and kv.num_pinned() == 0
    kv.check_integrity()
