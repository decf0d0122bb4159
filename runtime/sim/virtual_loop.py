"""An asyncio event loop on simulated time, so the real daemon and SDK can run a simulation.

`loop.time()` reads a SimClock. Whenever the loop would block waiting for its next timer and no
socket is ready and no worker thread is busy, the clock jumps to that timer instead of waiting:
a 10-second tool call or a 40 ms GPU step costs no real time, and everything that happens
between two timers (HTTP requests over loopback, SSE chunks, control-plane events) happens at
one simulated instant, in real order. aiohttp's timeouts and `asyncio.sleep` follow the same
clock.

Two things must not be skipped over:
- data in flight on a socket: loopback TCP delivers in the sender's send(), so a socket with
  data is ready when the loop asks (the selector polls before it jumps);
- work in another thread (`run_in_executor`: getaddrinfo, tokenization off the loop). While
  any is in flight the loop waits for it in real time, and the clock stands still.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any

from kvrt.runtime.sim.executor import SimClock

_THREAD_POLL_S = 0.1  # real seconds between checks while a worker thread runs


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    def __init__(self, clock: SimClock) -> None:
        super().__init__()
        self.clock = clock
        self.threads_busy = 0

    def select(self, timeout: float | None = None) -> list[Any]:
        events = super().select(0)
        if events or timeout == 0:
            return events
        if self.threads_busy:  # the thread's result arrives through the loop's self-pipe
            return super().select(_THREAD_POLL_S)
        if timeout is None:  # no timer at all: only I/O can wake the loop, as on a real one
            return super().select(None)
        self.clock.advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: SimClock | None = None) -> None:
        self.clock = clock or SimClock()
        self._jumping = _JumpingSelector(self.clock)
        super().__init__(self._jumping)

    def time(self) -> float:
        return self.clock.now()

    def run_in_executor(self, executor, func, *args):  # type: ignore[override]
        future = super().run_in_executor(executor, func, *args)
        self._jumping.threads_busy += 1
        future.add_done_callback(self._thread_done)
        return future

    def _thread_done(self, _future: asyncio.Future) -> None:
        self._jumping.threads_busy -= 1
