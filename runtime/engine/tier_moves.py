"""The engine's KV moves between tiers: planned by KVTiers, copied by the BlockMover on its
worker thread, completed here on the engine thread (the only thread that touches the pools).

The engine finishes the moves that are done before each step and while idle. A waiting request
whose prefix is on the host asks for an upload (the scheduler's `request_upload`) and is
admitted once it has landed; until then the step goes on without it.

A copy that fails, or cannot even start (the mover closed), is completed as failed: the two-phase
protocol's abort path leaves each block in a known tier (KVTiers.complete). A failed upload also
drops the host's copy of what it carried (the copy may be what failed), so the request waiting
for it computes its KV instead of asking for the same upload again at every step.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, wait

from kvrt.runtime.kv.mover import BlockMover
from kvrt.runtime.kv.tiers import Direction, KVTiers, Move

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
        move = offload.move
        if move is not None and self._start(move) is None:  # the copy could not start
            failed = set(move.target)
            return [b for b in offload.host_blocks if b not in failed]
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
        self.failed += 1
        log.error("KV %s of %d blocks failed: %s", move.direction.value, len(move), error)
        self.tiers.complete(move, ok=False)
        if move.direction is Direction.UPLOAD:
            host = self.tiers.host
            for block_id in move.source:
                if host.is_cached(block_id):
                    host.drop_cached(block_id)
