"""The graph builder, and graphs' round trip through the daemon."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from kvrt.sdk import Client, Graph, KvrtError
from kvrt.sdk.protocol.control import MAX_PAGE_LIMIT, AgentSpec, EdgeSpec, GraphSpec
from tests.server.live_server import LiveServer


def research_graph(name: str = "research") -> Graph:
    g = Graph(name)
    g.agent("planner", system="You plan.")
    g.agent("searcher", tools={"web_search": 2.0}, expected_output_tokens=64)
    g.agent("writer", importance=2.0)
    g.edge("planner", "searcher").edge("searcher", "writer")
    return g


def test_builder_makes_the_spec() -> None:
    g = Graph("loop", reuse="approximate").agent("a", "sys").agent("b", tools={"t": 1.5})
    g.edge("a", "b").edge("b", "a", expected_iterations=3)
    assert g.spec() == GraphSpec(
        name="loop",
        agents=[AgentSpec(name="a", system="sys"), AgentSpec(name="b", tools={"t": 1.5})],
        edges=[("a", "b"), EdgeSpec(source="b", target="a", expected_iterations=3)],
        reuse="approximate",
    )
    wire = msgspec.json.decode(msgspec.json.encode(g.spec()))
    assert wire["edges"] == [["a", "b"], {"from": "b", "to": "a", "expected_iterations": 3}]


def test_builder_leaves_validation_to_the_daemon() -> None:
    spec = Graph("dup").agent("a").agent("a").edge("a", "nobody").spec()
    assert [a.name for a in spec.agents] == ["a", "a"] and spec.edges == [("a", "nobody")]


def test_graph_round_trip(server: LiveServer) -> None:
    async def go() -> None:
        async with Client(server.url) as client:
            info = await client.create_graph(research_graph())
            assert info.name == "research" and info.object == "graph" and info.live_runs == 0
            assert [a.name for a in info.agents] == ["planner", "searcher", "writer"]
            assert info.agents[0].system == "You plan."
            assert info.agents[1].tools == {"web_search": 2.0}
            assert [(e.source, e.target) for e in info.edges] == [
                ("planner", "searcher"), ("searcher", "writer")]

            assert await client.get_graph(info.id) == info
            assert info.id in [g.id for g in await client.list_graphs()]

            deleted = await client.delete_graph(info)
            assert (deleted.id, deleted.object, deleted.deleted) == (info.id, "graph", True)
            assert info.id not in [g.id for g in await client.list_graphs()]
            with pytest.raises(KvrtError) as caught:
                await client.get_graph(info.id)
            assert (caught.value.status, caught.value.code) == (404, "graph_not_found")

    asyncio.run(go())


def test_create_graph_takes_a_spec(server: LiveServer) -> None:
    async def go() -> None:
        async with Client(server.url) as client:
            info = await client.create_graph(research_graph("as-spec").spec())
            assert info.name == "as-spec"
            await client.delete_graph(info.id)

    asyncio.run(go())


@pytest.mark.parametrize("graph", [
    Graph("bad-edge").agent("a").edge("a", "nobody"),  # whole-graph check, after decoding
    Graph("bad-importance").agent("a", importance=-1.0),  # a limit msgspec enforces
], ids=["unknown-agent", "out-of-range"])
def test_a_400_surfaces_with_the_daemons_code_and_message(server: LiveServer,
                                                           graph: Graph) -> None:
    raw = server.request("POST", "/v1/graphs", data=msgspec.json.encode(graph.spec()),
                         headers={"Content-Type": "application/json"})
    assert raw.status == 400, raw.body
    expected = raw.json()["error"]

    async def go() -> KvrtError:
        async with Client(server.url) as client:
            with pytest.raises(KvrtError) as caught:
                await client.create_graph(graph)
            return caught.value

    error = asyncio.run(go())
    assert type(error) is KvrtError and error.status == 400 and error.attempts == 1
    assert (error.code, error.message, error.param, error.type) == (
        expected["code"], expected["message"], expected["param"], expected["type"])
    assert error.message and str(error).startswith("[400")


def test_a_graph_with_live_runs_cannot_be_deleted(server: LiveServer) -> None:
    async def go() -> None:
        async with Client(server.url) as client:
            graph = await client.create_graph(research_graph("busy"))
            run = await client.start_run(graph)
            with pytest.raises(KvrtError) as caught:
                await client.delete_graph(graph)
            assert (caught.value.status, caught.value.code) == (409, "graph_in_use")
            assert (await client.get_graph(graph.id)).live_runs == 1
            await run.close()
            await client.delete_graph(graph)

    asyncio.run(go())


def test_every_graph_is_listed_past_one_page(server: LiveServer) -> None:
    async def go() -> None:
        async with Client(server.url) as client:
            before = [g.id for g in await client.list_graphs()]
            made = [(await client.create_graph(Graph(f"many{i}").agent("a"))).id
                    for i in range(MAX_PAGE_LIMIT + 5)]
            # Creation order, over two pages, nothing repeated.
            assert [g.id for g in await client.list_graphs()] == before + made
            for graph_id in made:
                await client.delete_graph(graph_id)
            assert [g.id for g in await client.list_graphs()] == before

    asyncio.run(go())
