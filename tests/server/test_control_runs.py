"""Runs on a live daemon: events change agent state and priorities, model calls are attributed
to agents with their KV, and ending a run releases the KV it alone holds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvrt.runtime.config import EngineConfig
from tests.server.live_server import (
    LiveServer,
    assert_error_shape,
    listed,
    live_server,
    sse_events,
)


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    # A long context, so a call can outlive the DELETE of its run.
    config = EngineConfig(kv_cache_memory=8 * 1024**2, max_model_len=2048, max_num_seqs=8)
    yield from live_server(tiny_model, config)


def diamond_run(server: LiveServer) -> str:
    """a -> {b, c} -> d with a 1 s, b 5 s, c 2 s, d 1 s of tool work: critical path a, b, d."""
    agents = [{"name": n, "tools": {"work": s}, "expected_output_tokens": 0}
              for n, s in (("a", 1), ("b", 5), ("c", 2), ("d", 1))]
    graph = server.post("/v1/graphs", {"name": "diamond", "agents": agents, "edges": [
        ["a", "b"], ["a", "c"], ["b", "d"], ["c", "d"]]}).json()
    reply = server.post("/v1/runs", {"graph_id": graph["id"]})
    assert reply.status == 201 and reply.json()["event_count"] == 0
    return reply.json()["id"]


def state(server: LiveServer, run: str) -> dict[str, Any]:
    reply = server.request("GET", f"/v1/runs/{run}")
    assert reply.status == 200, reply.body
    return reply.json()


def agents(server: LiveServer, run: str) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in state(server, run)["agents"]}


def event(server: LiveServer, run: str, **body: Any) -> dict[str, Any]:
    reply = server.post(f"/v1/runs/{run}/events", body)
    assert reply.status == 200, reply.body
    return reply.json()


def test_a_fresh_run(server: LiveServer) -> None:
    run = diamond_run(server)
    got = state(server, run)
    assert got["critical_path"] == ["a", "b", "d"] and got["critical_path_seconds"] == 7
    first = got["agents"][0]
    assert first == {"name": "a", "state": "idle", "priority": 1.0, "on_critical_path": True,
                     "remaining_seconds": 1.0, "requests": 0, "calls": 0,
                     "generated_tokens": 0, "tool": None, "waiting": None, "tool_calls": 0,
                     "kv": {"device_blocks": 0, "host_blocks": 0, "shared_blocks": 0,
                            "decision": None, "segment_tokens": 0,
                            "segment_reused_tokens": 0}}
    assert got["event_count"] == 0 and got["segment_kv_compression"] is None
    assert got["transitions"] == [] and got["episodes"] == 0


def test_tool_call_events_change_state_and_learn_durations(server: LiveServer) -> None:
    run = diamond_run(server)
    ack = event(server, run, type="tool_call.started", agent="a", tool="work")
    assert ack == {"run": run, "agent": "a", "state": "tool_call", "event_count": 1,
                   "duplicate": False}
    a = agents(server, run)["a"]
    assert (a["state"], a["tool"]) == ("tool_call", "work")
    time.sleep(0.2)
    assert event(server, run, type="tool_call.finished", agent="a", tool="work")["state"] == "idle"
    got = state(server, run)
    learned = {(t["agent"], t["tool"]): t for t in got["tools"]}[("a", "work")]
    assert learned["declared_seconds"] == 1 and learned["observations"] == 1
    assert 0.2 <= learned["estimate_seconds"] < 1.0
    # a's tool is done: a has no work left, and the path shrinks by a's second.
    assert got["critical_path_seconds"] == pytest.approx(6)
    assert {a["name"]: a["remaining_seconds"] for a in got["agents"]}["a"] == 0
    # Every run of the graph uses the learned estimate.
    graph = server.request("GET", f"/v1/graphs/{got['graph_id']}").json()
    assert graph["agents"][0]["expected_seconds"] == learned["estimate_seconds"]


def test_the_client_estimate_predicts_a_running_call(server: LiveServer) -> None:
    run = diamond_run(server)
    event(server, run, type="tool_call.started", agent="c", tool="work",
          expected_duration_s=30)
    got = state(server, run)
    c = {a["name"]: a for a in got["agents"]}["c"]
    assert 29 < c["remaining_seconds"] <= 30
    # c's 30 s now dominate: a, c, d is the critical path and b has slack.
    assert got["critical_path"] == ["a", "c", "d"]
    assert {a["name"]: a["on_critical_path"] for a in got["agents"]}["b"] is False


def test_agent_done_moves_the_critical_path(server: LiveServer) -> None:
    run = diamond_run(server)
    assert event(server, run, type="agent.done", agent="b")["state"] == "done"
    got = state(server, run)
    by = {a["name"]: a for a in got["agents"]}
    assert got["critical_path"] == ["a", "c", "d"] and got["critical_path_seconds"] == 4
    assert by["b"]["priority"] == 0 and not by["b"]["on_critical_path"]
    assert by["c"]["priority"] == 1 and by["c"]["on_critical_path"]


def test_a_wait_holds_the_agent_until_it_resumes(server: LiveServer) -> None:
    run = diamond_run(server)
    waiting = {"type": "agent.waiting", "agent": "b", "expected_duration_s": 30}
    assert event(server, run, **waiting) == {"run": run, "agent": "b", "state": "waiting",
                                             "event_count": 1, "duplicate": False}
    assert event(server, run, **waiting)["duplicate"]  # it waits on one thing at a time
    got = state(server, run)
    b = {a["name"]: a for a in got["agents"]}["b"]
    assert (b["state"], b["waiting"], b["tool"]) == ("waiting", "interrupt", None)
    # b's 5 s tool is still to come, and up to 30 s of the wait: a, b, d stays critical.
    assert 34 < b["remaining_seconds"] <= 35 and got["critical_path"] == ["a", "b", "d"]
    time.sleep(0.1)
    resumed = event(server, run, type="agent.resumed", agent="b")
    assert (resumed["state"], resumed["duplicate"], resumed["event_count"]) == ("idle", False, 2)
    assert event(server, run, type="agent.resumed", agent="b")["duplicate"]
    got = state(server, run)
    learned = {(t["agent"], t["tool"]): t for t in got["tools"]}[("b", "wait:interrupt")]
    assert learned["declared_seconds"] is None and learned["observations"] == 1
    assert 0.1 <= learned["estimate_seconds"] < 30
    assert {a["name"]: a["remaining_seconds"] for a in got["agents"]}["b"] == 5


def test_events_are_idempotent(server: LiveServer) -> None:
    run = diamond_run(server)
    start = {"type": "tool_call.started", "agent": "b", "tool": "work", "id": "e1"}
    assert event(server, run, **start)["duplicate"] is False
    again = event(server, run, **start)
    assert again["duplicate"] is True and again["event_count"] == 1
    # Without ids: a second start of a running tool, a second finish, a second done.
    assert event(server, run, type="tool_call.started", agent="b", tool="work")["duplicate"]
    finish = {"type": "tool_call.finished", "agent": "b", "tool": "work"}
    assert not event(server, run, **finish)["duplicate"]
    assert event(server, run, **finish)["duplicate"]
    assert not event(server, run, type="agent.done", agent="b")["duplicate"]
    last = event(server, run, type="agent.done", agent="b")
    assert last["duplicate"] and last["event_count"] == 3
    assert state(server, run)["event_count"] == 3


def test_concurrent_calls_of_one_tool_each_count_until_the_last_ends(server: LiveServer) -> None:
    # Two instances of one node (a LangGraph Send fan-out) run the same tool at once: events
    # with distinct ids are two calls, and the agent waits on its tool until both have ended.
    run = diamond_run(server)
    call = {"agent": "b", "tool": "work"}
    for i in (1, 2):
        assert not event(server, run, type="tool_call.started", id=f"s{i}", **call)["duplicate"]
    assert not event(server, run, type="tool_call.finished", id="f1", **call)["duplicate"]
    b = next(a for a in state(server, run)["agents"] if a["name"] == "b")
    assert (b["state"], b["tool"], b["tool_calls"]) == ("tool_call", "work", 2)
    assert not event(server, run, type="tool_call.finished", id="f2", **call)["duplicate"]
    b = next(a for a in state(server, run)["agents"] if a["name"] == "b")
    assert (b["state"], b["tool"]) == ("idle", None)
    # A third finish finds the tool finished already: a no-op, as a repeated finish is.
    assert event(server, run, type="tool_call.finished", id="f3", **call)["duplicate"]


@pytest.mark.parametrize(("path", "body", "status", "code"), [
    ("/v1/runs/run-nope/events", {"type": "agent.done", "agent": "a"}, 404, "run_not_found"),
    ("RUN", {"type": "agent.done", "agent": "zed"}, 404, "agent_not_found"),
    ("RUN", {"type": "tool_call.finished", "agent": "a", "tool": "work"}, 409,
     "tool_not_started"),
    ("RUN", {"type": "tool_call.exploded", "agent": "a"}, 400, None),
    ("RUN", {"type": "tool_call.started", "agent": "a"}, 400, None),
    ("RUN", {"type": "agent.done", "agent": "a", "extra": 1}, 400, None),
], ids=["unknown-run", "unknown-agent", "finish-without-start", "unknown-type", "no-tool",
        "unknown-field"])
def test_bad_events(server: LiveServer, path, body, status, code) -> None:
    run = diamond_run(server)
    path = f"/v1/runs/{run}/events" if path == "RUN" else path
    error = assert_error_shape(server.post(path, body), status)
    assert error["code"] == code
    assert state(server, run)["event_count"] == 0


def test_runs_are_listed_by_graph(server: LiveServer) -> None:
    first, second = diamond_run(server), diamond_run(server)
    graph_id = state(server, first)["graph_id"]
    of_graph = server.request("GET", f"/v1/runs?graph_id={graph_id}").json()["data"]
    assert [r["id"] for r in of_graph] == [first]
    everything = [r["id"] for r in listed(server, "/v1/runs")]
    assert first in everything and second in everything
    assert_error_shape(server.post("/v1/runs", {"graph_id": "graph-nope"}), 404)


def test_runs_of_a_graph_and_a_key_are_listed_a_page_at_a_time(server: LiveServer) -> None:
    graph = server.post("/v1/graphs", {"name": "pages", "agents": [{"name": "a"}]}).json()
    runs = [server.post("/v1/runs", {"graph_id": graph["id"], "key": key}).json()["id"]
            for key in ("k1", "k2", None, "k3")]
    of_graph = listed(server, f"/v1/runs?graph_id={graph['id']}", limit=3)
    assert [r["id"] for r in of_graph] == runs
    assert [r["id"] for r in listed(server, f"/v1/runs?graph_id={graph['id']}&key=k2",
                                    limit=1)] == [runs[1]]
    # Ending the run a page ended with does not lose the next one.
    server.request("DELETE", f"/v1/runs/{runs[1]}")
    page = server.request("GET", f"/v1/runs?graph_id={graph['id']}&limit=1&after={runs[1]}")
    assert [r["id"] for r in page.json()["data"]] == [runs[2]] and page.json()["has_more"]
    error = assert_error_shape(server.request("GET", f"/v1/runs?after={graph['id']}"), 400)
    assert error["param"] == "after"
    for run in (runs[0], runs[2], runs[3]):
        server.request("DELETE", f"/v1/runs/{run}")


# ---- model calls and KV ----------------------------------------------------------------------

SYSTEM = "You are one of many agents. " * 12  # a shared prefix of several KV blocks


def chat(server: LiveServer, run: str, agent: str, user: str, **extra: Any):
    body = {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": user}],
            "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "kvrt": {"run": run, "agent": agent}, **extra}
    return server.post("/v1/chat/completions", body)


def kv_run(server: LiveServer) -> str:
    graph = server.post("/v1/graphs", {"name": "kv", "agents": [
        {"name": "x", "expected_output_tokens": 8}, {"name": "y", "expected_output_tokens": 8}],
        "edges": [["x", "y"]]}).json()
    return server.post("/v1/runs", {"graph_id": graph["id"]}).json()["id"]


def integrity(server: LiveServer) -> None:
    async def check():
        await server.engine.wait_idle()
        server.engine.engine.check_integrity()

    server.call(check)


def test_calls_are_accounted_to_their_agent_and_released_with_the_run(server: LiveServer):
    first, second = kv_run(server), kv_run(server)
    assert chat(server, first, "x", "Plan the work.").status == 200
    assert chat(server, first, "y", "Write it up.").status == 200
    assert chat(server, second, "x", "Plan the work.").status == 200
    by = agents(server, first)
    assert by["x"]["generated_tokens"] == 8 and by["x"]["state"] == "idle"
    assert by["x"]["kv"]["device_blocks"] > 0 and by["y"]["kv"]["device_blocks"] > 0
    # x and y share the system prompt's blocks; x's whole prompt is in the other run too.
    assert 0 < by["y"]["kv"]["shared_blocks"] < by["y"]["kv"]["device_blocks"]
    assert by["x"]["kv"]["shared_blocks"] >= by["y"]["kv"]["shared_blocks"]
    other_x = agents(server, second)["x"]["kv"]
    cached = server.stats().kv_blocks_cached

    closed = server.request("DELETE", f"/v1/runs/{first}").json()
    assert closed["deleted"] is True and closed["released_blocks"] > 0
    # Released, not dropped: they stay cached, and the same prompt in a new run reads them.
    assert server.stats().kv_blocks_cached == cached
    # Blocks the other run holds stay; they are no longer shared with anyone.
    assert agents(server, second)["x"]["kv"] == {**other_x, "shared_blocks": 0}
    integrity(server)

    error = assert_error_shape(chat(server, first, "x", "Again."), 404)
    assert error["code"] == "run_not_found"
    assert_error_shape(server.request("GET", f"/v1/runs/{first}"), 404)
    assert_error_shape(server.request("DELETE", f"/v1/runs/{first}"), 404)
    third = kv_run(server)
    reply = chat(server, third, "y", "Write it up.")
    assert reply.status == 200
    hit = reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert hit == (reply.json()["usage"]["prompt_tokens"] - 1) // 16 * 16  # all but the last
    for run in (second, third):
        assert server.request("DELETE", f"/v1/runs/{run}").json()["released_blocks"] > 0
    stats = server.stats()
    assert stats.kv_blocks_in_use == 0
    integrity(server)


@pytest.mark.parametrize(("kvrt", "status", "code"), [
    ({"agent": "x"}, 400, None),
    ({"run": "RUN"}, 400, None),
    ({"run": "RUN", "agent": "nobody"}, 404, "agent_not_found"),
    ({"run": "run-nope", "agent": "x"}, 404, "run_not_found"),
], ids=["agent-without-run", "run-without-agent", "unknown-agent", "unknown-run"])
def test_badly_attributed_calls(server: LiveServer, kvrt, status, code) -> None:
    run = kv_run(server)
    kvrt = {k: (run if v == "RUN" else v) for k, v in kvrt.items()}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "kvrt": kvrt}
    error = assert_error_shape(server.post("/v1/chat/completions", body), status)
    assert error["code"] == code
    assert all(a["requests"] == 0 for a in agents(server, run).values())


def test_state_follows_a_call_in_flight(server: LiveServer) -> None:
    run = kv_run(server)

    async def look_while_streaming():
        body = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 1800,
                "ignore_eos": True, "stream": True, "kvrt": {"run": run, "agent": "x"}}
        async with aiohttp.ClientSession() as session, session.post(
                server.url + "/v1/chat/completions", json=body) as resp:
            events = sse_events(resp)
            await anext(events)
            await anext(events)
            async with session.get(f"{server.url}/v1/runs/{run}") as got:
                during = (await got.json())["agents"][0]
            async with session.delete(f"{server.url}/v1/runs/{run}") as closed:
                status = closed.status
            rest = [e async for e in events]
        return during, status, rest

    during, status, rest = asyncio.run(look_while_streaming())
    assert during["name"] == "x"
    assert during["state"] == "generating" and during["requests"] == 1
    assert during["kv"]["device_blocks"] > 0
    assert status == 200
    assert rest[-1] == "[DONE]" and rest[-2]["error"]["code"] == "run_ended"
    stats = server.stats()
    assert (stats.running, stats.waiting, stats.kv_blocks_in_use) == (0, 0, 0)
    integrity(server)


def test_text_completions_are_attributed_too(server: LiveServer) -> None:
    run = kv_run(server)
    # Long enough to fill whole blocks: a partial last block is not kept after the call.
    body = {"prompt": "Once upon a time " * 12, "max_tokens": 5, "ignore_eos": True}
    reply = server.post("/v1/completions", body, headers={"X-Kvrt-Run": run, "X-Kvrt-Agent": "y"})
    assert reply.status == 200, reply.body
    by = agents(server, run)
    assert (by["y"]["generated_tokens"], by["x"]["generated_tokens"]) == (5, 0)
    assert by["y"]["kv"]["device_blocks"] > 0
    server.request("DELETE", f"/v1/runs/{run}")
