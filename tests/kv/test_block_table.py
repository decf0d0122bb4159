"""Block tables with splices: positions map to own rows in order, spliced spans to the copy's
slots at their shift, no own row is skipped, and a chunk steps over a splice."""

from __future__ import annotations

import torch

from kvrt.runtime.kv.block_table import BlockTable, BlockTableEntry, Splice, next_chunk

BS = 4


def splice(start: int, end: int, first_slot: int, shift: int) -> Splice:
    slots = torch.arange(first_slot, first_slot + end - start)
    return Splice(start, end, slots, shift, tuple(sorted(set((slots // BS).tolist()))))


def test_own_rows_fill_in_order_around_splices() -> None:
    table = BlockTable(BS)
    table.splices = [splice(3, 8, 100, 7), splice(10, 12, 200, -2)]
    table.map_to(3, [0])  # positions 0-2: own rows 0-2, then the splice that begins there
    assert table.slots.tolist() == [0, 1, 2, 100, 101, 102, 103, 104]
    assert table.spare.tolist() == [3]  # the block's last row waits for position 8
    table.map_to(10, [1])  # 8, 9 own (rows 3, 4), the second splice; past the last splice
    # every spare row is mapped ahead of need
    assert table.slots.tolist() == [0, 1, 2, 100, 101, 102, 103, 104, 3, 4, 200, 201, 5, 6, 7]
    assert table.shifts.tolist() == [0, 0, 0, 7, 7, 7, 7, 7, 0, 0, -2, -2, 0, 0, 0]
    assert table.spare.numel() == 0
    assert table.key_limit == 3 and table.num_own(0, 15) == 8
    assert table.own_positions(0, 15) == [(0, 3), (8, 10), (12, 15)]


def test_a_table_without_splices_maps_whole_blocks() -> None:
    table = BlockTable(BS)
    table.map_to(5, [3, 1])
    assert table.slots.tolist() == [12, 13, 14, 15, 4, 5, 6, 7]
    assert table.shifts is None and table.key_limit is None
    assert table.own_rows_needed(9) == 1


def test_a_chunk_steps_over_a_splice_and_counts_own_positions() -> None:
    splices = [splice(5, 10, 0, 1), splice(12, 20, 0, 1)]
    assert next_chunk(splices, 0, 100, 25) == (25, 12)  # 5 + 2 + 5 own positions
    assert next_chunk(splices, 0, 5, 25) == (10, 5)  # ends at a splice: steps over it
    assert next_chunk(splices, 0, 6, 25) == (11, 6)
    assert next_chunk(splices, 10, 2, 25) == (20, 2)
    assert next_chunk(splices, 20, 4, 25) == (24, 4)


def test_shared_rows_are_packed_away_and_a_block_left_empty_goes() -> None:
    table = BlockTable(BS)
    table.splices = [splice(4, 8, 100, 7)]
    table.entries = [BlockTableEntry(25, 7)]  # the splice's block, referenced at admission
    table.map_to(4, [0])  # own rows 0-3, then the splice
    table.map_to(9, [1])  # position 8 on: block 1, mapped ahead to position 11
    assert table.slots.tolist() == [0, 1, 2, 3, 100, 101, 102, 103, 4, 5, 6, 7]
    # Positions 0-3 were computed; they turn out to read the copy's rows 96-99 as well.
    freed = table.share(0, torch.arange(96, 100), 7)
    assert freed.tolist() == [0, 1, 2, 3]
    assert table.key_limit == 0 and table.own_positions(0, 12) == [(8, 12)]
    assert table.shifts[:8].tolist() == [7] * 8
    # Positions 8-11 move into the freed rows (8, computed, is copied); block 1 empties.
    source, target, unused = table.compact(0, 9, freed, lambda block: True)
    assert (source.tolist(), target.tolist(), unused) == ([4], [0], [1])
    assert table.slots.tolist() == [96, 97, 98, 99, 100, 101, 102, 103, 0, 1, 2, 3]
    assert table.shifts[8:].tolist() == [0] * 4
    assert table.spare.numel() == 0
    assert table.block_ids() == [25, 0]


def test_compaction_leaves_rows_of_fixed_blocks_where_they_are() -> None:
    table = BlockTable(BS)
    table.map_to(9, [0, 1, 2])  # positions 0-11: rows 0-11
    freed = table.share(2, torch.tensor([50]), 3)
    # Block 0 may not move (keyed, say): position 3 keeps row 3; 4-11 shift down by one row.
    source, target, unused = table.compact(2, 9, freed, lambda block: block != 0)
    assert table.slots.tolist() == [0, 1, 50, 3, 2, 4, 5, 6, 7, 8, 9, 10]
    assert (source.tolist(), target.tolist()) == ([4, 5, 6, 7, 8], [2, 4, 5, 6, 7])
    assert unused == [] and table.spare.tolist() == [11]


def test_the_device_copy_follows_every_change_and_copies_only_what_changed() -> None:
    cpu = torch.device("cpu")
    table = BlockTable(BS)
    table.splices = [splice(4, 8, 100, 7)]
    table.entries = [BlockTableEntry(25, 7)]
    slots_mirror = lambda: table._mirrors[0]  # noqa: E731 (the counter of rows copied)

    def in_step() -> None:
        slots, shifts = table.on_device(cpu)
        assert slots.tolist() == table.slots.tolist()
        assert (shifts is None) == (table.shifts is None)
        if shifts is not None:
            assert shifts.tolist() == table.shifts.tolist()

    table.map_to(4, [0])
    in_step()
    assert slots_mirror().rows_copied == 8
    in_step()  # nothing changed: nothing copied
    assert slots_mirror().rows_copied == 8
    table.map_to(9, [1])  # appends positions 8-11
    in_step()
    assert slots_mirror().rows_copied == 12
    mapped = table.slots
    table.map_to(11, [])  # a decode step within the last block: mapped already, nothing copied
    assert table.slots is mapped
    in_step()
    assert slots_mirror().rows_copied == 12
    freed = table.share(0, torch.arange(96, 100), 7)  # rewrites positions 0-3
    in_step()
    assert slots_mirror().rows_copied == 24  # from position 0 again
    table.compact(0, 9, freed, lambda block: True)  # moves positions 8-11
    in_step()
    table.clear()
    table.map_to(2, [5])
    in_step()
    assert table.on_device(cpu)[0].tolist() == [20, 21, 22, 23]
