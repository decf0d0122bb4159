"""Learned tool durations: the plain mean of the first four calls, then a 0.25-weighted EWMA."""

from __future__ import annotations

from kvrt.runtime.graph.tool_estimates import ToolEstimates


def test_declared_until_observed_then_learned() -> None:
    estimates = ToolEstimates({("a", "search"): 5.0})
    assert estimates.seconds("a", "search") == 5.0
    assert estimates.seconds("a", "never-seen") == 0.0
    for seconds, expected in ((1.0, 1.0), (3.0, 2.0), (5.0, 3.0), (7.0, 4.0), (12.0, 6.0)):
        estimates.observe("a", "search", seconds)
        assert estimates.seconds("a", "search") == expected
    [(key, estimate)] = estimates.items()
    assert key == ("a", "search") and estimate.declared == 5.0 and estimate.observations == 5


def test_undeclared_tools_are_learned_per_agent() -> None:
    estimates = ToolEstimates({})
    estimates.observe("a", "shell", 2.0)
    assert estimates.seconds("a", "shell") == 2.0
    assert estimates.seconds("b", "shell") == 0.0
