"""The host tier as the KV manager uses it: moves planned by KVTiers, copied by a Mover on its
worker thread (or a simulated link), completed here on the engine thread (the only thread that
touches the pools).

The KV manager finishes the moves that are done before each engine step and while idle. A
waiting request whose prefix is on the host asks for an upload and is admitted once it has
landed; until then the step goes on without it.

An owner's offload is remembered (the host blocks it sent, in prefix order) until the owner's
upload brings exactly those back, its next offload replaces it, or its run ends. When that
upload lands, the owner is listed until `take_landed_uploads` (the engine times landings).

A copy that fails, or cannot even start (the mover closed), is completed as failed: the two-phase
protocol's abort path leaves each block in a known tier (KVTiers.complete). A failed upload also
drops the host's copy of what it carried (the copy may be what failed), so the request waiting
for it computes its KV instead of asking for the same upload again at every step. A failed
move is a fault, never a quiet fallback: it is logged with its reason and counted by direction
(`failures`, the engine's stats and `kvrt:kv_move_failures_total`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Container
from concurrent.futures import Future, wait

from kvrt.runtime.kv.block_pool import BlockPool
from kvrt.runtime.kv.owners import BlockOwners, Owner
from kvrt.runtime.kv.tiers.mover import Mover
from kvrt.runtime.kv.tiers.moves import Direction, KVTiers, Move

log = logging.getLogger(__name__)


class HostTier:
    def __init__(self, device: BlockPool, device_owners: BlockOwners, num_blocks: int,
                 mover: Mover) -> None:
        self.tiers = KVTiers(device, num_blocks, device_owners)
        self.mover = mover
        self._pending: list[tuple[Move, Future[None]]] = []
        self._offloaded: dict[Owner, list[int]] = {}  # owner -> host blocks of its last offload
        self._backing_up: Counter[int] = Counter()  # device block -> backups copying it now
        self._uploading: dict[int, Owner] = {}  # id of an owner's upload move in flight -> owner
        self._prefetching: dict[int, tuple[Owner, int]] = {}  # id of a prefetch -> owner, blocks
        self._landed_uploads: list[Owner] = []  # owners whose upload landed, not yet taken
        self.failures: Counter[Direction] = Counter()  # moves whose copy failed, since start

    def offload(self, block_ids: list[int]) -> list[int]:
        """Moves these device blocks (the cached ones) to the host: those it holds already
        leave the device now, the others are copied first. Returns the host blocks that hold,
        or will hold, their content, in order (in flight until the copy lands)."""
        offload = self.tiers.prepare_offload(block_ids)
        move = offload.move
        if move is not None and self._start(move) is None:  # the copy could not start
            failed = set(move.target)
            return [b for b in offload.host_blocks if b not in failed]
        return offload.host_blocks

    def offload_owner(self, owner: Owner, block_ids: list[int]) -> int:
        """`offload` of the owner's blocks, remembered for `upload_owner`; returns how many
        blocks leave the device."""
        self._offloaded[owner] = self.offload(block_ids)
        return len(self._offloaded[owner])

    def upload_owner(self, owner: Owner) -> bool:
        """Brings back what the owner's last offload sent to the host; False if nothing went."""
        host_blocks = self._offloaded.pop(owner, [])
        move = self._start(self.tiers.prepare_upload(host_blocks)) if host_blocks else None
        if move is not None:
            self._uploading[id(move)] = owner  # the move stays pending (alive) until completed
        return move is not None

    def take_landed_uploads(self) -> list[Owner]:
        """The owners whose `upload_owner` move has landed (completed successfully) since the
        last call."""
        landed, self._landed_uploads = self._landed_uploads, []
        return landed

    @property
    def failed(self) -> int:
        """Moves whose copy failed (or could not start) since start, both directions."""
        return self.failures.total()

    def offloaded_blocks(self, owner: Owner) -> int:
        return len(self._offloaded.get(owner, ()))

    def is_arriving_at_host(self, owner: Owner) -> bool:
        """The owner's last offload has not landed on the host yet."""
        host = self.tiers.host
        return any(host.is_in_flight(b) for b in self._offloaded.get(owner, ()))

    def forget_run(self, run: str) -> None:
        for owner in [o for o in self._offloaded if o[0] == run]:
            del self._offloaded[owner]
        self._landed_uploads = [o for o in self._landed_uploads if o[0] != run]

    def backup(self, block_ids: list[int]) -> Move | None:
        """Starts copying these keyed device blocks (the ones the host lacks) to the host,
        leaving them on the device; returns the move on its way, if any."""
        move = self._start(self.tiers.prepare_backup(block_ids))
        if move is not None:
            self._backing_up.update(move.source)
        return move

    def backups_of(self, device_block: int) -> int:
        """How many backups are copying this device block now (each holds a reference)."""
        return self._backing_up[device_block]

    def upload(self, host_block_ids: list[int]) -> bool:
        """Starts bringing these host blocks to the device; False if none could go now."""
        return self._start(self.tiers.prepare_upload(host_block_ids)) is not None

    def prefetchable(self, owner: Owner, limit: int, keys: Container[bytes]) -> list[int]:
        """The owner's host blocks of content `keys` that an upload could bring to the device
        now (those whose content the device lacks, and that no move holds), at most `limit` of
        them: the earliest in their prompts first (Block.position), since a chain's first blocks
        are what its next call reads first, and a block past one that stayed behind is found by
        no prefix match."""
        tiers = self.tiers
        blocks = tiers.host.blocks
        held = sorted((b for b in tiers.host_owners.blocks_of(owner) if blocks[b].key in keys),
                      key=lambda b: (blocks[b].position, b))
        return tiers.missing_on_device(held)[: max(0, limit)]

    def prefetch(self, owner: Owner, limit: int, keys: Container[bytes]) -> int:
        """Starts uploading `prefetchable(owner, limit, keys)`; returns how many blocks go."""
        move = self._start(self.tiers.prepare_upload(self.prefetchable(owner, limit, keys)))
        if move is None:
            return 0
        self._prefetching[id(move)] = (owner, len(move))  # pending (alive) until completed
        return len(move)

    def arriving(self, owner: Owner) -> int:
        """Blocks a prefetch of the owner is bringing to the device now."""
        return sum(count for of, count in self._prefetching.values() if of == owner)

    def copy_seconds(self, num_blocks: int, prior_bandwidth: float) -> float:
        """Seconds to copy `num_blocks` at the bandwidth the copies so far achieved
        (`prior_bandwidth`, bytes per second, before the first)."""
        mover = self.mover
        bandwidth = mover.bytes_moved / mover.seconds if mover.seconds > 0 else prior_bandwidth
        return num_blocks * mover.block_bytes / bandwidth

    def in_flight(self) -> bool:
        return bool(self._pending)

    def on_landing(self, callback: Callable[[], None]) -> None:
        """Calls `callback` when any move in flight lands (from the thread that lands it)."""
        for _, future in self._pending:
            future.add_done_callback(lambda _: callback())

    def finish_done(self) -> int:
        """Completes every move whose copy has ended; returns how many blocks landed."""
        landed, still = 0, []
        for move, future in self._pending:
            if future.done():
                landed += self._complete(move, future)
                self._prefetching.pop(id(move), None)
                owner = self._uploading.pop(id(move), None)
                if owner is not None and future.exception() is None:
                    self._landed_uploads.append(owner)
                if move.keep_source:
                    self._backed_up(move.source)
            else:
                still.append((move, future))
        self._pending = still
        return landed

    def wait(self) -> int:
        """Waits for every copy in flight, then completes them all."""
        wait([future for _, future in self._pending])
        return self.finish_done()

    def close(self) -> None:
        """Stops the mover (which lets its copies in flight end) and completes them."""
        self.mover.close()
        self.finish_done()

    def _backed_up(self, device_blocks: list[int]) -> None:
        for block_id in device_blocks:
            self._backing_up[block_id] -= 1
            if not self._backing_up[block_id]:
                del self._backing_up[block_id]

    def _start(self, move: Move | None) -> Move | None:
        """Hands the move to the mover; None if there was none, or it could not start."""
        if move is None:
            return None
        try:
            future = self.mover.start(move)
        except Exception as error:  # e.g. the mover is shut down: the copy never runs
            self._fail(move, error)
            return None
        self._pending.append((move, future))
        return move

    def _complete(self, move: Move, future: Future[None]) -> int:
        error = future.exception()
        if error is not None:
            self._fail(move, error)
            return 0
        return self.tiers.complete(move, ok=True)

    def _fail(self, move: Move, error: BaseException) -> None:
        """Completes a move whose copy failed: the content stays where it was, the pools stay
        consistent. A failed upload's source (host) copies are dropped."""
        self.failures[move.direction] += 1
        log.error("KV %s of %d blocks failed: %s", move.direction.value, len(move), error)
        self.tiers.complete(move, ok=False)
        if move.direction is Direction.UPLOAD:
            host = self.tiers.host
            for block_id in move.source:
                if host.is_cached(block_id):
                    host.drop_cached(block_id)
