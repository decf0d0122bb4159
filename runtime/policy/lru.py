"""`lru`: prefix caching with LRU eviction and first-come-first-served admission, as vLLM does."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvrt.runtime.policy.base import Policy, register_policy

if TYPE_CHECKING:
    from kvrt.runtime.engine.sequence import Sequence


@register_policy("lru")
class LRUPolicy(Policy):
    def admission_key(self, seq: Sequence) -> tuple:
        return (seq.arrival, seq.order)

    def victim(self, running: list[Sequence]) -> Sequence:
        return max(running, key=lambda s: (s.arrival, s.order))  # the latest arrival yields first
