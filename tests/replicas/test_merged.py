"""The replicas' figures as one engine's, on values written by hand."""

from __future__ import annotations

from kvrt.runtime.engine.decision_log import DecisionRecord
from kvrt.runtime.engine.protocol import (
    AgentResidency,
    EngineLoad,
    EngineStats,
    LandingStats,
    RecentDecisions,
)
from kvrt.runtime.replicas.merged import merge_decisions, merge_residency, sum_loads, sum_stats


def stats(**fields) -> EngineStats:
    base = dict(running=0, waiting=0, kv_blocks_total=0, kv_blocks_in_use=0,
                kv_blocks_cached=0, prefix_queries_tokens=0, prefix_hits_tokens=0,
                prompt_tokens=0, generation_tokens=0, preemptions=0)
    return EngineStats(**{**base, **fields})


def test_counters_add_up_and_dicts_merge_by_key():
    one = stats(running=2, kv_blocks_total=100, prompt_tokens=40, kv_decisions={"offload": 1},
                shared_text_blocks_per_agent=2.0,
                upload_landing=LandingStats(bucket_counts=(1,) + (0,) * 9, sum_s=0.5, count=1))
    two = stats(running=1, kv_blocks_total=100, prompt_tokens=2,
                kv_decisions={"offload": 2, "keep:short_tool": 1},
                upload_landing=LandingStats(bucket_counts=(0, 3) + (0,) * 8, sum_s=1.0,
                                            count=3))
    total = sum_stats([one, two])
    assert (total.running, total.kv_blocks_total, total.prompt_tokens) == (3, 200, 42)
    assert total.kv_decisions == {"offload": 3, "keep:short_tool": 1}
    assert total.shared_text_blocks_per_agent == 2.0  # the one replica that sampled
    assert total.upload_landing.bucket_counts[:2] == (1, 3)
    assert (total.upload_landing.sum_s, total.upload_landing.count) == (1.5, 4)


def test_loads_add_up_and_an_unknown_drain_rate_stays_unknown():
    assert sum_loads([EngineLoad(1, 10, 3, None), EngineLoad(2, 5, 2, 4.0)]) == EngineLoad(
        3, 15, 5, 4.0)
    assert sum_loads([EngineLoad(0, 0, 0, None)]).drain_per_s is None


def test_an_agent_on_two_replicas_holds_both_replicas_blocks():
    old = {"a": AgentResidency(4, 1, host_blocks=2, decision="offload"),
           "b": AgentResidency(1, 0)}
    new = {"a": AgentResidency(3, 0, decision=None)}
    merged = merge_residency([old, new])
    assert merged["a"] == AgentResidency(7, 1, host_blocks=2, decision="offload")
    assert merged["b"] == AgentResidency(1, 0)


def test_decisions_of_all_replicas_in_time_order():
    def record(at: float, agent: str) -> DecisionRecord:
        return DecisionRecord(at, "offload", "tool_call.started", "r", agent, "")

    merged = merge_decisions([RecentDecisions(5.0, (record(1.0, "x"), record(4.0, "y"))),
                              RecentDecisions(6.0, (record(2.0, "z"),))])
    assert merged.now == 6.0
    assert [r.agent for r in merged.records] == ["x", "z", "y"]
