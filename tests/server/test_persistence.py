"""Daemons started one after another on one --state-dir: the graphs come back with their ids
and tenants, runs that were live come back interrupted (readable, deletable, refusing events
and calls), and a state dir that cannot be used stops a daemon from starting."""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kvrt.runtime.config import ServeConfig
from kvrt.runtime.engine.async_engine import AsyncEngine
from kvrt.runtime.graph.store import FILE_NAME, StateError
from kvrt.runtime.server.app import create_app
from tests.server.live_server import (
    SMALL_ENGINE,
    LiveServer,
    Reply,
    assert_error_shape,
    live_server,
)

KEYS = (("key-of-tenant-a", "a"), ("key-of-tenant-b", "b"))
A = {"Authorization": "Bearer key-of-tenant-a"}
B = {"Authorization": "Bearer key-of-tenant-b"}
OPERATOR = "key-of-the-operator"
PIPELINE = {"name": "pipeline", "agents": [
    {"name": "planner", "tools": {"search": 3}}, {"name": "writer", "importance": 2}],
    "edges": [["planner", "writer"]]}


def daemon(model: Path, state_dir: Path) -> AbstractContextManager[LiveServer]:
    return contextmanager(live_server)(model, state_dir=str(state_dir), api_keys=KEYS,
                                       admin_keys=(OPERATOR,))


def ok(reply: Reply, status: int = 200) -> Any:
    assert reply.status == status, reply.body
    return reply.json()


def runs(server: LiveServer, headers: dict[str, str]) -> dict[str, str]:
    """The caller's runs: id -> status."""
    return {r["id"]: r["status"] for r in ok(server.request("GET", "/v1/runs", headers=headers))
            ["data"]}


def live_runs_metric(server: LiveServer) -> float:
    text = server.request("GET", "/metrics",
                          headers={"Authorization": f"Bearer {OPERATOR}"}).body.decode()
    return float(next(line for line in text.splitlines()
                      if line.startswith("kvrt:live_runs{")).rsplit(" ", 1)[1])


def test_graphs_and_runs_outlive_the_daemon(tiny_model: Path, tmp_path: Path) -> None:
    with daemon(tiny_model, tmp_path) as first:
        graph = ok(first.post("/v1/graphs", PIPELINE, headers=A), 201)
        other = ok(first.post("/v1/graphs", PIPELINE, headers=B), 201)
        keyed = ok(first.post("/v1/runs", {"graph_id": graph["id"], "key": "t1"}, headers=A),
                   201)["id"]
        plain = ok(first.post("/v1/runs", {"graph_id": graph["id"]}, headers=A), 201)["id"]
        ended = ok(first.post("/v1/runs", {"graph_id": graph["id"]}, headers=A), 201)["id"]
        ok(first.request("DELETE", f"/v1/runs/{ended}", headers=A))
        chat = {"messages": [{"role": "user", "content": "plan"}], "max_tokens": 2,
                "kvrt": {"run": keyed, "agent": "planner"}}
        ok(first.post("/v1/chat/completions", chat, headers=A))

    with daemon(tiny_model, tmp_path) as second:
        assert ok(second.request("GET", "/v1/graphs", headers=A))["data"] == [graph]
        assert [g["id"] for g in ok(second.request("GET", "/v1/graphs", headers=B))["data"]] == [
            other["id"]]
        assert runs(second, A) == {keyed: "interrupted", plain: "interrupted"}
        assert runs(second, B) == {}
        state = ok(second.request("GET", f"/v1/runs/{keyed}", headers=A))
        assert (state["status"], state["key"], state["graph_id"]) == (
            "interrupted", "t1", graph["id"])
        assert all(a["state"] == "idle" and a["calls"] == 0 for a in state["agents"])
        assert_error_shape(second.request("GET", f"/v1/runs/{keyed}", headers=B), 404)
        assert_error_shape(second.request("GET", f"/v1/runs/{ended}", headers=A), 404)
        for path, body, headers in (
            (f"/v1/runs/{keyed}/events", {"type": "agent.done", "agent": "writer"}, A),
            (f"/v1/runs/{keyed}/rounds",
             {"shared": [{"role": "user", "content": "hi"}], "agents": {"writer": {}}}, A),
            ("/v1/chat/completions", chat, A),
            ("/v1/chat/completions", {**chat, "kvrt": None},
             {**A, "X-Kvrt-Run": keyed, "X-Kvrt-Agent": "planner"}),
        ):
            error = assert_error_shape(second.post(path, body, headers=headers), 409)
            assert error["code"] == "run_interrupted", path
        # The key's next start is a new, live run; the graph is in use until its runs end.
        fresh = ok(second.post("/v1/runs", {"graph_id": graph["id"], "key": "t1"}, headers=A),
                   201)
        assert fresh["id"] != keyed and fresh["status"] == "live"
        ok(second.post(f"/v1/runs/{fresh['id']}/events", {"type": "agent.done",
                                                           "agent": "writer"}, headers=A))
        error = assert_error_shape(second.request("DELETE", f"/v1/graphs/{graph['id']}",
                                                  headers=A), 409)
        assert error["code"] == "graph_in_use"
        assert ok(second.request("DELETE", f"/v1/runs/{plain}", headers=A)) == {
            "id": plain, "object": "run", "deleted": True, "released_blocks": 0}
        assert runs(second, A) == {keyed: "interrupted", fresh["id"]: "live"}
        assert live_runs_metric(second) == 1  # interrupted runs are not live

    with daemon(tiny_model, tmp_path) as third:
        assert runs(third, A) == {keyed: "interrupted", fresh["id"]: "interrupted"}
        for run in (keyed, fresh["id"]):
            ok(third.request("DELETE", f"/v1/runs/{run}", headers=A))
        ok(third.request("DELETE", f"/v1/graphs/{graph['id']}", headers=A))

    with daemon(tiny_model, tmp_path) as fourth:
        assert ok(fourth.request("GET", "/v1/graphs", headers=A))["data"] == []
        assert runs(fourth, A) == {}
        assert len(ok(fourth.request("GET", "/v1/graphs", headers=B))["data"]) == 1


def test_a_state_dir_that_cannot_be_used_is_a_startup_error(tiny_model: Path,
                                                            tmp_path: Path) -> None:
    engine_config = replace(SMALL_ENGINE, model=str(tiny_model))
    engine = AsyncEngine.create(engine_config, "tiny")  # never started: the app is not made

    def start(state_dir: Path) -> None:
        create_app(ServeConfig(state_dir=str(state_dir), engine=engine_config), engine)

    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / FILE_NAME).write_bytes(b"this is no database " * 64)
    with pytest.raises(StateError, match="not a kvrt state file"):
        start(tmp_path / "corrupt")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StateError, match="cannot create the state dir"):
        start(tmp_path / "a-file" / "state")
    with daemon(tiny_model, tmp_path / "busy"), pytest.raises(StateError,
                                                               match="another kvrt daemon"):
        start(tmp_path / "busy")
