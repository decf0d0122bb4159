"""LangGraph applications as people write them, against a live tiny daemon: the prebuilt ReAct
agent, ToolNode with tools_condition, routing by Command, interrupt() and resume, a subgraph,
and a sync application. Each comes out as the agents that hold KV, with their tool calls and
waits reported for them, and each thread's invocation ends its agents (agent.done)."""

from __future__ import annotations

import asyncio
import operator
import warnings
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.prebuilt import ToolNode, create_react_agent, tools_condition
from langgraph.types import Command, interrupt

from kvrt.sdk import Client, GraphInfo, RunState
from kvrt.sdk.langgraph import close, close_all_sync, close_sync, register, register_sync
from tests.sdk.langgraph_models import ToolCaller
from tests.sdk.test_langgraph import make_model, run_of, thread
from tests.server.live_server import LiveServer, wait_released


@tool
def lookup(query: str) -> str:
    """Looks the query up."""
    return query.upper()


class Chat(TypedDict):
    messages: Annotated[list, operator.add]


def react_agent(server: LiveServer) -> Any:
    model = ToolCaller(kvrt=make_model(server), tool="lookup", args={"query": "kv"})
    with warnings.catch_warnings():  # moved to langchain.agents; still LangGraph's own
        warnings.simplefilter("ignore")
        return create_react_agent(model, [lookup])


async def declared_and_run(server: LiveServer, compiled: Any, name: str, inputs: Any,
                           key: str, **options: Any) -> tuple[GraphInfo, RunState, Any]:
    """Registers, invokes on thread `key`, reads the run state, closes the thread."""
    async with Client(server.url) as client:
        graph = await register(compiled, client, name=name, **options)
        result = await graph.ainvoke(inputs, thread(key))
        graph_id = graph.config["metadata"]["kvrt_graph_id"]
        state = await run_of(client, graph_id, key)
        await close(graph, key)
        return await client.get_graph(graph_id), state, result


def by_name(state: RunState) -> dict[str, Any]:
    return {a.name: a for a in state.agents}


def test_create_react_agent_is_one_agent_looping_over_its_tools(server: LiveServer) -> None:
    info, state, result = asyncio.run(declared_and_run(
        server, react_agent(server), "react", {"messages": [HumanMessage("What is KV?")]},
        "t-react", agents={"tools": {"tools": {"lookup": 0.5}}}, expected_iterations=3))
    assert [type(m) for m in result["messages"]] == [HumanMessage, AIMessage, ToolMessage,
                                                     AIMessage]
    assert [(a.name, a.tools) for a in info.agents] == [("agent", {"lookup": 0.5})]
    assert [(e.source, e.target, e.expected_iterations) for e in info.edges] == [
        ("agent", "agent", 3)]
    [agent] = state.agents
    # Two model calls (ask, then answer), the tool call between them, then done.
    assert (agent.calls, agent.tool_calls, agent.state) == (2, 1, "done")
    assert state.event_count == 3
    [estimate] = state.tools
    assert (estimate.agent, estimate.tool, estimate.declared_seconds,
            estimate.observations) == ("agent", "lookup", 0.5, 1)
    wait_released(server)


def test_tools_condition_through_a_tool_node_and_a_router_to_another_agent(
        server: LiveServer) -> None:
    """agent -> (tools_condition) tools -> agent, and when done a router without annotations
    sends it to `report`: declared as agent -> agent, agent -> report, and report -> every
    agent (its router may lead anywhere)."""
    model = make_model(server)
    caller = ToolCaller(kvrt=model, tool="lookup", args={"query": "kv"})

    async def agent(state: Chat) -> dict[str, Any]:
        return {"messages": [await caller.ainvoke(state["messages"])]}

    async def report(state: Chat) -> dict[str, Any]:
        return {"messages": [await model.ainvoke("Report.")]}

    def route(state: Chat):
        return END

    builder = StateGraph(Chat)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([lookup]))
    builder.add_node("report", report)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: "report"})
    builder.add_edge("tools", "agent")
    builder.add_conditional_edges("report", route)
    info, state, result = asyncio.run(declared_and_run(
        server, builder.compile(), "condition", {"messages": [HumanMessage("Go.")]}, "t-cond"))
    assert len(result["messages"]) == 5
    assert [a.name for a in info.agents] == ["agent", "report"]
    assert {(e.source, e.target) for e in info.edges} == {
        ("agent", "agent"), ("agent", "report"), ("report", "agent"), ("report", "report")}
    agents = by_name(state)
    assert (agents["agent"].calls, agents["agent"].tool_calls) == (2, 1)
    assert (agents["report"].calls, agents["report"].tool_calls) == (1, 0)
    assert {a.state for a in state.agents} == {"done"} and state.event_count == 4
    wait_released(server)


def test_a_router_without_annotations_is_learned_from_the_threads_that_ran(
        server: LiveServer) -> None:
    """supervisor -> (a router that says nothing) -> researcher or writer -> END. Declared, the
    router may lead to every node: one loop, every agent on the critical path. Each thread
    takes the researcher; after a few threads the writer's branch (never taken) fades: the
    graph's GET shows the learned edges, and a fresh run's writer has a lower priority than
    the researcher, which it did not have before."""
    model = make_model(server)

    async def supervisor(state: Chat) -> dict[str, Any]:
        return {"messages": [(await model.ainvoke("Whom next?")).content]}

    async def researcher(state: Chat) -> dict[str, Any]:
        return {"messages": [(await model.ainvoke("Research.")).content]}

    async def writer(state: Chat) -> dict[str, Any]:
        return {"messages": [(await model.ainvoke("Write.")).content]}

    def route(state: Chat):
        return "researcher"

    builder = StateGraph(Chat)
    for name, node in (("supervisor", supervisor), ("researcher", researcher),
                       ("writer", writer)):
        builder.add_node(name, node)
    builder.add_edge(START, "supervisor")
    builder.add_conditional_edges("supervisor", route)
    builder.add_edge("researcher", END)
    builder.add_edge("writer", END)

    async def go() -> tuple[GraphInfo, GraphInfo]:
        async with Client(server.url) as client:
            graph = await register(builder.compile(), client, name="learned-router")
            graph_id = graph.config["metadata"]["kvrt_graph_id"]
            before = await client.get_graph(graph_id)
            for k in range(4):
                await graph.ainvoke({"messages": []}, thread(f"t-learn-{k}"))
                await close(graph, f"t-learn-{k}")
            return before, await client.get_graph(graph_id)

    before, after = asyncio.run(go())
    priority = {a.name: a.priority for a in before.agents}
    assert priority["writer"] == priority["researcher"] == 1.0  # one loop: all critical
    learned = {(t.source, t.target): t for t in after.transitions}
    assert learned["supervisor", "researcher"].count == 4
    assert learned["supervisor", "writer"].count == 0 and not learned["supervisor", "writer"].likely
    assert learned["researcher", "__end__"].count == 4 and after.episodes == 4
    priority = {a.name: a.priority for a in after.agents}
    assert priority["writer"] < priority["researcher"] == 1.0
    wait_released(server)


def test_routing_by_command_alone_may_lead_to_every_node(server: LiveServer) -> None:
    model = make_model(server)

    async def triage(state: Chat) -> Command:
        await model.ainvoke("Who handles this?")
        return Command(goto="billing", update={"messages": ["triaged"]})

    async def billing(state: Chat) -> dict[str, Any]:
        return {"messages": [await model.ainvoke("Bill it.")]}

    async def support(state: Chat) -> dict[str, Any]:
        return {"messages": [await model.ainvoke("Support it.")]}

    builder = StateGraph(Chat)
    builder.add_node("triage", triage)
    builder.add_node("billing", billing)
    builder.add_node("support", support, destinations=("billing",))
    builder.add_edge(START, "triage")
    builder.add_edge("billing", END)
    info, state, result = asyncio.run(declared_and_run(
        server, builder.compile(), "command", {"messages": []}, "t-command"))
    assert result["messages"][0] == "triaged"
    assert {(e.source, e.target) for e in info.edges} == {
        ("triage", "triage"), ("triage", "billing"), ("triage", "support"),
        ("support", "billing")}  # support's Command destinations were declared
    agents = by_name(state)
    assert [agents[n].calls for n in ("triage", "billing", "support")] == [1, 1, 0]
    assert [agents[n].state for n in ("triage", "billing", "support")] == ["done", "done",
                                                                          "idle"]
    assert state.event_count == 2
    wait_released(server)


def test_an_interrupt_is_a_wait_of_its_agent_and_resuming_ends_it(server: LiveServer) -> None:
    model = make_model(server)
    cached: list[int] = []  # prompt tokens the draft's first call found cached, each time

    async def draft(state: Chat) -> dict[str, Any]:
        first = await model.ainvoke("Draft the refund letter. " * 20)
        cached.append(first.usage_metadata["input_token_details"].get("cache_read") or 0)
        verdict = interrupt("Send it?")  # the first time raises; the resume re-runs the node
        return {"messages": [first.content, verdict, (await model.ainvoke("Send.")).content]}

    async def send(state: Chat) -> dict[str, Any]:
        return {"messages": [(await model.ainvoke("Sent.")).content]}

    builder = StateGraph(Chat)
    builder.add_node("draft", draft)
    builder.add_node("send", send)
    builder.add_edge(START, "draft")
    builder.add_edge("draft", "send")
    compiled = builder.compile(checkpointer=InMemorySaver())

    async def go() -> tuple[RunState, RunState, RunState]:
        async with Client(server.url) as client:
            graph = await register(compiled, client, name="interrupt")
            graph_id = graph.config["metadata"]["kvrt_graph_id"]
            paused = await graph.ainvoke({"messages": []}, thread("t-int"))
            assert [i.value for i in paused["__interrupt__"]] == ["Send it?"]
            waiting = await run_of(client, graph_id, "t-int")
            result = await graph.ainvoke(Command(resume="yes"), thread("t-int"))
            assert result["messages"][1] == "yes" and len(result["messages"]) == 4
            finished = await run_of(client, graph_id, "t-int")
            await graph.ainvoke(Command(resume="again"), thread("t-int"))  # nothing to resume
            after = await run_of(client, graph_id, "t-int")
            await close(graph, "t-int")
            return waiting, finished, after

    waiting, finished, after = asyncio.run(go())
    draft_state = by_name(waiting)["draft"]
    assert (draft_state.state, draft_state.waiting, draft_state.calls) == (
        "waiting", "interrupt", 1)
    assert by_name(waiting)["send"].state == "idle" and waiting.event_count == 1
    assert finished.id == waiting.id  # the resumed thread is the same run
    # The resumed node ran again from its start: its first call again, then the second.
    assert [by_name(finished)[n].calls for n in ("draft", "send")] == [3, 1]
    assert [a.state for a in finished.agents] == ["done", "done"]
    assert finished.event_count == 4  # waiting, resumed, two dones
    assert [t.tool for t in finished.tools] == ["wait:interrupt"]  # the wait was learned
    # The resumed node's first call found the KV its first run left (whole blocks of 16).
    assert cached[0] == 0 and cached[1] >= 16 * 3
    assert after.event_count == 4 and after.id == waiting.id
    wait_released(server)


def test_an_interrupt_in_a_review_node_is_a_wait_of_the_agents_it_reviews(
        server: LiveServer) -> None:
    """draft (a model call) -> review (interrupt(), no model call) -> final. While the thread
    waits for its person, the draft's KV waits too: both are reported waiting, both resumed."""
    model = make_model(server)

    async def draft(state: Chat) -> dict[str, Any]:
        return {"messages": [(await model.ainvoke("Draft the reply.")).content]}

    def review(state: Chat) -> dict[str, Any]:
        return {"messages": [interrupt("Send it?")]}

    async def final(state: Chat) -> dict[str, Any]:
        return {"messages": [(await model.ainvoke("Send.")).content]}

    builder = StateGraph(Chat)
    for name, node in (("draft", draft), ("review", review), ("final", final)):
        builder.add_node(name, node)
    builder.add_edge(START, "draft")
    builder.add_edge("draft", "review")
    builder.add_edge("review", "final")
    compiled = builder.compile(checkpointer=InMemorySaver())

    async def go() -> tuple[RunState, RunState]:
        async with Client(server.url) as client:
            graph = await register(compiled, client, name="review")
            graph_id = graph.config["metadata"]["kvrt_graph_id"]
            await graph.ainvoke({"messages": []}, thread("t-review"))
            waiting = await run_of(client, graph_id, "t-review")
            await graph.ainvoke(Command(resume="yes"), thread("t-review"))
            finished = await run_of(client, graph_id, "t-review")
            await close(graph, "t-review")
            return waiting, finished

    waiting, finished = asyncio.run(go())
    assert [(a.name, a.state, a.waiting) for a in waiting.agents] == [
        ("draft", "waiting", "interrupt"), ("review", "waiting", "interrupt"),
        ("final", "idle", None)]
    assert [(a.name, a.state, a.calls) for a in finished.agents] == [
        ("draft", "done", 1), ("review", "done", 0), ("final", "done", 1)]
    assert finished.event_count == 7  # 2 waiting, 2 resumed, 3 done
    wait_released(server)


def test_a_subgraph_node_is_its_inner_nodes(server: LiveServer) -> None:
    model = make_model(server)

    def calls(prompt: str) -> Any:
        async def node(state: Chat) -> dict[str, Any]:
            return {"messages": [(await model.ainvoke(prompt)).content]}
        return node

    inner = StateGraph(Chat)
    inner.add_node("think", calls("Think."))
    inner.add_node("check", calls("Check."))
    inner.add_edge(START, "think")
    inner.add_edge("think", "check")
    inner.add_edge("check", END)  # without it, check might route anywhere (by Command)
    outer = StateGraph(Chat)
    outer.add_node("prep", calls("Prepare."))
    outer.add_node("solve", inner.compile())
    outer.add_node("write", calls("Write."))
    outer.add_edge(START, "prep")
    outer.add_edge("prep", "solve")
    outer.add_edge("solve", "write")
    outer.add_edge("write", END)
    info, state, _ = asyncio.run(declared_and_run(
        server, outer.compile(), "nested", {"messages": []}, "t-sub"))
    names = ["prep", "solve/think", "solve/check", "write"]
    assert [a.name for a in info.agents] == names
    assert [(e.source, e.target) for e in info.edges] == list(zip(names, names[1:]))
    assert [by_name(state)[n].calls for n in names] == [1, 1, 1, 1]
    assert {a.state for a in state.agents} == {"done"}
    wait_released(server)


def test_a_sync_application_never_touches_asyncio(server: LiveServer) -> None:
    graph = register_sync(react_agent(server), server.url, name="react-sync")
    graph_id = graph.config["metadata"]["kvrt_graph_id"]
    assert register_sync(graph, server.url) is graph
    result = graph.invoke({"messages": [HumanMessage("What is KV?")]}, thread("t-sync"))
    assert len(result["messages"]) == 4
    [info] = server.request("GET", f"/v1/runs?graph_id={graph_id}&key=t-sync").json()["data"]
    state = server.request("GET", f"/v1/runs/{info['id']}").json()
    [agent] = state["agents"]
    assert (agent["calls"], agent["tool_calls"], agent["state"]) == (2, 1, "done")
    assert close_sync(graph, "t-sync").id == info["id"]
    assert close_sync(graph, "t-sync") is None
    graph.invoke({"messages": [HumanMessage("Again.")]}, thread("t-sync-2"))
    assert [c.released_blocks >= 0 for c in close_all_sync(graph)] == [True]
    assert server.request("GET", f"/v1/runs?graph_id={graph_id}").json()["data"] == []
    wait_released(server)


def test_tool_options_on_a_tool_node_are_its_tools_seconds_only(server: LiveServer) -> None:
    from kvrt.sdk.langgraph import agent_graph

    with pytest.raises(ValueError, match="ToolNode"):
        agent_graph(react_agent(server), "g", agents={"tools": {"system": "no"}})
