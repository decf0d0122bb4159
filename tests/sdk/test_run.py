"""Runs through the SDK against the real daemon: attributed chat and streaming, tool-call
reports, event deduplication, closing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from kvrt.sdk import Client, Graph, GraphInfo, KvrtError, Run
from kvrt.sdk.protocol.control import MAX_PAGE_LIMIT, AgentState, RunState, ToolEstimate
from tests.server.live_server import LiveServer

# Long enough to span more than one 16-token KV block, so a repeat can hit the prefix cache.
PLANNER_SYSTEM = ("You plan research for a team of agents. Each agent reads the notes of the "
                  "agents before it, then writes its own.")
QUESTION = [{"role": "user", "content": "What is a KV cache?"}]
GREEDY: dict[str, Any] = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def graph(server: LiveServer) -> Iterator[GraphInfo]:
    g = Graph("sdk-runs")
    g.agent("planner", PLANNER_SYSTEM).agent("searcher", tools={"web_search": 0.5})
    g.agent("writer").edge("planner", "searcher").edge("searcher", "writer")

    async def create() -> GraphInfo:
        async with Client(server.url) as client:
            return await client.create_graph(g)

    yield asyncio.run(create())


def with_run(server: LiveServer, graph: GraphInfo,
             body: Callable[[Client, Run], Awaitable[None]]) -> None:
    """Runs `body(client, run)` on a fresh run of `graph`, closed afterwards."""

    async def go() -> None:
        async with Client(server.url) as client, await client.start_run(graph) as run:
            await body(client, run)

    asyncio.run(go())


def agent_state(state: RunState, name: str) -> AgentState:
    [agent] = [a for a in state.agents if a.name == name]
    return agent


def estimate_of(state: RunState) -> ToolEstimate:
    [estimate] = [t for t in state.tools if (t.agent, t.tool) == ("searcher", "web_search")]
    return estimate


def test_chat_is_attributed_to_the_agent(server: LiveServer, graph: GraphInfo) -> None:
    async def body(client: Client, run: Run) -> None:
        assert run.graph_id == graph.id and run.graph == graph
        reply = await run.agent("writer").chat(QUESTION, **GREEDY)
        assert reply.id and isinstance(reply.content, str) and reply.finish_reason == "length"
        assert reply.usage.completion_tokens == 4 and reply.usage.prompt_tokens > 0
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + 4
        state = await run.state()
        assert (state.id, state.graph_id) == (run.id, graph.id)
        writer = agent_state(state, "writer")
        assert writer.state == "idle" and writer.requests == 0
        assert writer.generated_tokens == 4
        assert agent_state(state, "planner").generated_tokens == 0

    with_run(server, graph, body)


def test_declared_system_prompt_is_used(server: LiveServer, graph: GraphInfo) -> None:
    """planner's calls carry its declared system prompt unless the messages bring their own."""

    async def body(client: Client, run: Run) -> None:
        planner = run.agent("planner")
        assert planner.system == PLANNER_SYSTEM and run.agent("writer").system is None
        declared = await planner.chat(QUESTION, **GREEDY)
        explicit = await client.chat(
            [{"role": "system", "content": PLANNER_SYSTEM}, *QUESTION], **GREEDY)
        assert declared.content == explicit.content
        assert declared.usage.prompt_tokens == explicit.usage.prompt_tokens
        assert explicit.usage.cached_tokens > 0  # the same prompt again hits the prefix cache
        own = [{"role": "system", "content": "Be brief."}, *QUESTION]
        mine = await planner.chat(own, **GREEDY)
        assert mine.usage.prompt_tokens == (await client.chat(own, **GREEDY)).usage.prompt_tokens
        assert mine.usage.prompt_tokens < declared.usage.prompt_tokens

    with_run(server, graph, body)


def test_stream_matches_the_plain_reply(server: LiveServer, graph: GraphInfo) -> None:
    async def body(client: Client, run: Run) -> None:
        writer = run.agent("writer")
        stream = writer.stream(QUESTION, **{**GREEDY, "max_tokens": 6})
        deltas = [delta async for delta in stream]
        assert deltas and all(isinstance(d, str) and d for d in deltas)
        assert "".join(deltas) == stream.text
        assert stream.finish_reason == "length" and stream.id
        assert stream.usage is not None and stream.usage.completion_tokens == 6
        plain = await writer.chat(QUESTION, **{**GREEDY, "max_tokens": 6})
        assert plain.content == stream.text
        assert plain.usage.prompt_tokens == stream.usage.prompt_tokens
        assert agent_state(await run.state(), "writer").generated_tokens == 12

    with_run(server, graph, body)


def test_stream_closed_early(server: LiveServer, graph: GraphInfo) -> None:
    async def body(client: Client, run: Run) -> None:
        # 700 tokens take the tiny model most of a second; closing after the first aborts it.
        async with run.agent("writer").stream(QUESTION, max_tokens=700, ignore_eos=True) as s:
            async for _ in s:
                break
        assert s.usage is None and s.finish_reason is None and s.text
        await asyncio.sleep(0.2)  # the daemon notices the disconnect and aborts the request
        writer = agent_state(await run.state(), "writer")
        assert writer.requests == 0 and writer.generated_tokens < 700

    with_run(server, graph, body)


def test_unknown_agent_is_a_404(server: LiveServer, graph: GraphInfo) -> None:
    async def body(client: Client, run: Run) -> None:
        ghost = run.agent("ghost")
        with pytest.raises(KvrtError) as caught:
            await ghost.chat(QUESTION, **GREEDY)
        assert caught.value.status == 404
        with pytest.raises(KvrtError) as caught:
            async for _ in ghost.stream(QUESTION, **GREEDY):
                pass
        assert caught.value.status == 404
        with pytest.raises(KvrtError) as caught:
            await ghost.done()
        assert (caught.value.status, caught.value.code) == (404, "agent_not_found")

    with_run(server, graph, body)


def test_tool_call_reports_start_and_finish(server: LiveServer, graph: GraphInfo) -> None:
    async def body(client: Client, run: Run) -> None:
        searcher = run.agent("searcher")
        observed = estimate_of(await run.state()).observations  # in every run of the graph
        async with searcher.tool_call("web_search", expected_duration_s=0.5) as ack:
            assert (ack.run, ack.agent, ack.state, ack.duplicate) == (
                run.id, "searcher", "tool_call", False)
            inside = agent_state(await run.state(), "searcher")
            assert (inside.state, inside.tool) == ("tool_call", "web_search")
        after = await run.state()
        assert agent_state(after, "searcher").state == "idle"
        assert agent_state(after, "searcher").tool is None
        assert after.event_count == 2
        assert estimate_of(after).observations == observed + 1

    with_run(server, graph, body)


def test_tool_call_reports_the_finish_when_the_block_raises(server: LiveServer,
                                                            graph: GraphInfo) -> None:
    async def body(client: Client, run: Run) -> None:
        searcher = run.agent("searcher")
        failure = LookupError("search backend down")
        with pytest.raises(LookupError) as caught:
            async with searcher.tool_call("web_search"):
                raise failure
        assert caught.value is failure
        state = await run.state()
        assert agent_state(state, "searcher").state == "idle" and state.event_count == 2

    with_run(server, graph, body)


def test_the_blocks_exception_wins_over_a_failed_finish(server: LiveServer,
                                                        graph: GraphInfo) -> None:
    async def body(client: Client, run: Run) -> None:
        failure = LookupError("search backend down")
        with pytest.raises(LookupError) as caught:
            async with run.agent("searcher").tool_call("web_search"):
                await run.close()  # the finish event will get a 404
                raise failure
        assert caught.value is failure
        # Without an exception in the block, the failed finish is the error.
        again = await client.start_run(graph)
        with pytest.raises(KvrtError) as error:
            async with again.agent("searcher").tool_call("web_search"):
                await again.close()
        assert (error.value.status, error.value.code) == (404, "run_not_found")

    with_run(server, graph, body)


def test_events_with_the_same_id_apply_once(server: LiveServer, graph: GraphInfo) -> None:
    async def body(client: Client, run: Run) -> None:
        searcher = run.agent("searcher")
        first = await searcher.event("tool_call.started", tool="web_search", id="evt-1")
        again = await searcher.event("tool_call.started", tool="web_search", id="evt-1")
        assert (first.duplicate, again.duplicate) == (False, True)
        assert first.event_count == again.event_count == 1
        # Without an id, each call is an event of its own (the SDK gives each a fresh id).
        finish = await searcher.event("tool_call.finished", tool="web_search")
        assert (finish.duplicate, finish.state, finish.event_count) == (False, "idle", 2)
        # The daemon takes a repeated finish as a duplicate; a finish never started is an error.
        repeat = await searcher.event("tool_call.finished", tool="web_search")
        assert (repeat.duplicate, repeat.event_count) == (True, 2)
        with pytest.raises(KvrtError) as caught:
            await run.agent("writer").event("tool_call.finished", tool="web_search")
        assert (caught.value.status, caught.value.code) == (409, "tool_not_started")
        done = await searcher.done()
        assert done.state == "done"

    with_run(server, graph, body)


def test_close_then_state_is_a_404_and_close_twice_is_fine(server: LiveServer,
                                                           graph: GraphInfo) -> None:
    async def go() -> None:
        async with Client(server.url) as client:
            run = await client.start_run(graph.id)  # by id: the graph is fetched
            assert (run.graph.id, run.graph.agents[0].system) == (graph.id, PLANNER_SYSTEM)
            assert run.graph.live_runs == 1
            assert run.id in [r.id for r in await client.list_runs(graph_id=graph.id)]
            closed = await run.close()
            assert closed is not None and closed.id == run.id and closed.released_blocks == 0
            assert await run.close() is None
            with pytest.raises(KvrtError) as caught:
                await run.state()
            assert (caught.value.status, caught.value.code) == (404, "run_not_found")
            assert run.id not in [r.id for r in await client.list_runs()]
            async with run:  # leaving the context of a closed run is fine too
                pass

    asyncio.run(go())


def test_get_run_gives_a_handle_to_an_existing_run(server: LiveServer, graph: GraphInfo) -> None:
    async def body(client: Client, run: Run) -> None:
        await run.agent("writer").chat(QUESTION, **GREEDY)
        async with Client(server.url) as other:
            handle = await other.get_run(run.id)
            assert (handle.id, handle.graph_id, handle.graph.id) == (run.id, graph.id, graph.id)
            assert handle.agent("planner").system == PLANNER_SYSTEM
            assert agent_state(await handle.state(), "writer").generated_tokens == 4
            with pytest.raises(KvrtError) as caught:
                await other.get_run("no-such-run")
            assert (caught.value.status, caught.value.code) == (404, "run_not_found")

    with_run(server, graph, body)


def test_start_run_of_an_unknown_graph(server: LiveServer) -> None:
    async def go() -> None:
        async with Client(server.url) as client:
            with pytest.raises(KvrtError) as caught:
                await client.start_run("no-such-graph")
            assert (caught.value.status, caught.value.code) == (404, "graph_not_found")

    asyncio.run(go())


def test_every_run_is_listed_past_one_page(server: LiveServer, graph: GraphInfo) -> None:
    async def go() -> None:
        async with Client(server.url) as client:
            runs = [await client.start_run(graph, key=f"t{i}") for i in range(MAX_PAGE_LIMIT + 5)]
            listed = await client.list_runs(graph_id=graph.id)
            assert [r.id for r in listed] == [r.id for r in runs]
            assert [r.key for r in listed] == [f"t{i}" for i in range(MAX_PAGE_LIMIT + 5)]
            for run in runs:
                await run.close()
            assert await client.list_runs(graph_id=graph.id) == []

    asyncio.run(go())


def test_a_round_without_max_tokens_is_a_turn_not_the_whole_context(
        server: LiveServer, graph: GraphInfo) -> None:
    """The SDK's default is 256 tokens an agent (documented in Run.round and the README);
    `max_tokens=None` leaves it to the daemon: the rest of the context (1,024 here)."""

    async def body(client: Client, run: Run) -> None:
        agents: dict[str, list] = {"planner": [], "writer": []}
        default = await run.round(QUESTION, agents, temperature=0.0, ignore_eos=True)
        for output in default.agents.values():
            assert output.usage.completion_tokens == 256 and output.finish_reason == "length"
        unbounded = await run.round(QUESTION, agents, max_tokens=None, temperature=0.0,
                                    ignore_eos=True)
        for output in unbounded.agents.values():
            assert output.usage.prompt_tokens + output.usage.completion_tokens == 1024

    with_run(server, graph, body)
