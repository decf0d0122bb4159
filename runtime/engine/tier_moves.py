"""The engine's KV moves between tiers: planned by KVTiers, copied by the BlockMover on its
worker thread, completed here on the engine thread (the only thread that touches the pools).

The engine finishes the moves that are done before each step and while idle. A waiting request
whose prefix is on the host asks for an upload (the scheduler's `request_upload`) and is
admitted once it has landed; until then the step goes on without it.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, wait

from kvrt.runtime.kv.mover import BlockMover
from kvrt.runtime.kv.tiers import KVTiers, Move

log = logging.getLogger(__name__)


class TierMoves:
    def __init__(self, tiers: KVTiers, mover: BlockMover) -> None:
        self.tiers, self.mover = tiers, mover
        self._pending: list[tuple[Move, Future[None]]] = []
        self.failed = 0

    def offload(self, block_ids: list[int]) -> list[int]:
        """Moves these device blocks (the cached ones) to the host: those it holds already
        leave the device now, the others are copied first. Returns the host blocks that hold,
        or will hold, their content, in order (in flight until the copy lands)."""
        offload = self.tiers.prepare_offload(block_ids)
        self._start(offload.move)
        return offload.host_blocks

    def backup(self, block_ids: list[int]) -> Move | None:
        """Starts copying these keyed device blocks (the ones the host lacks) to the host,
        leaving them on the device; returns the move on its way, if any."""
        return self._start(self.tiers.prepare_backup(block_ids))

    def upload(self, host_block_ids: list[int]) -> bool:
        """Starts bringing these host blocks to the device; False if none could go now."""
        return self._start(self.tiers.prepare_upload(host_block_ids)) is not None

    def bandwidth(self) -> float | None:
        """Bytes per second the copies so far achieved (None before the first)."""
        mover = self.mover
        return mover.bytes_moved / mover.seconds if mover.seconds > 0 else None

    def in_flight(self) -> bool:
        return bool(self._pending)

    def finish_done(self) -> int:
        """Completes every move whose copy has ended; returns how many blocks landed."""
        landed, still = 0, []
        for move, future in self._pending:
            if future.done():
                landed += self._complete(move, future)
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

    def _start(self, move: Move | None) -> Move | None:
        if move is not None:
            self._pending.append((move, self.mover.start(move)))
        return move

    def _complete(self, move: Move, future: Future[None]) -> int:
        error = future.exception()
        if error is not None:  # the content stays where it was; the pools stay consistent
            self.failed += 1
            log.error("KV %s of %d blocks failed: %s", move.direction.value, len(move), error)
        return self.tiers.complete(move, ok=error is None)
