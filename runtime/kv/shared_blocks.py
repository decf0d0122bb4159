"""Blocks held for shared text: what the device pool spends on segments, per agent, in blocks.

The reuse planner counts segment *tokens* (runtime/kv/reuse/planner.py: stored, read in place,
dropped). The pool holds *blocks*: a reader that reads most of a segment's rows from the master
but keeps a few rows of its own still holds the block they sit in, and a master's block that
mixes its private text with the segment stays in use for as long as a reader reads the
segment's rows in it. So the token figure can show savings the pool does not see. This module
measures what the live block tables hold, by the rule:

    who                                      counts, for a block b of a live table t
    ---------------------------------------  -----------------------------------------------
    the k live tables referencing b          1/k of b each (masters amortized over readers)
    of t's 1/k, the part held for shared     seg(t, b) / rows(t, b): the rows of b that t maps
      text, where t maps rows of b           at its segment positions, over all the rows of b
                                             it maps
    ... where t maps no row of b but a       all of it: the master's rows t recomputed itself,
      splice of t references b               referenced for the diff encode's comparison
    ... otherwise (own rows allocated ahead) none

Why a mixed block counts in proportion, and not whole or not at all: it holds memory for both
texts (neither alone would free it), and the proportional rule splits every referenced block
exactly once over the tables and their texts, so shared-text blocks plus the rest add up to the
blocks the live tables hold. A block's rows that t does not map (rows not filled yet, or
another call's private text kept in use only because t reads the segment rows next to it) go
with the rows t maps: a reader holding a master's block for its segment rows alone pays for the
whole of its share, which is the cost the token figure misses; a table that shares nothing
counts its segment rows over the block size, up to its partially filled blocks.

`k` counts the tables given (the engine's running sequences, with segments or not); a block no
live table references (cached, or only pinned) is held for no agent and counts for none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.owners import Owner


class Holder(Protocol):
    """A live call holding a block table (the engine's Sequence)."""

    table: BlockTable
    num_computed: int

    @property
    def owner(self) -> Owner | None: ...

    @property
    def segments(self) -> tuple[tuple[int, int], ...]: ...


def shared_text_blocks(holders: Sequence[Holder], block_size: int) -> dict[object, float]:
    """Per agent (a call's owner, or the call itself when unattributed) whose live calls hold
    blocks for segments: those blocks, by the module's rule. A few vectorized passes over all
    the tables at once (~1 ms for 16 tables of 1,500 positions on a CPU core): call it when
    sampling, not at every step."""
    pairs: list[int] = []  # (table index, block) of every block a table references, as keys
    spliced: list[int] = []  # ... of the blocks its splices reference
    slots: list[torch.Tensor] = []
    bounds: list[tuple[int, int]] = []  # segment spans, as rows of the concatenated slots
    offset = 0
    width = 1 << 32  # a key is table index * width + block id
    for index, holder in enumerate(holders):
        table, base, mapped = holder.table, index * width, holder.table.num_mapped
        pairs.extend(base + entry.block for entry in table.entries)
        spliced.extend(base + b for s in table.splices for b in s.block_ids)
        slots.append(table.slots)
        bounds.extend((offset + min(a, mapped), offset + min(b, mapped))
                      for a, b in holder.segments)
        offset += mapped
    keys = torch.tensor(pairs, dtype=torch.int64).unique()  # sorted
    if not keys.numel():
        return {}
    _, which, counts = (keys % width).unique(return_inverse=True, return_counts=True)
    refs = counts[which].double()  # k: the tables referencing each key's block
    lengths = torch.tensor([s.numel() for s in slots])
    tables = torch.repeat_interleave(torch.arange(len(holders)) * width, lengths)
    at = torch.searchsorted(keys, torch.cat(slots) // block_size + tables)  # all referenced
    rows = torch.bincount(at, minlength=keys.numel()).double()
    seg = torch.bincount(at[_within(bounds, offset)], minlength=keys.numel()).double()
    held = torch.isin(keys, torch.tensor(spliced, dtype=torch.int64)).double()
    share = torch.where(rows > 0, seg / rows.clamp(min=1), held) / refs
    by_table = torch.bincount(keys // width, weights=share, minlength=len(holders)).tolist()
    per_agent: dict[object, float] = {}
    for holder, blocks in zip(holders, by_table):
        if blocks > 0:
            agent = holder.owner if holder.owner is not None else holder
            per_agent[agent] = per_agent.get(agent, 0.0) + blocks
    return per_agent


def _within(spans: list[tuple[int, int]], length: int) -> torch.Tensor:
    """A mask of `length` rows, True inside the spans [start, end)."""
    edges = torch.tensor(spans, dtype=torch.int64).reshape(-1, 2)
    steps = torch.zeros(length + 1, dtype=torch.int64)
    steps.index_add_(0, edges[:, 0], torch.ones(len(spans), dtype=torch.int64))
    steps.index_add_(0, edges[:, 1], torch.full((len(spans),), -1, dtype=torch.int64))
    return steps.cumsum(0)[:-1] > 0


class SharedTextMeter:
    """Samples of `shared_text_blocks`, reported where the most agents held shared text at
    once: the mean, over the samples with that many agents, of the blocks they held per agent.

    Why there, not averaged over the whole run: a master's blocks are in use as long as any of
    its readers is, so a time average divides them by the readers still live, fewer and fewer
    as they finish (a round's outputs differ in length) and one while the master computes
    alone before its readers are admitted; it would measure how the round's calls end, not
    what sharing costs. With every agent of a round resident, the figure is what the pool
    holds per agent: the masters over all their readers, plus each one's own rows, the
    quantity that decides how many agents fit. Samples taken while no step ran in between (a
    step is slower than the sampling period) repeat the last one's figure at no cost."""

    def __init__(self) -> None:
        self.agents = 0  # the most agents a sample saw holding shared text
        self._per_agent: list[float] = []  # each such sample's blocks per agent
        self._last: tuple[list[tuple[int, int, int]], dict[object, float]] = ([], {})

    def sample(self, holders: Sequence[Holder], block_size: int) -> None:
        state = [(id(h), h.num_computed, h.table.num_mapped) for h in holders]
        if state != self._last[0]:
            self._last = (state, shared_text_blocks(holders, block_size))
        per_agent = self._last[1]
        if not per_agent or len(per_agent) < self.agents:
            return
        if len(per_agent) > self.agents:
            self.agents, self._per_agent = len(per_agent), []
        self._per_agent.append(sum(per_agent.values()) / len(per_agent))

    def per_agent(self) -> float | None:
        """None until a sample saw an agent holding shared text."""
        return sum(self._per_agent) / len(self._per_agent) if self._per_agent else None
