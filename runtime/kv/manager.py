"""The KV manager: block tables of sequences over the device block pool, with exact prefix reuse
and spliced segments.

The scheduler sees only this interface (`match_prefix / splice / can_grow / grow / commit /
free`) and `BlockTable`; the executor reads a table's slots and shifts. Exact prefix hits are
seen at shift zero; a splice (runtime/kv/block_table.py) places another copy of a segment at
the reader's positions, at a shift.

A table may name an owner (run, agent); every block that enters it is claimed for that owner in
the `owners` ledger (runtime/kv/owners.py), which the pool keeps current through `on_drop`.

A policy may `pin` an owner's KV (e.g. while the agent waits on a tool): one extra reference on
each keyed block the owner holds, so none can be evicted, until `unpin` gives exactly those
references back. A pinned block is "in use" (ref_count > 0) to the pool:

    block state            readers  pins  ref_count  evictable
    ---------------------  -------  ----  ---------  ---------
    cached                 0        0     0          yes (LRU)
    cached, pinned         0        p     p          no
    in use, maybe pinned   r        p     r + p      no
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvrt.runtime.kv.block_pool import BlockPool, PoolUsage
from kvrt.runtime.kv.block_table import BlockTable, BlockTableEntry, Splice, blocks_of
from kvrt.runtime.kv.owners import AgentResidency, BlockOwners, Owner
from kvrt.runtime.kv.prefix_hash import ROOT_KEY, block_key
from kvrt.runtime.kv.segments import SegmentIndex
from kvrt.runtime.kv.tiers import KVTiers

_KEPT_ROOT = b"\x01" * 32  # the parent of `keep_rows`' keys: never a prefix chain's


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    block_ids: list[int]
    last_key: bytes

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


@dataclass(frozen=True, slots=True)
class HostMatch:
    """The full blocks that continue a device prefix match on the host tier."""

    block_ids: list[int]  # host blocks, in prefix order, to upload
    arriving: bool  # the next block is being uploaded already: wait for it


class KVManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True,
                 host_blocks: int = 0) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.owners = BlockOwners()
        # The host tier: offloaded KV, found again by the same keys (none when 0 blocks).
        self.tiers = None
        if host_blocks:
            self.tiers = KVTiers(self.pool, BlockPool(host_blocks), self.owners)
        self.segments = SegmentIndex(block_size)  # copies of segments, by content
        self.pool.on_drop = self._dropped
        self.query_tokens = 0  # prefix-cache counters, in tokens
        self.hit_tokens = 0
        self._pins: dict[Owner, list[int]] = {}  # owner -> the blocks it pinned (ascending)
        self._pin_counts: dict[int, int] = {}  # block -> how many owners pin it
        self._kept = 0  # blocks keyed by `keep_rows`
        # Copies rows (source slots, own slots, shift: K rotated) within the device pool; set by
        # the engine on the torch path, where splices are copied (Splice.copied).
        self.copy_rows: Callable[[torch.Tensor, torch.Tensor, int], None] | None = None
        # Copies rows (source slots to target slots, all at once) within the device pool; set
        # by the engine, None in a simulation (no KV to move).
        self.move_rows: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    def _dropped(self, block_id: int) -> None:
        self.owners.drop_block(block_id)
        self.segments.drop_block(block_id)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, token_ids: list[int], salt: bytes) -> PrefixMatch:
        """Longest run of cached full blocks that prefixes `token_ids`, leaving at least one
        token to compute (its logits are needed). Found blocks are not yet acquired."""
        found, parent, _ = self._chain(self.pool, token_ids, salt, 0, ROOT_KEY)
        return PrefixMatch(found, parent)

    def match_host(self, token_ids: list[int], salt: bytes, match: PrefixMatch) -> HostMatch:
        """The full blocks after `match` that the host tier holds (the same usable limit as
        `match_prefix`), up to the first it lacks; `arriving` when that one is being uploaded."""
        if self.tiers is None:
            return HostMatch([], False)
        found, _, missing = self._chain(self.tiers.host, token_ids, salt, match.num_blocks,
                                        match.last_key)
        return HostMatch(found, missing is not None and self.tiers.is_arriving(missing))

    def _chain(self, pool: BlockPool, token_ids: list[int], salt: bytes, start: int,
               parent: bytes) -> tuple[list[int], bytes, bytes | None]:
        """Walks the full blocks of `token_ids` from block `start` (whose parent key is
        `parent`) while `pool` holds each: the blocks found, the last found key, and the key of
        the first block it lacks (None when the usable blocks ran out first)."""
        usable = (len(token_ids) - 1) // self.block_size if self.prefix_caching else 0
        found: list[int] = []
        for index in range(start, usable):
            tokens = tuple(token_ids[index * self.block_size : (index + 1) * self.block_size])
            key = block_key(parent, salt, tokens)
            block_id = pool.lookup(key, tokens)
            if block_id is None:
                return found, parent, key
            found.append(block_id)
            parent = key
        return found, parent, None

    def adopt_prefix(self, table: BlockTable, match: PrefixMatch) -> None:
        """Acquires the matched blocks into an empty table."""
        assert not table.entries, "a prefix is adopted only by an empty table"
        for block_id in match.block_ids:
            self.pool.acquire(block_id)
        table.map_to(match.num_blocks * self.block_size, match.block_ids)
        self._claim(table, match.block_ids)
        table.num_keyed, table.last_key = match.num_blocks, match.last_key

    def splice(self, table: BlockTable, splices: list[Splice]) -> None:
        """Makes the table read these spans from their copies (positions not mapped yet, in
        ascending order): it references the copies' blocks from now on, so none is evicted
        before it is read. Positions are mapped by `grow`, as they are reached."""
        assert not table.splices and all(s.start >= table.num_mapped for s in splices)
        for splice in splices:
            for block_id in splice.block_ids:
                self.pool.acquire(block_id)
                table.entries.append(BlockTableEntry(block_id, splice.shift))
            if not splice.copied:  # a copied one's blocks are held only until copied
                self._claim(table, list(splice.block_ids))
        table.splices = list(splices)

    def record_query(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.query_tokens += prompt_tokens
        self.hit_tokens += hit_tokens

    def blocks_needed(self, table: BlockTable, num_tokens: int) -> int:
        return self.blocks_for(table.own_rows_needed(num_tokens))

    def can_admit(self, match: PrefixMatch, num_tokens: int,
                  splices: tuple[Splice, ...] | list[Splice] = ()) -> bool:
        """Whether an empty table could adopt `match`, splice `splices` and then cover
        `num_tokens` positions. Adopting and splicing take the blocks they reference that sit
        cached out of the allocatable ones."""
        referenced = set(match.block_ids).union(*(s.block_ids for s in splices))
        taken = sum(1 for block_id in referenced if self.pool.is_cached(block_id))
        spliced = sum(min(s.end, num_tokens) - s.start for s in splices
                      if s.start < num_tokens and not s.copied)
        own = num_tokens - match.num_blocks * self.block_size - spliced
        return self.blocks_for(max(0, own)) <= self.pool.num_allocatable() - taken

    def can_grow(self, table: BlockTable, num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= self.pool.num_allocatable()

    def grow(self, table: BlockTable, num_tokens: int) -> None:
        """Makes the table cover `num_tokens` positions (raises OutOfBlocks if it cannot)."""
        new = self.pool.allocate(self.blocks_needed(table, num_tokens))
        copies = table.map_to(num_tokens, new)
        self._claim(table, new)
        for splice, rows in copies:  # copied once; the copy is then let go
            assert self.copy_rows is not None, "a copied splice needs copy_rows"
            self.copy_rows(splice.slots, rows, splice.shift)
            for block_id in splice.block_ids:
                table.entries.remove(BlockTableEntry(block_id, splice.shift))
            self.pool.release(list(splice.block_ids))

    def commit(
        self, table: BlockTable, token_ids: list[int], num_computed: int, salt: bytes
    ) -> list[int]:
        """Keys every block that became full of computed KV, so later prompts can reuse it;
        returns the blocks it keyed. A spliced table keys only the blocks before its first
        splice (past it, a block's rows are not one run of the prompt)."""
        if not self.prefix_caching:
            return []
        limit = table.key_limit
        full = (num_computed if limit is None else min(num_computed, limit)) // self.block_size
        keyed: list[int] = []
        for index in range(table.num_keyed, full):
            tokens = tuple(token_ids[index * self.block_size : (index + 1) * self.block_size])
            key = block_key(table.last_key, salt, tokens)
            block_id = int(table.slots[index * self.block_size]) // self.block_size
            if self.pool.register(block_id, key, tokens):
                keyed.append(block_id)
            table.last_key = key
        table.num_keyed = max(table.num_keyed, full)
        return keyed

    def share_rows(self, table: BlockTable, computed: int,
                   parts: list[tuple[int, torch.Tensor, int]]) -> int:
        """Computed own positions read another copy's rows from now on: each part is (first
        position, the copy's slots, shift), and the table references their blocks already.
        The table's rows past the first such position are packed densely again (rows of
        unkeyed blocks: nobody else reads them), and own blocks left with nothing mapped are
        released. Returns the positions shared."""
        if not parts:
            return 0
        freed = [table.share(start, slots, shift) for start, slots, shift in parts]
        source, target, unused = table.compact(
            min(start for start, _, _ in parts), computed, torch.cat(freed),
            lambda block_id: self.pool.blocks[block_id].key is None)
        if source.numel() and self.move_rows is not None:
            self.move_rows(source, target)
        self.pool.release(unused)
        return sum(f.numel() for f in freed)

    def keep_rows(self, table: BlockTable, start: int, end: int, salt: bytes) -> torch.Tensor:
        """Keys every unkeyed block holding positions [start, end) of a table about to be freed,
        so their content stays cached (findable through the segment index, evictable) once it
        is; returns those positions' slots. The keys are unique (nobody looks them up): such a
        block's rows are not one run of a prompt."""
        slots = table.slots[start:end]
        for block_id in blocks_of(slots, self.block_size):
            if self.pool.blocks[block_id].key is None:
                self._kept += 1
                key = block_key(_KEPT_ROOT, salt, (block_id, self._kept))
                self.pool.register(block_id, key, ())
        return slots

    def free(self, table: BlockTable) -> None:
        self.pool.release(table.block_ids())
        table.clear()

    def pin(self, owner: Owner) -> int:
        """Takes one extra reference on every keyed block `owner` holds now (in the ledger), so
        none of them can be evicted; returns how many blocks this call pinned. Pinning a pinned
        owner pins only the keyed blocks it came to hold since: each block is pinned at most
        once per owner. Unkeyed blocks are left alone: they are a live request's partial tail,
        which no later call can find, so pinning them would only hold memory."""
        have = set(self._pins.get(owner, ()))
        pool = self.pool
        new = [
            block_id
            for block_id in sorted(self.owners.blocks_of(owner))
            if block_id not in have and pool.blocks[block_id].key is not None
            and not pool.is_in_flight(block_id)  # on its way to the host: nothing to keep here
        ]
        for block_id in new:
            self.pool.acquire(block_id)  # a cached block leaves the LRU: it cannot be evicted
            self._pin_counts[block_id] = self._pin_counts.get(block_id, 0) + 1
        if new:
            self._pins.setdefault(owner, []).extend(new)
        return len(new)

    def unpin(self, owner: Owner) -> int:
        """Gives back exactly the references `pin` took for `owner` (none if it holds no pin);
        returns how many. The blocks keep their keys: one nobody else reads becomes cached
        again, most recently used, in ascending block order."""
        block_ids = self._pins.pop(owner, [])
        for block_id in block_ids:
            if self._pin_counts[block_id] > 1:
                self._pin_counts[block_id] -= 1
            else:
                del self._pin_counts[block_id]
        self.pool.release(block_ids)
        return len(block_ids)

    def is_pinned(self, owner: Owner) -> bool:
        return owner in self._pins

    def num_pinned(self) -> int:
        """Distinct blocks at least one owner pins. Safe to call from any thread."""
        return len(self._pin_counts)

    def release_run(self, run: str) -> int:
        """Drops the run's pins and ownership and frees (unkeys) every cached block no owner
        holds now; returns how many. Blocks a live request still reads stay, and so do other
        owners'."""
        for owner in [o for o in self._pins if o[0] == run]:
            self.unpin(owner)
        if self.tiers is not None:  # and its host copies no other run owns
            _drop_orphans(self.tiers.host, self.tiers.host_owners.release_run(run))
        return _drop_orphans(self.pool, self.owners.release_run(run))

    def residency(self, run: str) -> dict[str, AgentResidency]:
        """Per agent of `run`: its device blocks and how many of them others hold too.
        Safe to call from any thread."""
        device = self.owners.residency(run)
        if self.tiers is None:
            return device
        host = self.tiers.host_owners.residency(run)
        return {agent: AgentResidency(
            device[agent].device_blocks if agent in device else 0,
            device[agent].shared_blocks if agent in device else 0,
            host[agent].device_blocks if agent in host else 0,
        ) for agent in device.keys() | host.keys()}

    def usage(self) -> PoolUsage:
        return self.pool.usage()

    def check_integrity(self) -> None:
        """The pool's table, the ledger's maps, and: the ledger names no free block."""
        self.pool.check_integrity()
        if self.tiers is not None:
            self.tiers.check_integrity()
        self.owners.check_integrity()
        self.segments.check_integrity()
        for block_id in self.segments.block_ids():
            block = self.pool.blocks[block_id]
            assert block.key is not None, f"a segment copy lies in unkeyed block {block}"
        for block_id in self.owners.block_ids():
            block = self.pool.blocks[block_id]
            assert block.ref_count > 0 or block.key is not None, f"owned block {block} is free"
        self._check_pins()

    def _check_pins(self) -> None:
        """Pins name keyed blocks their owner holds, once per owner, each counted in its
        block's ref_count; the per-block counts mirror the per-owner lists."""
        counted = Counter(b for block_ids in self._pins.values() for b in block_ids)
        assert counted == Counter(self._pin_counts), "pin counts disagree with the pins"
        for owner, block_ids in self._pins.items():
            assert block_ids and len(set(block_ids)) == len(block_ids), f"bad pin of {owner}"
            held = self.owners.blocks_of(owner)
            assert set(block_ids) <= held, f"{owner} pins blocks it does not hold"
        for block_id, count in self._pin_counts.items():
            block = self.pool.blocks[block_id]
            assert block.key is not None and block.ref_count >= count, f"pinned {block} is wrong"

    def _claim(self, table: BlockTable, block_ids: list[int]) -> None:
        if table.owner is not None and block_ids:
            self.owners.claim(table.owner, block_ids)


def _drop_orphans(pool: BlockPool, orphans: list[int]) -> int:
    """Frees the cached blocks among those no owner holds now; returns how many."""
    cached = [block_id for block_id in orphans if pool.is_cached(block_id)]
    for block_id in cached:
        pool.drop_cached(block_id)
    return len(cached)
