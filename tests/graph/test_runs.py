"""A run's events, without a server: what `Run.apply` hands the engine's policy."""

from __future__ import annotations

import gc

import pytest

from kvrt.runtime.config import ControlConfig
from kvrt.runtime.engine.protocol import AgentEvent
from kvrt.runtime.graph.control_plane import ControlPlane
from kvrt.runtime.graph.runs import AgentActivity, Run
from kvrt.sdk.protocol.control import (
    AgentDone,
    AgentResumed,
    AgentSpec,
    AgentWaiting,
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


# ---- waits (agent.waiting / agent.resumed) ---------------------------------------------------


def test_a_wait_is_a_tool_call_to_the_policy_and_its_duration_is_learned() -> None:
    now = [0.0]
    run = new_run(now)
    first = run.apply(AgentWaiting(agent="a"))
    assert first == AgentEvent("tool_call.started", run.id, "a", 0.0)  # nothing known yet
    assert run.agent_state("a") == "waiting"
    assert run.apply(AgentWaiting(agent="a", reason="approval")) is None  # one wait at a time
    now[0] = 7.0
    assert run.apply(AgentResumed(agent="a")) == AgentEvent("tool_call.finished", run.id, "a")
    assert run.agent_state("a") == "idle"
    assert run.apply(AgentResumed(agent="a")) is None  # not waiting: a no-op
    assert run.event_count == 2
    # The next wait of this reason is predicted as the last one took; another reason's is not.
    assert run.apply(AgentWaiting(agent="a")) == AgentEvent(
        "tool_call.started", run.id, "a", 7.0)
    now[0] = 8.0
    run.apply(AgentResumed(agent="a"))
    assert run.apply(AgentWaiting(agent="a", reason="timer")) == AgentEvent(
        "tool_call.started", run.id, "a", 0.0)
    estimates = {key: e for key, e in run.costs.estimates.items()}
    assert estimates[("a", "wait:interrupt")].observations == 2
    assert estimates[("a", "wait:interrupt")].seconds == 4.0  # the mean of 7 and 1


def test_a_wait_counts_in_the_remaining_work_until_a_model_call_ends_it() -> None:
    now = [0.0]
    run = new_run(now)
    agent = run.graph.agents[0]
    call = 256 * 0.02  # one call of the default output tokens, at the default decode speed
    assert run.apply(AgentWaiting(agent="a", expected_duration_s=30.0)) == AgentEvent(
        "tool_call.started", run.id, "a", 30.0)  # the client's estimate wins
    now[0] = 10.0
    # 20 s left of the wait, the call and the 3 s search not yet made.
    assert run.costs.work(agent, run.agents[0], now[0]) == pytest.approx(20.0 + call + 3.0)
    now[0] = 12.0
    run.submit_call(0, "req-1")  # the answer came: the agent calls its model again
    assert run.agent_state("a") == "queued"
    assert run.apply(AgentResumed(agent="a")) is None  # the call ended the wait already
    assert run.costs.estimates.seconds("a", "wait:interrupt") == 12.0
    # The call is in flight with no output yet: all of its tokens are still to come.
    assert run.costs.work(agent, run.agents[0], now[0]) == pytest.approx(call + 3.0)


def test_a_done_agent_waiting_is_revived() -> None:
    run = new_run([0.0])
    run.apply(AgentDone(agent="a"))
    assert run.apply(AgentWaiting(agent="a")) is not None
    assert run.agent_state("a") == "waiting"


# ---- what an agent holds (a run holds one activity per agent of its graph) --------------------


def containers(activity: AgentActivity) -> list[object]:
    """The sets and dicts the activity itself holds (its episode's aside)."""
    return [held for held in gc.get_referents(activity) if isinstance(held, (set, dict))]


def test_an_agent_holds_containers_only_while_something_of_it_is_in_flight() -> None:
    now = [0.0]
    run = new_run(now)
    activity = run.agents[0]
    assert containers(activity) == []  # a fresh agent: its counters and its episode only
    call = run.submit_call(0, "req-1")
    assert (run.agent_state("a"), activity.queued, dict(activity.call_tokens)) == (
        "queued", {"req-1"}, {"req-1": 0})
    call.produced(3)
    assert (run.agent_state("a"), activity.queued, activity.generating) == (
        "generating", set(), {"req-1"})
    call.ended()
    assert (run.agent_state("a"), activity.calls, activity.generated_tokens) == ("idle", 1, 3)
    assert containers(activity) == []
    run.apply(ToolCallStarted(id="t1", agent="a", tool="search"))
    run.apply(ToolCallStarted(id="t2", agent="a", tool="search"))  # two at once
    assert [len(calls) for calls in activity.tools.values()] == [2]
    run.apply(ToolCallFinished(agent="a", tool="search"))
    assert run.agent_state("a") == "tool_call"  # until the last one ends
    run.apply(ToolCallFinished(agent="a", tool="search"))
    # What is left is the name of the finished tool, so that a repeated finish is a no-op.
    assert containers(activity) == [{"search"}]
    assert run.apply(ToolCallFinished(agent="a", tool="search")) is None
    run.apply(ToolCallStarted(agent="a", tool="search"))  # started again: no longer finished
    assert [type(held) for held in containers(activity)] == [dict]  # the running calls
    now[0] = 1.0
    run.apply(ToolCallFinished(agent="a", tool="search"))
    assert containers(activity) == [{"search"}] and run.agent_state("a") == "idle"
