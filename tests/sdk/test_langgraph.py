"""The LangGraph adapter against the real langgraph package and a live tiny daemon: a compiled
graph is declared node for node, each thread is one run, each node's model calls and tool calls
are attributed to it, and closing the runs returns the KV accounting to zero."""

from __future__ import annotations

import asyncio
import logging
import operator
import threading
from collections import Counter
from typing import Annotated, Any, Literal, TypedDict

import openai
import pytest
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import Send

from kvrt.sdk import Client, GraphInfo, RunState
from kvrt.sdk.langgraph import (
    KvrtChatModel,
    agent_graph,
    close,
    close_all,
    close_all_sync,
    register,
    register_sync,
    tool_call,
)
from kvrt.sdk.langgraph.declare import annotated_names
from kvrt.sdk.protocol.control import MAX_PAGE_LIMIT
from tests.server.live_server import LiveServer, wait_released

TOKENS = 4  # every call generates exactly this many (ignore_eos)


class Did:
    """What the nodes did, counted by the nodes themselves (sync nodes run on worker threads)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.tools: Counter[str] = Counter()
        self._lock = threading.Lock()

    def call(self, node: str) -> None:
        with self._lock:
            self.calls[node] += 1

    def tool(self, node: str) -> None:
        with self._lock:
            self.tools[node] += 1


@tool
def lookup(query: str) -> str:
    """Looks the query up."""
    return query.upper()


@tool
def shout(query: str) -> str:
    """Says the query out loud."""
    return query + "!"


@tool
def flaky(query: str) -> str:
    """Always fails."""
    raise RuntimeError("the service is down")


class State(TypedDict):
    round: int
    notes: Annotated[list[str], operator.add]


def research(model: KvrtChatModel, did: Did) -> StateGraph:
    """plan -> Send fan-out to 2 x search -> write -> (path map) plan again or review ->
    (a branch without ends) END. Two rounds of the loop: plan 2, search 4, write 2, review 1."""

    async def plan(state: State, config: RunnableConfig) -> dict[str, Any]:
        await model.ainvoke("Plan the research.")
        did.call("plan")
        await lookup.ainvoke({"query": "kv cache"}, config)  # a LangChain tool in a node
        did.tool("plan")
        return {"round": state["round"] + 1}

    def fan_out(state: State) -> list[Send]:
        return [Send("search", {"round": state["round"], "notes": [topic]})
                for topic in ("paging", "prefix caching")]

    def search(state: State) -> dict[str, Any]:  # sync: LangGraph runs it on a worker thread
        reply = model.invoke(f"Search {state['notes'][0]}.")
        did.call("search")
        return {"notes": [reply.content]}

    async def write(state: State) -> dict[str, Any]:
        text = "".join([chunk.content async for chunk in model.astream("Write it up.")])
        did.call("write")
        try:
            async with tool_call("fetch", expected_s=0.5):
                did.tool("write")
                raise ConnectionError("the fetch failed")  # its finish is still sent
        except ConnectionError:
            pass
        return {"notes": [text]}

    def more(state: State) -> str:
        return "again" if state["round"] < 2 else "done"

    async def review(state: State, config: RunnableConfig) -> dict[str, Any]:
        "".join(chunk.content for chunk in model.stream("Review."))  # sync stream, async node
        did.call("review")
        with pytest.raises(RuntimeError):
            await flaky.ainvoke({"query": "x"}, config)  # the tool's error ends its call too
        did.tool("review")
        return {}

    def finish(state: State):  # no annotation, no path map: get_graph() draws only -> END
        return END

    builder = StateGraph(State)
    for name, node in (("plan", plan), ("search", search), ("write", write),
                       ("review", review)):
        builder.add_node(name, node)
    builder.add_edge(START, "plan")
    builder.add_conditional_edges("plan", fan_out, ["search"])
    builder.add_edge("search", "write")
    builder.add_conditional_edges("write", more, {"again": "plan", "done": "review"})
    builder.add_conditional_edges("review", finish)
    return builder


NODES = ["plan", "search", "write", "review"]
EDGES = {("plan", "search"), ("search", "write"), ("write", "plan"), ("write", "review")} | {
    ("review", node) for node in NODES}  # the branch without ends may lead anywhere


def make_model(server: LiveServer, **options: Any) -> KvrtChatModel:
    return KvrtChatModel(base_url=server.url, max_tokens=TOKENS, temperature=0,
                         extra_body={"ignore_eos": True}, **options)


def thread(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id}}


async def run_of(client: Client, graph_id: str, key: str) -> RunState:
    [info] = await client.list_runs(graph_id, key=key)
    return await client.run(info, await client.get_graph(graph_id)).state()


def assert_attributed(state: RunState, did: Did, invocations: int = 1) -> None:
    """Exactly the nodes as agents, each with the calls it made and one event pair per tool
    call (a start whose finish never came would leave the agent in tool_call), and each done
    once per invocation of the thread (all of them worked in each)."""
    assert [a.name for a in state.agents] == NODES
    by = {a.name: a for a in state.agents}
    assert {n: by[n].calls for n in NODES} == {n: did.calls[n] for n in NODES}
    assert {n: by[n].generated_tokens for n in NODES} == {
        n: did.calls[n] * TOKENS for n in NODES}
    assert {n: by[n].tool_calls for n in NODES} == {n: did.tools[n] for n in NODES}
    assert state.event_count == 2 * sum(did.tools.values()) + invocations * len(NODES)
    assert all(a.state == "done" and a.tool is None and a.requests == 0 for a in state.agents)


# ---- declaring the graph -------------------------------------------------------------------


def test_a_declaration_is_found_again_past_the_first_page_of_graphs(server: LiveServer) -> None:
    async def go() -> tuple[str, list[str]]:
        async with Client(server.url) as client:
            others = [(await client.create_graph(agent_graph(
                research(make_model(server), Did()).compile(), f"other{i}").spec())).id
                for i in range(MAX_PAGE_LIMIT + 1)]
            first = await register(research(make_model(server), Did()).compile(), client,
                                   name="paged")  # declared after the others: on page two
            again = await register(research(make_model(server), Did()).compile(), client,
                                   name="paged")
            assert kvrt_graph_id(again) == kvrt_graph_id(first)
            return kvrt_graph_id(first), others

    graph_id, others = asyncio.run(go())
    # The blocking registration reads the listing a page at a time too.
    bound = register_sync(research(make_model(server), Did()).compile(), server.url,
                          name="paged")
    assert kvrt_graph_id(bound) == graph_id
    close_all_sync(bound)  # no runs; closes its blocking client

    async def tidy() -> None:
        async with Client(server.url) as client:
            for other in [*others, graph_id]:
                await client.delete_graph(other)

    asyncio.run(tidy())


def kvrt_graph_id(graph: Any) -> str:
    return graph.config["metadata"]["kvrt_graph_id"]


def test_register_declares_the_nodes_and_every_possible_edge(server: LiveServer) -> None:
    compiled = research(make_model(server), Did()).compile()

    async def go() -> tuple[GraphInfo, Any, list[GraphInfo]]:
        async with Client(server.url) as client:
            graph = await register(compiled, client, name="declared",
                                   agents={"plan": {"system": "You plan."}},
                                   expected_iterations=3)
            again = await register(research(make_model(server), Did()).compile(), client,
                                   name="declared", agents={"plan": {"system": "You plan."}},
                                   expected_iterations=3)
            assert await register(graph, client) is graph
            return (await client.get_graph(graph.config["metadata"]["kvrt_graph_id"]), again,
                    await client.list_graphs())

    info, again, graphs = asyncio.run(go())
    assert [a.name for a in info.agents] == NODES
    assert {(e.source, e.target) for e in info.edges} == EDGES
    assert info.agents[0].system == "You plan."
    # Every edge is on the loop through review (its branch may lead back to plan).
    assert {e.expected_iterations for e in info.edges} == {3}
    # The same compiled graph registered again reuses the declaration; a registered graph
    # registered again comes back as it is.
    assert [g.id for g in graphs if g.name == "declared"] == [info.id]
    assert again.config["metadata"]["kvrt_graph_id"] == info.id


def test_branch_targets_come_from_literal_annotations_else_every_node() -> None:
    def union(state: Any) -> Literal["a"] | Literal["b"]: ...  # LangGraph infers no ends here

    def listed(state: Any) -> list[Literal["a", "__end__"]]: ...

    def any_name(state: Any) -> str: ...

    def unannotated(state: Any): ...

    assert annotated_names(union) == {"a", "b"}
    assert annotated_names(listed) == {"a", "__end__"}
    assert annotated_names(any_name) is None and annotated_names(unannotated) is None

    class S(TypedDict):
        x: int

    builder = StateGraph(S)
    for name in ("a", "b", "c"):
        builder.add_node(name, lambda state: {})
    builder.add_edge(START, "a")
    builder.add_conditional_edges("a", union)
    builder.add_conditional_edges("b", listed)
    builder.add_conditional_edges("c", unannotated)
    edges = {(s, t) for s, t in agent_graph(builder.compile(), "g").edges}
    assert edges == {("a", "a"), ("a", "b"), ("b", "a"), ("c", "a"), ("c", "b"), ("c", "c")}


def test_agent_options_must_name_nodes(server: LiveServer) -> None:
    with pytest.raises(ValueError, match="nope"):
        agent_graph(research(make_model(server), Did()).compile(), "g", agents={"nope": {}})


# ---- runs by thread --------------------------------------------------------------------------


def test_a_thread_is_one_run_with_each_node_attributed(server: LiveServer) -> None:
    did = Did()
    builder = research(make_model(server), did)

    async def go() -> tuple[RunState, list[Any]]:
        async with Client(server.url) as client:
            graph = await register(builder.compile(), client, name="attributed")
            graph_id = graph.config["metadata"]["kvrt_graph_id"]
            result = await graph.ainvoke({"round": 0, "notes": []}, thread("t-main"))
            assert result["round"] == 2 and len(result["notes"]) == 6
            state = await run_of(client, graph_id, "t-main")
            closed = await close_all(graph)
            assert await client.list_runs(graph_id) == []
            return state, closed

    state, closed = asyncio.run(go())
    assert dict(did.calls) == {"plan": 2, "search": 4, "write": 2, "review": 1}
    assert dict(did.tools) == {"plan": 2, "write": 2, "review": 1}
    assert_attributed(state, did)
    assert state.key == "t-main" and [c.id for c in closed] == [state.id]
    # Each agent's KV was accounted to it, and closing the run let go of what it alone held.
    assert all(a.kv.device_blocks > 0 for a in state.agents)
    assert closed[0].released_blocks > 0
    wait_released(server)


def test_concurrent_threads_get_their_own_runs_and_a_thread_keeps_its_run(
        server: LiveServer) -> None:
    did = {"t-a": Did(), "t-b": Did()}
    models = {key: make_model(server) for key in did}

    async def go() -> None:
        async with Client(server.url) as client:
            graphs = {key: await register(research(models[key], did[key]).compile(), client,
                                          name="threads") for key in did}
            [graph_id] = {g.config["metadata"]["kvrt_graph_id"] for g in graphs.values()}
            await asyncio.gather(*(graphs[key].ainvoke({"round": 0, "notes": []}, thread(key))
                                   for key in did))
            runs = {key: await run_of(client, graph_id, key) for key in did}
            assert runs["t-a"].id != runs["t-b"].id
            for key in did:
                assert_attributed(runs[key], did[key])

            await graphs["t-a"].ainvoke({"round": 0, "notes": []}, thread("t-a"))
            again = await run_of(client, graph_id, "t-a")
            assert again.id == runs["t-a"].id  # the same thread, the same run
            assert_attributed(again, did["t-a"], 2)  # counts doubled, in that one run
            assert did["t-a"].calls["search"] == 8

            for key in did:
                assert (await close(graphs[key], key)).id == runs[key].id
                assert await close(graphs[key], key) is None  # nothing left to close
            assert await client.list_runs(graph_id) == []

    asyncio.run(go())
    wait_released(server)


def test_close_finds_a_run_this_process_never_used(server: LiveServer) -> None:
    async def go() -> None:
        async with Client(server.url) as client:
            graph = await register(research(make_model(server), Did()).compile(), client,
                                   name="elsewhere")
            graph_id = graph.config["metadata"]["kvrt_graph_id"]
            run = await client.start_run(graph_id, key="started-elsewhere")
            closed = await close(graph, "started-elsewhere")
            assert closed is not None and closed.id == run.id
            assert await client.list_runs(graph_id) == []

    asyncio.run(go())


def test_a_sync_graph_reports_through_the_sync_paths(server: LiveServer) -> None:
    """graph.invoke: sync nodes, sync model calls and sync tool callbacks, on a thread that
    has no event loop (the client's loop is free meanwhile)."""
    model, did = make_model(server), Did()

    def ask(state: State) -> dict[str, Any]:
        reply = model.invoke("Ask.")
        did.call("ask")
        text = "".join(chunk.content for chunk in model.stream("Ask again."))
        did.call("ask")
        return {"notes": [reply.content, text]}

    def act(state: State) -> dict[str, Any]:
        lookup.invoke({"query": "x"})
        did.tool("act")
        return {}

    builder = StateGraph(State)
    builder.add_node("ask", ask)
    builder.add_node("act", act)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", "act")
    builder.add_edge("act", END)

    async def go() -> RunState:
        async with Client(server.url) as client:
            graph = await register(builder.compile(), client, name="sync")
            await asyncio.to_thread(graph.invoke, {"round": 0, "notes": []}, thread("t-sync"))
            state = await run_of(client, graph.config["metadata"]["kvrt_graph_id"], "t-sync")
            await close(graph, "t-sync")
            return state

    state = asyncio.run(go())
    by = {a.name: a for a in state.agents}
    assert (by["ask"].calls, by["ask"].tool_calls) == (2, 0)
    assert (by["act"].calls, by["act"].tool_calls) == (0, 1)
    assert state.event_count == 4  # the tool call's two, and each agent's done
    assert {a.state for a in state.agents} == {"done"}
    wait_released(server)


def test_tool_node_runs_are_the_tool_calls_of_the_agent_that_asked(server: LiveServer) -> None:
    """ToolNode runs the tools an AI message asks for (at once); each is a tool call of the
    node whose output asked for it (here the node builds the message itself), not of the
    ToolNode, which is no agent. (Overlapping calls of one tool by one agent count once: the
    daemon tracks one call per agent and tool at a time.)"""
    model = make_model(server)

    class Chat(TypedDict):
        messages: Annotated[list, operator.add]

    async def agent(state: Chat) -> dict[str, Any]:
        await model.ainvoke("Which tools?")
        calls = [{"name": name, "args": {"query": "kv"}, "id": f"call-{name}"}
                 for name in ("lookup", "shout")]
        return {"messages": [AIMessage(content="", tool_calls=calls)]}

    builder = StateGraph(Chat)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([lookup, shout]))
    builder.add_edge(START, "agent")
    builder.add_edge("agent", "tools")
    builder.add_edge("tools", END)

    async def go() -> tuple[GraphInfo, RunState, list[Any]]:
        async with Client(server.url) as client:
            graph = await register(builder.compile(), client, name="toolnode")
            result = await graph.ainvoke({"messages": []}, thread("t-tools"))
            graph_id = graph.config["metadata"]["kvrt_graph_id"]
            state = await run_of(client, graph_id, "t-tools")
            await close(graph, "t-tools")
            return await client.get_graph(graph_id), state, result["messages"]

    info, state, messages = asyncio.run(go())
    assert [m.content for m in messages[1:]] == ["KV", "kv!"]
    assert [a.name for a in info.agents] == ["agent"] and info.edges == []
    [agent_state] = state.agents
    assert (agent_state.calls, agent_state.tool_calls, agent_state.state) == (1, 2, "done")
    assert state.event_count == 5  # two starts, two finishes, the done
    assert {(t.agent, t.tool, t.observations) for t in state.tools} == {
        ("agent", "lookup", 1), ("agent", "shout", 1)}
    wait_released(server)


# ---- the model -------------------------------------------------------------------------------


def test_the_model_outside_a_graph_is_plain(server: LiveServer) -> None:
    model = make_model(server)
    before = server.request("GET", "/v1/runs").json()["data"]
    reply = model.invoke("What is a KV cache?")
    assert isinstance(reply, AIMessage) and reply.usage_metadata["output_tokens"] == TOKENS
    assert reply.response_metadata["model_name"] == "tiny"  # the served model, asked for none
    # Greedy: the streamed tokens are the plain reply's, sync and async.
    chunks = list(model.stream("What is a KV cache?"))
    assert len(chunks) > 1 and "".join(c.content for c in chunks) == reply.content

    async def astream() -> str:
        return "".join([c.content async for c in model.astream("What is a KV cache?")])

    assert asyncio.run(astream()) == reply.content
    assert asyncio.run(model.ainvoke("What is a KV cache?")).content == reply.content
    bound = model.bind_tools([lookup])  # the daemon ignores `tools` until it serves them
    assert isinstance(bound.invoke("Look up paging."), AIMessage)
    assert server.request("GET", "/v1/runs").json()["data"] == before  # no run was touched


def test_the_model_in_an_unregistered_graph_is_plain(server: LiveServer) -> None:
    model = make_model(server)

    async def node(state: State) -> dict[str, Any]:
        return {"notes": [(await model.ainvoke("Hi.")).content]}

    builder = StateGraph(State)
    builder.add_node("node", node)
    builder.add_edge(START, "node")
    result = asyncio.run(builder.compile().ainvoke({"round": 0, "notes": []}, thread("plain")))
    assert len(result["notes"]) == 1
    assert server.request("GET", "/v1/runs?key=plain").json()["data"] == []


def test_a_graph_invoked_without_a_thread_is_unattributed(server: LiveServer, caplog) -> None:
    did = Did()

    async def go() -> list[Any]:
        async with Client(server.url) as client:
            graph = await register(research(make_model(server), did).compile(), client,
                                   name="threadless")
            with caplog.at_level(logging.WARNING, logger="kvrt.sdk.langgraph.binding"):
                await graph.ainvoke({"round": 0, "notes": []})
            return await client.list_runs(graph.config["metadata"]["kvrt_graph_id"])

    assert asyncio.run(go()) == []
    assert did.calls["search"] == 4  # the graph ran
    assert sum("without a thread_id" in r.message for r in caplog.records) == 1  # warned once


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_the_base_url_may_end_in_v1(server: LiveServer, suffix: str) -> None:
    model = KvrtChatModel(base_url=server.url + suffix, model="tiny", max_tokens=1)
    assert model.openai_api_base == server.url + "/v1"
    assert model.invoke("Hi.").usage_metadata["output_tokens"] == 1


def test_an_unknown_model_is_refused(server: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        KvrtChatModel(base_url=server.url, model="no-such-model", max_retries=0).invoke("Hi.")
