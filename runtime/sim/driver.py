"""The driver of a simulated engine: AsyncEngine's worker, stepped by a task on the loop.

The engine thread (ThreadDriver) exists because a real step takes real time. A simulated step
takes none: it is priced by the cost model and its time is slept on the VirtualTimeLoop. So a
task on the loop does what the engine thread does:

    apply the commands sent so far -> step (the scheduler decides at simulated time t)
    -> sleep the step's predicted seconds (requests and events arriving meanwhile are handled
       at their own simulated time, and wait for the next step, as on a real engine)
    -> deliver the step's tokens at t + step time

and, while there is no work, ticks the policy every IDLE_WAIT_S of simulated time or as soon
as a command arrives. Everything else (validation, streams, run release, shutdown) is the
worker's and AsyncEngine's.
"""

from __future__ import annotations

import asyncio
import contextlib

from kvrt.runtime.engine.worker import IDLE_WAIT_S, EngineWorker
from kvrt.runtime.sim.executor import SimExecutor
from kvrt.runtime.sim.link import SimLink

_STALL_RETRY_S = 1e-4  # an engine iteration that schedules nothing (a stall): ~100 us of Python


class SimDriver:
    def __init__(self, executor: SimExecutor, link: SimLink | None) -> None:
        """`executor`: the engine's, built without a clock (its steps' time is slept here);
        `link`: the engine's host link, whose next landing ends an idle wait."""
        if executor.clock is not None:
            raise ValueError("SimDriver steps an engine whose SimExecutor has no clock "
                             "(build_sim_engine(..., advance_clock=False))")
        self._executor, self._link = executor, link
        self._task: asyncio.Task[None] | None = None
        self._worker: EngineWorker | None = None
        self._wake = asyncio.Event()

    def start(self, worker: EngineWorker) -> None:
        self._worker = worker
        self._task = asyncio.create_task(self._drive(worker), name="kvrt-sim-engine")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.stopping.set()
        self._wake.set()
        if self._task is not None:
            await self._task

    def is_alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        self._wake.set()

    async def wait_idle(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._until_idle(), timeout)

    async def _until_idle(self) -> None:
        worker = self._worker
        while (self.is_alive() and worker is not None
               and (worker.engine.has_work() or worker.has_commands())):
            await asyncio.sleep(IDLE_WAIT_S)

    async def _drive(self, worker: EngineWorker) -> None:
        engine = worker.engine
        try:
            while not worker.stopping.is_set():
                worker.handle_commands(block=False)
                forwards = self._executor.totals.steps
                busy = engine.has_work()
                emitted = worker.step() if busy else []
                if self._executor.totals.steps > forwards:  # a forward ran: its time passes
                    await asyncio.sleep(self._executor.last_step_seconds)
                    worker.side.deliver(emitted)
                    continue
                if not busy:
                    worker.tick()
                # Nothing ran: idle, or waiting calls wait for their KV to land, or pins stall
                # the pool (a policy lets one go per stalled step). Until a command comes, a
                # move lands, or the policy's next tick; a stall is retried after a short while.
                stalled = busy and not engine.waits_on_moves()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._idle_wait(stalled))
        finally:
            worker.shut_down()

    def _idle_wait(self, stalled: bool) -> float:
        wait = _STALL_RETRY_S if stalled else IDLE_WAIT_S
        landing = self._link.next_landing() if self._link is not None else None
        if landing is not None:
            wait = min(wait, max(0.0, landing - asyncio.get_running_loop().time()))
        return wait
