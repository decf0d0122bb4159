"""What the control plane learns from runs, without a server: transitions counted by the rule
of runtime/graph/episodes.py, likely edges, and the learned expected work behind priorities.
Every expected number is worked out by hand in the comments."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from kvrt.runtime.config import ControlConfig
from kvrt.runtime.graph.control_plane import ControlPlane, GraphEntry
from kvrt.runtime.graph.runs import AgentCall, Run
from kvrt.sdk.protocol.control import (
    AgentDone,
    AgentSpec,
    EdgeSpec,
    GraphSpec,
    ToolCallFinished,
    ToolCallStarted,
)


class Driver:
    """A control plane on a clock that moves one second at each step."""

    def __init__(self, spec: GraphSpec, **config: Any) -> None:
        self.now = 0.0
        self.control = ControlPlane(ControlConfig(**config), clock=lambda: self.now)
        self.entry: GraphEntry = self.control.create_graph(spec)
        self.run = self.new_run()
        self._ids = itertools.count()

    def new_run(self) -> Run:
        self.run = self.control.start_run(self.entry.id)
        return self.run

    def start(self, agent: str) -> AgentCall:
        self.now += 1
        return self.run.submit_call(self.run.agent_index(agent), f"req-{next(self._ids)}")

    def end(self, call: AgentCall, tokens: int = 0) -> None:
        self.now += 1
        if tokens:
            call.produced(tokens)
        call.ended()

    def call(self, agent: str, tokens: int = 0) -> None:
        self.end(self.start(agent), tokens)

    def tool(self, agent: str, tool: str, seconds: float = 1.0) -> None:
        self.run.apply(ToolCallStarted(agent=agent, tool=tool))
        self.now += seconds
        self.run.apply(ToolCallFinished(agent=agent, tool=tool))

    def done(self, *agents: str) -> None:
        for agent in agents:
            self.run.apply(AgentDone(agent=agent))

    def run_transitions(self) -> dict[tuple[str, str], int]:
        name = self.entry.learned.name
        return {(name(s), name(t)): n for (s, t), n in self.run.episodes.transitions.items()}

    def graph_transitions(self) -> dict[tuple[str, str], int]:
        name = self.entry.learned.name
        return {(name(s), name(t)): n for (s, t), n in self.entry.learned.counts.items()}

    def criticality(self, agent: str) -> float:
        return self.entry.criticality().criticality(self.entry.graph.index[agent])


def every_edge(names: list[str]) -> list[tuple[str, str]]:
    """What a LangGraph router with `Command(goto=...)` declares: every node to every other."""
    return [(s, t) for s in names for t in names if s != t]


def test_a_router_graph_counts_the_transitions_taken() -> None:
    names = ["router", "a", "b", "c"]
    drive = Driver(GraphSpec(name="g", agents=[AgentSpec(name=n) for n in names],
                             edges=every_edge(names)))
    drive.call("router")  # t1-2: (start, router)
    drive.call("a")  # t3-4: router ended last of a's predecessors: (router, a)
    drive.call("a")  # t5-6: router's end (2) is before a's last start (3): a goes on
    drive.call("router")  # t7-8: a ended at 6, after router's last start (1): (a, router)
    drive.call("b")  # t9-10: router (8) ended after a (6): (router, b), not (a, b)
    drive.done("router", "a")
    assert drive.run.episodes.count == 0  # b, active, is not done yet
    drive.done("b")  # every active agent is done (c never ran): the episode ends with b
    first = {("__start__", "router"): 1, ("router", "a"): 1, ("a", "router"): 1,
             ("router", "b"): 1, ("b", "__end__"): 1}
    assert drive.run_transitions() == first == drive.graph_transitions()
    assert drive.run.episodes.count == drive.entry.learned.episodes == 1
    assert drive.run.agent_state("a") == "done"

    drive.call("router")  # a second invocation of the thread: a new episode, a fresh start
    assert drive.run.agent_state("a") == "idle"  # revived: the new pass may reach it
    drive.control.end_run(drive.run.id)  # ends the episode: router was its last agent
    assert drive.graph_transitions() == {**first, ("__start__", "router"): 2,
                                         ("router", "__end__"): 1}
    learned = drive.entry.learned
    assert learned.episodes == 2
    # router is on the declared loop of unstated count (prior 2 calls); 2 + 1 calls seen:
    # (2 + 3) / (1 + 2) calls per episode. c: (2 + 0) / 3.
    router, c = learned.agents[0], learned.agents[3]
    assert router.expected_calls(learned.episodes) == pytest.approx(5 / 3)
    assert c.expected_calls(learned.episodes) == pytest.approx(2 / 3)


def test_a_parallel_fan_out_counts_no_transition_between_workers() -> None:
    workers = ["w1", "w2", "w3"]
    drive = Driver(GraphSpec(
        name="g", agents=[AgentSpec(name=n) for n in ["planner", *workers, "reviewer"]],
        edges=[("planner", w) for w in workers] + [(w, "reviewer") for w in workers]))
    drive.call("planner")  # t1-2
    w1, w2, w3 = (drive.start(w) for w in workers)  # t3, t4, t5: each (planner, w)
    drive.end(w1)  # t6
    drive.end(w3)  # t7
    drive.call("w1")  # t8-9: planner (2) ended before w1's last start (3): no transition
    drive.end(w2)  # t10: w2 ends last
    drive.call("reviewer")  # t11-12: (w2, reviewer) only
    drive.done("planner", *workers, "reviewer")
    assert drive.run_transitions() == {
        ("__start__", "planner"): 1, ("planner", "w1"): 1, ("planner", "w2"): 1,
        ("planner", "w3"): 1, ("w2", "reviewer"): 1, ("reviewer", "__end__"): 1}
    # planner was left 3 times, once to each worker: a third each, every edge likely.
    learned = drive.entry.learned
    assert learned.share(0, 1) == pytest.approx(1 / 3) and learned.likely(0, 1)


def test_a_declared_self_loop_counts_each_repetition() -> None:
    drive = Driver(GraphSpec(
        name="g", agents=[AgentSpec(name="react", tools={"search": 1.0}), AgentSpec(
            name="final")], edges=[("react", "react"), ("react", "final")]))
    drive.call("react")  # t1-2: (start, react)
    drive.tool("react", "search")  # t2-3: react's activity ends at 3
    drive.call("react")  # t4-5: react is its own latest predecessor: (react, react)
    drive.call("react")  # t6-7: (react, react)
    drive.call("final")  # t8-9: (react, final)
    drive.call("final")  # t10-11: no self-edge: final's second call is not a transition
    assert drive.run_transitions() == {("__start__", "react"): 1, ("react", "react"): 2,
                                       ("react", "final"): 1}


def test_a_branch_that_never_runs_fades_from_the_critical_path() -> None:
    spec = GraphSpec(name="g", agents=[
        AgentSpec(name="router", expected_output_tokens=100),
        AgentSpec(name="a", expected_output_tokens=200),
        AgentSpec(name="b", expected_output_tokens=200)],
        edges=[("router", "a"), ("router", "b")])
    drive = Driver(spec, seconds_per_output_token=0.01)
    learned = drive.entry.learned
    declared = learned.structure()
    # Declared: router (1 s) -> a (2 s) and router -> b (2 s): both branches are critical.
    assert drive.criticality("a") == drive.criticality("b") == 1
    structures = []
    for _ in range(4):  # four runs, each taking router -> a
        drive.call("router", tokens=100)
        drive.call("a", tokens=200)
        drive.control.end_run(drive.run.id)
        structures.append(learned.structure())
        drive.new_run()
    # Two departures from router are fewer than the 3 the prior holds: still declared. The
    # third makes router -> b's share 0 < 0.05: the structure is rebuilt, once.
    assert structures[0] is structures[1] is declared
    assert structures[2] is not declared and structures[3] is structures[2]
    assert not learned.edge_likely(1) and learned.edge_likely(0)
    assert learned.share(0, 2) == 0 and learned.share(0, 1) == 1
    # After 4 episodes: router (1 + 4) / 5 = 1 call of (100 + 400) / 5 = 100 tokens: 1 s;
    # a 1 call of (200 + 800) / 5 = 200 tokens: 2 s; b (1 + 0) / 5 = 0.2 calls of 200: 0.4 s.
    # Likely: router -> a (3 s); b stands alone: 0.4 / 3.
    assert [drive.entry.costs.work(a) for a in drive.entry.graph.agents] == pytest.approx(
        [1.0, 2.0, 0.4])
    assert drive.criticality("a") == 1
    assert drive.criticality("b") == pytest.approx(0.4 / 3)
    run = drive.run  # a new run reads the graph's current structure too
    assert run.priority(2, run.criticality()) == pytest.approx(0.4 / 3)
    assert run.priority(1, run.criticality()) == 1


def test_loop_iterations_done_lower_the_remaining_work() -> None:
    drive = Driver(GraphSpec(name="g", agents=[
        AgentSpec(name="writer", expected_output_tokens=100),
        AgentSpec(name="reviewer", expected_output_tokens=50)],
        edges=[("writer", "reviewer"),
               EdgeSpec(source="reviewer", target="writer", expected_iterations=3)]),
        seconds_per_output_token=0.01)
    run, writer = drive.run, drive.entry.graph.agents[0]

    def remaining() -> float:
        return run.costs.work(writer, run.agents[0], drive.now)

    # Three expected calls of 100 tokens: 3 s; the reviewer's 3 x 50: 1.5 s.
    assert remaining() == pytest.approx(3.0)
    assert run.criticality().length == pytest.approx(4.5)
    drive.call("writer", tokens=100)
    assert remaining() == pytest.approx(2.0)  # two calls left
    second = drive.start("writer")
    second.produced(30)
    # One call not started (100 tokens) and 70 left of the one in flight.
    assert remaining() == pytest.approx(1.7)
    assert run.criticality().length == pytest.approx(1.7 + 1.5)


def test_a_tool_called_twice_per_episode_counts_twice_once_learned() -> None:
    drive = Driver(GraphSpec(name="g", agents=[
        AgentSpec(name="a", tools={"search": 4.0}, expected_output_tokens=0)]))
    agent = drive.entry.graph.agents[0]
    assert drive.entry.costs.work(agent) == 4.0  # declared: one search of 4 s
    for _ in range(3):
        drive.call("a")
        drive.tool("a", "search", 1.0)
        drive.tool("a", "search", 1.0)
        drive.tool("a", "shell", 2.0)  # undeclared: its prior is 0 calls
        drive.done("a")
    assert drive.entry.learned.episodes == 3
    # search: (1 + 6) / (1 + 3) = 1.75 calls of 1 s (every observed call took 1 s);
    # shell: (0 + 3) / 4 = 0.75 calls of 2 s.
    assert drive.entry.costs.work(agent) == pytest.approx(1.75 * 1.0 + 0.75 * 2.0)
    drive.call("a")  # a fourth episode: one search started and finished
    drive.tool("a", "search", 1.0)
    assert drive.run.costs.work(agent, drive.run.agents[0], drive.now) == pytest.approx(
        0.75 * 1.0 + 0.75 * 2.0)


def test_learned_output_tokens_per_call() -> None:
    drive = Driver(GraphSpec(name="g", agents=[AgentSpec(name="a", expected_output_tokens=90)]),
                   seconds_per_output_token=0.01)
    drive.call("a", tokens=10)
    drive.call("a", tokens=20)
    drive.done("a")
    # (1 x 90 + 30) / (1 + 2) = 40 tokens per call, (1 + 2) / (1 + 1) = 1.5 calls: 0.6 s.
    means = drive.entry.learned.agents[0]
    assert means.tokens_per_call == 40 and means.expected_calls(1) == 1.5
    assert drive.entry.costs.work(drive.entry.graph.agents[0]) == pytest.approx(0.6)


def test_a_run_without_calls_folds_nothing() -> None:
    drive = Driver(GraphSpec(name="g", agents=[AgentSpec(name="a", tools={"t": 1.0})]))
    drive.tool("a", "t")
    drive.done("a")
    drive.control.end_run(drive.run.id)
    assert drive.entry.learned.episodes == 0 and drive.entry.learned.counts == {}


def test_a_pipeline_reporting_each_agent_done_as_it_finishes_is_one_episode() -> None:
    # As examples/three_agent_pipeline.py does: planner done before the searcher starts (with
    # a tool call before its model call), searcher done before the writer starts.
    drive = Driver(GraphSpec(name="g", agents=[
        AgentSpec(name="planner"), AgentSpec(name="searcher", tools={"search": 1.0}),
        AgentSpec(name="writer")], edges=[("planner", "searcher"), ("searcher", "writer")]))
    learned = drive.entry.learned
    drive.call("planner")
    drive.done("planner")
    assert learned.episodes == 1  # it seems over: planner was its only agent
    drive.tool("searcher", "search")
    drive.call("searcher")  # searcher follows planner, which the episode reached: reopened
    assert learned.episodes == 0 and drive.run.agent_state("planner") == "done"
    drive.done("searcher")
    drive.call("writer")
    drive.done("writer")
    pass_once = {("__start__", "planner"): 1, ("planner", "searcher"): 1,
                 ("searcher", "writer"): 1, ("writer", "__end__"): 1}
    assert drive.run_transitions() == pass_once == drive.graph_transitions()
    assert learned.episodes == drive.run.episodes.count == 1
    searcher = learned.agents[1]
    assert (searcher.calls, searcher.tool_calls) == (1, {"search": 1})
    assert [drive.run.agent_state(n) for n in ("planner", "searcher", "writer")] == ["done"] * 3
    drive.call("planner")  # planner was in the last episode: this is a new pass
    assert drive.run.agent_state("writer") == "idle"
    assert drive.run_transitions() == {**pass_once, ("__start__", "planner"): 2}


def test_next_use_is_the_work_ahead_of_each_agent() -> None:
    """planner -> coder -> reviewer, 0.02 s an output token (ControlConfig's default):
    planner 100 tokens (2 s), coder 50 tokens (1 s) and a `test` tool declared at 10 s,
    reviewer 50 tokens (1 s)."""
    drive = Driver(GraphSpec(name="chain", agents=[
        AgentSpec(name="planner", expected_output_tokens=100),
        AgentSpec(name="coder", expected_output_tokens=50, tools={"test": 10.0}),
        AgentSpec(name="reviewer", expected_output_tokens=50)],
        edges=[EdgeSpec(source="planner", target="coder"),
               EdgeSpec(source="coder", target="reviewer")]))
    run = drive.run

    def next_use() -> dict[str, float | None]:
        criticality = run.criticality()
        return {agent.name: run.next_use(i, criticality)
                for i, agent in enumerate(run.graph.agents)}

    # Nothing ran: the coder starts after the planner's 2 s, the reviewer after 2 + 1 + 10.
    assert next_use() == pytest.approx({"planner": 0.0, "coder": 2.0, "reviewer": 13.0})
    planning = drive.start("planner")
    assert next_use()["planner"] == 0.0  # queued
    drive.end(planning, tokens=100)
    drive.done("planner")
    call = drive.start("coder")
    drive.end(call, tokens=50)  # the coder's call is spent; its tool (10 s) is ahead
    run.apply(ToolCallStarted(agent="coder", tool="test"))
    drive.now += 4  # 6 s of the tool left
    uses = next_use()
    assert uses["planner"] is None  # done
    assert uses["coder"] == pytest.approx(6.0)
    assert uses["reviewer"] == pytest.approx(6.0)  # after what is left of the coder's work
    run.apply(ToolCallFinished(agent="coder", tool="test"))
    drive.done("coder")
    assert next_use() == {"planner": None, "coder": None, "reviewer": 0.0}
