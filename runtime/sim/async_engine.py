"""The daemon's engine for a simulation: AsyncEngine's commands and streams, stepped on the loop.

AsyncEngine runs the engine on a thread because a real step takes real time. A simulated step
takes none: it is priced by the cost model and its time is slept on the VirtualTimeLoop. So a
task on the loop does what the engine thread does:

    apply the commands sent so far -> step (the scheduler decides at simulated time t)
    -> sleep the step's predicted seconds (requests and events arriving meanwhile are handled
       at their own simulated time, and wait for the next step, as on a real engine)
    -> deliver the step's tokens at t + step time

and, while there is no work, ticks the policy every `_IDLE_WAIT_S` of simulated time or as soon
as a command arrives. Everything else (validation, streams, run release, shutdown) is
AsyncEngine's.
"""

from __future__ import annotations

import asyncio
import contextlib

from kvrt.runtime.engine.async_engine import _IDLE_WAIT_S, AsyncEngine
from kvrt.runtime.engine.engine import Engine
from kvrt.runtime.sim.executor import SimExecutor

_STALL_RETRY_S = 1e-4  # an engine iteration that schedules nothing (a stall): ~100 us of Python


class SimAsyncEngine(AsyncEngine):
    def __init__(self, engine: Engine, model_name: str) -> None:
        super().__init__(engine, model_name)
        if not isinstance(engine.executor, SimExecutor) or engine.executor.clock is not None:
            raise ValueError("SimAsyncEngine drives an engine whose SimExecutor has no clock "
                             "(build_sim_engine(..., advance_clock=False))")
        self._executor: SimExecutor = engine.executor
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._drive(), name="kvrt-sim-engine")

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            await self._task

    def is_alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait_idle(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._until_idle(), timeout)

    async def _until_idle(self) -> None:
        while self.is_alive() and (self.engine.has_work() or not self._inbox.empty()):
            await asyncio.sleep(_IDLE_WAIT_S)

    def _send(self, kind, payload) -> bool:
        sent = super()._send(kind, payload)
        if sent:
            self._wake.set()
        return sent

    async def _drive(self) -> None:
        try:
            while not self._stopping.is_set():
                self._handle_commands(block=False)
                forwards = self._executor.totals.steps
                busy = self.engine.has_work()
                emitted = self._step() if busy else []
                if self._executor.totals.steps > forwards:  # a forward ran: its time passes
                    await asyncio.sleep(self._executor.last_step_seconds)
                    self._deliver(emitted)
                    continue
                if not busy:
                    self._tick()
                # Nothing ran: idle, waiting calls wait for their KV to land, or pins stall the
                # pool (a policy lets one go per stalled step). Until a command comes, a move
                # lands, or the policy's next tick; a stall is retried after a short while.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._idle_wait(busy))
        finally:
            self._shut_down()

    def _idle_wait(self, busy: bool) -> float:
        wait = _STALL_RETRY_S if busy else _IDLE_WAIT_S
        moves = self.engine.moves
        landing = moves.mover.next_landing() if moves is not None else None  # type: ignore[attr-defined]
        if landing is not None:
            wait = min(wait, max(0.0, landing - asyncio.get_running_loop().time()))
        return wait
