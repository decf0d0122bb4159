"""`tool-agents-langgraph`'s LangGraph application, registered through kvrt's adapter.

One compiled graph per worker count n: `planner` -> `worker0` .. `worker{n-1}` (static nodes, so
each is its own kvrt agent, as in `tool-agents`; a `Send` fan-out would make them one) ->
`reviewer`. The workers run in one superstep, so the reviewer runs once, after all of them.
Each worker node runs a standard ReAct loop: an inner compiled graph (`agent` node calling the
model, `ToolNode([run_tests])`, `tools_condition`) invoked with the node's config, so the
adapter credits its model and tool calls to the worker node. The ToolNode is hidden inside the
worker's function, so `run_tests`' seconds are declared on the worker nodes themselves.

A thread's plan is a `ThreadPlan` of the `langgraph` workload, so its `PlannedModel`,
`react_graph` and `slow_tool` serve as they are: `lengths` is `tool-agents`' list (planner,
then each worker's turns + 1 calls, then the reviewer), `tools` the planned tool calls, worker
by worker and turn by turn.
"""

from __future__ import annotations

import asyncio
import operator
from typing import Annotated, Any, TypedDict

from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool
from langgraph.graph import END, START, StateGraph

from kvrt.runtime.bench.session import BenchSession
from kvrt.runtime.bench.workloads.langgraph_apps import ThreadPlan, ToolPlan
from kvrt.runtime.bench.workloads.langgraph_graphs import (
    PlannedModel,
    react_graph,
    slow_tool,
)
from kvrt.runtime.bench.workloads.tool_agents import ToolAgents
from kvrt.sdk.langgraph import KvrtChatModel, close, close_all, register

_NO_TIMEOUT_S = 1e9  # as the runner's client: a call may wait long in the queue


class TeamState(TypedDict, total=False):
    task: str
    steps: str  # the planner's answer
    results: Annotated[dict[int, str], operator.or_]  # worker -> its answer
    review: str


def thread_plans(plan: ToolAgents) -> list[ThreadPlan]:
    """`tool-agents`' runs as threads "run 1", "run 2", ...; tool call n of a thread is worker
    n // turns' turn n % turns."""
    return [ThreadPlan(app="tool-agents", thread=f"run {k + 1}", task=run.task,
                       lengths=list(run.lengths),
                       tools=[ToolPlan(seconds, output)
                              for durations, outputs in zip(run.durations, run.tool_outputs)
                              for seconds, output in zip(durations, outputs)],
                       route=[], human_s=0.0)
            for k, run in enumerate(plan.plans)]


class Team:
    """The graphs registered on the session's daemon; `play` runs one thread as a job."""

    def __init__(self, plan: ToolAgents, session: BenchSession, model: PlannedModel,
                 run_tests: BaseTool, threads: list[ThreadPlan]) -> None:
        self.plan, self.session, self.model = plan, session, model
        self.run_tests = run_tests
        self.threads = threads
        self.workers: dict[int, Any] = {}  # worker index -> its compiled ReAct graph
        self.graphs: dict[int, Any] = {}  # worker count -> the registered team graph

    @classmethod
    async def start(cls, plan: ToolAgents, session: BenchSession) -> Team:
        threads = thread_plans(plan)
        tickets = {t.ticket(n): tool for t in threads for n, tool in enumerate(t.tools)}
        model = PlannedModel(session, KvrtChatModel(
            base_url=session.client.base_url, temperature=0, max_retries=0,
            timeout=_NO_TIMEOUT_S), {t.thread: t for t in threads})
        team = cls(plan, session, model, slow_tool("run_tests", tickets, session.time_scale),
                   threads)
        for n in sorted({run.workers for run in plan.plans}):
            team.graphs[n] = await team.register(n)
        return team

    async def register(self, workers: int) -> Any:
        """The team graph for `workers`, declared as `ToolAgents.graph(workers)` declares it."""
        p, system = self.plan.params, self.plan.system
        mean = (p.min_output_tokens + p.max_output_tokens) // 2
        agents: dict[str, dict[str, Any]] = {
            "planner": {"system": f"{system}\nYou plan.", "expected_output_tokens": mean},
            "reviewer": {"system": f"{system}\nYou review.", "expected_output_tokens": mean}}
        for w in range(workers):
            agents[f"worker{w}"] = {
                "system": f"{system}\nYou implement.",
                "tools": {"run_tests": p.tool_median_s * self.session.time_scale},
                "expected_output_tokens": mean * (p.turns + 1)}
        return await register(self.team_graph(workers).compile(), self.session.client,
                               f"lg-tool-agents-{workers}", agents=agents)

    def team_graph(self, workers: int) -> StateGraph:
        system, model, reviewer_at = self.plan.system, self.model, 1 + workers * (
            self.plan.params.turns + 1)

        async def planner(state: TeamState, config: RunnableConfig) -> dict[str, Any]:
            reply = await model.call(model.model, [SystemMessage(f"{system}\nYou plan."),
                                                   HumanMessage(state["task"])], 0, config,
                                     "planner")
            return {"steps": reply.content}

        async def reviewer(state: TeamState, config: RunnableConfig) -> dict[str, Any]:
            results = state["results"]
            review = HumanMessage("Review the work:\n" + "\n".join(
                f"Worker {w}: {results[w]}" for w in range(workers)))
            reply = await model.call(model.model, [SystemMessage(f"{system}\nYou review."),
                                                   review], reviewer_at, config, "reviewer")
            return {"review": reply.content}

        builder = StateGraph(TeamState)
        builder.add_node("planner", planner)
        builder.add_node("reviewer", reviewer)
        builder.add_edge(START, "planner")
        for w in range(workers):
            builder.add_node(f"worker{w}", self.worker_node(w))
            builder.add_edge("planner", f"worker{w}")
            builder.add_edge(f"worker{w}", "reviewer")
        builder.add_edge("reviewer", END)
        return builder

    def worker_node(self, w: int) -> Any:
        inner = self.worker_graph(w)

        async def worker(state: TeamState, config: RunnableConfig) -> dict[str, Any]:
            task = HumanMessage(f"Plan:\n{state['steps']}\nDo part {w + 1}.")
            out = await inner.ainvoke({"messages": [task]}, config)
            return {"results": {w: out["messages"][-1].content}}

        return worker

    def worker_graph(self, w: int) -> Any:
        """Worker w's ReAct loop, compiled once for every team size: agent -> (tools_condition)
        tools -> agent ... -> END; its call t is the thread's call 1 + w * (turns + 1) + t."""
        if w in self.workers:
            return self.workers[w]
        turns = self.plan.params.turns
        builder = react_graph(self.model, f"{self.plan.system}\nYou implement.", self.run_tests,
                              agent=f"worker{w}", turns=turns, first_call=1 + w * (turns + 1),
                              first_ticket=w * turns)
        self.workers[w] = builder.compile()
        return self.workers[w]

    async def play_all(self) -> None:
        await asyncio.gather(*(self.play(k, thread) for k, thread in enumerate(self.threads)))

    async def play(self, k: int, thread: ThreadPlan) -> None:
        graph = self.graphs[self.plan.plans[k].workers]
        config: RunnableConfig = {"configurable": {"thread_id": thread.thread},
                                  "recursion_limit": 2 * self.plan.params.turns + 10}
        async with self.session.job(thread.thread):
            try:
                await graph.ainvoke({"task": thread.task}, config)
            finally:
                await close(graph, thread.thread)

    async def stop(self) -> None:
        for graph in self.graphs.values():
            await close_all(graph)  # every thread is closed already: frees the HTTP client
