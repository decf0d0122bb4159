"""What the paper-shaped presets share: Poisson arrival times and heavy-tailed tool durations
(drawn from the seed in advance, so every policy sees the same jobs at the same times), waiting
for an arrival, and the checks of their parameters."""

from __future__ import annotations

import asyncio
import math
import random

from kvrt.runtime.bench.session import BenchSession

_Z95 = 1.6449  # the standard normal's 95th percentile


def poisson_arrivals(rng: random.Random, count: int, qps: float) -> list[float]:
    """Arrival times in seconds (before time scaling) of `count` jobs, `qps` a second on average
    (exponential gaps, the first one too); all at 0 when `qps` is 0."""
    if qps == 0:
        return [0.0] * count
    at, out = 0.0, []
    for _ in range(count):
        at += rng.expovariate(qps)
        out.append(at)
    return out


def lognormal(rng: random.Random, median: float, p95: float) -> float:
    """A log-normal draw with the given median and 95th percentile."""
    return rng.lognormvariate(math.log(median), math.log(p95 / median) / _Z95)


async def wait_until(session: BenchSession, started: float, at: float) -> None:
    """Sleeps until `at` seconds (times the session's time scale) after `started`."""
    wait = started + at * session.time_scale - session.clock()
    if wait > 0:
        await asyncio.sleep(wait)


def check_positive(params: object, *names: str) -> None:
    for name in names:
        if getattr(params, name) < 1:
            raise ValueError(f"{name} must be at least 1, not {getattr(params, name)}")


def check_qps(qps: float) -> None:
    if not qps >= 0:
        raise ValueError(f"qps must not be negative (0: all jobs at once), not {qps}")


def check_lengths(low: int, high: int) -> None:
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= min_output_tokens <= max_output_tokens, not {low} and {high}")


def check_tool_times(kind: str, median: float, p95: float) -> None:
    if not 0 < median <= p95:
        raise ValueError(f"need 0 < {kind}_median_s <= {kind}_p95_s, not {median} and {p95}")
