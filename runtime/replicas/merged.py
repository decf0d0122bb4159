"""The replicas' figures as one engine's: what /metrics, /ui and the run state read of a
ReplicaSet (each replica's own stay in `ReplicaSet.replicas()`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from kvrt.runtime.engine.protocol import (
    AgentResidency,
    EngineLoad,
    EngineStats,
    LandingStats,
    RecentDecisions,
)


def sum_stats(stats: Sequence[EngineStats]) -> EngineStats:
    """Counters and sizes add up; `kv_blocks_in_use_peak` is the sum of the replicas' peaks
    (they need not have peaked together: an upper bound); the shared text per agent is the
    mean of the replicas that sampled one."""
    if not stats:
        return EngineStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    summed = {}
    for field in dataclasses.fields(EngineStats):
        values = [getattr(s, field.name) for s in stats]
        if field.name == "upload_landing":
            summed[field.name] = _landings(values)
        elif field.name == "shared_text_blocks_per_agent":
            known = [v for v in values if v is not None]
            summed[field.name] = sum(known) / len(known) if known else None
        elif isinstance(values[0], dict):
            summed[field.name] = _add_counts(values)
        else:
            summed[field.name] = sum(values)
    return EngineStats(**summed)


def _add_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in counts:
        for key, value in one.items():
            total[key] = total.get(key, 0) + value
    return total


def _landings(landings: Sequence[LandingStats]) -> LandingStats:
    first = landings[0]
    return LandingStats(
        recent=tuple(sample for one in landings for sample in one.recent),
        early_returns=sum(one.early_returns for one in landings),
        buckets=first.buckets,
        bucket_counts=tuple(map(sum, zip(*(one.bucket_counts for one in landings),
                                         strict=True))),
        sum_s=sum(one.sum_s for one in landings),
        count=sum(one.count for one in landings))


def sum_loads(loads: Sequence[EngineLoad]) -> EngineLoad:
    rates = [load.drain_per_s for load in loads if load.drain_per_s is not None]
    return EngineLoad(sum(load.queued_requests for load in loads),
                      sum(load.queued_tokens for load in loads),
                      sum(load.in_flight for load in loads),
                      sum(rates) if rates else None)


def merge_residency(parts: Iterable[dict[str, AgentResidency]]) -> dict[str, AgentResidency]:
    """An agent that moved holds KV on two replicas: its blocks add up; the decision is the
    latest replica's (the parts come oldest first)."""
    merged: dict[str, AgentResidency] = {}
    for part in parts:
        for agent, here in part.items():
            before = merged.get(agent)
            merged[agent] = here if before is None else AgentResidency(
                before.device_blocks + here.device_blocks,
                before.shared_blocks + here.shared_blocks,
                before.host_blocks + here.host_blocks,
                here.decision or before.decision,
                before.segment_tokens + here.segment_tokens,
                before.segment_reused_tokens + here.segment_reused_tokens)
    return merged


def merge_decisions(parts: Sequence[RecentDecisions]) -> RecentDecisions:
    """Every replica's, in the order they were carried out. Ages stay right as long as the
    replicas' clocks agree (one machine's monotonic clock, or the simulated loop's)."""
    records = sorted((r for part in parts for r in part.records), key=lambda r: r.at)
    return RecentDecisions(max((part.now for part in parts), default=0.0), tuple(records))
