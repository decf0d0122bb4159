"""Domain objects of the control plane -> its wire Structs (sdk/protocol/control.py).

What the server estimates (priorities, learned shares and counts, predicted seconds) is rounded
here, at the edge: a priority of 0.5714285714285714 claims a precision no estimate has, and
makes responses hard to read. Estimated ratios keep 3 significant digits, estimated seconds
milliseconds; what a client declared (importance, a tool's seconds) and what is counted go
out as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, overload

from kvrt.runtime.graph.control_plane import GraphEntry
from kvrt.runtime.graph.listing import Page
from kvrt.runtime.graph.runs import Run
from kvrt.sdk.protocol.control import (
    AgentInfo,
    AgentState,
    Edge,
    GraphInfo,
    GraphList,
    KVResidency,
    RunInfo,
    RunList,
    RunState,
    ToolEstimate,
    Transition,
    TransitionCount,
)


class Residency(Protocol):
    device_blocks: int
    shared_blocks: int
    host_blocks: int
    decision: str | None
    segment_tokens: int
    segment_reused_tokens: int


@overload
def estimate(value: float) -> float: ...
@overload
def estimate(value: None) -> None: ...
def estimate(value: float | None) -> float | None:
    """An estimated ratio or count to 3 significant digits (4/7 -> 0.571)."""
    return None if value is None else float(f"{value:.3g}")


@overload
def seconds(value: float) -> float: ...
@overload
def seconds(value: None) -> None: ...
def seconds(value: float | None) -> float | None:
    """Estimated seconds to the millisecond."""
    return None if value is None else round(value, 3)


def graph_info(entry: GraphEntry) -> GraphInfo:
    graph, criticality, learned = entry.graph, entry.criticality(), entry.learned
    agents = [
        AgentInfo(
            name=agent.name, system=agent.system, tools=agent.tools,
            expected_output_tokens=agent.expected_output_tokens, importance=agent.importance,
            expected_seconds=seconds(entry.costs.work(agent)),
            priority=estimate(agent.importance * criticality.criticality(i)),
            on_critical_path=criticality.on_critical_path(i),
            expected_calls=estimate(learned.agents[i].expected_calls(learned.episodes)),
            output_tokens_per_call=estimate(learned.agents[i].tokens_per_call),
        )
        for i, agent in enumerate(graph.agents)
    ]
    edges = [
        Edge(source=graph.agents[e.source].name, target=graph.agents[e.target].name,
             in_loop=graph.structure.in_loop(e.source, e.target),
             expected_iterations=graph.iterations(e))
        for e in graph.edges
    ]
    return GraphInfo(
        id=entry.id, name=graph.name, created=entry.created, reuse=graph.reuse, agents=agents,
        edges=edges, critical_path=[graph.agents[i].name for i in criticality.path],
        critical_path_seconds=seconds(criticality.length), live_runs=len(entry.runs),
        transitions=_transitions(entry), episodes=learned.episodes,
        declared_bytes=entry.declared_bytes, implicit=entry.implicit,
    )


def graph_list(page: Page[GraphEntry]) -> GraphList:
    return GraphList(**_listed([graph_info(entry) for entry in page.items], page.has_more))


def _transitions(entry: GraphEntry) -> list[Transition]:
    """The declared edges in their order (likely: as the structure has them), then the
    observed episode starts and ends."""
    learned, edges = entry.learned, entry.graph.edges
    rows = [Transition(source=learned.name(e.source), target=learned.name(e.target),
                       count=learned.counts.get((e.source, e.target), 0),
                       share=estimate(learned.share(e.source, e.target)),
                       likely=learned.edge_likely(i))
            for i, e in enumerate(edges)]
    rows += [Transition(source=learned.name(s), target=learned.name(t), count=n,
                        share=estimate(learned.share(s, t)), likely=learned.likely(s, t))
             for (s, t), n in sorted(learned.counts.items()) if s < 0 or t < 0]
    return rows


def run_info(run: Run) -> RunInfo:
    return RunInfo(id=run.id, graph_id=run.graph_id, created=run.created,
                   event_count=run.event_count, key=run.key, status=run.status,
                   implicit=run.implicit)


def run_list(page: Page[Run]) -> RunList:
    return RunList(**_listed([run_info(run) for run in page.items], page.has_more))


def _listed(data: list, has_more: bool) -> dict:
    """A page's fields: its items, the ids at its ends, and whether more follow."""
    return {"data": data, "first_id": data[0].id if data else None,
            "last_id": data[-1].id if data else None, "has_more": has_more}


def run_state(run: Run, residency: Mapping[str, Residency],
              replicas: Sequence[str] = ()) -> RunState:
    """`residency`: the engine's per-agent KV accounting of this run (agents absent hold none);
    `replicas`: the engine replicas holding it (none with one engine)."""
    criticality, now = run.criticality(), run.clock()
    agents = []
    for i, (agent, activity) in enumerate(zip(run.graph.agents, run.agents)):
        kv = residency.get(agent.name)
        agents.append(AgentState(
            name=agent.name, state=activity.state,
            priority=estimate(run.priority(i, criticality)),
            on_critical_path=not activity.done and criticality.on_critical_path(i),
            remaining_seconds=seconds(run.costs.work(agent, activity, now)),
            requests=len(activity.queued) + len(activity.generating),
            calls=activity.calls, tool_calls=activity.tool_calls,
            generated_tokens=activity.generated_tokens,
            tool=next(iter(activity.tools), None),
            waiting=None if activity.waiting is None else activity.waiting[0],
            kv=KVResidency(device_blocks=kv.device_blocks if kv else 0,
                           host_blocks=kv.host_blocks if kv else 0,
                           shared_blocks=kv.shared_blocks if kv else 0,
                           decision=kv.decision if kv else None,
                           segment_tokens=kv.segment_tokens if kv else 0,
                           segment_reused_tokens=kv.segment_reused_tokens if kv else 0),
        ))
    tools = [
        ToolEstimate(agent=agent, tool=tool, declared_seconds=learned.declared,
                     observations=learned.observations, estimate_seconds=seconds(learned.seconds))
        for (agent, tool), learned in run.costs.estimates.items()
    ]
    path = [run.graph.agents[i].name for i in criticality.path if not run.agents[i].done]
    segment_tokens = sum(a.kv.segment_tokens for a in agents)
    stored = segment_tokens - sum(a.kv.segment_reused_tokens for a in agents)
    return RunState(
        id=run.id, graph_id=run.graph_id, created=run.created, event_count=run.event_count,
        key=run.key, status=run.status, implicit=run.implicit, critical_path=path,
        critical_path_seconds=seconds(criticality.length), agents=agents, tools=tools,
        segment_kv_compression=estimate(segment_tokens / stored) if segment_tokens else None,
        transitions=[TransitionCount(source=run.costs.learned.name(s),
                                     target=run.costs.learned.name(t), count=n)
                     for (s, t), n in sorted(run.episodes.transitions.items())],
        episodes=run.episodes.count, replicas=list(replicas),
    )
