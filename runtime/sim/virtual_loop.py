"""An asyncio event loop on simulated time, so the real daemon and SDK can run a simulation.

`loop.time()` reads a SimClock. Whenever the loop would block waiting for its next timer and no
socket is ready, the clock jumps to that timer instead of waiting:
a 10-second tool call or a 40 ms GPU step costs no real time, and everything that happens
between two timers (HTTP requests over loopback, SSE chunks, control-plane events) happens at
one simulated instant, in real order. aiohttp's timeouts and `asyncio.sleep` follow the same
clock.

Data in flight on a socket must not be skipped over: loopback TCP delivers in the sender's
send(), so a socket with data is ready when the loop asks (the selector polls before it jumps).

Work the daemon hands to another thread (`run_in_executor`: getaddrinfo, building a call's
prompt) is done at once, on the loop: it takes no simulated time, and it ends in the order it
was asked for, as everything else on this loop does. In a thread it would end in real time's
order, and a simulation must repeat exactly.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any

from kvrt.runtime.sim.executor import SimClock


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    def __init__(self, clock: SimClock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None) -> list[Any]:
        events = super().select(0)
        if events or timeout == 0:
            return events
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
        future = self.create_future()
        try:
            future.set_result(func(*args))
        except Exception as error:
            future.set_exception(error)
        return future
