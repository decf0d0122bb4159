"""A token bucket: at most `rate` actions (or bytes) a second on average, `burst` at once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    rate: float  # tokens added a second
    burst: float  # the most it holds; it starts full
    tokens: float
    updated: float  # clock seconds of the last refill

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        return cls(rate, burst, burst, now)

    def take(self, now: float, amount: float = 1.0) -> float:
        """Takes `amount` tokens (at most `burst`): 0.0 if there were as many, else the
        seconds until there are (and nothing is taken)."""
        self.tokens = min(self.burst, self.tokens + max(now - self.updated, 0.0) * self.rate)
        self.updated = max(now, self.updated)
        if self.tokens >= amount:
            self.tokens -= amount
            return 0.0
        return (amount - self.tokens) / self.rate
