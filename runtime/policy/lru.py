"""`lru`: prefix caching with LRU eviction and first-come-first-served admission, as vLLM does."""

from __future__ import annotations

from kvrt.runtime.policy.base import CallT, Policy, register_policy
from kvrt.runtime.policy.view import Call


@register_policy("lru")
class LRUPolicy(Policy):
    def admission_key(self, call: Call) -> tuple:
        return (call.arrival, call.order)

    def victim(self, running: list[CallT]) -> CallT:
        return max(running, key=lambda c: (c.arrival, c.order))  # the latest arrival yields first
