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

With several tenants (API keys naming more than one), one tenant may hold at most
`max_queue_share_per_tenant` of both bounds (runtime/server/tenant_queue.py counts each one's
calls): past its share a new request of it gets 429 `tenant_queue_full` (param
`max_queue_share_per_tenant`) with a Retry-After from its part of the drain rate, while the
rest of the queue stays open to the others. The share reserves room for a tenant that comes
later, so it applies whether or not another tenant waits now; with one tenant there is no one
to reserve it for, and the tenant has the whole queue. A tenant with nothing queued is
admitted whatever its share (as an empty queue takes any request); what a tenant holds past
its share does not count against the others' admission, so its oversized round cannot close
the queue to them. A round's calls count as many as they are against both bounds.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

from aiohttp import web

from kvrt.runtime.config import ServerLimits
from kvrt.runtime.engine.protocol import EngineClient, EngineLoad, GenerateRequest
from kvrt.runtime.server.auth import tenant_of
from kvrt.runtime.server.errors import APIError
from kvrt.runtime.server.generation import CallObserver
from kvrt.runtime.server.model_calls import PreparedCall
from kvrt.runtime.server.tenant_queue import QueuedCall, TenantLoad, TenantQueue

State = Literal["starting", "ready", "draining"]

_ALWAYS_OPEN = frozenset({"/health", "/metrics", "/v1/models", "/openapi.json"})
_MAX_RETRY_AFTER_S = 60  # an estimate from a momentary stall must not park clients for long
# The HTTP request's admitted request ids, for the middleware (a str key before aiohttp 3.13).
_ADMITTED: Any = (web.RequestKey("admitted", list[str]) if hasattr(web, "RequestKey")
                  else "kvrt.admitted")


class Admission:
    """`shared`: the server has several tenants, so each gets its share of the queue."""

    def __init__(self, limits: ServerLimits, *, shared: bool = False) -> None:
        self.limits = limits
        self.shared = shared
        self.state: State = "starting"
        self.tenants = TenantQueue()

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

    def check_room(self, http: web.Request, engine: EngineClient, count: int) -> None:
        """The queue's bounds for a round of `count` calls before its prompts are built: a round
        the count alone refuses gets its 429 without its thousands of prompts being rendered
        and tokenized (retried every few milliseconds, they took the machine's CPU from every
        other tenant). `admit` checks again, with the prompts' tokens. (A single call is built
        first: its 400, if it can never run, comes before a 429.)"""
        load, tenant = engine.load(), tenant_of(http)
        self.check_queue(load, 0, count, self._excess_beside(tenant))
        self.check_share(load, self.tenants.load(tenant), 0, count)

    def admit(self, http: web.Request, engine: EngineClient, calls: list[PreparedCall],
              arrival: float) -> list[GenerateRequest]:
        """Calls of the HTTP request `http` that arrived together (one call, or a round's),
        admitted or refused whole: 400 for one that can never run (whatever the load), 429
        past the queue bounds or the tenant's share of them; returns their requests, each with
        what is left of the time limit, counted in the tenant's part of the queue (hand their
        observers to `follow`)."""
        timeout = self.timeout_s(arrival)
        requests = [call.request(timeout) for call in calls]
        for request in requests:
            engine.validate(request)
        tokens = sum(len(r.prompt_token_ids) for r in requests)
        load, tenant = engine.load(), tenant_of(http)
        self.check_queue(load, tokens, len(requests), self._excess_beside(tenant))
        self.check_share(load, self.tenants.load(tenant), tokens, len(requests))
        for request in requests:
            self.tenants.enter(tenant, request.request_id, len(request.prompt_token_ids))
        http.setdefault(_ADMITTED, []).extend(r.request_id for r in requests)
        return requests

    def follow(self, requests: list[GenerateRequest], observers: list[CallObserver | None]
               ) -> list[CallObserver]:
        """The observers to generate `requests` with: each leaves the tenant's part of the
        queue at its call's first output or end, then tells `observers` (the runs')."""
        return [QueuedCall(self.tenants, request.request_id, observer)
                for request, observer in zip(requests, observers, strict=True)]

    def release(self, http: web.Request) -> None:
        """The HTTP request ended: none of its calls is queued any longer."""
        for request_id in http.get(_ADMITTED, ()):
            self.tenants.leave(request_id)

    def share(self) -> TenantLoad:
        """The most of the queue one tenant may hold (requests, prompt tokens)."""
        limits, share = self.limits, self.limits.max_queue_share_per_tenant
        return TenantLoad(max(1, math.floor(share * limits.max_queued_requests)),
                          max(1, math.floor(share * limits.max_queued_tokens)))

    def check_share(self, load: EngineLoad, held: TenantLoad, prompt_tokens: int,
                    count: int = 1) -> None:
        """Raises a 429 if the tenant, holding `held` of the queue, would pass its share with
        `count` more calls of `prompt_tokens` in all."""
        if not self.shared or held.requests == 0:
            return
        cap = self.share()
        if held.requests + count <= cap.requests and held.tokens + prompt_tokens <= cap.tokens:
            return
        # Its calls leave the queue at their part of the drain rate (None: unknown).
        rate = (None if not load.drain_per_s or not load.queued_requests else
                load.drain_per_s * min(1.0, held.requests / load.queued_requests))
        wait = _wait_s(rate, held.requests, held.tokens, prompt_tokens, count, cap.requests,
                       cap.tokens)
        share = self.limits.max_queue_share_per_tenant
        raise APIError(
            429,
            f"this tenant has {held.requests} requests ({held.tokens} prompt tokens) waiting "
            f"for the engine, its share of the queue (--max-queue-share-per-tenant {share:g}: "
            f"{cap.requests} requests, {cap.tokens} tokens); retry after {wait} s",
            code="tenant_queue_full", param="max_queue_share_per_tenant", retry_after_s=wait,
        )

    def check_queue(self, load: EngineLoad, prompt_tokens: int, count: int = 1,
                    excess: TenantLoad | None = None) -> None:
        """Raises a 429 if `count` calls of `prompt_tokens` in all would overfill the engine's
        queue. `excess`: what other tenants hold past their share, not counted: a tenant let
        past its share with nothing queued (a round larger than it) must not close the queue
        to the others."""
        limits = self.limits
        if load.queued_requests == 0:
            return
        excess = excess or TenantLoad()
        requests = max(0, load.queued_requests - excess.requests)
        tokens = max(0, load.queued_tokens - excess.tokens)
        if (requests + count <= limits.max_queued_requests
                and tokens + prompt_tokens <= limits.max_queued_tokens):
            return
        wait = _wait_s(load.drain_per_s, requests, tokens, prompt_tokens, count,
                       limits.max_queued_requests, limits.max_queued_tokens)
        raise APIError(
            429,
            f"the server is busy: {load.queued_requests} requests ({load.queued_tokens} prompt "
            f"tokens) wait for the engine, at most {limits.max_queued_requests} "
            f"({limits.max_queued_tokens} tokens) may; retry after {wait} s",
            code="queue_full", retry_after_s=wait,
        )

    def _excess_beside(self, tenant: str) -> TenantLoad:
        """What the tenants other than `tenant` hold past their share (none unless shared)."""
        return self.tenants.excess(self.share(), beside=tenant) if self.shared else TenantLoad()

    def timeout_s(self, arrival: float) -> float | None:
        """What is left of the request's time limit (`arrival`: its time.perf_counter() when
        it came in); None without a limit."""
        limit = self.limits.request_timeout_s
        if not limit:
            return None
        return max(limit - (time.perf_counter() - arrival), 1e-3)


def _wait_s(rate: float | None, requests: int, tokens: int, prompt_tokens: int, count: int,
            max_requests: int, max_tokens: int) -> int:
    """Seconds until enough of `requests` queued calls (`tokens` prompt tokens) have drained,
    at `rate` calls a second, for `count` more of `prompt_tokens` in all to fit the bounds (1 s
    when the rate is not known)."""
    if not rate:
        return 1
    over_requests = requests + count - max_requests
    over_tokens = tokens + prompt_tokens - max_tokens
    tokens_per_request = max(1.0, tokens / requests)
    to_drain = max(over_requests, math.ceil(over_tokens / tokens_per_request), 1)
    return min(_MAX_RETRY_AFTER_S, max(1, math.ceil(to_drain / rate)))


ADMISSION = web.AppKey("admission", Admission)


@web.middleware
async def admission_middleware(request: web.Request, handler) -> web.StreamResponse:
    admission = request.app[ADMISSION]
    if request.path not in _ALWAYS_OPEN:
        refusal = admission.unavailable()
        if refusal is not None:
            raise refusal
    try:
        return await handler(request)
    finally:
        admission.release(request)
