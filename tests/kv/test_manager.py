import hashlib
from array import array

from kvrt.runtime.kv.manager import BlockTable, KVManager
from kvrt.runtime.kv.owners import AgentResidency
from kvrt.runtime.kv.prefix_hash import ROOT_KEY, block_key


def _fill(kv: KVManager, tokens: list[int], salt: bytes = b"") -> BlockTable:
    table = BlockTable(kv.block_size)
    kv.grow(table, len(tokens))
    kv.commit(table, tokens, len(tokens), salt)
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
    kv.adopt_prefix(reader, kv.match_prefix(tokens, b""))
    assert reader.block_ids() == owner.block_ids()[:2]
    assert [kv.pool.blocks[b].ref_count for b in reader.block_ids()] == [2, 2]
    kv.free(owner)
    kv.free(reader)
    usage = kv.usage()
    assert (usage.in_use, usage.cached, usage.free) == (0, 2, 6)
    kv.check_integrity()


def test_commit_keys_only_blocks_full_of_computed_tokens():
    kv = KVManager(num_blocks=8, block_size=4)
    table = BlockTable(4)
    tokens = list(range(10))
    kv.grow(table, 10)
    kv.commit(table, tokens, 7, b"")
    assert table.num_keyed == 1
    kv.commit(table, tokens, 10, b"")
    assert table.num_keyed == 2
    assert kv.pool.blocks[table.entries[2].block].key is None


def test_blocks_entering_an_owned_table_are_claimed_for_its_owner():
    kv = KVManager(num_blocks=8, block_size=4)
    tokens = list(range(9))
    planner = BlockTable(4, owner=("run-a", "planner"))
    kv.grow(planner, len(tokens))
    kv.commit(planner, tokens, len(tokens), b"")
    assert planner.block_ids() == [0, 1, 2]
    coder = BlockTable(4, owner=("run-a", "coder"))
    kv.adopt_prefix(coder, kv.match_prefix(tokens, b""))
    kv.grow(coder, len(tokens))
    assert coder.block_ids() == [0, 1, 3]
    assert kv.residency("run-a") == {
        "planner": AgentResidency(device_blocks=3, shared_blocks=2),
        "coder": AgentResidency(device_blocks=3, shared_blocks=2),
    }
    unowned = BlockTable(4)
    kv.grow(unowned, 4)
    assert kv.owners.block_ids() == {0, 1, 2, 3}
    kv.check_integrity()


def test_freeing_keeps_ownership_of_cached_blocks_and_drops_the_rest():
    kv = KVManager(num_blocks=4, block_size=4)
    tokens = list(range(10))
    table = BlockTable(4, owner=("run-a", "planner"))
    kv.grow(table, len(tokens))
    kv.commit(table, tokens, len(tokens), b"")
    kv.free(table)
    # Blocks 0 and 1 are full and keyed (cached now); block 2 held two tokens and is free.
    assert kv.owners.block_ids() == {0, 1}
    # Allocating all four evicts the cached blocks: their content, and ownership, are gone.
    kv.grow(BlockTable(4), 16)
    assert kv.residency("run-a") == {}
    kv.check_integrity()


def test_release_run_frees_only_cached_blocks_no_other_owner_holds():
    kv = KVManager(num_blocks=8, block_size=4)
    shared = list(range(8))
    a_table = BlockTable(4, owner=("run-a", "planner"))
    kv.grow(a_table, 12)
    kv.commit(a_table, shared + [50, 51, 52, 53], 12, b"")  # blocks 0, 1 shared; 2 run-a's
    b_table = BlockTable(4, owner=("run-b", "planner"))
    kv.adopt_prefix(b_table, kv.match_prefix(shared + [60], b""))
    kv.grow(b_table, 9)
    assert b_table.block_ids() == [0, 1, 3]
    kv.free(a_table)
    # run-a's own cached block 2 is freed; 0 and 1 are run-b's too (and in use).
    assert kv.release_run("run-a") == 1
    assert kv.match_prefix(shared + [50, 51, 52, 53, 0], b"").block_ids == [0, 1]
    assert kv.residency("run-a") == {}
    assert kv.residency("run-b") == {"planner": AgentResidency(3, 0)}
    assert (kv.usage().free, kv.usage().cached, kv.usage().in_use) == (5, 0, 3)
    kv.free(b_table)
    # Blocks still read by a live unowned table are never freed by a release.
    reader = BlockTable(4)
    kv.adopt_prefix(reader, kv.match_prefix(shared + [60], b""))
    assert kv.release_run("run-b") == 0
    assert kv.owners.is_empty()
    kv.free(reader)
    assert (kv.usage().free, kv.usage().cached, kv.usage().in_use) == (6, 2, 0)
    kv.check_integrity()


def test_can_admit_counts_the_cached_blocks_a_match_takes():
    kv = KVManager(num_blocks=4, block_size=4)
    tokens = list(range(9))
    kv.free(_fill(kv, tokens))  # blocks 0, 1 keyed and cached; 2 free (unkeyed); 3 free
    match = kv.match_prefix(tokens + [50] * 8, b"")
    assert match.block_ids == [0, 1]
    # 4 allocatable, but adopting takes the 2 cached ones: 2 more blocks fit, 3 do not.
    assert kv.can_admit(match, 16)
    assert not kv.can_admit(match, 17)
    kv.check_integrity()
