"""Runs by key on a live daemon (`POST /v1/runs {graph_id, key}`): one key names one live run of
a graph, even when many callers start it at once; the key is listed, filtered on and freed when
the run ends. Also each agent's count of finished model calls and reported tool calls."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from kvrt.runtime.config import ControlConfig
from kvrt.runtime.graph.control_plane import ControlPlane
from kvrt.runtime.graph.errors import Conflict
from kvrt.sdk.protocol.control import AgentSpec, GraphSpec
from tests.server.live_server import LiveServer, assert_error_shape, good_chat


def graph(server: LiveServer, *agents: str) -> str:
    reply = server.post("/v1/graphs", {"name": "keys", "agents": [{"name": a} for a in agents]})
    assert reply.status == 201, reply.body
    return reply.json()["id"]


def start(server: LiveServer, graph_id: str, key: str | None = None, status: int = 201
          ) -> dict[str, Any]:
    body = {"graph_id": graph_id} if key is None else {"graph_id": graph_id, "key": key}
    reply = server.post("/v1/runs", body)
    assert reply.status == status, reply.body
    return reply.json()


def listed(server: LiveServer, query: str) -> list[str]:
    reply = server.request("GET", "/v1/runs?" + query)
    assert reply.status == 200, reply.body
    return [run["id"] for run in reply.json()["data"]]


def test_a_key_names_one_live_run_of_its_graph(server: LiveServer) -> None:
    g, h = graph(server, "a"), graph(server, "a")
    first = start(server, g, "thread-1")
    assert first["key"] == "thread-1" and first["graph_id"] == g
    again = start(server, g, "thread-1", status=200)  # found, not started
    assert again == first
    other_key = start(server, g, "thread-2")
    other_graph = start(server, h, "thread-1")
    assert len({first["id"], other_key["id"], other_graph["id"]}) == 3
    unkeyed = start(server, g)
    assert unkeyed["key"] is None and start(server, g)["id"] != unkeyed["id"]
    state = server.request("GET", f"/v1/runs/{first['id']}").json()
    assert state["key"] == "thread-1"


def test_runs_are_filtered_by_key_and_graph(server: LiveServer) -> None:
    g, h = graph(server, "a"), graph(server, "a")
    run_g = start(server, g, "shared-key")["id"]
    run_h = start(server, h, "shared-key")["id"]
    start(server, g, "other-key")
    assert sorted(listed(server, "key=shared-key")) == sorted([run_g, run_h])
    assert listed(server, f"key=shared-key&graph_id={g}") == [run_g]
    assert listed(server, "key=no-such-key") == []


def test_ending_a_run_frees_its_key(server: LiveServer) -> None:
    g = graph(server, "a")
    first = start(server, g, "resumed")["id"]
    assert server.request("DELETE", f"/v1/runs/{first}").status == 200
    assert listed(server, "key=resumed") == []
    second = start(server, g, "resumed")["id"]  # a new run, started afresh (201)
    assert second != first
    assert listed(server, "key=resumed") == [second]


def test_callers_starting_one_key_at_once_share_one_run(server: LiveServer) -> None:
    g = graph(server, "a")

    async def race() -> list[tuple[int, str]]:
        async with aiohttp.ClientSession() as session:
            async def one() -> tuple[int, str]:
                async with session.post(server.url + "/v1/runs",
                                        json={"graph_id": g, "key": "raced"}) as resp:
                    return resp.status, (await resp.json())["id"]

            return await asyncio.gather(*(one() for _ in range(16)))

    answers = asyncio.run(race())
    assert len({run_id for _, run_id in answers}) == 1
    assert sorted(status for status, _ in answers) == [200] * 15 + [201]
    assert listed(server, f"graph_id={g}") == [answers[0][1]]


@pytest.mark.parametrize(("key", "where"), [
    ("", "key"), ("k" * 129, "key"), (7, "key"), (None, None),
], ids=["empty", "too-long", "not-a-string", "null-is-no-key"])
def test_bad_keys_are_refused_and_the_server_keeps_serving(server: LiveServer, key, where
                                                           ) -> None:
    g = graph(server, "a")
    reply = server.post("/v1/runs", {"graph_id": g, "key": key})
    if where is None:  # an explicit null is the same as no key
        assert reply.status == 201 and reply.json()["key"] is None
        return
    error = assert_error_shape(reply, 400)
    assert "key" in error["message"]
    assert start(server, g, "fine")["key"] == "fine"


def test_agents_count_their_finished_calls_and_tool_calls(server: LiveServer) -> None:
    g = graph(server, "a", "b")
    run = start(server, g, "counted")["id"]
    for _ in range(2):
        reply = server.post("/v1/chat/completions",
                            good_chat(kvrt={"run": run, "agent": "a"}))
        assert reply.status == 200, reply.body
    server.stream("/v1/chat/completions", good_chat(stream=True, kvrt={"run": run, "agent": "b"}))
    events = [
        {"type": "tool_call.started", "agent": "b", "tool": "search", "id": "s1"},
        {"type": "tool_call.started", "agent": "b", "tool": "search", "id": "s1"},  # a retry
        {"type": "tool_call.finished", "agent": "b", "tool": "search", "id": "f1"},
        {"type": "tool_call.started", "agent": "b", "tool": "search", "id": "s2"},
        {"type": "tool_call.finished", "agent": "b", "tool": "search", "id": "f2"},
    ]
    for event in events:
        assert server.post(f"/v1/runs/{run}/events", event).status == 200
    agents = {a["name"]: a for a in server.request("GET", f"/v1/runs/{run}").json()["agents"]}
    assert (agents["a"]["calls"], agents["a"]["tool_calls"]) == (2, 0)
    assert (agents["b"]["calls"], agents["b"]["tool_calls"]) == (1, 2)
    assert server.request("DELETE", f"/v1/runs/{run}").status == 200


def test_a_known_key_is_found_even_at_the_live_run_limit() -> None:
    control = ControlPlane(ControlConfig(max_live_runs=1))
    g = control.create_graph(GraphSpec(name="g", agents=[AgentSpec(name="a")]))
    run = control.start_run(g.id, "k")
    assert control.start_run(g.id, "k") is run and control.keyed_run(g.id, "k") is run
    with pytest.raises(Conflict):
        control.start_run(g.id, "another")
    control.end_run(run.id)
    assert control.keyed_run(g.id, "k") is None
    assert control.start_run(g.id, "k").id != run.id
