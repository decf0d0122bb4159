"""POST/GET/DELETE /v1/graphs on a live daemon: validation, and the critical path and priorities
of known graphs against values computed by hand. Agents declare no output tokens, so an agent's
work is its tools' expected seconds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvrt.runtime.config import ControlConfig
from kvrt.sdk.protocol.control import MAX_AGENTS
from tests.server.live_server import LiveServer, assert_error_shape, listed, live_server

# {"name": "g", "agents": [{"name": "a"}]} as the byte quota counts it: compact JSON, every
# field written.
TINY_JSON = ('{"name":"g","agents":[{"name":"a","system":null,"tools":{},'
             '"expected_output_tokens":null,"importance":1.0}],"edges":[],"reuse":"exact"}')


def agent(name: str, seconds: float = 0, **extra: Any) -> dict[str, Any]:
    tools = {"work": seconds} if seconds else {}
    return {"name": name, "tools": tools, "expected_output_tokens": 0, **extra}


def declare(server: LiveServer, agents: list, edges: list, **extra: Any) -> dict[str, Any]:
    reply = server.post("/v1/graphs", {"name": "g", "agents": agents, "edges": edges, **extra})
    assert reply.status == 201, reply.body
    return reply.json()


def by_name(graph: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in graph["agents"]}


def test_chain(server: LiveServer) -> None:
    graph = declare(server, [agent("a", 1), agent("b", 2), agent("c", 3)],
                    [["a", "b"], ["b", "c"]])
    assert graph["critical_path"] == ["a", "b", "c"]
    assert graph["critical_path_seconds"] == 6
    assert all(a["priority"] == 1 and a["on_critical_path"] for a in graph["agents"])
    assert [a["expected_seconds"] for a in graph["agents"]] == [1, 2, 3]


def test_diamond(server: LiveServer) -> None:
    # a -> b -> d and a -> c -> d: the path through b takes 1 + 5 + 1 = 7 s, through c 4 s.
    graph = declare(
        server, [agent("a", 1), agent("b", 5), agent("c", 2), agent("d", 1, importance=0.5)],
        [["a", "b"], ["a", "c"], ["b", "d"], ["c", "d"]])
    agents = by_name(graph)
    assert graph["critical_path"] == ["a", "b", "d"] and graph["critical_path_seconds"] == 7
    assert agents["a"]["priority"] == 1 and agents["b"]["priority"] == 1
    assert agents["c"]["priority"] == 0.571  # 4 / 7, to 3 significant digits
    assert agents["d"]["priority"] == 0.5  # on the path, at half importance
    assert [agents[n]["on_critical_path"] for n in "abcd"] == [True, True, False, True]


def test_fan_out_of_eight(server: LiveServer) -> None:
    workers = [agent(f"w{i}", i) for i in range(1, 9)]
    graph = declare(server, [agent("root", 1), *workers],
                    [["root", f"w{i}"] for i in range(1, 9)])
    agents = by_name(graph)
    assert graph["critical_path"] == ["root", "w8"] and graph["critical_path_seconds"] == 9
    assert agents["root"]["priority"] == 1
    for i in range(1, 9):
        assert agents[f"w{i}"]["priority"] == round((1 + i) / 9, 3)  # 3 significant digits
        assert agents[f"w{i}"]["on_critical_path"] == (i == 8)


def test_loop_counts_its_iterations(server: LiveServer) -> None:
    # plan -> act <-> observe -> answer, the loop expected 3 times: 1 + 3 * (2 + 1) + 1 = 11 s.
    # plan -> side -> answer bypasses the loop: 1 + 2 + 1 = 4 s.
    graph = declare(
        server,
        [agent("plan", 1), agent("act", 2), agent("observe", 1), agent("answer", 1),
         agent("side", 2)],
        [["plan", "act"], ["act", "observe"],
         {"from": "observe", "to": "act", "expected_iterations": 3}, ["observe", "answer"],
         ["plan", "side"], ["side", "answer"]])
    agents = by_name(graph)
    assert graph["critical_path"] == ["plan", "act", "observe", "answer"]
    assert graph["critical_path_seconds"] == 11
    assert agents["side"]["priority"] == 0.364  # 4 / 11
    assert all(agents[n]["priority"] == 1 for n in ("plan", "act", "observe", "answer"))
    loops = {(e["from"], e["to"]): (e["in_loop"], e["expected_iterations"])
             for e in graph["edges"]}
    assert loops[("act", "observe")] == (True, 3) and loops[("observe", "act")] == (True, 3)
    assert loops[("plan", "act")] == (False, 1)


def test_self_loop_runs_twice_by_default(server: LiveServer) -> None:
    # A ReAct agent calling itself: 2 iterations of 2 s, then 1 s.
    graph = declare(server, [agent("react", 2), agent("final", 1)],
                    [["react", "react"], ["react", "final"]])
    assert graph["critical_path"] == ["react", "final"] and graph["critical_path_seconds"] == 5


def test_estimated_seconds_go_out_to_the_millisecond_declared_ones_as_given(
        server: LiveServer) -> None:
    third = 1 / 3
    graph = declare(server, [agent("a", third), agent("b", 2 * third)], [["a", "b"]])
    assert [a["expected_seconds"] for a in graph["agents"]] == [0.333, 0.667]
    assert graph["critical_path_seconds"] == 1.0
    assert graph["agents"][0]["tools"] == {"work": third}  # declared: not an estimate


def test_output_tokens_cost_decode_time(server: LiveServer) -> None:
    per_token = server.config.control.seconds_per_output_token
    graph = declare(server, [{"name": "solo", "expected_output_tokens": 100,
                              "tools": {"search": 1.5}}], [])
    assert graph["agents"][0]["expected_seconds"] == pytest.approx(100 * per_token + 1.5)


def test_get_list_delete(server: LiveServer) -> None:
    created = declare(server, [agent("x", 1)], [], reuse="approximate")
    assert created["reuse"] == "approximate" and created["id"].startswith("graph-")
    fetched = server.request("GET", f"/v1/graphs/{created['id']}").json()
    assert fetched == created
    assert created in listed(server, "/v1/graphs")
    deleted = server.request("DELETE", f"/v1/graphs/{created['id']}")
    assert deleted.json() == {"id": created["id"], "object": "graph", "deleted": True}
    error = assert_error_shape(server.request("GET", f"/v1/graphs/{created['id']}"), 404)
    assert error["code"] == "graph_not_found"
    assert_error_shape(server.request("DELETE", f"/v1/graphs/{created['id']}"), 404)


def test_graphs_are_listed_a_page_at_a_time_in_creation_order(server: LiveServer) -> None:
    made = [declare(server, [agent("x", 1)], [])["id"] for _ in range(5)]
    everything = [g["id"] for g in listed(server, "/v1/graphs", limit=2)]
    assert len(everything) == len(set(everything)) >= 5
    assert [i for i in everything if i in made] == made
    first = server.request("GET", "/v1/graphs").json()  # 20 by default
    assert [g["id"] for g in first["data"]] == everything[:20]
    assert first["has_more"] == (len(everything) > 20)
    # A page after a graph deleted since starts where that graph was.
    server.request("DELETE", f"/v1/graphs/{made[1]}")
    after = server.request("GET", f"/v1/graphs?limit=2&after={made[1]}").json()
    assert [g["id"] for g in after["data"]] == made[2:4] and after["has_more"]


@pytest.mark.parametrize("query, param", [
    ("limit=0", "limit"), ("limit=101", "limit"), ("limit=ten", "limit"), ("limit=-1", "limit"),
    ("limit=", "limit"), ("after=", "after"), ("after=run-0", "after"),
])
def test_a_bad_page_is_a_400_naming_the_parameter(server: LiveServer, query, param) -> None:
    error = assert_error_shape(server.request("GET", f"/v1/graphs?{query}"), 400)
    assert error["param"] == param and param in error["message"]


@pytest.fixture(scope="module")
def two_tiny_graphs(tiny_model: Path) -> Iterator[LiveServer]:
    """A daemon whose tenants may hold two TINY_JSON graphs' worth of declarations."""
    yield from live_server(tiny_model, control=ControlConfig(
        max_graph_bytes_per_tenant=2 * len(TINY_JSON)))


def test_declared_bytes_past_the_quota_are_a_429_and_one_graph_past_it_a_413(
        two_tiny_graphs: LiveServer) -> None:
    server, tiny = two_tiny_graphs, {"name": "g", "agents": [{"name": "a"}]}
    held = [server.post("/v1/graphs", tiny).json() for _ in range(2)]
    assert [g["declared_bytes"] for g in held] == [len(TINY_JSON)] * 2
    error = assert_error_shape(server.post("/v1/graphs", tiny), 429)
    assert (error["code"], error["param"]) == ("quota_exceeded", "max_graph_bytes_per_tenant")
    assert "--max-graph-bytes-per-tenant" in error["message"]
    big = {"name": "g", "agents": [{"name": "a", "system": "x" * 3 * len(TINY_JSON)}]}
    error = assert_error_shape(server.post("/v1/graphs", big), 413)
    assert (error["code"], error["param"]) == ("quota_exceeded", "max_graph_bytes_per_tenant")
    server.request("DELETE", f"/v1/graphs/{held[0]['id']}")
    assert server.post("/v1/graphs", tiny).status == 201


def test_a_graph_with_live_runs_cannot_be_deleted(server: LiveServer) -> None:
    graph = declare(server, [agent("x", 1)], [])
    run = server.post("/v1/runs", {"graph_id": graph["id"]}).json()
    error = assert_error_shape(server.request("DELETE", f"/v1/graphs/{graph['id']}"), 409)
    assert error["code"] == "graph_in_use"
    assert server.request("DELETE", f"/v1/runs/{run['id']}").status == 200
    assert server.request("DELETE", f"/v1/graphs/{graph['id']}").status == 200


def many(count: int) -> list[dict[str, Any]]:
    return [{"name": f"a{i}"} for i in range(count)]


@pytest.mark.parametrize(("body", "needle", "param"), [
    ({"name": "g", "agents": []}, "length >= 1", "agents"),
    ({"name": "g"}, "missing required field `agents`", None),
    ({"name": "g", "agents": [{"name": "a"}, {"name": "a"}]}, "'a' is declared twice",
     "agents[1].name"),
    ({"name": "g", "agents": [{"name": "a"}], "edges": [["a", "ghost"]]},
     "unknown agent 'ghost'", "edges[0]"),
    ({"name": "g", "agents": [{"name": "a"}], "edges": [{"from": "nobody", "to": "a"}]},
     "unknown agent 'nobody'", "edges[0]"),
    ({"name": "g", "agents": many(2), "edges": [["a0", "a1"], ["a0", "a1"]]},
     "repeats the edge a0 -> a1", "edges[1]"),
    ({"name": "g", "agents": many(2), "edges": [
        {"from": "a0", "to": "a1", "expected_iterations": 3}]},
     "not part of a loop", "edges[0].expected_iterations"),
    ({"name": "g", "agents": many(2), "edges": [
        {"from": "a0", "to": "a1", "expected_iterations": 0}]},
     ">= 1", "edges[0].expected_iterations"),
    ({"name": "g", "agents": [{"name": "a", "tools": {"t": -1}}]}, ">= 0", "agents[0].tools"),
    ({"name": "g", "agents": [{"name": "a", "importance": -2}]}, ">= 0",
     "agents[0].importance"),
    ({"name": "g", "agents": [{"name": "a", "expected_tokens": 5}]}, "unknown field",
     "agents[0]"),
    ({"name": "g", "agents": [{"name": ""}]}, "length >= 1", "agents[0].name"),
    ({"name": "g", "agents": [{"name": "a"}], "reuse": "fuzzy"}, "Invalid enum value 'fuzzy'",
     "reuse"),
    ({"name": "g", "agents": many(MAX_AGENTS + 1)}, f"length <= {MAX_AGENTS}", "agents"),
    ({"name": "g", "agents": [{"name": "a", "tools": {f"t{i}": 1 for i in range(65)}}]},
     "length <= 64", "agents[0].tools"),
], ids=["empty", "no-agents", "duplicate-name", "unknown-target", "unknown-source",
        "duplicate-edge", "iterations-outside-loop", "zero-iterations", "negative-tool-time",
        "negative-importance", "misspelt-field", "empty-name", "bad-reuse", "too-many-agents",
        "too-many-tools"])
def test_bad_graphs_get_a_400_naming_the_problem(server: LiveServer, body, needle,
                                                 param) -> None:
    before = len(server.request("GET", "/v1/graphs").json()["data"])
    error = assert_error_shape(server.post("/v1/graphs", body), 400)
    assert needle in error["message"], error
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error
    assert len(server.request("GET", "/v1/graphs").json()["data"]) == before


def test_runs_teach_the_graph_which_branch_is_taken(server: LiveServer) -> None:
    # router -> a, router -> b; every run takes router -> a. Calls are exact in length
    # (ignore_eos): router's make 2 tokens, a's 4, as declared.
    graph = declare(server, [{"name": "router", "expected_output_tokens": 2},
                             {"name": "a", "expected_output_tokens": 4},
                             {"name": "b", "expected_output_tokens": 4}],
                    [["router", "a"], ["router", "b"]])
    per_token = server.config.control.seconds_per_output_token
    # Declared: both branches take 6 tokens, so every agent is critical.
    assert [a["priority"] for a in graph["agents"]] == pytest.approx([1, 1, 1])
    assert graph["episodes"] == 0 and [(t["from"], t["to"], t["count"], t["share"], t["likely"])
                                       for t in graph["transitions"]] == [
        ("router", "a", 0, None, True), ("router", "b", 0, None, True)]
    for _ in range(3):
        run = server.post("/v1/runs", {"graph_id": graph["id"]}).json()["id"]
        for agent_name, tokens in (("router", 2), ("a", 4)):
            body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": tokens,
                    "ignore_eos": True, "temperature": 0,
                    "kvrt": {"run": run, "agent": agent_name}}
            assert server.post("/v1/chat/completions", body).status == 200
        for agent_name in ("router", "a"):
            server.post(f"/v1/runs/{run}/events", {"type": "agent.done", "agent": agent_name})
        state = server.request("GET", f"/v1/runs/{run}").json()
        assert state["episodes"] == 1 and state["transitions"] == [
            {"from": "__start__", "to": "router", "count": 1},
            {"from": "router", "to": "a", "count": 1},
            {"from": "a", "to": "__end__", "count": 1}]
        assert server.request("DELETE", f"/v1/runs/{run}").status == 200

    learned = server.request("GET", f"/v1/graphs/{graph['id']}").json()
    assert learned["episodes"] == 3
    assert learned["transitions"] == [
        {"from": "router", "to": "a", "count": 3, "share": 1.0, "likely": True},
        {"from": "router", "to": "b", "count": 0, "share": 0.0, "likely": False},
        {"from": "__start__", "to": "router", "count": 3, "share": 1.0, "likely": True},
        {"from": "a", "to": "__end__", "count": 3, "share": 1.0, "likely": True}]
    agents = by_name(learned)
    # 3 episodes and the declared prior: router (1 + 3) / 4 = 1 call of (2 + 6) / 4 = 2
    # tokens, a 1 call of 4, b (1 + 0) / 4 = 0.25 calls of 4 tokens: 1 token.
    assert [(agents[n]["expected_calls"], agents[n]["output_tokens_per_call"])
            for n in ("router", "a", "b")] == [(1.0, 2.0), (1.0, 4.0), (0.25, 4.0)]
    assert agents["b"]["expected_seconds"] == pytest.approx(1 * per_token)
    assert learned["critical_path"] == ["router", "a"]
    assert learned["critical_path_seconds"] == pytest.approx(6 * per_token)
    assert agents["a"]["priority"] == 1
    assert agents["b"]["priority"] == 0.167  # alone: 1 token of the path's 6
    assert not agents["b"]["on_critical_path"]
