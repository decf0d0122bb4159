"""Percentiles and the ideal, on cases counted by hand."""

from __future__ import annotations

import math

import pytest

from kvrt.runtime.bench.metrics import ideal, percentile


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([3, 1, 2, 4], 50) == 2.5
    assert percentile([10, 20], 95) == pytest.approx(19.5)
    assert percentile([7], 99) == 7
    assert math.isnan(percentile([], 50))


def test_ideal_counts_each_distinct_prefix_once() -> None:
    calls = [
        ([1, 2, 3, 4], [9, 9]),  # 4 new tokens
        ([1, 2, 3, 4, 9, 5], [8]),  # 1 2 3 4 9 are known (9 was generated): 1 new
        ([1, 2, 7], [6]),  # 1 2 known, 7 new
        ([1, 2, 3], [5]),  # all known, but the last prompt token is always computed: 1
    ]
    result = ideal(calls, bytes_per_token=10)
    assert result["prefill_tokens_prefix_reuse"] == 4 + 1 + 1 + 1
    # Distinct KV: 1 2 3 4 9 | 5 | 7 (the last generated token of each call has no KV).
    assert result["kv_bytes_prefix_reuse"] == 7 * 10


def test_the_ideal_reuses_runs_of_tokens_wherever_they_sit() -> None:
    calls = [
        ([1, 2, 3, 4], [9, 9]),  # all new: 4 (runs with KV: 12 23 34 49)
        ([5, 6, 2, 3, 7], [8]),  # prefix: all 5 new; anywhere: "2 3" was seen, 3 new
        ([1, 2, 3, 9, 5, 6], [4]),  # prefix: 1 2 3 known, 3 new; anywhere: only 9 is new
    ]
    result = ideal(calls, bytes_per_token=10, span=2)
    assert result["prefill_tokens_prefix_reuse"] == 4 + 5 + 3
    assert result["prefill_tokens"] == 4 + 3 + 1
    assert result["kv_bytes"] == (8 + 1) * 10  # the computed tokens and one generated 9
