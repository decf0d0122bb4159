"""KVManager.fork: a choice of n > 1 reads its prompt's full blocks by reference and copies the
partly filled last one (the rows the copy moves are the partial block's, row for row)."""

from __future__ import annotations

import torch

from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import KVManager


class RecordedRows:
    """KVRows that records the copies asked of it."""

    def __init__(self) -> None:
        self.copies: list[tuple[list[int], list[int]]] = []

    def copy(self, source: torch.Tensor, target: torch.Tensor) -> None:
        self.copies.append((source.tolist(), target.tolist()))

    def change(self, rows, base, shift):  # pragma: no cover - not used by fork
        raise AssertionError


def _prompt_table(kv: KVManager, tokens: list[int]) -> BlockTable:
    table = BlockTable(kv.block_size, owner=("run", "agent"))
    kv.grow(table, len(tokens))
    kv.key_full_blocks(table, tokens, len(tokens), b"")
    return table


def test_full_blocks_are_shared_and_the_partial_one_copied() -> None:
    rows = RecordedRows()
    kv = KVManager(num_blocks=8, block_size=4, rows=rows)
    tokens = list(range(10))  # blocks 0, 1 full; 2 holds positions 8, 9
    parent = _prompt_table(kv, tokens)
    child = BlockTable(4, owner=("run", "agent"))
    assert kv.fork(parent, child, len(tokens))
    assert parent.block_ids() == [0, 1, 2] and child.block_ids() == [0, 1, 3]
    assert [kv.pool.blocks[b].ref_count for b in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert child.slots[:8].tolist() == parent.slots[:8].tolist()
    assert rows.copies == [([8, 9], [12, 13])]  # block 2's rows 0-1 into block 3's
    assert child.num_keyed == parent.num_keyed == 2 and child.last_key == parent.last_key
    kv.check_integrity()
    kv.free(parent)
    kv.check_integrity()
    kv.free(child)
    assert kv.usage().in_use == 0
    kv.check_integrity()


def test_a_prompt_of_whole_blocks_copies_nothing() -> None:
    rows = RecordedRows()
    kv = KVManager(num_blocks=4, block_size=4, rows=rows)
    parent = _prompt_table(kv, list(range(8)))
    child = BlockTable(4)
    assert kv.fork(parent, child, 8)
    assert child.block_ids() == [0, 1] and rows.copies == []
    kv.free(child)
    kv.free(parent)
    kv.check_integrity()


def test_no_block_for_the_copy_forks_nothing() -> None:
    kv = KVManager(num_blocks=3, block_size=4, rows=RecordedRows())
    parent = _prompt_table(kv, list(range(10)))  # every block in use
    child = BlockTable(4)
    assert not kv.fork(parent, child, 10)
    assert child.block_ids() == [] and [b.ref_count for b in kv.pool.blocks] == [1, 1, 1]
    kv.check_integrity()
