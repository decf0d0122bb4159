"""Request bodies per tenant: one tenant's stream of large bodies cannot take the event loop.

Every JSON body is decoded on the event loop (msgspec holds the interpreter for the whole of
it: some 4 ms a MiB on this 2-core machine, so a few giant bodies a second take most of a
core from everybody's calls and the engine's thread). With several tenants (API keys naming
more than one), each may send `--max-body-rate-per-tenant` bytes of bodies a second on
average, in bursts of `--max-body-size` (so any body the size limit admits passes when the
tenant has sent nothing for a while). Past it a body is refused before it is read (by its
Content-Length; a chunked one once read) or decoded: 429
`body_rate_exceeded` (param `max_body_rate_per_tenant`) with the Retry-After that lets it
pass. A single-tenant server has no such limit (there is no other tenant to protect).
"""

from __future__ import annotations

import math
import time

from aiohttp import web

from kvrt.runtime.config import ServerLimits
from kvrt.runtime.graph.token_bucket import TokenBucket
from kvrt.runtime.server.errors import APIError


class BodyRate:
    """`shared`: the server has several tenants; else nothing is limited."""

    def __init__(self, limits: ServerLimits, *, shared: bool) -> None:
        self.rate = limits.max_body_bytes_per_s_per_tenant if shared else 0
        self.burst = limits.max_body_bytes
        self._buckets: dict[str, TokenBucket] = {}

    def charge(self, tenant: str, size: int) -> None:
        """Counts a body of `size` bytes against its tenant's rate; 429 past it."""
        if not self.rate:
            return
        now = time.monotonic()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = TokenBucket.full(self.rate, self.burst, now)
        wait = bucket.take(now, min(size, self.burst))
        if wait > 0:
            raise APIError(
                429, f"this tenant sends request bodies faster than this server's limit of "
                f"{self.rate:.0f} bytes a second (--max-body-rate-per-tenant); this one "
                f"({size} bytes) may be sent again after the Retry-After seconds",
                code="body_rate_exceeded", param="max_body_rate_per_tenant",
                retry_after_s=max(1, math.ceil(wait)))


BODY_RATE = web.AppKey("body_rate", BodyRate)
