"""Property-based tests of the block pool, the KV manager and the tiers (hypothesis).

Two state machines drive random sequences of operations and check the whole state after every
step, against a model the test keeps itself:

- `PoolMachine`: one BlockPool against a reference model of its table (free FIFO, LRU of
  cached blocks, retention levels, index, ref counts, blocks in flight). Every allocation must
  hand out exactly the block ids the model predicts (free list first, then the least recently
  released cached block of the lowest level), and `on_drop` / `on_unkey` must fire exactly
  when the model says content is gone.
- `TiersMachine`: a KVManager with a host tier. Tables of sequences come and go (prefix hits,
  growth, commits), owners pin and unpin and set retention levels, runs are released, and moves
  between the tiers are prepared and completed (offload, upload, prefetch, backup; success or
  failure) in any order. After each
  step: `check_integrity()` (with every device block at its owners' highest level), free +
  cached + in use + in flight = total in both pools, every
  device block's ref count equals the references the test holds (tables, pins, backups in
  flight), and the blocks in flight in each pool are exactly those of the unfinished moves.
  At the end every move lands and every table is freed: nothing is in use or in flight.

A third property checks the data: offloading blocks and uploading them again through the
BlockMover returns bit-identical KV. Example counts are CI-sized (the module runs in ~10 s).
"""

from __future__ import annotations

from collections import Counter, deque

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from kvrt.runtime.kv.block_pool import (
    DEFAULT_RETENTION,
    RETENTION_LEVELS,
    BlockPool,
    OutOfBlocks,
)
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import AdmissionPlan, HostSpec, KVManager
from kvrt.runtime.kv.owners import Owner
from kvrt.runtime.kv.tiers.mover import BlockMover
from kvrt.runtime.kv.tiers.moves import Direction, Move
from tests.kv.helpers import host_spec

MACHINE_SETTINGS = settings(max_examples=100, stateful_step_count=40, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])
PICK = st.integers(0, 10**6)  # an index into whatever list the rule picks from (modulo)


def _pick(items: list, index: int):
    return items[index % len(items)]


# -- the block pool against a reference model ------------------------------------------------


class PoolMachine(RuleBasedStateMachine):
    """Every BlockPool verb, checked block id by block id against a model of its table."""

    SIZE = 6
    KEYS = [(f"k{i}".encode(), (i,)) for i in range(5)]  # few keys: duplicates happen

    @initialize()
    def setup(self) -> None:
        self.drops: list[int] = []
        self.unkeys: list[bytes] = []
        self.pool = BlockPool(self.SIZE, on_drop=self.drops.append,
                              on_unkey=lambda key, tokens: self.unkeys.append(key))
        # The model.
        self.free: deque[int] = deque(range(self.SIZE))
        self.lru: list[int] = []  # cached, least recently released first (all levels)
        self.level = dict.fromkeys(range(self.SIZE), DEFAULT_RETENTION)
        self.index: dict[bytes, int] = {}
        self.key: dict[int, bytes | None] = dict.fromkeys(range(self.SIZE))
        self.refs = Counter[int]()
        self.moving_out: set[int] = set()
        self.moving_in: set[int] = set()
        self.expected_drops: list[int] = []
        self.expected_unkeys: list[bytes] = []

    def _take(self, count: int) -> list[int]:
        taken = []
        for _ in range(count):
            if self.free:
                taken.append(self.free.popleft())
                continue
            block = min(self.lru, key=self.level.__getitem__)  # the first of the lowest level
            self.lru.remove(block)
            self.level[block] = DEFAULT_RETENTION
            key = self.key[block]
            assert key is not None
            self.expected_unkeys.append(key)
            del self.index[key]
            self.key[block] = None
            self.expected_drops.append(block)
            taken.append(block)
        return taken

    def _free(self, block: int) -> None:
        self.free.append(block)
        self.level[block] = DEFAULT_RETENTION

    @rule(block=st.integers(0, SIZE - 1), level=st.integers(0, RETENTION_LEVELS - 1))
    def set_retention(self, block: int, level: int) -> None:
        """Any block, in any state: a free one keeps the default, a cached one whose level
        changes becomes the most recent of its new level."""
        self.pool.set_retention(block, level)
        if block in self.free or self.level[block] == level:
            return
        self.level[block] = level
        if block in self.lru:
            self.lru.remove(block)
            self.lru.append(block)

    @rule(level=st.sampled_from([-1, RETENTION_LEVELS]))
    def a_level_out_of_range_is_refused(self, level: int) -> None:
        with pytest.raises(ValueError, match="retention level"):
            self.pool.set_retention(0, level)

    @rule(count=st.integers(1, 4))
    def allocate(self, count: int) -> None:
        if count > len(self.free) + len(self.lru):
            with pytest.raises(OutOfBlocks):
                self.pool.allocate(count)
            return
        expected = self._take(count)
        assert self.pool.allocate(count) == expected
        for block in expected:
            self.refs[block] = 1

    @precondition(lambda self: any(self.refs[b] > 0 and self.key[b] is None for b in self.refs))
    @rule(which=PICK, key=st.sampled_from(KEYS))
    def register(self, which: int, key: tuple[bytes, tuple[int, ...]]) -> None:
        block = _pick(sorted(b for b in self.refs if self.refs[b] > 0 and self.key[b] is None),
                      which)
        taken = key[0] in self.index
        assert self.pool.register(block, *key) is not taken
        if not taken:
            self.key[block], self.index[key[0]] = key[0], block

    @rule(key=st.sampled_from(KEYS))
    def lookup_and_acquire(self, key: tuple[bytes, tuple[int, ...]]) -> None:
        found = self.pool.lookup(*key)
        assert found == self.index.get(key[0])
        assert self.pool.lookup(key[0], (99,)) is None  # tokens confirm a hit
        if found is not None:
            self.pool.acquire(found)
            if self.refs[found] == 0:
                self.lru.remove(found)
            self.refs[found] += 1

    @precondition(lambda self: any(n > 0 for n in self.refs.values()))
    @rule(which=PICK)
    def release(self, which: int) -> None:
        block = _pick(sorted(b for b, n in self.refs.items() if n > 0), which)
        self.pool.release([block])
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if self.key[block] is None:
                self._free(block)
                self.expected_drops.append(block)
            else:
                self.lru.append(block)

    @rule()
    def release_of_a_free_block_is_refused(self) -> None:
        if self.free:
            with pytest.raises(RuntimeError):
                self.pool.release([self.free[0]])

    @precondition(lambda self: self.lru)
    @rule(which=PICK, recent=st.booleans())
    def touch(self, which: int, recent: bool) -> None:
        block = _pick(self.lru, which)
        self.pool.set_recency(block, recent)
        self.lru.remove(block)
        if recent:
            self.lru.append(block)
        else:
            self.lru.insert(0, block)

    @precondition(lambda self: self.lru)
    @rule(which=PICK)
    def drop_cached(self, which: int) -> None:
        block = _pick(self.lru, which)
        self.pool.drop_cached(block)
        self.lru.remove(block)
        key = self.key[block]
        assert key is not None
        self.expected_unkeys.append(key)
        del self.index[key]
        self.key[block] = None
        self._free(block)
        self.expected_drops.append(block)

    @precondition(lambda self: self.lru)
    @rule(which=PICK)
    def begin_move_out(self, which: int) -> None:
        block = _pick(self.lru, which)
        self.pool.begin_move_out(block)
        self.lru.remove(block)
        del self.index[self.key[block]]  # type: ignore[arg-type]
        self.moving_out.add(block)

    @precondition(lambda self: self.moving_out)
    @rule(which=PICK, keep=st.booleans())
    def finish_move_out(self, which: int, keep: bool) -> None:
        block = _pick(sorted(self.moving_out), which)
        self.pool.finish_move_out(block, keep)
        self.moving_out.remove(block)
        key = self.key[block]
        assert key is not None
        if keep and key not in self.index:
            self.index[key] = block
            self.lru.append(block)
        else:
            self.key[block] = None
            self._free(block)
            self.expected_drops.append(block)

    @rule(count=st.integers(1, 3))
    def begin_move_in(self, count: int) -> None:
        if count > len(self.free) + len(self.lru):
            with pytest.raises(OutOfBlocks):
                self.pool.begin_move_in(count)
            return
        expected = self._take(count)
        assert self.pool.begin_move_in(count) == expected
        self.moving_in.update(expected)

    @precondition(lambda self: self.moving_in)
    @rule(which=PICK, key=st.sampled_from(KEYS), ok=st.booleans())
    def finish_move_in(self, which: int, key: tuple[bytes, tuple[int, ...]], ok: bool) -> None:
        block = _pick(sorted(self.moving_in), which)
        landed = ok and key[0] not in self.index
        assert self.pool.finish_move_in(block, *key, ok) is landed
        self.moving_in.remove(block)
        if landed:
            self.key[block], self.index[key[0]] = key[0], block
            self.lru.append(block)
        else:
            self._free(block)

    @invariant()
    def matches_the_model(self) -> None:
        if not hasattr(self, "pool"):
            return
        pool = self.pool
        pool.check_integrity()
        usage = pool.usage()
        in_use = sum(1 for n in self.refs.values() if n > 0)
        moving = len(self.moving_out) + len(self.moving_in)
        assert (usage.free, usage.cached, usage.in_use, usage.in_flight) == (
            len(self.free), len(self.lru), in_use, moving)
        assert usage.free + usage.cached + usage.in_use + usage.in_flight == usage.total
        assert list(pool._free) == list(self.free)
        # The exact eviction order: by level, then least recently released.
        assert [b for lru in pool._cached for b in lru] == sorted(
            self.lru, key=self.level.__getitem__)
        assert all(pool.blocks[b].retention == self.level[b] for b in range(self.SIZE))
        assert all(pool.num_evictable_below(level) == sum(
            1 for b in self.lru if self.level[b] < level) for level in range(RETENTION_LEVELS + 1))
        assert pool._index == self.index
        assert all(pool.blocks[b].ref_count == self.refs[b] for b in range(self.SIZE))
        assert self.drops == self.expected_drops
        assert self.unkeys == self.expected_unkeys


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = MACHINE_SETTINGS


# -- the KV manager and its tiers ------------------------------------------------------------

BLOCK = 4
DEVICE_BLOCKS, HOST_BLOCKS = 10, 6
CHUNKS = [(1, 2, 3, 4), (5, 6, 7, 8), (9, 9, 9, 9)]  # shared full blocks: prefixes recur
OWNERS: list[Owner | None] = [("r1", "a"), ("r1", "b"), ("r2", "a"), None]
prompts = st.builds(
    lambda chunks, tail: [t for c in chunks for t in c] + tail,
    st.lists(st.sampled_from(CHUNKS), max_size=3),
    st.lists(st.integers(0, 3), min_size=1, max_size=6),
)


class Live:
    """A sequence the test holds: its table, tokens, salt and computed positions."""

    def __init__(self, table: BlockTable, tokens: list[int], salt: bytes, computed: int) -> None:
        self.table, self.tokens, self.salt, self.computed = table, tokens, salt, computed


class TiersMachine(RuleBasedStateMachine):
    @initialize(finished=st.lists(st.tuples(prompts, st.sampled_from(OWNERS)), max_size=4),
                offload=st.booleans())
    def setup(self, finished: list[tuple[list[int], Owner | None]], offload: bool) -> None:
        """Starts from finished requests' KV, cached on the device, or on the host too."""
        self.kv = KVManager(DEVICE_BLOCKS, BLOCK, host=host_spec(DEVICE_BLOCKS, HOST_BLOCKS))
        assert self.kv.host is not None
        self.tiers = self.kv.host.tiers  # moves are planned and completed here, by hand
        self.live: list[Live] = []
        self.moves: list[Move] = []
        self.pins: dict[Owner, set[int]] = {}
        for tokens, owner in finished:
            self.finished_request(tokens, b"", owner)
        if offload:
            cached = [b for b in range(DEVICE_BLOCKS) if self.kv.pool.is_cached(b)]
            move = self.tiers.prepare_offload(cached[: len(cached) // 2]).move
            if move is not None:
                self.tiers.complete(move, ok=True)

    # sequences

    @rule(tokens=prompts, salt=st.sampled_from([b"", b"tenant-2"]),
          owner=st.sampled_from(OWNERS), computed=st.floats(0, 1))
    def start(self, tokens: list[int], salt: bytes, owner: Owner | None,
              computed: float) -> None:
        kv = self.kv
        match = kv.match_prefix(tokens, salt)
        assert match.num_blocks <= (len(tokens) - 1) // BLOCK
        plan = AdmissionPlan(match, match.num_blocks * BLOCK)  # the device's prefix only
        if not kv.can_allocate(plan, len(tokens)):
            taken = sum(1 for b in match.block_ids if kv.pool.is_cached(b))
            assert kv.blocks_for(len(tokens)) - match.num_blocks > (
                kv.pool.num_allocatable() - taken)
            return
        table = BlockTable(BLOCK, owner=owner)
        event("prefix hit" if match.num_blocks else "prefix miss")
        kv.allocate(table, plan, len(tokens))
        hit = match.num_blocks * BLOCK
        done = hit + round(computed * (len(tokens) - hit))
        kv.key_full_blocks(table, tokens, done, salt)
        self.live.append(Live(table, tokens, salt, done))

    @rule(tokens=prompts, salt=st.sampled_from([b"", b"tenant-2"]),
          owner=st.sampled_from(OWNERS))
    def finished_request(self, tokens: list[int], salt: bytes, owner: Owner | None) -> None:
        """A whole request: admitted, computed and freed (its full blocks stay cached)."""
        before = len(self.live)
        self.start(tokens, salt, owner, 1.0)
        if len(self.live) > before:
            self.kv.free(self.live.pop().table)

    @precondition(lambda self: self.live)
    @rule(which=PICK, more=st.lists(st.integers(0, 3), min_size=1, max_size=6),
          computed=st.floats(0, 1))
    def grow(self, which: int, more: list[int], computed: float) -> None:
        seq = _pick(self.live, which)
        tokens = seq.tokens + more
        if not self.kv.can_grow(seq.table, len(tokens)):
            with pytest.raises(OutOfBlocks):
                self.kv.grow(seq.table, len(tokens))
            return
        self.kv.grow(seq.table, len(tokens))
        seq.tokens = tokens
        seq.computed += round(computed * (len(tokens) - seq.computed))
        self.kv.key_full_blocks(seq.table, tokens, seq.computed, seq.salt)

    @precondition(lambda self: self.live)
    @rule(which=PICK)
    def free(self, which: int) -> None:
        seq = self.live.pop(which % len(self.live))
        self.kv.free(seq.table)

    @rule(which=PICK, recent=st.booleans())
    def touch(self, which: int, recent: bool) -> None:
        cached = [b for b in range(DEVICE_BLOCKS) if self.kv.pool.is_cached(b)]
        if cached:
            self.kv.pool.set_recency(_pick(cached, which), recent)

    # owners

    @rule(owner=st.sampled_from(OWNERS[:3]))
    def pin(self, owner: Owner) -> None:
        pool = self.kv.pool
        have = self.pins.get(owner, set())
        new = {b for b in self.kv.owners.blocks_of(owner)
               if pool.blocks[b].key is not None and not pool.is_in_flight(b)} - have
        assert self.kv.pin(owner) == len(new)
        if new:
            self.pins[owner] = have | new

    @rule(owner=st.sampled_from(OWNERS[:3]))
    def unpin(self, owner: Owner) -> None:
        assert self.kv.unpin(owner) == len(self.pins.pop(owner, ()))

    @rule(run=st.sampled_from(["r1", "r2"]), free_first=st.booleans())
    def release_run(self, run: str, free_first: bool) -> None:
        """As the engine does (its requests aborted first), or with them still live."""
        if free_first:
            for seq in [s for s in self.live if s.table.owner and s.table.owner[0] == run]:
                self.live.remove(seq)
                self.kv.free(seq.table)
        self.kv.release_run(run)
        for owner in [o for o in self.pins if o[0] == run]:
            del self.pins[owner]
        assert not any(self.kv.is_pinned((run, agent)) for agent in ("a", "b"))
        assert all(self.kv.retention_of((run, agent)) == DEFAULT_RETENTION for agent in "ab")
        assert self.tiers.host_owners.residency(run) == {}

    @rule(owner=st.sampled_from(OWNERS[:3]), level=st.integers(0, RETENTION_LEVELS - 1))
    def retain(self, owner: Owner, level: int) -> None:
        self.kv.set_retention(owner, level)
        assert self.kv.retention_of(owner) == level

    # moves between tiers

    @rule(which=PICK)
    def prefetch(self, which: int) -> None:
        """Only into free blocks and cached ones of levels below the owner's (mostly an owner
        with KV to bring up)."""
        kv, pool = self.kv, self.kv.pool
        assert kv.host is not None
        owners = [o for o in OWNERS[:3]  # type: ignore[arg-type]
                  if kv.host.prefetchable(o, DEVICE_BLOCKS, kv.last_keys(o))]
        owner: Owner = _pick(owners or OWNERS[:3], which)
        level = kv.retention_of(owner)
        cached = [b for b in range(DEVICE_BLOCKS) if pool.is_cached(b)]
        kept = [b for b in cached if pool.blocks[b].retention >= level]
        room = pool.usage().free + len(cached) - len(kept)
        blocks = kv.host.prefetchable(owner, room, kv.last_keys(owner))
        assert len(blocks) == kv.prefetchable_blocks(owner) <= room
        assert set(blocks) <= self.tiers.host_owners.blocks_of(owner)
        assert {self.tiers.host.blocks[b].key for b in blocks} <= kv.last_keys(owner)
        event("prefetch moved blocks" if blocks else "prefetch had nothing to move")
        move = self.tiers.prepare_upload(blocks)
        assert (move.source if move is not None else []) == blocks
        if move is not None:
            self.moves.append(move)
        assert all(pool.is_cached(b) for b in kept)

    def _choose(self, picks: list[int], candidates: list[int], others: list[int]) -> list[int]:
        """Mostly blocks a move can take (`candidates`), plus any others (which it skips)."""
        chosen = [_pick(candidates, i) for i in picks] if candidates else []
        return list(dict.fromkeys(chosen + others))

    @rule(picks=st.lists(PICK, max_size=5),
          others=st.lists(st.integers(0, DEVICE_BLOCKS - 1), max_size=2))
    def offload(self, picks: list[int], others: list[int]) -> None:
        pool = self.kv.pool
        blocks = self._choose(picks, [b for b in range(DEVICE_BLOCKS) if pool.is_cached(b)],
                              others)
        cached = [b for b in blocks if pool.is_cached(b)]
        offload = self.tiers.prepare_offload(blocks)
        assert len(offload.host_blocks) <= len(cached)
        for block in cached:  # copied, or gone now (the host held it); or the host was full
            assert pool.is_in_flight(block) or not pool.is_cached(block) or (
                len(offload.host_blocks) < len(cached))
        if offload.move is not None:
            assert offload.move.direction is Direction.OFFLOAD
            assert set(offload.move.source) <= set(cached)
            self.moves.append(offload.move)

    @rule(picks=st.lists(PICK, max_size=5),
          others=st.lists(st.integers(0, DEVICE_BLOCKS - 1), max_size=2))
    def backup(self, picks: list[int], others: list[int]) -> None:
        pool = self.kv.pool
        keyed = [b for b in range(DEVICE_BLOCKS) if pool.blocks[b].key is not None]
        blocks = self._choose(picks, keyed, others)
        move = self.tiers.prepare_backup(blocks)
        if move is not None:
            assert move.keep_source and set(move.source) <= set(blocks)
            self.moves.append(move)

    @rule(picks=st.lists(PICK, max_size=5),
          others=st.lists(st.integers(0, HOST_BLOCKS - 1), max_size=2))
    def upload(self, picks: list[int], others: list[int]) -> None:
        host = self.tiers.host
        blocks = self._choose(picks, [b for b in range(HOST_BLOCKS) if host.is_cached(b)],
                              others)
        move = self.tiers.prepare_upload(blocks)
        if move is not None:
            assert move.direction is Direction.UPLOAD
            assert all(self.tiers.is_arriving(key) for key in move.keys)
            self.moves.append(move)

    @precondition(lambda self: self.moves)
    @rule(which=PICK, ok=st.booleans())
    def complete(self, which: int, ok: bool) -> None:
        move = self.moves.pop(which % len(self.moves))
        landed = self.tiers.complete(move, ok)
        kind = "backup" if move.keep_source else move.direction.value
        event(f"{kind} {'landed' if landed else 'failed' if not ok else 'lost its keys'}")
        assert 0 <= landed <= (len(move) if ok else 0)

    # checks

    @invariant()
    def accounting_holds(self) -> None:
        if not hasattr(self, "kv"):
            return
        kv, host = self.kv, self.tiers.host
        kv.check_integrity()
        for pool in (kv.pool, host):
            usage = pool.usage()
            assert usage.free + usage.cached + usage.in_use + usage.in_flight == usage.total
            assert usage.in_use == sum(1 for b in pool.blocks if b.ref_count > 0)
        # Every device reference is one the test holds: a table's, a pin, a backup in flight.
        refs = Counter(b for seq in self.live for b in seq.table.block_ids())
        refs.update(b for blocks in self.pins.values() for b in blocks)
        refs.update(b for m in self.moves if m.keep_source for b in m.source)
        assert {b.block_id: b.ref_count for b in kv.pool.blocks if b.ref_count} == dict(refs)
        assert not any(b.ref_count for b in host.blocks), "nothing reads the host tier"
        # In flight: exactly the blocks of the unfinished moves, on each side.
        device_moving = {b for m in self.moves if m.direction is Direction.OFFLOAD
                         and not m.keep_source for b in m.source}
        device_moving |= {b for m in self.moves if m.direction is Direction.UPLOAD
                          for b in m.target}
        host_moving = {b for m in self.moves for b in
                       (m.target if m.direction is Direction.OFFLOAD else m.source)}
        assert {b for b in range(DEVICE_BLOCKS) if kv.pool.is_in_flight(b)} == device_moving
        assert {b for b in range(HOST_BLOCKS) if host.is_in_flight(b)} == host_moving
        assert kv.pool.usage().in_flight == sum(
            len(m) for m in self.moves if not m.keep_source or m.direction is Direction.UPLOAD)

    def teardown(self) -> None:
        if not hasattr(self, "kv"):
            return
        for move in self.moves:
            self.tiers.complete(move, ok=True)
        for seq in self.live:
            self.kv.free(seq.table)
        for owner in list(self.pins):
            self.kv.unpin(owner)
        self.kv.check_integrity()
        for pool in (self.kv.pool, self.tiers.host):
            usage = pool.usage()
            assert (usage.in_use, usage.in_flight) == (0, 0), usage
            assert usage.free + usage.cached == usage.total


TestTiersMachine = TiersMachine.TestCase
TestTiersMachine.settings = MACHINE_SETTINGS


# -- the data of a round trip ----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4), seed=st.integers(0, 2**16),
       upload_fails=st.booleans())
def test_offload_then_upload_returns_bit_identical_kv(lengths: list[int], seed: int,
                                                      upload_fails: bool) -> None:
    """Prompts are computed (random KV written into their blocks), cached, offloaded through
    the mover, evicted from the device by other work, and uploaded again: every block that
    lands holds exactly the bytes written at first; a failed upload leaves the host copy."""
    generator = torch.Generator().manual_seed(seed)
    device_kv = torch.zeros(12, 2, 2, BLOCK, 1, 3)
    mover = BlockMover(device_kv, torch.zeros(12, 2, 2, BLOCK, 1, 3))
    kv = KVManager(12, BLOCK, host=HostSpec(12, mover))
    assert kv.host is not None
    tiers = kv.host.tiers  # copied inline below (mover.copy), completed by hand
    written: dict[bytes, torch.Tensor] = {}
    for i, length in enumerate(lengths):
        tokens = [i + 1] * (length * BLOCK // 3 + 1)
        table = BlockTable(BLOCK)
        match = kv.match_prefix(tokens, b"")
        if not kv.can_allocate(AdmissionPlan(match, match.num_blocks * BLOCK), len(tokens)):
            continue
        kv.grow(table, len(tokens))
        for block in kv.key_full_blocks(table, tokens, len(tokens), b""):
            device_kv[block] = torch.randn(device_kv.shape[1:], generator=generator)
            written[kv.pool.blocks[block].key] = device_kv[block].clone()  # type: ignore[index]
        kv.free(table)
    cached = [b for b in range(12) if kv.pool.is_cached(b)]
    offload = tiers.prepare_offload(cached)
    if offload.move is not None:
        mover.copy(offload.move)
        tiers.complete(offload.move, ok=True)
    filler = kv.pool.allocate(kv.pool.num_allocatable())  # the device forgets everything
    device_kv[filler] = float("nan")
    kv.pool.release(filler)
    upload = tiers.prepare_upload(offload.host_blocks)
    assert (upload is None) == (not offload.host_blocks)
    if upload is not None:
        if not upload_fails:
            mover.copy(upload)
        assert tiers.complete(upload, ok=not upload_fails) == (0 if upload_fails
                                                                  else len(upload))
        landed = [b for b in upload.target if kv.pool.is_cached(b)]
        assert len(landed) == (0 if upload_fails else len(upload))
        for block in landed:
            assert torch.equal(device_kv[block], written[kv.pool.blocks[block].key])  # type: ignore[index]
    for host_block in offload.host_blocks:  # the host keeps its copy (inclusive)
        key = tiers.host.blocks[host_block].key
        assert key is not None and torch.equal(mover.host_kv[host_block], written[key])
    mover.close()
    kv.check_integrity()
    assert kv.usage().in_use == 0 and kv.usage().in_flight == 0
