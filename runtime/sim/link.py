"""The simulated host link: a Mover (runtime/kv/tiers/mover.py) with no data and simulated
copy times.

A move takes `CostModel.transfer_time(bytes)` of simulated time on the event loop's clock; the moves
of one direction share its link, so each starts when the previous one ends (a GPU's copy engine in
one direction is one queue; PCIe carries both directions at once). The copies overlap the engine's
steps, as a side stream does, and cost them nothing. The engine completes a move once its future is
done, as with the real mover.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from concurrent.futures import Future

from kvrt.runtime.kv.tiers.moves import Direction, Move
from kvrt.runtime.sim.cost_model import CostModel


class SimLink:
    def __init__(self, cost_model: CostModel, block_bytes: int) -> None:
        self.cost_model, self.block_bytes = cost_model, block_bytes
        self.bytes_moved = 0
        self.seconds = 0.0
        self._busy_until = {d: 0.0 for d in Direction}
        self._in_flight: list[tuple[float, int, Future[None]]] = []  # a heap, by landing time
        self._order = itertools.count()  # ties land in the order they started

    def start(self, move: Move) -> Future[None]:
        loop = asyncio.get_running_loop()
        num_bytes = len(move) * self.block_bytes
        seconds = self.cost_model.transfer_time(num_bytes)
        lands = max(self._busy_until[move.direction], loop.time()) + seconds
        self._busy_until[move.direction] = lands
        future: Future[None] = Future()
        loop.call_at(lands, self._land)
        heapq.heappush(self._in_flight, (lands, next(self._order), future))
        self.bytes_moved += num_bytes
        self.seconds += seconds
        return future

    def next_landing(self) -> float | None:
        """The simulated time the next move in flight lands (None: none in flight)."""
        return self._in_flight[0][0] if self._in_flight else None

    def _land(self) -> None:
        if self._in_flight:  # (none left if closed meanwhile)
            heapq.heappop(self._in_flight)[2].set_result(None)

    def close(self) -> None:
        """Lands every move still in flight at once (the simulation is over)."""
        while self._in_flight:
            heapq.heappop(self._in_flight)[2].set_result(None)
