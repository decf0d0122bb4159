"""Moves between the device and host tiers, as bookkeeping: two phases, success and failure, and
no block ever free and in flight at once, found while in flight, or evicted while in flight."""

from __future__ import annotations

import pytest

from kvrt.runtime.kv.block_pool import BlockPool, OutOfBlocks
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import KVManager
from kvrt.runtime.kv.owners import AgentResidency
from kvrt.runtime.kv.prefix_hash import ROOT_KEY, block_key
from kvrt.runtime.kv.tiers.moves import Direction, Move
from tests.kv.helpers import adopt_prefix, host_spec

BLOCK = 4


def cached_prefix(kv: KVManager, tokens: list[int]) -> list[int]:
    """Computes `tokens` in a table, keys its full blocks and frees it: they sit cached."""
    table = BlockTable(BLOCK, owner=("run", "agent"))
    kv.grow(table, len(tokens))
    kv.key_full_blocks(table, tokens, len(tokens), b"")
    blocks = table.block_ids()[: len(tokens) // BLOCK]
    kv.free(table)
    return blocks


def offloaded(kv: KVManager, blocks: list[int]) -> Move:
    """Offloads these device blocks and lets the copy land; the move that did it."""
    assert kv.host is not None
    move = kv.host.tiers.prepare_offload(blocks).move
    assert move is not None and kv.host.tiers.complete(move, ok=True) == len(move)
    return move


def states(pool: BlockPool) -> tuple[int, int, int, int]:
    u = pool.usage()
    return u.free, u.cached, u.in_use, u.in_flight


def test_an_offload_moves_cached_blocks_to_the_host_in_two_phases() -> None:
    kv = KVManager(6, BLOCK, host=host_spec(6, 4))
    tokens = list(range(1, 14))  # 3 full blocks and a partial one
    blocks = cached_prefix(kv, tokens)
    tiers = kv.host.tiers
    assert tiers is not None and kv.match_prefix(tokens, b"").block_ids == blocks
    move = tiers.prepare_offload(blocks).move
    assert move is not None and move.direction is Direction.OFFLOAD and move.source == blocks
    # In flight: found nowhere, counted as in flight in both pools.
    assert kv.match_prefix(tokens, b"").block_ids == []
    assert kv.match_host(tokens, b"", kv.match_prefix(tokens, b"")).block_ids == []
    assert states(kv.pool) == (3, 0, 0, 3) and states(tiers.host) == (1, 0, 0, 3)
    kv.check_integrity()
    assert tiers.complete(move, ok=True) == 3
    assert states(kv.pool) == (6, 0, 0, 0) and states(tiers.host) == (1, 3, 0, 0)
    assert kv.owners.blocks_of(("run", "agent")) == set()  # the device copy is gone
    host = kv.match_host(tokens, b"", kv.match_prefix(tokens, b""))
    assert host.block_ids == move.target and not host.arriving
    assert tiers.offloaded_blocks == 3
    kv.check_integrity()


def test_a_failed_offload_leaves_the_blocks_cached_on_the_device() -> None:
    kv = KVManager(6, BLOCK, host=host_spec(6, 4))
    tokens = list(range(1, 10))
    blocks = cached_prefix(kv, tokens)
    assert kv.host is not None
    move = kv.host.tiers.prepare_offload(blocks).move
    assert move is not None and kv.host.tiers.complete(move, ok=False) == 0
    assert kv.match_prefix(tokens, b"").block_ids == blocks
    assert states(kv.host.tiers.host) == (4, 0, 0, 0) and kv.host.tiers.offloaded_blocks == 0
    assert kv.owners.blocks_of(("run", "agent")) == set(blocks)
    kv.check_integrity()


def test_a_block_in_flight_is_never_allocated_nor_evicted() -> None:
    kv = KVManager(4, BLOCK, host=host_spec(4, 4))
    blocks = cached_prefix(kv, list(range(1, 10)))  # 2 cached blocks, 2 free
    assert kv.host is not None
    move = kv.host.tiers.prepare_offload(blocks).move
    assert move is not None
    with pytest.raises(OutOfBlocks):
        kv.pool.allocate(3)  # only the 2 free ones: the moving blocks are not evictable
    assert sorted(kv.pool.allocate(2)) == sorted(set(range(4)) - set(blocks))
    kv.host.tiers.complete(move, ok=True)
    kv.check_integrity()


def test_only_cached_blocks_move_and_content_the_host_has_is_not_copied_again() -> None:
    kv = KVManager(8, BLOCK, host=host_spec(8, 8))
    tokens = list(range(1, 10))
    blocks = cached_prefix(kv, tokens)
    assert kv.host is not None
    reader = BlockTable(BLOCK)
    adopt_prefix(kv, reader, kv.match_prefix(tokens, b""))  # a live request reads them
    assert kv.host.tiers.prepare_offload(blocks).move is None
    kv.free(reader)
    move = offloaded(kv, blocks)
    # Upload keeps the host's copy; offloading the same content again drops the device copy.
    up = kv.host.tiers.prepare_upload(move.target)
    assert up is not None and kv.host.tiers.complete(up, ok=True) == 2
    assert kv.match_prefix(tokens, b"").block_ids == up.target
    assert kv.host.tiers.prepare_offload(up.target).move is None
    assert kv.match_prefix(tokens, b"").block_ids == []
    assert kv.host.tiers.host.usage().cached == 2
    kv.check_integrity()


def test_an_upload_lands_findable_and_the_next_block_is_announced_as_arriving() -> None:
    kv = KVManager(8, BLOCK, host=host_spec(8, 8))
    tokens = list(range(1, 14))
    blocks = cached_prefix(kv, tokens)
    assert kv.host is not None
    off = offloaded(kv, blocks)
    up = kv.host.tiers.prepare_upload(off.target)
    assert up is not None
    assert kv.match_host(tokens, b"", kv.match_prefix(tokens, b"")).arriving
    assert states(kv.host.tiers.host) == (5, 0, 0, 3)
    kv.check_integrity()
    assert kv.host.tiers.complete(up, ok=True) == 3
    assert kv.match_prefix(tokens, b"").block_ids == up.target
    assert states(kv.host.tiers.host) == (5, 3, 0, 0) and kv.host.tiers.uploaded_blocks == 3
    kv.check_integrity()


def test_a_failed_upload_frees_the_device_blocks_and_keeps_the_host_copy() -> None:
    kv = KVManager(8, BLOCK, host=host_spec(8, 8))
    tokens = list(range(1, 10))
    assert kv.host is not None
    off = offloaded(kv, cached_prefix(kv, tokens))
    up = kv.host.tiers.prepare_upload(off.target)
    assert up is not None and kv.host.tiers.complete(up, ok=False) == 0
    assert states(kv.pool) == (8, 0, 0, 0)
    host = kv.match_host(tokens, b"", kv.match_prefix(tokens, b""))
    assert host.block_ids == off.target and not host.arriving
    kv.check_integrity()


def test_a_key_recomputed_while_its_block_was_away_is_not_indexed_twice() -> None:
    kv = KVManager(8, BLOCK, host=host_spec(8, 8))
    tokens = list(range(1, 10))
    blocks = cached_prefix(kv, tokens)
    assert kv.host is not None
    move = kv.host.tiers.prepare_offload(blocks).move
    assert move is not None
    again = cached_prefix(kv, tokens)  # computed again meanwhile: the same keys, new blocks
    assert set(again).isdisjoint(blocks)
    kv.host.tiers.complete(move, ok=False)  # the old copies cannot take their keys back: freed
    assert kv.match_prefix(tokens, b"").block_ids == again
    assert states(kv.pool) == (6, 2, 0, 0)
    kv.check_integrity()


def test_ownership_travels_with_the_content_and_a_run_release_leaves_both_copies() -> None:
    kv = KVManager(8, BLOCK, host=host_spec(8, 8))
    tokens = list(range(1, 10))
    assert kv.host is not None
    off = offloaded(kv, cached_prefix(kv, tokens))
    assert kv.residency("run") == {"agent": AgentResidency(0, 0, host_blocks=2)}
    up = kv.host.tiers.prepare_upload(off.target)
    assert up is not None
    kv.host.tiers.complete(up, ok=True)
    assert kv.residency("run") == {"agent": AgentResidency(2, 0, host_blocks=2)}
    kv.check_integrity()
    kv.release_run("run")
    assert kv.residency("run") == {} and kv.host.tiers.host_owners.is_empty()
    # Both copies stay cached for a later prompt (the host's first, the device's too).
    assert kv.usage().cached == 2 and kv.host.tiers.host.usage().cached == 2
    assert len(kv.match_prefix(tokens, b"").block_ids) == 2
    kv.check_integrity()


def test_blocks_already_moving_are_neither_moved_again_nor_pinned() -> None:
    kv = KVManager(8, BLOCK, host=host_spec(8, 8))
    blocks = cached_prefix(kv, list(range(1, 10)))
    assert kv.host is not None
    move = kv.host.tiers.prepare_offload(blocks).move
    assert move is not None and not kv.pool.is_cached(blocks[0])
    assert kv.host.tiers.prepare_offload(blocks).move is None  # in flight already: not cached
    assert kv.pin(("run", "agent")) == 0 and not kv.is_pinned(("run", "agent"))
    kv.host.tiers.complete(move, ok=True)
    kv.check_integrity()


def test_a_backup_copies_keyed_blocks_to_the_host_and_leaves_them_readable() -> None:
    kv = KVManager(6, BLOCK, host=host_spec(6, 8))
    tokens = list(range(1, 14))
    table = BlockTable(BLOCK, owner=("run", "agent"))
    kv.grow(table, len(tokens))
    kv.key_full_blocks(table, tokens, len(tokens), b"")
    keyed = table.block_ids()[:3]  # in use by a running sequence: a backup may copy them
    assert kv.host is not None
    move = kv.host.tiers.prepare_backup(table.block_ids())  # the partial block has no key: skipped
    assert move is not None and move.keep_source and move.source == keyed
    # During the copy the device blocks stay findable and cannot be evicted (one more reader).
    assert kv.match_prefix(tokens, b"").block_ids == keyed
    assert [kv.pool.blocks[b].ref_count for b in keyed] == [2, 2, 2]
    assert states(kv.host.tiers.host) == (5, 0, 0, 3)
    kv.check_integrity()
    assert kv.host.tiers.complete(move, ok=True) == 3 and kv.host.tiers.backed_up_blocks == 3
    assert [kv.pool.blocks[b].ref_count for b in keyed] == [1, 1, 1]
    assert kv.host.tiers.prepare_backup(keyed) is None  # the host has them now
    kv.free(table)
    # Evicted from the device, the content is still on the host, owned by the same agent.
    with pytest.raises(OutOfBlocks):
        kv.pool.allocate(7)
    kv.pool.allocate(6)
    assert kv.match_prefix(tokens, b"").block_ids == []
    assert kv.match_host(tokens, b"", kv.match_prefix(tokens, b"")).block_ids == move.target
    assert kv.residency("run")["agent"].host_blocks == 3
    kv.check_integrity()


def test_a_failed_backup_frees_the_host_blocks_and_lets_the_device_ones_go() -> None:
    kv = KVManager(6, BLOCK, host=host_spec(6, 8))
    tokens = list(range(1, 10))
    blocks = cached_prefix(kv, tokens)
    assert kv.host is not None
    move = kv.host.tiers.prepare_backup(blocks)
    assert move is not None and states(kv.pool) == (4, 0, 2, 0)  # referenced by the copy
    assert kv.host.tiers.complete(move, ok=False) == 0
    assert states(kv.pool) == (4, 2, 0, 0) and states(kv.host.tiers.host) == (8, 0, 0, 0)
    assert kv.match_prefix(tokens, b"").block_ids == blocks
    kv.check_integrity()


def test_the_host_evicts_spare_backups_before_last_copies() -> None:
    """A's blocks live only on the host (offloaded); B's host copies are backups of blocks the
    device still holds. Making room on the host takes B's spare copy, not A's last one; once
    the device lets B go, B's host copy is a last copy too, and the oldest last copy goes."""
    kv = KVManager(16, BLOCK, host=host_spec(16, 4))
    tiers = kv.host.tiers
    assert tiers is not None
    a, b = list(range(1, 10)), list(range(20, 29))  # 2 full blocks each
    c, d = list(range(40, 45)), list(range(50, 55))  # 1 each
    assert len(offloaded(kv, cached_prefix(kv, a))) == 2
    b_device = cached_prefix(kv, b)
    back = tiers.prepare_backup(b_device)
    assert back is not None and tiers.complete(back, ok=True) == 2
    assert states(tiers.host) == (0, 4, 0, 0)

    def on_host(tokens: list[int]) -> int:
        """How many of the full blocks of `tokens` the host holds (a chain or not)."""
        held, parent = 0, ROOT_KEY
        for i in range(len(tokens) // BLOCK):
            piece = tuple(tokens[i * BLOCK:(i + 1) * BLOCK])
            parent = block_key(parent, b"", piece)
            held += tiers.host.lookup(parent, piece) is not None
        return held

    assert len(offloaded(kv, cached_prefix(kv, c))) == 1  # the host must evict one block
    assert (on_host(a), on_host(b)) == (2, 1)  # a spare backup went, not A's only copies
    for block_id in b_device:
        kv.pool.drop_cached(block_id)  # the device lets B go: the host holds its last copy
    assert len(offloaded(kv, cached_prefix(kv, d))) == 1
    assert (on_host(a), on_host(b), on_host(c)) == (1, 1, 1)  # one of A's, the oldest, went
    kv.check_integrity()


def test_offloadable_blocks_counts_exactly_what_an_offload_takes_off_the_device() -> None:
    """A policy decides by the count (runtime/policy/view.py), the offload then moves: the two
    must agree, here with the host's room taken by a backup still in flight."""
    kv = KVManager(8, BLOCK, host=host_spec(8, 4))
    owner = ("run", "agent")
    blocks = cached_prefix(kv, list(range(1, 22)))  # 5 cached blocks of the owner
    assert kv.host is not None
    backup = kv.host.tiers.prepare_backup(blocks[:2])  # 2 host blocks in flight, 2 free
    assert backup is not None
    assert kv.cached_blocks(owner) == 3  # the 2 being backed up are referenced meanwhile
    assert kv.offloadable_blocks(owner) == 2
    assert kv.offload(owner) == 2 and kv.offloaded_blocks(owner) == 2
    assert kv.is_offload_landing(owner)  # its copy has not completed on the engine thread
    kv.host.wait()
    assert not kv.is_offload_landing(owner)
    assert kv.host.tiers.complete(backup, ok=True) == 2
    assert kv.cached_blocks(owner) == 3 and kv.offloadable_blocks(owner) == 3
    kv.check_integrity()
