"""What each tenant has in the engine's queue, counted by the server for its share of it.

The engine counts its queue as a whole (EngineLoad); the per-tenant share of it
(`--max-queue-share-per-tenant`, runtime/server/admission.py) needs each tenant's part. A call
is counted from its admission until its first output or its end, as the engine counts it
(from its submission), so a burst counts at once:

    event                                     by                          count
    ----------------------------------------  --------------------------  ---------------
    admitted                                  Admission.admit             enter
    first output                              QueuedCall.produced         leave
    ended (finished, failed, timed out,       QueuedCall.ended            leave
      cancelled, client gone)
    the HTTP request's end (a round's call    admission_middleware        leave each call
      cancelled before its generator ran)                                 of the request

Leaving twice is a no-op, so the last row is a net under the others: every count returns to
zero when its HTTP request ends, whatever ended it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrt.runtime.server.generation import CallObserver


@dataclass(slots=True)
class TenantLoad:
    requests: int = 0
    tokens: int = 0  # their prompt tokens


class TenantQueue:
    def __init__(self) -> None:
        self._calls: dict[str, tuple[str, int]] = {}  # request id -> (tenant, prompt tokens)
        self._tenants: dict[str, TenantLoad] = {}  # tenants with calls queued only

    def load(self, tenant: str) -> TenantLoad:
        """The tenant's queued calls now (a copy)."""
        held = self._tenants.get(tenant)
        return TenantLoad() if held is None else TenantLoad(held.requests, held.tokens)

    def excess(self, share: TenantLoad, beside: str) -> TenantLoad:
        """What the tenants other than `beside` hold past `share` each, summed."""
        over = TenantLoad()
        for tenant, held in self._tenants.items():
            if tenant != beside:
                over.requests += max(0, held.requests - share.requests)
                over.tokens += max(0, held.tokens - share.tokens)
        return over

    def enter(self, tenant: str, request_id: str, prompt_tokens: int) -> None:
        self._calls[request_id] = (tenant, prompt_tokens)
        held = self._tenants.setdefault(tenant, TenantLoad())
        held.requests += 1
        held.tokens += prompt_tokens

    def leave(self, request_id: str) -> None:
        """The call left the queue (its first output, or its end). Leaving twice is a no-op."""
        call = self._calls.pop(request_id, None)
        if call is None:
            return
        tenant, tokens = call
        held = self._tenants[tenant]
        held.requests -= 1
        held.tokens -= tokens
        if not held.requests:
            del self._tenants[tenant]

    def check_integrity(self) -> None:
        """Each tenant's count is the sum over its calls, and no tenant is held at zero."""
        expected: dict[str, TenantLoad] = {}
        for tenant, tokens in self._calls.values():
            load = expected.setdefault(tenant, TenantLoad())
            load.requests += 1
            load.tokens += tokens
        assert expected == self._tenants, (expected, self._tenants)


@dataclass(slots=True)
class QueuedCall:
    """A call's CallObserver while it is counted: leaves the queue at its first output or its
    end, then hands both on to the run's observer, if any."""

    queue: TenantQueue
    request_id: str
    inner: CallObserver | None

    def produced(self, tokens: int) -> None:
        self.queue.leave(self.request_id)
        if self.inner is not None:
            self.inner.produced(tokens)

    def ended(self) -> None:
        self.queue.leave(self.request_id)
        if self.inner is not None:
            self.inner.ended()
