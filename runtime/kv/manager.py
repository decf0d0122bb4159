"""The KV manager: block tables of sequences over the device block pool, with exact prefix reuse,
spliced segments, pins and the host tier.

Contract with the scheduler (the only verbs it uses; a table's fields change only through them):

    verb                                   does
    -------------------------------------  ------------------------------------------------------
    plan_admission(ids, salt, budget)      the cached prefix a prompt adopts, and whether it must
                                           wait (its next blocks are on their way up from the host:
                                           asked for here, when the prompt could then be admitted)
    can_allocate(plan, end, splices)       whether an empty table could adopt the plan's prefix,
                                           splice `splices` and then cover `end` positions
    allocate(table, plan, end, splices)    does it (check first: it raises OutOfBlocks otherwise)
    can_grow(table, end) / grow(...)       a running table covers `end` positions (more blocks)
    key_full_blocks(table, ids, n, salt)   keys the blocks that the first n computed positions fill
    fork(source, target, length)           an empty table reads another's first `length` positions
                                           (a choice of n > 1 forking its prompt's KV)
    free(table)                            releases every block the table references

Exact prefix hits are seen at shift zero; a splice (runtime/kv/block_table.py) places another
copy of a segment at the reader's positions, at a shift. Refusing an admission (can_allocate
False) leaves every cached block as it was: its LRU order, its owners.

A table may name an owner (run, agent); every block that enters it is claimed for that owner in
the `owners` ledger (runtime/kv/owners.py), which the pool keeps current through `on_drop`.

Policies read the KV through the per-owner queries below (runtime/policy/view.py) and decide;
the engine carries their decisions out through the verbs after them: pin or unpin an owner's KV
(runtime/kv/pins.py), set its retention level (the order of eviction, runtime/kv/block_pool.py),
offload it to the host tier, upload it back or prefetch it, back blocks up there
(runtime/kv/tiers/).

An owner's retention level lives in the ledger until its run is released; every device block
sits at the highest level of its owners (DEFAULT_RETENTION for an owner without one), kept so
when the owner sets a level, when a block enters an owner's table or lands from the host, and
when a run's release leaves a shared block to its other owners (or to none: then the default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from kvrt.runtime.kv.block_pool import RETENTION_LEVELS, BlockPool, PoolUsage
from kvrt.runtime.kv.block_table import BlockTable, Splice, blocks_of
from kvrt.runtime.kv.owners import AgentResidency, BlockOwners, Owner
from kvrt.runtime.kv.pins import Pins
from kvrt.runtime.kv.prefix_hash import ROOT_KEY, block_key
from kvrt.runtime.kv.reuse.index import SegmentIndex
from kvrt.runtime.kv.rows import KVRows
from kvrt.runtime.kv.tiers.host_tier import HostTier
from kvrt.runtime.kv.tiers.mover import Mover
from kvrt.runtime.kv.tiers.moves import Direction, TierCounts

_KEPT_ROOT = b"\x01" * 32  # the parent of `keep_cached`'s keys: never a prefix chain's


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    block_ids: list[int]
    last_key: bytes

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


@dataclass(frozen=True, slots=True)
class AdmissionPlan:
    """What admitting a prompt starts from: the cached prefix it adopts, covering its first
    `computed` positions; `wait`: admit it later (its KV is coming up from the host)."""

    prefix: PrefixMatch
    computed: int
    wait: bool = False


@dataclass(frozen=True, slots=True)
class HostMatch:
    """The full blocks that continue a device prefix match on the host tier."""

    block_ids: list[int]  # host blocks, in prefix order, to upload
    arriving: bool  # the next block is being uploaded already: wait for it


@dataclass(frozen=True, slots=True)
class HostSpec:
    """A host tier of `num_blocks` blocks whose copies `mover` makes."""

    num_blocks: int
    mover: Mover


class KVManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True,
                 host: HostSpec | None = None, rows: KVRows | None = None) -> None:
        """`rows`: the KV tensor's row operations (None in a simulation: no KV to copy)."""
        self.pool = BlockPool(num_blocks, on_drop=self._dropped, on_unkey=self._unkeyed)
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.owners = BlockOwners()
        self.segments = SegmentIndex(block_size)  # copies of segments, by content
        self.rows = rows
        self.pins = Pins(self.pool, self.owners)
        # The host tier: offloaded KV, found again by the same keys (none without a spec).
        self.host = (None if host is None
                     else HostTier(self.pool, self.owners, host.num_blocks, host.mover))
        self._kept = 0  # blocks keyed by `keep_cached`
        self._last_keys: dict[Owner, frozenset[bytes]] = {}  # keys of each owner's last table

    def _dropped(self, block_id: int) -> None:
        self.owners.drop_block(block_id)
        self.segments.drop_block(block_id)

    def _unkeyed(self, key: bytes, token_ids: tuple[int, ...]) -> None:
        if self.host is not None:
            self.host.tiers.left_device(key, token_ids)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- admission (the scheduler's contract) -------------------------------------------------

    def plan_admission(self, token_ids: list[int], salt: bytes, budget: int,
                       owner: Owner | None = None) -> AdmissionPlan:
        """The prompt's cached prefix on the device. When the host holds the blocks after it,
        they are brought up first (the plan waits), if the prompt could then be admitted with
        `budget` tokens of its own: uploaded blocks sit cached, and the growth of the running
        would evict them again before it is. Where retention levels are in use, the `owner` of
        a call that waits for an upload goes to the highest level."""
        match = self.match_prefix(token_ids, salt)
        plan = AdmissionPlan(match, match.num_blocks * self.block_size)
        if self.host is None:
            return plan
        host = self.match_host(token_ids, salt, match)
        if host.arriving:
            return AdmissionPlan(match, plan.computed, wait=True)
        if not host.block_ids:
            return plan
        loaded = (match.num_blocks + len(host.block_ids)) * self.block_size
        count = min(len(token_ids) - loaded, budget)
        if not self.can_allocate(plan, loaded + count):
            return AdmissionPlan(match, plan.computed, wait=True)
        if owner is not None:
            # Its call waits for this KV, and will read it: its owner holds it from now on (the
            # blocks land owned by it, shared ones too), at the highest level where levels are
            # in use, since no KV is needed sooner. At a lower level the landed blocks could be
            # the first to go, and the call's next upload (or another's) would evict them before
            # it is admitted: in a pool held at higher levels it would wait forever.
            self.host.tiers.host_owners.claim(owner, host.block_ids)
            if self.owners.has_levels:
                self.set_retention(owner, RETENTION_LEVELS - 1)
        if self.host.upload(host.block_ids):
            return AdmissionPlan(match, plan.computed, wait=True)
        return plan  # none could come up: computed instead

    def can_allocate(self, plan: AdmissionPlan, end: int, splices: Sequence[Splice] = ()
                     ) -> bool:
        """Adopting and splicing take the blocks they reference that sit cached out of the
        allocatable ones."""
        match = plan.prefix
        referenced = set(match.block_ids).union(*(s.block_ids for s in splices))
        taken = sum(1 for block_id in referenced if self.pool.is_cached(block_id))
        spliced = sum(min(s.end, end) - s.start for s in splices if s.start < end)
        own = end - plan.computed - spliced
        return self.blocks_for(max(0, own)) <= self.pool.num_allocatable() - taken

    def allocate(self, table: BlockTable, plan: AdmissionPlan, end: int,
                 splices: Sequence[Splice] = ()) -> None:
        """An empty table adopts the plan's prefix, references the splices' copies (so none is
        evicted before it is read) and covers `end` positions."""
        match = plan.prefix
        for block_id in match.block_ids:
            self.pool.acquire(block_id)
        table.adopt_prefix(match.block_ids, match.last_key)
        self._claim(table, match.block_ids)
        for splice in splices:
            for block_id in splice.block_ids:
                self.pool.acquire(block_id)
            self._claim(table, list(splice.block_ids))
        table.add_splices(list(splices))
        self.grow(table, end)

    def can_grow(self, table: BlockTable, end: int) -> bool:
        return self._blocks_needed(table, end) <= self.pool.num_allocatable()

    def grow(self, table: BlockTable, end: int) -> None:
        """Makes the table cover `end` positions (raises OutOfBlocks if it cannot)."""
        new = self.pool.allocate(self._blocks_needed(table, end))
        table.map_to(end, new)
        self._claim(table, new)

    def _blocks_needed(self, table: BlockTable, end: int) -> int:
        return self.blocks_for(table.own_rows_needed(end))

    def key_full_blocks(self, table: BlockTable, token_ids: list[int], num_computed: int,
                        salt: bytes) -> list[int]:
        """Keys every block that became full of computed KV, so later prompts can reuse it;
        returns the blocks it keyed. A spliced table keys only the blocks before its first
        splice (past it, a block's rows are not one run of the prompt)."""
        if not self.prefix_caching:
            return []
        limit = table.key_limit
        full = (num_computed if limit is None else min(num_computed, limit)) // self.block_size
        keyed: list[int] = []
        last = table.last_key
        for index, key, tokens in self._keyed_blocks(token_ids, salt, table.num_keyed, last,
                                                     full):
            block_id = table.block_at(index)
            if self.pool.register(block_id, key, tokens, index):
                keyed.append(block_id)
            last = key
        table.mark_keyed(full, last)
        return keyed

    def fork(self, source: BlockTable, target: BlockTable, length: int) -> bool:
        """The empty `target` reads the KV of `source`'s first `length` positions (computed),
        as its own first positions: the full blocks by reference (their ref counts go up;
        keyed or not, neither table writes them again), and the partly filled last block, which
        both go on writing, copied now into a block of the target's own (copy on write, the
        write being the target's next step; copying one block costs less than recomputing
        it). False, with nothing done, when the pool has no block for the copy, or `source`
        splices other copies (its rows are then not one run of positions)."""
        assert not target.entries, "a fork starts from an empty table"
        full, partial = divmod(length, self.block_size)
        if source.splices or (partial and self.pool.num_allocatable() < 1):
            return False
        shared = [source.block_at(index) for index in range(full)]
        for block_id in shared:
            self.pool.acquire(block_id)
        target.map_to(full * self.block_size, shared)
        target.mark_keyed(source.num_keyed, source.last_key)  # (at most `full`: computed)
        self._claim(target, shared)
        if partial:
            self.grow(target, length)
            start = full * self.block_size
            if self.rows is not None:
                self.rows.copy(source.slots[start:length], target.slots[start:length])
        return True

    def free(self, table: BlockTable) -> None:
        if table.owner is not None and self.host is not None:
            # What its next call most likely reads again: a prefetch brings back this, not
            # every block the owner ever left on the host.
            blocks = self.pool.blocks
            self._last_keys[table.owner] = frozenset(
                key for b in table.block_ids()[: table.num_keyed]
                if (key := blocks[b].key) is not None)
        self.pool.release(table.block_ids())
        table.clear()

    # -- segment copies (the reuse planner's) ------------------------------------------------

    def is_keyed(self, block_id: int) -> bool:
        return self.pool.blocks[block_id].key is not None

    def is_moving(self, block_ids: Iterable[int]) -> bool:
        """Whether any of these device blocks is on its way to or from the host."""
        return any(self.pool.is_in_flight(b) for b in block_ids)

    def splice_computed(self, table: BlockTable, computed: int,
                        parts: list[tuple[int, torch.Tensor, int]]) -> int:
        """Computed own positions read another copy's rows from now on: each part is (first
        position, the copy's slots, shift), and the table references their blocks already.
        The table's rows past the first such position are packed densely again (rows of
        unkeyed blocks: nobody else reads them), and own blocks left with nothing mapped are
        released. Returns the positions spliced."""
        if not parts:
            return 0
        freed = [table.share(start, slots, shift) for start, slots, shift in parts]
        source, target, unused = table.compact(
            min(start for start, _, _ in parts), computed, torch.cat(freed),
            lambda block_id: not self.is_keyed(block_id))
        if source.numel() and self.rows is not None:
            self.rows.copy(source, target)
        self.pool.release(unused)
        return sum(f.numel() for f in freed)

    def keep_cached(self, table: BlockTable, start: int, end: int, salt: bytes) -> torch.Tensor:
        """Keys every unkeyed block holding positions [start, end) of a table about to be freed,
        so their content stays cached (findable through the segment index, evictable) once it
        is; returns those positions' slots. The keys are unique (nobody looks them up): such a
        block's rows are not one run of a prompt."""
        slots = table.slots[start:end]
        for block_id in blocks_of(slots, self.block_size):
            if not self.is_keyed(block_id):
                self._kept += 1
                key = block_key(_KEPT_ROOT, salt, (block_id, self._kept))
                self.pool.register(block_id, key, ())
        return slots

    # -- lookups -----------------------------------------------------------------------------

    def match_prefix(self, token_ids: list[int], salt: bytes) -> PrefixMatch:
        """Longest run of cached full blocks that prefixes `token_ids`, leaving at least one
        token to compute (its logits are needed). Found blocks are not yet acquired."""
        found, parent, _ = self._chain(self.pool, token_ids, salt, 0, ROOT_KEY)
        return PrefixMatch(found, parent)

    def match_host(self, token_ids: list[int], salt: bytes, match: PrefixMatch) -> HostMatch:
        """The full blocks after `match` that the host tier holds (the same usable limit as
        `match_prefix`), up to the first it lacks; `arriving` when that one is being uploaded."""
        assert self.host is not None
        tiers = self.host.tiers
        found, _, missing = self._chain(tiers.host, token_ids, salt, match.num_blocks,
                                        match.last_key)
        return HostMatch(found, missing is not None and tiers.is_arriving(missing))

    def block_keys(self, token_ids: list[int], salt: bytes, start: int, parent: bytes,
                   stop: int) -> Iterator[bytes]:
        """The keys of `token_ids`' full blocks `start` to `stop` (excluded), the key of block
        `start - 1` being `parent`: what keying them once computed will register."""
        return (key for _, key, _ in self._keyed_blocks(token_ids, salt, start, parent, stop))

    def _keyed_blocks(self, token_ids: list[int], salt: bytes, start: int, parent: bytes,
                      stop: int) -> Iterator[tuple[int, bytes, tuple[int, ...]]]:
        """(index, key, tokens) of `token_ids`' full blocks `start` to `stop` (excluded), each
        key chained on the one before, the first on `parent`."""
        for index in range(start, min(stop, len(token_ids) // self.block_size)):
            tokens = tuple(token_ids[index * self.block_size : (index + 1) * self.block_size])
            parent = block_key(parent, salt, tokens)
            yield index, parent, tokens

    def _chain(self, pool: BlockPool, token_ids: list[int], salt: bytes, start: int,
               parent: bytes) -> tuple[list[int], bytes, bytes | None]:
        """Walks the full blocks of `token_ids` from block `start` (whose parent key is
        `parent`) while `pool` holds each: the blocks found, the last found key, and the key of
        the first block it lacks (None when the usable blocks ran out first)."""
        usable = (len(token_ids) - 1) // self.block_size if self.prefix_caching else 0
        found: list[int] = []
        for _, key, tokens in self._keyed_blocks(token_ids, salt, start, parent, usable):
            block_id = pool.lookup(key, tokens)
            if block_id is None:
                return found, parent, key
            found.append(block_id)
            parent = key
        return found, parent, None

    # -- what policies read (runtime/policy/view.py) --------------------------------------

    def usage(self) -> PoolUsage:
        return self.pool.usage()

    def evicted_blocks(self) -> int:
        """Cached device blocks taken for other content since start (0: no memory pressure)."""
        return self.pool.evictions

    def num_pinned(self) -> int:
        """Distinct blocks at least one owner pins. Safe to call from any thread."""
        return len(self.pins)

    def is_pinned(self, owner: Owner) -> bool:
        return self.pins.is_pinned(owner)

    def pinnable_blocks(self, owner: Owner) -> int:
        return len(self.pins.pinnable(owner))

    def cached_blocks(self, owner: Owner) -> int:
        return len(self._cached_of(owner))

    def arriving_blocks(self, owner: Owner) -> int:
        """The owner's blocks a prefetch is bringing up from the host now."""
        return 0 if self.host is None else self.host.arriving(owner)

    def settling_blocks(self, owner: Owner) -> int:
        """The owner's blocks that only write-through copies to the host hold now: cached as
        soon as those land (a call's last blocks, right after it ends)."""
        host = self.host
        if host is None:
            return 0
        blocks = self.pool.blocks
        return sum(1 for b in self.owners.blocks_of(owner)
                   if 0 < blocks[b].ref_count == host.backups_of(b))

    @property
    def has_host_tier(self) -> bool:
        return self.host is not None

    def offloadable_blocks(self, owner: Owner) -> int:
        if self.host is None:
            return 0
        return self.host.tiers.offloadable(sorted(self.owners.blocks_of(owner)))

    def offloaded_blocks(self, owner: Owner) -> int:
        return 0 if self.host is None else self.host.offloaded_blocks(owner)

    def is_offload_landing(self, owner: Owner) -> bool:
        return self.host is not None and self.host.is_arriving_at_host(owner)

    def retention_of(self, owner: Owner) -> int:
        return self.owners.retention_of(owner)

    def prefetchable_blocks(self, owner: Owner) -> int:
        """How many blocks a `prefetch` of the owner would bring to the device now."""
        if self.host is None:
            return 0
        return len(self.host.prefetchable(owner, self._prefetch_room(owner),
                                          self.last_keys(owner)))

    def last_keys(self, owner: Owner) -> frozenset[bytes]:
        """The content keys of the blocks the owner's last call held when it ended."""
        return self._last_keys.get(owner, frozenset())

    def copy_seconds(self, num_blocks: int, prior_bandwidth: float) -> float:
        assert self.host is not None, "copies need a host tier"
        return self.host.copy_seconds(num_blocks, prior_bandwidth)

    def _cached_of(self, owner: Owner) -> list[int]:
        return [b for b in sorted(self.owners.blocks_of(owner)) if self.pool.is_cached(b)]

    def _prefetch_room(self, owner: Owner) -> int:
        """How many blocks a prefetch of the owner may take: the free ones and the cached ones
        of levels below the owner's (eviction takes those first), so it evicts nothing as
        important as what it brings, and no block a request reads."""
        pool = self.pool
        return pool.usage().free + pool.num_evictable_below(self.retention_of(owner))

    # -- what policies decide (the engine carries it out) -------------------------------------

    def pin(self, owner: Owner) -> int:
        return self.pins.pin(owner)

    def unpin(self, owner: Owner) -> int:
        return self.pins.unpin(owner)

    def offload(self, owner: Owner) -> int:
        """Starts moving the owner's cached KV (blocks no request reads) to the host tier;
        returns how many blocks leave the device (0 without a host tier)."""
        if self.host is None:
            return 0
        return self.host.offload_owner(owner, self._cached_of(owner))

    def upload(self, owner: Owner) -> bool:
        """Starts bringing back what the owner's last offload sent to the host."""
        return self.host is not None and self.host.upload_owner(owner)

    def set_retention(self, owner: Owner, level: int) -> None:
        """Sets the owner's retention level (0..RETENTION_LEVELS-1; a ValueError otherwise): each
        device block it holds, now or later, takes the highest level of its owners. Cached
        blocks that change level join the new level's LRU the last in their prompt first, so a
        chain's tail is evicted before its head (a prefix stays usable). Costs O(k log k) for
        the k blocks the owner holds (times their owners), nothing when the level is unchanged."""
        if not isinstance(level, int) or level not in range(RETENTION_LEVELS):
            raise ValueError(f"retention level {level!r} of {owner} is not in "
                             f"0..{RETENTION_LEVELS - 1}")
        changed = self.owners.set_retention(owner, level)
        blocks = self.pool.blocks
        for block_id in sorted(changed, key=lambda b: (-blocks[b].position, b)):
            self.pool.set_retention(block_id, changed[block_id])

    def prefetch(self, owner: Owner) -> int:
        """Starts bringing back up the owner's KV that is on the host and not on the device, of
        the blocks its last call held when it ended (its previous turn, which its next call
        extends): an upload, landing cached, findable, at the owner's level. As much as fits
        without evicting blocks of the owner's level or above (`_prefetch_room`); returns how
        many blocks go (0 without a host tier)."""
        if self.host is None:
            return 0
        return self.host.prefetch(owner, self._prefetch_room(owner), self.last_keys(owner))

    def backup(self, block_ids: Iterable[int]) -> None:
        """Starts copying these keyed device blocks to the host, leaving them on the device."""
        if self.host is not None:
            self.host.backup(list(block_ids))

    # -- moves in flight ---------------------------------------------------------------------

    def finish_moves(self) -> int:
        """Completes the moves whose copies have landed; returns how many blocks landed."""
        return 0 if self.host is None else self.host.finish_done()

    def take_landed_uploads(self) -> list[Owner]:
        """The owners whose `upload` landed since the last call (completed by `finish_moves`)."""
        return [] if self.host is None else self.host.take_landed_uploads()

    def host_usage(self) -> PoolUsage | None:
        """The host tier's pool (None without one)."""
        return None if self.host is None else self.host.tiers.host.usage()

    def tier_counts(self) -> TierCounts:
        return TierCounts() if self.host is None else self.host.tiers.counts()

    def move_failures(self) -> dict[str, int]:
        """Tier moves whose copy failed since start, by direction (every direction listed)."""
        failures = self.host.failures if self.host is not None else {}
        return {d.value: failures.get(d, 0) for d in Direction}

    def moves_in_flight(self) -> bool:
        return self.host is not None and self.host.in_flight()

    def on_next_landing(self, callback: Callable[[], None]) -> None:
        """Calls `callback` once a move in flight lands (at once if one has; never if none is
        in flight)."""
        if self.host is not None:
            self.host.on_landing(callback)

    def close(self) -> None:
        """Lets the moves in flight land and stops the mover."""
        if self.host is not None:
            self.host.close()

    # -- runs --------------------------------------------------------------------------------

    def release_run(self, run: str) -> int:
        """Drops the run's pins and ownership; returns how many cached blocks no owner holds
        now. Those stay cached, on both tiers, as a prefix cache keeps what its requests left:
        a later run's prompt reads them again (the same agents' system prompts, a thread's
        history); they are evicted in LRU order at the default level. Blocks the run shares
        keep the level of their other owners."""
        self.pins.unpin_run(run)
        for owner in [o for o in self._last_keys if o[0] == run]:
            del self._last_keys[owner]
        leveled = self.owners.blocks_of_run(run) if self.owners.has_levels else set()
        if self.host is not None:
            self.host.forget_run(run)
            self.host.tiers.host_owners.release_run(run)
        released = sum(1 for b in self.owners.release_run(run) if self.pool.is_cached(b))
        self._relevel(list(leveled))
        return released

    def residency(self, run: str) -> dict[str, AgentResidency]:
        """Per agent of `run`: its device blocks and how many of them others hold too.
        Safe to call from any thread."""
        device = self.owners.residency(run)
        if self.host is None:
            return device
        host = self.host.tiers.host_owners.residency(run)
        return {agent: AgentResidency(
            device[agent].device_blocks if agent in device else 0,
            device[agent].shared_blocks if agent in device else 0,
            host[agent].device_blocks if agent in host else 0,
        ) for agent in device.keys() | host.keys()}

    def check_integrity(self) -> None:
        """The pool's table, the ledger's maps, and: the ledger names no free block; every
        block sits at its owners' retention level."""
        self.pool.check_integrity()
        if self.host is not None:
            self.host.tiers.check_integrity()
        self.owners.check_integrity()
        self.segments.check_integrity()
        for block_id in self.segments.block_ids():
            block = self.pool.blocks[block_id]
            assert block.key is not None, f"a segment copy lies in unkeyed block {block}"
        for block_id in self.owners.block_ids():
            block = self.pool.blocks[block_id]
            assert block.ref_count > 0 or block.key is not None, f"owned block {block} is free"
        levels = self.owners.retention_levels(range(self.pool.num_blocks))
        for block, level in zip(self.pool.blocks, levels):
            assert block.retention == level, f"{block} is not at its owners' level {level}"
        self.pins.check_integrity()

    def _claim(self, table: BlockTable, block_ids: list[int]) -> None:
        if table.owner is not None and block_ids:
            self.owners.claim(table.owner, block_ids)
            if self.owners.has_levels:
                self._relevel(block_ids)

    def _relevel(self, block_ids: list[int]) -> None:
        """Sets these blocks to their owners' level (a free one keeps the default)."""
        for block_id, level in zip(block_ids, self.owners.retention_levels(block_ids)):
            self.pool.set_retention(block_id, level)
