"""A sequence's block table: which pool slot holds the KV of each of its positions, and at which
position shift its reader sees it.

Own positions (computed by this sequence) take the rows of its own blocks in order. A splice
makes a span of positions read rows of another sequence's copy of the same text instead (a
segment reused at another position, runtime/kv/reuse/): those rows stay where they are,
shared and ref-counted, and are seen at `shift` (the kernel rotates their K). So a table maps
positions to slots, not blocks to blocks:

    positions  0 .. 37 own | 38 .. 120 spliced (shift 212) | 121 .. own again
    slots      own rows 0..37 | the copy's rows             | own rows 38.. (the same block
                                                              goes on filling: no row is lost)

Without splices, position p is own row p (block p // block_size): the prefix index can key the
table's full blocks, and `grow` maps whole blocks ahead of need. Keying stops where the first
spliced segment starts (`key_limit`): past it, a block's rows are no longer one run of the
prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvrt.runtime.kv.device_mirror import DeviceMirror
from kvrt.runtime.kv.owners import Owner
from kvrt.runtime.kv.prefix_hash import ROOT_KEY


def blocks_of(slots: torch.Tensor, block_size: int) -> tuple[int, ...]:
    """The distinct blocks these slots lie in, ascending."""
    return tuple(sorted(set((slots // block_size).tolist())))


@dataclass(slots=True)
class BlockTableEntry:
    block: int
    shift: int = 0


@dataclass(frozen=True, slots=True)
class Splice:
    """Positions [start, end) read `slots` (one per position) of another copy, at `shift`.

    `head`: the positions just before it that its reader computes itself, of the same segment
    (runtime/kv/reuse/planner.py): the segment starts at start - head."""

    start: int
    end: int
    slots: torch.Tensor  # [end - start] int64
    shift: int
    block_ids: tuple[int, ...]  # the distinct blocks those slots lie in
    head: int = 0

    def __post_init__(self) -> None:
        assert self.end - self.start == self.slots.numel() > 0, "a splice maps each position"


@dataclass(slots=True)
class BlockTable:
    """`slots` caches the slot of every mapped position, so building a step's batch costs one
    slice per sequence, not a Python loop over its context."""

    block_size: int
    entries: list[BlockTableEntry] = field(default_factory=list)  # every block referenced
    slots: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    shifts: torch.Tensor | None = None  # per mapped position; None while every shift is 0
    spare: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    splices: list[Splice] = field(default_factory=list)  # ascending, not overlapping
    num_keyed: int = 0  # leading full blocks already keyed (registered or hit)
    last_key: bytes = ROOT_KEY  # key of the last keyed block: the parent of the next one
    owner: Owner | None = None  # (run, agent) whose KV this is; None: unattributed
    # The device's copies of slots and shifts (on_device), and the first position whose slot or
    # shift changed since they were last brought up to date.
    _mirrors: tuple[DeviceMirror, DeviceMirror] | None = None
    _changed_from: int = 0

    @property
    def num_mapped(self) -> int:
        return self.slots.numel()

    @property
    def key_limit(self) -> int | None:
        """The start of the first segment read from another copy: no block from the one
        holding it on is keyed. Not the first spliced position: the rows its reader computes
        before it (the head) may be given back for the copy's later (the diff encode), and a
        keyed block's rows are another prompt's prefix, to stay as they are."""
        return min(s.start - s.head for s in self.splices) if self.splices else None

    def block_ids(self) -> list[int]:
        return [entry.block for entry in self.entries]

    def block_at(self, index: int) -> int:
        """The block holding own block `index` of a table whose rows are its positions (before
        any splice)."""
        return int(self.slots[index * self.block_size]) // self.block_size

    def on_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`slots` and `shifts` on `device`, for a step's batch: mirrors that copy only what
        changed since the last call (on a CPU device too, where the copy is as cheap, so that
        every engine test checks the mirrors)."""
        if self._mirrors is None:
            self._mirrors = (DeviceMirror(device, self.slots.dtype),
                             DeviceMirror(device, torch.int32))
        slots_mirror, shifts_mirror = self._mirrors
        changed, self._changed_from = self._changed_from, self.num_mapped
        slots = slots_mirror.sync(self.slots, changed)
        shifts = None if self.shifts is None else shifts_mirror.sync(self.shifts, changed)
        return slots, shifts

    def adopt_prefix(self, block_ids: list[int], last_key: bytes) -> None:
        """An empty table reads these keyed blocks as its first positions (a prefix hit)."""
        assert not self.entries, "a prefix is adopted only by an empty table"
        self.map_to(len(block_ids) * self.block_size, block_ids)
        self.num_keyed, self.last_key = len(block_ids), last_key

    def mark_keyed(self, num_blocks: int, last_key: bytes) -> None:
        """Its first `num_blocks` own blocks are keyed, the last under `last_key`."""
        if num_blocks > self.num_keyed:
            self.num_keyed, self.last_key = num_blocks, last_key

    def add_splices(self, splices: list[Splice]) -> None:
        """These spans (ascending, none mapped yet) read their copies' rows; the table
        references the copies' blocks from now on. Positions are mapped as they are reached."""
        assert not self.splices and all(s.start >= self.num_mapped for s in splices)
        for splice in splices:
            self.entries.extend(BlockTableEntry(b, splice.shift) for b in splice.block_ids)
        self.splices = list(splices)

    def own_positions(self, start: int, end: int) -> list[tuple[int, int]]:
        """The runs of positions in [start, end) that no splice covers."""
        runs = []
        for splice in self.splices:
            if splice.end <= start or splice.start >= end:
                continue
            if splice.start > start:
                runs.append((start, splice.start))
            start = splice.end
        if start < end:
            runs.append((start, end))
        return runs

    def num_own(self, start: int, end: int) -> int:
        return sum(b - a for a, b in self.own_positions(start, end))

    def next_splice_from(self, position: int) -> Splice | None:
        return next((s for s in self.splices if s.end > position), None)

    def own_rows_needed(self, end: int) -> int:
        """Own rows that mapping every position below `end` still has to allocate."""
        return max(0, self.num_own(self.num_mapped, end) - self.spare.numel())

    def map_to(self, end: int, new_block_ids: list[int]) -> None:
        """Maps every position below `end` (past the mapped ones): own positions take the spare
        rows, then the rows of `new_block_ids` (own_rows_needed's worth of blocks, which this
        table now references); spliced ones their copy's slots (a splice that begins where the
        mapping stops is mapped too: its rows exist already). Once no splice lies ahead, all
        remaining own rows are mapped too, ahead of need, as in a table without splices."""
        self.entries.extend(BlockTableEntry(b) for b in new_block_ids)
        block_rows = torch.arange(self.block_size, dtype=torch.int64)
        fresh = (torch.tensor(new_block_ids, dtype=torch.int64)[:, None] * self.block_size
                 + block_rows).flatten()
        self.spare = torch.cat([self.spare, fresh])
        pieces, shifts = [self.slots], []
        position = self.num_mapped
        while True:
            splice = self.next_splice_from(position)
            if splice is not None and splice.start == position:
                pieces.append(splice.slots)
                shifts.append((splice.slots.numel(), splice.shift))
                position = splice.end
                continue
            if position >= end and splice is not None:
                break
            take = self.spare.numel() if splice is None else min(end, splice.start) - position
            if take:
                pieces.append(self._take_spare(take))
                shifts.append((take, 0))
            position += take
            if splice is None:
                break
        if len(pieces) == 1:  # mapped already (a decode step within its last block): no copy
            assert self.num_mapped >= end, "map_to was given too few blocks"
            return
        self._changed(self.num_mapped)
        self.slots = torch.cat(pieces)
        if self.shifts is not None or any(shift for _, shift in shifts):
            self.shifts = torch.cat(
                [self.shifts if self.shifts is not None
                 else torch.zeros(self.num_mapped - sum(n for n, _ in shifts), dtype=torch.int32)]
                + [torch.full((n,), shift, dtype=torch.int32) for n, shift in shifts])
        assert self.num_mapped >= end, "map_to was given too few blocks"

    def share(self, start: int, slots: torch.Tensor, shift: int) -> torch.Tensor:
        """Own positions [start, start + len(slots)), computed, read `slots` of another copy at
        `shift` from now on (a splice of them: the blocks holding `slots` must be referenced
        already); returns the own rows they held, which hold nothing now."""
        end = start + slots.numel()
        assert self.num_own(start, end) == end - start, "share takes own positions only"
        freed = self.slots[start:end].clone()
        self._changed(start)
        self.slots[start:end] = slots
        if shift and self.shifts is None:
            self.shifts = torch.zeros(self.num_mapped, dtype=torch.int32)
            self._changed(0)
        if self.shifts is not None:
            self.shifts[start:end] = shift
        splice = Splice(start, end, slots, shift, blocks_of(slots, self.block_size))
        self.splices = sorted([*self.splices, splice], key=lambda s: s.start)
        return freed

    def compact(self, start: int, computed: int, freed: torch.Tensor,
                movable: Callable[[int], bool]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Packs the rows this table stores for positions from `start` on (own positions, in
        `movable` blocks) densely again, with the `freed` rows (`share`'s)
        and the spare ones, in the table's block order: so the next positions (an output
        that later prompts may quote) fill whole blocks, and the last blocks empty. Returns the
        rows to copy (from, to) for the computed positions that moved, and the blocks left
        with no mapped row, which the table no longer references."""
        shared = torch.zeros(self.num_mapped, dtype=torch.bool)
        for splice in self.splices:
            shared[splice.start:splice.end] = True
        shared[:start] = True
        positions = torch.nonzero(~shared).flatten()
        blocks = self.slots[positions] // self.block_size
        positions = positions[torch.tensor([movable(b) for b in blocks.tolist()], dtype=torch.bool)]
        rows = self.slots[positions]
        rank = {entry.block: i for i, entry in reversed(list(enumerate(self.entries)))}
        available = torch.cat([rows, freed, self.spare])
        order = [rank[b] * self.block_size + r for b, r in zip(
            (available // self.block_size).tolist(), (available % self.block_size).tolist())]
        available = available[torch.tensor(order, dtype=torch.int64).argsort()]
        new = available[:positions.numel()]
        self._changed(start)
        self.slots[positions] = new
        self.spare = available[positions.numel():]
        mapped = set(blocks_of(self.slots, self.block_size))
        unused = [b for b in blocks_of(self.spare, self.block_size) if b not in mapped]
        if unused:
            gone = torch.isin(self.spare // self.block_size, torch.tensor(unused))
            self.spare = self.spare[~gone]
            for block_id in unused:
                self.entries.remove(BlockTableEntry(block_id))
        moved = (new != rows) & (positions < computed)
        return rows[moved], new[moved], unused

    def _changed(self, position: int) -> None:
        self._changed_from = min(self._changed_from, position)

    def _take_spare(self, count: int) -> torch.Tensor:
        rows, self.spare = self.spare[:count], self.spare[count:]
        return rows

    def clear(self) -> None:
        self.entries.clear()
        self.slots = self.slots[:0]
        self.spare = self.spare[:0]
        self.shifts = None
        self._changed_from = 0
        self.splices = []
        self.num_keyed, self.last_key = 0, ROOT_KEY


def next_chunk(splices: list[Splice], start: int, budget: int, length: int) -> tuple[int, int]:
    """The next prefill chunk of a sequence of `length` tokens computed up to `start`: (end,
    count), where the chunk computes `count` own positions (at most `budget`) in [start, end).
    A chunk that reaches a splice steps over it (its rows are read, not computed)."""
    end, count = start, 0
    position = start
    for splice in [*splices, None]:
        if splice is not None and splice.end <= position:
            continue
        stop = length if splice is None else min(splice.start, length)
        take = min(max(0, stop - position), budget - count)
        count, end = count + take, position + take
        if splice is None or end < splice.start:
            break
        end = position = splice.end
    return end, count
