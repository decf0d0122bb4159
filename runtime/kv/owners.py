"""Which (run, agent) owns which device blocks: the ledger behind per-agent KV accounting.

An owner's KV is the blocks its requests hold now (in use) plus the keyed blocks its finished
requests left in the prefix cache (cached, ref_count 0). The ledger is two mirrored maps:

    owner  (run, agent)  ->  {block id, ...}     `_blocks`
    block id             ->  {owner, ...}        `_owners`

A block is "shared" for an owner when at least one other owner (another agent of the same run,
or any agent of another run) also holds it.

The ledger also remembers each owner's retention level (a policy's hint, runtime/kv/block_pool.py)
until its run is released, since a block's level follows from its owners':

    owner  (run, agent)  ->  level                   `_levels` (only levels != DEFAULT_RETENTION)
    block's level        =   max over its owners' levels (DEFAULT_RETENTION for an owner without
                             one, and for a block without owners)
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from kvrt.runtime.kv.block_pool import DEFAULT_RETENTION

Owner = tuple[str, str]  # (run, agent)


@dataclass(frozen=True, slots=True)
class AgentResidency:
    device_blocks: int  # blocks holding the agent's KV on the device pool, in use or cached
    shared_blocks: int  # of those, blocks at least one other owner also holds
    host_blocks: int = 0  # blocks holding its KV on the host tier
    decision: str | None = None  # the policy's last decision on it at a tool call
    segment_tokens: int = 0  # tokens of segments in its calls (kv/reuse/planner.py)
    segment_reused_tokens: int = 0  # of those, read in place from another copy (not stored)


class BlockOwners:
    """The ownership ledger. Contract:

    - The KV manager `claim`s every block that enters an owned block table and calls
      `drop_block` whenever a block's content becomes unreachable (freed or evicted), so the
      ledger only ever names blocks that are in use or cached, never free ones.
    - Ownership outlives the request: a finished request's keyed blocks stay owned while they
      are cached. Only `drop_block` and `release_run` end it.
    - `release_run` returns the blocks no owner holds any more; the caller decides which of
      them to free (only cached ones: an in-use block still has a reader).
    - Thread-safe: mutations come from the engine thread, `residency` from the event loop. One
      uncontended lock guards the maps.
    - Levels are bookkeeping only: the KV manager applies the block levels it reads here
      (`set_retention`, `retention_levels`) to the pool.
    """

    def __init__(self) -> None:
        self._blocks: dict[Owner, set[int]] = {}
        self._owners: dict[int, set[Owner]] = {}
        self._levels: dict[Owner, int] = {}
        self._lock = threading.Lock()

    @property
    def has_levels(self) -> bool:
        """Whether some owner has a level other than the default (else every block has it)."""
        return bool(self._levels)

    def set_retention(self, owner: Owner, level: int) -> dict[int, int]:
        """Remembers `owner`'s level; returns the level each block it holds has now (the max of
        its owners'), or nothing when the owner's level did not change."""
        with self._lock:
            if self._levels.get(owner, DEFAULT_RETENTION) == level:
                return {}
            if level == DEFAULT_RETENTION:
                del self._levels[owner]
            else:
                self._levels[owner] = level
            return {b: self._level_of(b) for b in self._blocks.get(owner, ())}

    def retention_of(self, owner: Owner) -> int:
        return self._levels.get(owner, DEFAULT_RETENTION)

    def retention_levels(self, block_ids: Iterable[int]) -> list[int]:
        """The level of each of these blocks, from its owners' levels."""
        with self._lock:
            return [self._level_of(b) for b in block_ids]

    def _level_of(self, block_id: int) -> int:
        levels = self._levels
        return max((levels.get(o, DEFAULT_RETENTION) for o in self._owners.get(block_id, ())),
                   default=DEFAULT_RETENTION)

    def claim(self, owner: Owner, block_ids: Iterable[int]) -> None:
        with self._lock:
            held = self._blocks.setdefault(owner, set())
            for block_id in block_ids:
                held.add(block_id)
                self._owners.setdefault(block_id, set()).add(owner)

    def owners_of(self, block_id: int) -> set[Owner]:
        with self._lock:
            return set(self._owners.get(block_id, ()))

    def drop_block(self, block_id: int) -> None:
        """The block's content is gone: no owner holds it any more."""
        with self._lock:
            for owner in self._owners.pop(block_id, ()):
                held = self._blocks[owner]
                held.discard(block_id)
                if not held:
                    del self._blocks[owner]

    def residency(self, run: str) -> dict[str, AgentResidency]:
        """Per agent of `run` (agents holding no block are absent)."""
        with self._lock:
            return {
                agent: AgentResidency(
                    device_blocks=len(held),
                    shared_blocks=sum(1 for b in held if len(self._owners[b]) > 1),
                )
                for (owner_run, agent), held in self._blocks.items()
                if owner_run == run
            }

    def held_counts(self) -> list[int]:
        """How many blocks each owner holds, over every run: residency's device_blocks, at the
        cost of one pass over the owners (a benchmark samples it many times a second)."""
        with self._lock:
            return [len(held) for held in self._blocks.values()]

    def blocks_of_run(self, run: str) -> set[int]:
        """The blocks the owners of `run` hold (a snapshot)."""
        with self._lock:
            return {b for (owner_run, _), held in self._blocks.items() if owner_run == run
                    for b in held}

    def release_run(self, run: str) -> list[int]:
        """Forgets every owner of `run`, and its level; returns (ascending) the blocks no owner
        holds now."""
        with self._lock:
            for owner in [o for o in self._levels if o[0] == run]:
                del self._levels[owner]
            orphans: set[int] = set()
            for owner in [o for o in self._blocks if o[0] == run]:
                for block_id in self._blocks.pop(owner):
                    owners = self._owners[block_id]
                    owners.discard(owner)
                    if not owners:
                        del self._owners[block_id]
                        orphans.add(block_id)
            return sorted(orphans)

    def blocks_of(self, owner: Owner) -> set[int]:
        """The blocks `owner` holds (a snapshot)."""
        with self._lock:
            return set(self._blocks.get(owner, ()))

    def block_ids(self) -> set[int]:
        """Every block some owner holds (a snapshot)."""
        with self._lock:
            return set(self._owners)

    def is_empty(self) -> bool:
        with self._lock:
            return not self._owners

    def check_integrity(self) -> None:
        """The two maps mirror each other and hold no empty sets."""
        with self._lock:
            pairs = {(o, b) for o, held in self._blocks.items() for b in held}
            mirrored = {(o, b) for b, owners in self._owners.items() for o in owners}
            assert pairs == mirrored, f"owner maps disagree: {pairs ^ mirrored}"
            assert all(self._blocks.values()), "an owner without blocks is still listed"
            assert all(self._owners.values()), "a block without owners is still listed"
            assert all(level != DEFAULT_RETENTION for level in self._levels.values()), \
                "a default level is stored"
