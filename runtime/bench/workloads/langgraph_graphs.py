"""The `langgraph` workload's three LangGraph applications, registered on the bench's daemon
through the adapter (`kvrt.sdk.langgraph`), and one thread of each played as a job.

A node's model call goes through `PlannedModel`: a real streamed call of the planned length,
timed and recorded in the session, whose reply then carries the plan's tool call if there is
one (the bench's small models cannot be trusted to write it). Everything else is LangGraph's:
`ToolNode`, `tools_condition`, conditional edges, `interrupt` and `Command(resume=...)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.tool import tool_call
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.tools import BaseTool, tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import Command, interrupt

from kvrt.runtime.bench.session import BenchSession, CallRecord
from kvrt.runtime.bench.workloads.langgraph_apps import (
    SPECIALISTS,
    ThreadPlan,
    ToolPlan,
)
from kvrt.sdk.langgraph import KvrtChatModel, close, close_all, register

if TYPE_CHECKING:
    from kvrt.runtime.bench.workloads.langgraph_apps import LangGraphApps

_NO_TIMEOUT_S = 1e9  # as the runner's client: a call may wait long in the queue
SPECIALIST_TOOLS = {"researcher": "search", "coder": "run_tests", "writer": "check_style"}


class SupervisorState(MessagesState):
    step: int  # specialists visited so far
    next: str  # where the supervisor sends the thread


def slow_tool(name: str, tickets: dict[str, ToolPlan], time_scale: float) -> BaseTool:
    """A `@tool` that takes its planned (time-scaled) seconds and returns its planned text; the
    call's `ticket` argument names the plan."""

    @tool(name)
    async def run(ticket: str) -> str:
        """Runs the named job and returns its output."""
        planned = tickets[ticket]
        await asyncio.sleep(planned.seconds * time_scale)
        return planned.output

    return run


class PlannedModel:
    """The model calls of the nodes: real, of the planned length, recorded in the session."""

    def __init__(self, session: BenchSession, model: KvrtChatModel,
                 plans: dict[str, ThreadPlan]) -> None:
        self.session = session
        self.model = model
        self.plans = plans

    def plan(self, config: RunnableConfig) -> ThreadPlan:
        return self.plans[config["configurable"]["thread_id"]]

    async def call(self, model: Runnable, messages: Sequence[BaseMessage], n: int,
                   config: RunnableConfig, agent: str) -> AIMessage:
        """The thread's `n`-th model call, streamed (EOS ignored, so its work is fixed)."""
        plan, clock = self.plan(config), self.session.clock
        submitted, first, reply = clock(), None, AIMessageChunk(content="")
        async for chunk in model.astream(messages, config, max_tokens=plan.lengths[n],
                                         extra_body={"ignore_eos": True}):
            if first is None and chunk.content:
                first = clock()
            reply += chunk
        finished = clock()
        usage = reply.usage_metadata
        assert usage is not None, "the daemon sends usage with every stream"
        self.session.record(CallRecord(
            job=plan.thread, agent=agent, submitted=submitted,
            first_token=finished if first is None else first, finished=finished,
            prompt_tokens=usage["input_tokens"],
            cached_tokens=usage.get("input_token_details", {}).get("cache_read") or 0,
            completion_tokens=usage["output_tokens"]))
        return AIMessage(content=reply.content)


def with_tool_call(reply: AIMessage, tool_name: str, plan: ThreadPlan, n: int) -> AIMessage:
    """The reply asking for the thread's `n`-th planned tool call."""
    call = tool_call(name=tool_name, args={"ticket": plan.ticket(n)},
                     id=f"call-{plan.thread}-{n}".replace(" ", "-"))
    return AIMessage(content=reply.content, tool_calls=[call])


def react_graph(model: PlannedModel, system: str, run_tests: BaseTool, *, agent: str = "agent",
                turns: int | None = None, first_call: int = 0, first_ticket: int = 0
                ) -> StateGraph:
    """agent -> (tools_condition) tools -> agent ... -> END. Its turn t is the thread's model
    call `first_call + t`, then, for the first `turns` turns (None: one a planned tool of the
    thread), the planned tool call `first_ticket + t`; `agent` names the calls' node in the
    records."""
    bound = model.model.bind_tools([run_tests])

    async def call(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        plan = model.plan(config)
        turn = sum(isinstance(m, AIMessage) for m in state["messages"])
        reply = await model.call(bound, [SystemMessage(system), *state["messages"]],
                                 first_call + turn, config, agent)
        if turn < (len(plan.tools) if turns is None else turns):
            reply = with_tool_call(reply, run_tests.name, plan, first_ticket + turn)
        return {"messages": [reply]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", call)
    builder.add_node("tools", ToolNode([run_tests]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder


def supervisor_graph(model: PlannedModel, system: str, tools: dict[str, BaseTool]
                     ) -> StateGraph:
    """supervisor -> (a router without annotation or path map) a specialist -> supervisor ...
    -> END. The supervisor's call n is 2 * step, a specialist's 2 * step + 1."""

    async def supervisor(state: SupervisorState, config: RunnableConfig) -> dict[str, Any]:
        plan, step = model.plan(config), state.get("step", 0)
        reply = await model.call(model.model, [SystemMessage(f"{system}\nYou lead the team."),
                                               *state["messages"]], 2 * step, config, "supervisor")
        return {"messages": [reply], "step": step,
                "next": plan.route[step] if step < len(plan.route) else END}

    def route(state):  # unannotated on purpose: kvrt must assume it leads to any node
        return state["next"]

    def specialist(name: str) -> Callable[..., Awaitable[dict[str, Any]]]:
        own_tool = tools[name]
        bound = model.model.bind_tools([own_tool])

        async def node(state: SupervisorState, config: RunnableConfig) -> dict[str, Any]:
            plan, step = model.plan(config), state["step"]
            reply = await model.call(bound, [SystemMessage(f"{system}\nYou are the {name}."),
                                             *state["messages"]], 2 * step + 1, config, name)
            if plan.tools[step] is None:
                return {"messages": [reply], "step": step + 1}
            reply = with_tool_call(reply, own_tool.name, plan, step)
            result: ToolMessage = await own_tool.ainvoke(reply.tool_calls[0], config)
            return {"messages": [reply, result], "step": step + 1}

        return node

    builder = StateGraph(SupervisorState)
    builder.add_node("supervisor", supervisor)
    for name in SPECIALISTS:
        builder.add_node(name, specialist(name))
        builder.add_edge(name, "supervisor")
    builder.add_edge(START, "supervisor")
    builder.add_conditional_edges("supervisor", route)
    return builder


def approval_graph(model: PlannedModel, system: str) -> StateGraph:
    """draft -> approve (interrupt: a human's verdict) -> final -> END."""

    async def draft(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        reply = await model.call(model.model, [SystemMessage(f"{system}\nYou draft."),
                                               *state["messages"]], 0, config, "draft")
        return {"messages": [reply]}

    def approve(state: MessagesState) -> dict[str, Any]:
        verdict = interrupt({"draft": state["messages"][-1].content})
        return {"messages": [HumanMessage(f"The reviewer says: {verdict}")]}

    async def final(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        reply = await model.call(model.model, [SystemMessage(f"{system}\nYou draft."),
                                               *state["messages"]], 1, config, "final")
        return {"messages": [reply]}

    builder = StateGraph(MessagesState)
    for name, node in (("draft", draft), ("approve", approve), ("final", final)):
        builder.add_node(name, node)
    builder.add_edge(START, "draft").add_edge("draft", "approve")
    builder.add_edge("approve", "final").add_edge("final", END)
    return builder


class Apps:
    """The three graphs registered on the session's daemon; `play` runs one thread as a job."""

    def __init__(self, workload: LangGraphApps, session: BenchSession,
                 graphs: dict[str, Any]) -> None:
        self.workload = workload
        self.session = session
        self.graphs = graphs

    @classmethod
    async def start(cls, workload: LangGraphApps, session: BenchSession) -> Apps:
        p, system, scale = workload.params, workload.system, session.time_scale
        plans = {plan.thread: plan for plan in workload.plans}
        tickets = {plan.ticket(n): t for plan in workload.plans
                   for n, t in enumerate(plan.tools) if t is not None}
        model = PlannedModel(session, KvrtChatModel(
            base_url=session.client.base_url, temperature=0, max_retries=0,
            timeout=_NO_TIMEOUT_S), plans)
        tools = {name: slow_tool(SPECIALIST_TOOLS[name], tickets, scale) for name in SPECIALISTS}
        mean = (p.min_output_tokens + p.max_output_tokens) // 2
        tool_s = p.tool_median_s * scale

        def agent(role: str, calls: int = 1, tool_name: str | None = None) -> dict[str, Any]:
            return {"system": f"{system}\n{role}", "expected_output_tokens": mean * calls,
                    "tools": {tool_name: tool_s} if tool_name else {}}

        client = session.client
        graphs = {
            "react": await register(
                react_graph(model, system, tools["coder"]).compile(), client, "lg-react",
                agents={"agent": agent("You implement.", p.turns + 1, "run_tests")},
                expected_iterations=p.turns),
            "supervisor": await register(
                supervisor_graph(model, system, tools).compile(), client, "lg-supervisor",
                agents={"supervisor": agent("You lead the team.", p.routes + 1),
                        **{name: agent(f"You are the {name}.", 1, SPECIALIST_TOOLS[name])
                           for name in SPECIALISTS}},
                expected_iterations=max(1, p.routes // len(SPECIALISTS))),
            "approval": await register(
                approval_graph(model, system).compile(checkpointer=InMemorySaver()), client,
                "lg-approval", agents={"draft": agent("You draft."), "final": agent("You draft.")}),
        }
        return cls(workload, session, graphs)

    async def play(self, plan: ThreadPlan) -> None:
        graph, p = self.graphs[plan.app], self.workload.params
        config: RunnableConfig = {"configurable": {"thread_id": plan.thread},
                                  "recursion_limit": 2 * max(p.turns, p.routes) + 10}
        task = {"messages": [HumanMessage(plan.task)]}
        async with self.session.job(plan.thread):
            try:
                result = await graph.ainvoke(task, config)
                if plan.app == "approval":
                    if "__interrupt__" not in result:
                        raise RuntimeError(f"{plan.thread}: the approval did not interrupt")
                    await asyncio.sleep(plan.human_s * self.session.time_scale)
                    await graph.ainvoke(Command(resume="approved"), config)
            finally:
                await close(graph, plan.thread)

    async def stop(self) -> None:
        for graph in self.graphs.values():
            await close_all(graph)  # every thread is closed already: frees the HTTP client
