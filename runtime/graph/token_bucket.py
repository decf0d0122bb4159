"""A token bucket: at most `rate` actions a second on average, `burst` at once."""

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

    def take(self, now: float) -> float:
        """Takes a token: 0.0 if there was one, else the seconds until there is one (and
        nothing is taken)."""
        self.tokens = min(self.burst, self.tokens + max(now - self.updated, 0.0) * self.rate)
        self.updated = max(now, self.updated)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate
