"""A run's events, without a server: what `Run.apply` hands the engine's policy."""

from __future__ import annotations

from kvrt.runtime.config import ControlConfig
from kvrt.runtime.engine.protocol import AgentEvent
from kvrt.runtime.graph.control_plane import ControlPlane
from kvrt.runtime.graph.runs import Run
from kvrt.sdk.protocol.control import (
    AgentDone,
    AgentSpec,
    GraphSpec,
    ToolCallFinished,
    ToolCallStarted,
)


def new_run(now: list[float]) -> Run:
    control = ControlPlane(ControlConfig(), clock=lambda: now[0])
    graph = control.create_graph(GraphSpec(name="g", agents=[
        AgentSpec(name="a", tools={"search": 3.0})]))
    return control.start_run(graph.id)


def test_apply_returns_the_engines_event_with_the_predicted_time() -> None:
    now = [0.0]
    run = new_run(now)
    declared = run.apply(ToolCallStarted(agent="a", tool="search"))
    assert declared == AgentEvent("tool_call.started", run.id, "a", 3.0)
    assert run.agent_state("a") == "tool_call"
    now[0] = 5.0
    assert run.apply(ToolCallFinished(agent="a", tool="search")) == AgentEvent(
        "tool_call.finished", run.id, "a")
    learned = run.apply(ToolCallStarted(agent="a", tool="search"))
    assert learned == AgentEvent("tool_call.started", run.id, "a", 5.0)  # as observed
    estimated = run.apply(ToolCallStarted(id="e1", agent="a", tool="search",
                                          expected_duration_s=0.5))
    assert estimated == AgentEvent("tool_call.started", run.id, "a", 0.5)
    assert run.apply(AgentDone(agent="a")) == AgentEvent("agent.done", run.id, "a")


def test_a_duplicate_event_hands_the_engine_nothing() -> None:
    run = new_run([0.0])
    assert run.apply(ToolCallStarted(id="e1", agent="a", tool="search")) is not None
    assert run.apply(ToolCallStarted(id="e1", agent="a", tool="search")) is None  # same id
    assert run.apply(ToolCallStarted(agent="a", tool="search")) is None  # already running
    assert run.apply(AgentDone(agent="a")) is not None
    assert run.apply(AgentDone(agent="a")) is None
    assert run.event_count == 2
    assert run.agent_state("a") == "tool_call"  # a running tool call outranks done
