"""Failed tier copies through the real mover (small CPU tensors): a copy that raises on the
worker, or that cannot even start, takes the two-phase protocol's abort path, so every block
ends in a known tier, nothing stays in flight, and both pools keep their integrity."""

from __future__ import annotations

import pytest
import torch

from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import HostSpec, KVManager
from kvrt.runtime.kv.tiers.host_tier import HostTier
from kvrt.runtime.kv.tiers.mover import BlockMover
from kvrt.runtime.kv.tiers.moves import Direction

BLOCKS, BLOCK = 6, 4
OWNER = ("run", "agent")
TOKENS = list(range(1, 14))  # 3 full blocks and a partial one


def setup() -> tuple[KVManager, HostTier, list[int]]:
    """3 cached device blocks of OWNER, a host tier of as many blocks, a real mover."""
    shape = (1, 2, BLOCK, 1, 8)
    mover = BlockMover(torch.randn((BLOCKS, *shape)), torch.zeros((BLOCKS, *shape)))
    kv = KVManager(BLOCKS, BLOCK, host=HostSpec(BLOCKS, mover))
    assert kv.host is not None
    moves = kv.host
    table = BlockTable(BLOCK, owner=OWNER)
    kv.grow(table, len(TOKENS))
    kv.key_full_blocks(table, TOKENS, len(TOKENS), b"")
    blocks = table.block_ids()[:3]
    kv.free(table)
    return kv, moves, blocks


def broken(*_) -> None:
    raise RuntimeError("copy failed")


def assert_settled(kv: KVManager, moves: HostTier) -> None:
    assert kv.host is not None
    assert not moves.in_flight()
    assert kv.pool.usage().in_flight == 0 and kv.host.tiers.host.usage().in_flight == 0
    kv.check_integrity()


def test_a_failed_offload_leaves_the_blocks_cached_on_the_device() -> None:
    kv, moves, blocks = setup()
    moves.mover._pack = broken
    assert len(moves.offload(blocks)) == 3  # planned: the host blocks it would fill
    moves.wait()
    assert moves.failed == 1
    assert kv.match_prefix(TOKENS, b"").block_ids == blocks  # still findable on the device
    assert kv.host.tiers.host.usage().free == BLOCKS  # the host took nothing
    assert kv.owners.blocks_of(OWNER) == set(blocks)
    assert_settled(kv, moves)
    moves.close()


def test_a_failed_upload_frees_the_device_side_and_drops_the_host_copy() -> None:
    kv, moves, blocks = setup()
    host_blocks = moves.offload(blocks)
    moves.wait()
    assert kv.match_prefix(TOKENS, b"").block_ids == []
    moves.mover._unpack = broken  # an upload's device-side kernel
    assert moves.upload(host_blocks)
    moves.wait()
    assert moves.failures == {Direction.UPLOAD: 1}
    assert kv.match_prefix(TOKENS, b"").block_ids == []  # nothing landed on the device
    assert kv.pool.usage().free == BLOCKS
    # The host copy went too, so a waiting reader computes the KV instead of asking again.
    assert kv.match_host(TOKENS, b"", kv.match_prefix(TOKENS, b"")).block_ids == []
    assert not moves.upload(host_blocks)
    assert_settled(kv, moves)
    moves.close()


def test_a_failed_backup_leaves_the_blocks_readable_and_unreferenced() -> None:
    kv, moves, blocks = setup()
    moves.mover._pack = broken
    assert moves.backup(blocks) is not None
    moves.wait()
    assert moves.failed == 1
    assert kv.pool.usage().in_use == 0 and kv.pool.usage().cached == 3  # the extra ref is gone
    assert kv.match_prefix(TOKENS, b"").block_ids == blocks
    assert kv.host.tiers.host.usage().free == BLOCKS
    assert_settled(kv, moves)
    moves.close()


@pytest.mark.parametrize("move", ["offload", "backup"])
def test_a_copy_that_cannot_start_is_completed_as_failed_at_once(move: str) -> None:
    kv, moves, blocks = setup()
    moves.mover.close()  # its workers take no more copies
    if move == "offload":
        assert moves.offload(blocks) == []  # no host block holds the content
    else:
        assert moves.backup(blocks) is None
    assert moves.failed == 1
    assert kv.match_prefix(TOKENS, b"").block_ids == blocks
    assert kv.pool.usage().cached == 3 and kv.host.tiers.host.usage().free == BLOCKS
    assert_settled(kv, moves)
