"""Whether the daemon takes new work now: its lifecycle, the queue bounds, the time limit.

    state     set by                                    new work gets
    --------  ----------------------------------------  ------------------------------------
    starting  create_app                                503 "starting", Retry-After: 1
    ready     the engine started (app cleanup_ctx)      served, or 429 past the queue bounds
    draining  shutdown began (`app.drain`)              503 "draining", Retry-After

Monitoring routes (`/health`, `/metrics`, `/v1/models`, `/openapi.json`) answer in every state;
`/health` says which state it is in. The queue is the engine's (`EngineClient.load`): requests
submitted that have produced no output yet. Past `max_queued_requests` of them, or past
`max_queued_tokens` of their prompt tokens, a new request gets 429 with a Retry-After estimated
from the recent drain rate (1 s when there is none). An empty queue takes any request the engine
can ever run, however long its prompt: a bound on waiting must not make a request unservable.
"""

from __future__ import annotations

import math
import time
from typing import Literal

from aiohttp import web

from kvrt.runtime.config import ServerLimits
from kvrt.runtime.engine.protocol import EngineClient, EngineLoad, GenerateRequest
from kvrt.runtime.server.errors import APIError
from kvrt.runtime.server.model_calls import PreparedCall

State = Literal["starting", "ready", "draining"]

_ALWAYS_OPEN = frozenset({"/health", "/metrics", "/v1/models", "/openapi.json"})
_MAX_RETRY_AFTER_S = 60  # an estimate from a momentary stall must not park clients for long


class Admission:
    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.state: State = "starting"

    def open(self) -> None:
        if self.state == "starting":
            self.state = "ready"

    def begin_drain(self) -> None:
        self.state = "draining"

    def unavailable(self) -> APIError | None:
        """The 503 that new work gets now; None when ready."""
        if self.state == "starting":
            return APIError(503, "the server is starting; retry shortly", code="starting",
                            retry_after_s=1)
        if self.state == "draining":
            return APIError(503, "the server is shutting down and takes no new work",
                            code="draining",
                            retry_after_s=max(1, math.ceil(self.limits.shutdown_timeout_s)))
        return None

    def admit(self, engine: EngineClient, calls: list[PreparedCall], arrival: float
              ) -> list[GenerateRequest]:
        """Calls that arrived together (one call, or a round's), admitted or refused whole:
        400 for one that can never run (whatever the load), 429 past the queue bounds; returns
        their requests, each with what is left of the time limit."""
        timeout = self.timeout_s(arrival)
        requests = [call.request(timeout) for call in calls]
        for request in requests:
            engine.validate(request)
        self.check_queue(engine.load(), sum(len(r.prompt_token_ids) for r in requests))
        return requests

    def check_queue(self, load: EngineLoad, prompt_tokens: int) -> None:
        """Raises a 429 if a request of `prompt_tokens` would overfill the engine's queue."""
        limits = self.limits
        if load.queued_requests == 0:
            return
        if (load.queued_requests < limits.max_queued_requests
                and load.queued_tokens + prompt_tokens <= limits.max_queued_tokens):
            return
        wait = self._retry_after_s(load, prompt_tokens)
        raise APIError(
            429,
            f"the server is busy: {load.queued_requests} requests ({load.queued_tokens} prompt "
            f"tokens) wait for the engine, at most {limits.max_queued_requests} "
            f"({limits.max_queued_tokens} tokens) may; retry after {wait} s",
            code="queue_full", retry_after_s=wait,
        )

    def _retry_after_s(self, load: EngineLoad, prompt_tokens: int) -> int:
        """Seconds until enough of the queue has drained for this request, at the recent rate."""
        rate = load.drain_per_s
        if not rate:
            return 1
        limits = self.limits
        over_requests = load.queued_requests + 1 - limits.max_queued_requests
        over_tokens = load.queued_tokens + prompt_tokens - limits.max_queued_tokens
        tokens_per_request = max(1.0, load.queued_tokens / load.queued_requests)
        to_drain = max(over_requests, math.ceil(over_tokens / tokens_per_request), 1)
        return min(_MAX_RETRY_AFTER_S, max(1, math.ceil(to_drain / rate)))

    def timeout_s(self, arrival: float) -> float | None:
        """What is left of the request's time limit (`arrival`: its time.perf_counter() when
        it came in); None without a limit."""
        limit = self.limits.request_timeout_s
        if not limit:
            return None
        return max(limit - (time.perf_counter() - arrival), 1e-3)


ADMISSION = web.AppKey("admission", Admission)


@web.middleware
async def admission_middleware(request: web.Request, handler) -> web.StreamResponse:
    if request.path not in _ALWAYS_OPEN:
        refusal = request.app[ADMISSION].unavailable()
        if refusal is not None:
            raise refusal
    return await handler(request)
