"""The token bucket behind the per-run event limit, on a clock the test sets."""

from __future__ import annotations

import pytest

from kvrt.runtime.graph.token_bucket import TokenBucket


def test_a_full_bucket_takes_a_burst_then_says_how_long_to_wait() -> None:
    bucket = TokenBucket.full(rate=4, burst=4, now=10.0)
    assert [bucket.take(10.0) for _ in range(4)] == [0.0] * 4
    assert bucket.take(10.0) == pytest.approx(0.25)
    assert bucket.take(10.1) == pytest.approx(0.15)  # a refused take takes nothing
    assert bucket.take(10.25) == 0.0
    assert bucket.take(10.25) == pytest.approx(0.25)


def test_it_refills_at_its_rate_up_to_the_burst_only() -> None:
    bucket = TokenBucket.full(rate=2, burst=3, now=0.0)
    for _ in range(3):
        bucket.take(0.0)
    assert bucket.take(100.0) == 0.0  # long idle: full again, not 200 tokens
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]


def test_a_clock_that_steps_back_adds_nothing() -> None:
    bucket = TokenBucket.full(rate=1, burst=1, now=5.0)
    assert bucket.take(5.0) == 0.0
    assert bucket.take(4.0) == pytest.approx(1.0)
    assert bucket.take(5.5) == pytest.approx(0.5)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket.full(rate=0, burst=1, now=0.0)
    with pytest.raises(ValueError):
        TokenBucket.full(rate=1, burst=0.5, now=0.0)


def test_a_take_of_many_tokens_waits_for_all_of_them() -> None:
    bucket = TokenBucket.full(rate=100, burst=1000, now=0.0)
    assert bucket.take(0.0, 700) == 0.0
    assert bucket.take(0.0, 500) == pytest.approx(2.0)  # 300 held: 200 more, at 100 a second
    assert bucket.take(1.0, 500) == pytest.approx(1.0)  # nothing was taken meanwhile
    assert bucket.take(2.0, 500) == 0.0
