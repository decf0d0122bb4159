"""Pins: a policy keeps an owner's KV from eviction (e.g. while the agent waits on a tool).

A pin is one extra reference on each keyed block the owner holds, so none can be evicted,
until `unpin` gives exactly those references back. A pinned block is "in use" (ref_count > 0)
to the pool:

    block state            readers  pins  ref_count  evictable
    ---------------------  -------  ----  ---------  ---------
    cached                 0        0     0          yes (LRU)
    cached, pinned         0        p     p          no
    in use, maybe pinned   r        p     r + p      no
"""

from __future__ import annotations

from collections import Counter

from kvrt.runtime.kv.block_pool import BlockPool
from kvrt.runtime.kv.owners import BlockOwners, Owner


class Pins:
    def __init__(self, pool: BlockPool, owners: BlockOwners) -> None:
        self.pool, self.owners = pool, owners
        self._pins: dict[Owner, list[int]] = {}  # owner -> the blocks it pinned (ascending)
        self._counts: dict[int, int] = {}  # block -> how many owners pin it

    def pinnable(self, owner: Owner) -> list[int]:
        """The keyed blocks `owner` holds that are not on their way to the host, ascending."""
        pool = self.pool
        return [block_id for block_id in sorted(self.owners.blocks_of(owner))
                if pool.blocks[block_id].key is not None and not pool.is_in_flight(block_id)]

    def pin(self, owner: Owner) -> int:
        """Takes one extra reference on every keyed block `owner` holds now (in the ledger), so
        none of them can be evicted; returns how many blocks this call pinned. Pinning a pinned
        owner pins only the keyed blocks it came to hold since: each block is pinned at most
        once per owner. Unkeyed blocks are left alone: they are a live request's partial tail,
        which no later call can find, so pinning them would only hold memory."""
        have = set(self._pins.get(owner, ()))
        new = [block_id for block_id in self.pinnable(owner) if block_id not in have]
        for block_id in new:
            self.pool.acquire(block_id)  # a cached block leaves the LRU: it cannot be evicted
            self._counts[block_id] = self._counts.get(block_id, 0) + 1
        if new:
            self._pins.setdefault(owner, []).extend(new)
        return len(new)

    def unpin(self, owner: Owner) -> int:
        """Gives back exactly the references `pin` took for `owner` (none if it holds no pin);
        returns how many. The blocks keep their keys: one nobody else reads becomes cached
        again, most recently used, in ascending block order."""
        block_ids = self._pins.pop(owner, [])
        for block_id in block_ids:
            if self._counts[block_id] > 1:
                self._counts[block_id] -= 1
            else:
                del self._counts[block_id]
        self.pool.release(block_ids)
        return len(block_ids)

    def unpin_run(self, run: str) -> None:
        for owner in [o for o in self._pins if o[0] == run]:
            self.unpin(owner)

    def is_pinned(self, owner: Owner) -> bool:
        return owner in self._pins

    def __len__(self) -> int:
        """Distinct blocks at least one owner pins. Safe to call from any thread."""
        return len(self._counts)

    def check_integrity(self) -> None:
        """Pins name keyed blocks their owner holds, once per owner, each counted in its
        block's ref_count; the per-block counts mirror the per-owner lists."""
        counted = Counter(b for block_ids in self._pins.values() for b in block_ids)
        assert counted == Counter(self._counts), "pin counts disagree with the pins"
        for owner, block_ids in self._pins.items():
            assert block_ids and len(set(block_ids)) == len(block_ids), f"bad pin of {owner}"
            held = self.owners.blocks_of(owner)
            assert set(block_ids) <= held, f"{owner} pins blocks it does not hold"
        for block_id, count in self._counts.items():
            block = self.pool.blocks[block_id]
            assert block.key is not None and block.ref_count >= count, f"pinned {block} is wrong"
