"""What waits for the engine, and how fast it drains: counted on the event loop.

A request is queued from its submission until its first output (or its end, whichever comes
first): waiting for admission, or in its first prefill. The drain rate is the number of recent
first outputs over the time since the oldest of them, so it falls on its own while nothing
leaves the queue.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

_WINDOW = 32  # recent first outputs the drain rate is measured over


class QueueMeter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._queued: dict[str, int] = {}  # request id -> prompt tokens
        self.tokens = 0
        self._served: deque[float] = deque(maxlen=_WINDOW)  # clock times of first outputs

    @property
    def requests(self) -> int:
        return len(self._queued)

    def enter(self, request_id: str, prompt_tokens: int) -> None:
        self._queued[request_id] = prompt_tokens
        self.tokens += prompt_tokens

    def leave(self, request_id: str, served: bool) -> None:
        """The request left the queue: `served` (its first output came) or not (it failed, or
        its caller went away). Leaving twice is a no-op."""
        tokens = self._queued.pop(request_id, None)
        if tokens is None:
            return
        self.tokens -= tokens
        if served:
            self._served.append(self._clock())

    def drain_per_s(self) -> float | None:
        if not self._served:
            return None
        elapsed = self._clock() - self._served[0]
        return len(self._served) / elapsed if elapsed > 0 else None
