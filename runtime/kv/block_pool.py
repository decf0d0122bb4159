"""A tier's block pool: ref counts, the prefix index, eviction by retention level then LRU, and
moves between tiers.

The device tier and the host tier (runtime/kv/tiers/) each keep one. Every block is in
exactly one state:

    state      ref_count  key       where
    ---------  ---------  --------  -------------------------------------------------
    free       0          None      `_free` (a FIFO of unkeyed, released or dropped blocks)
    cached     0          set       `_cached[level]` (LRU order, oldest first) and `_index`
    in use     > 0        optional  referenced by live sequences; `_index` if keyed
    in flight  0          optional  `_in_flight`: being copied to or from another tier;
                                    never found, never allocated, never evicted

    transition                                 hook
    -----------------------------------------  ------------------------------------------
    in use -> free   (release)                 `on_drop` (an unkeyed block's content is gone)
    in use -> cached (release)                 none (still findable)
    cached -> in use (acquire)                 none (a prefix hit: the content is read)
    cached -> in use (allocate)                `on_drop` (evicted: the old content is gone)
    cached -> free   (drop_cached)             `on_drop`
    cached -> in flight (begin_move_out)       none (its content is being copied out)
    in flight -> free (finish_move_out, moved) `on_drop` (the content lives in the other tier)
    in flight -> cached (.., kept)             none (a failed move, or a copy kept here)
    free/cached -> in flight (begin_move_in)   `on_drop` for an evicted cached block
    in flight -> cached (finish_move_in, ok)   none (findable from now on)
    in flight -> free (finish_move_in, failed) none

A move is two-phase (begin, then finish with success or failure), so a block is never both free
and in flight, and nothing reads or reuses a block while its content is being copied.

Contract: `allocate` only hands out free blocks, evicting cached blocks when the free list runs
dry (evicting a cached block is always safe: no reader holds it): the least recently released
block of the lowest retention level that holds any, so LRU order within a level.
A keyed block is found by `lookup` until it is evicted or dropped. `on_drop(block_id)` (the KV
manager's, given at construction) fires exactly when a block's content becomes unreachable;
`on_unkey(key, token_ids)` when a cached block's content leaves this pool (evicted or dropped).
`check_integrity()` verifies the table.

Retention levels (0..RETENTION_LEVELS-1) are soft hints: a block of a higher level outlives every
cached block of a lower one, yet stays evictable (a pin, runtime/kv/pins.py, is the hard kind).

    block state         its level
    ------------------  ----------------------------------------------------------------------
    free                DEFAULT_RETENTION (a freed or evicted block forgets its level)
    cached              the LRU `_cached[level]` it sits in; `set_retention` moves it there
                        as most recently used
    in use / in flight  kept, and set by `set_retention`: it takes effect when the block is
                        cached again

An evicting allocation scans the levels from 0 up once: O(RETENTION_LEVELS) per allocation
plus O(1) per block. Nobody setting a level leaves every cached block at DEFAULT_RETENTION, i.e.
plain LRU. `allocate`, `acquire` and `release` inline the LRU bookkeeping (`_cache`,
`_uncache`, `_free_block`): they run per block on every step.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

RETENTION_LEVELS = 8  # 0 (evicted first) .. 7 (evicted last)
DEFAULT_RETENTION = 2  # a block nobody set a level for: below it, levels for KV to drop early
_LEVELS = range(RETENTION_LEVELS)


class OutOfBlocks(Exception):
    """Not enough free or evictable blocks for an allocation."""


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    key: bytes | None = None
    token_ids: tuple[int, ...] = ()  # confirms an index hit (a hash match alone is not trusted)
    retention: int = DEFAULT_RETENTION  # its eviction level (see the module docstring)
    position: int = 0  # a keyed block's index in its prompt (a prefetch brings the first first)


@dataclass(frozen=True, slots=True)
class PoolUsage:
    total: int
    free: int
    cached: int
    in_use: int
    in_flight: int


class BlockPool:
    def __init__(self, num_blocks: int, on_drop: Callable[[int], None] | None = None,
                 on_unkey: Callable[[bytes, tuple[int, ...]], None] | None = None) -> None:
        """`on_unkey`: the host tier uses it to keep the host's last copies longer."""
        if num_blocks <= 0:
            raise ValueError("a block pool needs at least one block")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        # One LRU per retention level; `_num_cached` is their total (usage() stays O(1)).
        self._cached = [OrderedDict[int, None]() for _ in range(RETENTION_LEVELS)]
        self._num_cached = 0
        self._index: dict[bytes, int] = {}
        self._in_flight: set[int] = set()
        self.evictions = 0
        self._on_drop, self._on_unkey = on_drop, on_unkey

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def num_allocatable(self) -> int:
        return len(self._free) + self._num_cached

    def num_evictable_below(self, level: int) -> int:
        """Cached blocks of retention levels lower than `level`: what an allocation may evict
        without touching a block of `level` or above."""
        return sum(len(self._cached[lower]) for lower in range(min(level, RETENTION_LEVELS)))

    def allocate(self, count: int) -> list[int]:
        """Hands out `count` blocks with ref_count 1 and no key."""
        taken = self._take(count)
        for block_id in taken:
            self.blocks[block_id].ref_count = 1
        return taken

    def _take(self, count: int) -> list[int]:
        """`count` unkeyed blocks off the free list, then evicting cached ones: the oldest of the
        lowest level first. One pass over the levels per call, not per block."""
        if count > self.num_allocatable():
            raise OutOfBlocks(f"need {count} blocks, {self.num_allocatable()} allocatable")
        free = self._free
        if count <= len(free):
            return [free.popleft() for _ in range(count)]
        taken = list(free)
        free.clear()
        evicting = count - len(taken)
        self._num_cached -= evicting  # counted once (the hooks never read the counts)
        self.evictions += evicting
        blocks, default = self.blocks, DEFAULT_RETENTION
        for lru in self._cached:
            while evicting and lru:
                block_id, _ = lru.popitem(last=False)
                block = blocks[block_id]
                block.retention = default
                self._unkey(block)
                self._dropped(block_id)
                taken.append(block_id)
                evicting -= 1
            if not evicting:
                break
        return taken

    def lookup(self, key: bytes, token_ids: tuple[int, ...]) -> int | None:
        block_id = self._index.get(key)
        if block_id is None or self.blocks[block_id].token_ids != token_ids:
            return None
        return block_id

    def acquire(self, block_id: int) -> None:
        """Adds a reader to a keyed block found by `lookup` (takes it out of the LRU if cached)."""
        block = self.blocks[block_id]
        assert block_id not in self._in_flight, f"block {block_id} is in flight"
        if block.ref_count == 0:  # inlined `_uncache`: a prefix hit's hot path
            del self._cached[block.retention][block_id]
            self._num_cached -= 1
        block.ref_count += 1

    def release(self, block_ids: list[int]) -> None:
        """Drops one reference from each block. Keyed blocks stay findable until evicted."""
        blocks, cached = self.blocks, self._cached
        for block_id in block_ids:
            block = blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} released more often than acquired")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.key is None:  # inlined `_free_block`
                    block.retention = DEFAULT_RETENTION
                    self._free.append(block_id)
                    self._dropped(block_id)
                else:  # inlined `_cache`: every release of a keyed block
                    cached[block.retention][block_id] = None
                    self._num_cached += 1

    def is_cached(self, block_id: int) -> bool:
        """Unreferenced, keyed and findable (a block moving out keeps its key but is not)."""
        return block_id in self._cached[self.blocks[block_id].retention]

    def drop_cached(self, block_id: int) -> None:
        """Unkeys a cached block and returns it to the free list (its owner let it go)."""
        if not self.is_cached(block_id):
            raise ValueError(f"block {block_id} is not cached: {self.blocks[block_id]}")
        block = self.blocks[block_id]
        self._uncache(block)
        self._unkey(block)
        self._free_block(block)
        self._dropped(block_id)

    def set_recency(self, block_id: int, recent: bool) -> None:
        """Moves a cached block to the most (`recent`) or least recently used end of its level's
        LRU: the last or the first of its level to be evicted."""
        lru = self._cached[self.blocks[block_id].retention]
        if block_id in lru:
            lru.move_to_end(block_id, last=recent)

    def set_retention(self, block_id: int, level: int) -> None:
        """Sets a block's retention level. A cached block moves to that level's LRU as its most
        recently used (if the level changed: setting the same level again keeps its place); an
        in-use or in-flight block keeps the level for when it is cached. A free block has no
        content to retain and is left at the default."""
        if not isinstance(level, int) or level not in _LEVELS:
            raise ValueError(f"retention level {level} is not in 0..{RETENTION_LEVELS - 1}")
        block = self.blocks[block_id]
        if block.retention == level:
            return
        if block.ref_count == 0 and block_id not in self._in_flight:
            if block.key is None:
                return  # free
            del self._cached[block.retention][block_id]
            block.retention = level
            self._cached[level][block_id] = None
            return
        block.retention = level

    def register(self, block_id: int, key: bytes, token_ids: tuple[int, ...],
                 position: int = 0) -> bool:
        """Keys a full, in-use block so others can find it. Returns False (and leaves the block
        unkeyed) when another block already holds the key, e.g. two identical prompts computed
        in the same step."""
        block = self.blocks[block_id]
        assert block.ref_count > 0 and block.key is None, "only fresh in-use blocks get a key"
        if key in self._index:
            return False
        block.key, block.token_ids, block.position = key, token_ids, position
        self._index[key] = block_id
        return True

    # -- moves between tiers: begin, then finish with success or failure -------------------

    def begin_move_out(self, block_id: int) -> None:
        """A cached block's content starts being copied to another tier. It leaves the LRU and
        the index (so it is neither evicted nor found) and keeps its key for `finish_move_out`."""
        if not self.is_cached(block_id):
            raise ValueError(f"only a cached block can move out: {self.blocks[block_id]}")
        block = self.blocks[block_id]
        self._uncache(block)
        del self._index[block.key]  # type: ignore[arg-type]
        self._in_flight.add(block_id)

    def finish_move_out(self, block_id: int, keep: bool) -> None:
        """`keep`: the block is cached here again (the move failed, or this tier keeps a copy),
        unless another block took its key meanwhile; else its content is gone from this tier."""
        block = self._take_in_flight(block_id)
        assert block.key is not None
        if keep and block.key not in self._index:
            self._index[block.key] = block_id
            self._cache(block)
            return
        block.key, block.token_ids = None, ()
        self._free_block(block)
        self._dropped(block_id)

    def begin_move_in(self, count: int) -> list[int]:
        """`count` blocks to receive content from another tier (evicting like `allocate`)."""
        taken = self._take(count)
        self._in_flight.update(taken)
        return taken

    def finish_move_in(self, block_id: int, key: bytes, token_ids: tuple[int, ...],
                       ok: bool, position: int = 0) -> bool:
        """On success the block is cached under `key`, findable; returns False (and frees the
        block) when the move failed or another block holds the key already."""
        block = self._take_in_flight(block_id)
        if not ok or key in self._index:
            self._free_block(block)
            return False
        block.key, block.token_ids, block.position = key, token_ids, position
        self._index[key] = block_id
        self._cache(block)
        return True

    def is_in_flight(self, block_id: int) -> bool:
        return block_id in self._in_flight

    def _take_in_flight(self, block_id: int) -> Block:
        if block_id not in self._in_flight:
            raise ValueError(f"block {block_id} is not in flight")
        self._in_flight.remove(block_id)
        return self.blocks[block_id]

    def usage(self) -> PoolUsage:
        """O(1): every block is free, cached, in flight or in use (check_integrity counts)."""
        free, cached, moving = len(self._free), self._num_cached, len(self._in_flight)
        in_use = len(self.blocks) - free - cached - moving
        return PoolUsage(len(self.blocks), free, cached, in_use, moving)

    def check_integrity(self) -> None:
        """free + cached + in use + in flight == total; the index and the LRUs agree with the
        blocks; each cached block sits in its own level's LRU, each free one at the default."""
        usage = self.usage()
        in_use = sum(1 for b in self.blocks if b.ref_count > 0)
        assert in_use == usage.in_use, f"{in_use} blocks are referenced, not {usage.in_use}"
        assert len(set(self._free)) == len(self._free), "a block is twice on the free list"
        for block_id in self._free:
            block = self.blocks[block_id]
            assert block.ref_count == 0 and block.key is None, f"free block {block} is not clean"
            assert block.retention == DEFAULT_RETENTION, f"free block {block} keeps a level"
        assert sum(map(len, self._cached)) == self._num_cached, "the cached count is stale"
        cached = set()
        for level, lru in enumerate(self._cached):
            for block_id in lru:
                block = self.blocks[block_id]
                assert block.ref_count == 0 and block.key is not None, f"cached {block} is wrong"
                assert block.retention == level, f"cached {block} is in level {level}'s LRU"
                cached.add(block_id)
        for block_id in self._in_flight:
            block = self.blocks[block_id]
            assert block.ref_count == 0, f"in-flight block {block} is referenced"
            assert block_id not in cached and block_id not in self._free, f"{block} twice"
        for key, block_id in self._index.items():
            assert self.blocks[block_id].key == key, f"index entry for {block_id} is stale"
            assert block_id not in self._in_flight, f"in-flight block {block_id} is findable"
        keyed = sum(1 for b in self.blocks if b.key is not None and b.block_id not in
                    self._in_flight)
        assert keyed == len(self._index), "a keyed block is missing from the index"

    def _cache(self, block: Block) -> None:
        self._cached[block.retention][block.block_id] = None
        self._num_cached += 1

    def _uncache(self, block: Block) -> None:
        del self._cached[block.retention][block.block_id]
        self._num_cached -= 1

    def _free_block(self, block: Block) -> None:
        block.retention = DEFAULT_RETENTION
        self._free.append(block.block_id)

    def _unkey(self, block: Block) -> None:
        assert block.key is not None
        if self._on_unkey is not None:
            self._on_unkey(block.key, block.token_ids)
        del self._index[block.key]
        block.key, block.token_ids = None, ()

    def _dropped(self, block_id: int) -> None:
        if self._on_drop is not None:
            self._on_drop(block_id)
