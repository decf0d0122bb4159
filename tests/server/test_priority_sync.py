"""A live daemon under `tokencake` that runs one call at a time: the priorities of a run's queued
calls follow its critical path as events move it (the server pushes them to the engine, which
admits by them), and a run's pushed priorities go with the run."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kvrt.runtime.server.priority_sync import MIN_PUSH_INTERVAL_S, PRIORITY_SYNC
from tests.server.live_server import LiveServer, live_server, tokencake_engine, wait_released


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    # One call at a time, and room for a blocker that runs for seconds.
    config = replace(tokencake_engine(tiny_model, 128), max_num_seqs=1, max_model_len=2048)
    yield from live_server(tiny_model, config)


def until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Call(threading.Thread):
    """One greedy call of `agent`, in the background; `done_at` is when its reply came."""

    def __init__(self, server: LiveServer, run: str, agent: str, max_tokens: int) -> None:
        super().__init__()
        self.body = {"messages": [{"role": "user", "content": f"Work, {agent}."}],
                     "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                     "kvrt": {"run": run, "agent": agent}}
        self.server, self.status, self.done_at = server, 0, 0.0
        self.start()

    def run(self) -> None:
        self.status = self.server.post("/v1/chat/completions", self.body).status
        self.done_at = time.monotonic()


def pushed(server: LiveServer, run: str) -> dict[str, float]:
    return server.engine.engine.priorities.of_run(run)


def start(server: LiveServer, graph: dict[str, Any]) -> str:
    graph_id = server.post("/v1/graphs", graph).json()["id"]
    return server.post("/v1/runs", {"graph_id": graph_id}).json()["id"]


def test_a_long_tool_moves_the_critical_path_and_the_queue_follows(server) -> None:
    """x -> y, and z alone. z's 1,000 tokens are the critical path until x starts a tool of
    1,000 s: then y, after x, is on it and z far off. y's call, queued behind w's long one, was
    made at y's old priority, below z's; it runs first all the same."""
    run = start(server, {"name": "moves", "edges": [["x", "y"]], "agents": [
        {"name": "x", "expected_output_tokens": 10, "tools": {"build": 1}},
        {"name": "y", "expected_output_tokens": 10},
        {"name": "z", "expected_output_tokens": 1000},
        {"name": "w", "expected_output_tokens": 10}]})
    blocker = Call(server, run, "w", 1500)  # seconds; the engine runs one call at a time
    until(lambda: server.stats().running == 1)
    y = Call(server, run, "y", 2)
    until(lambda: server.stats().waiting == 1)
    z = Call(server, run, "z", 2)
    until(lambda: server.stats().waiting == 2)
    before = pushed(server, run)  # the submissions pushed every agent's
    assert before["z"] == 1.0 and before["y"] == pytest.approx((20 * 0.02 + 1) / 20)

    reply = server.post(f"/v1/runs/{run}/events", {"type": "tool_call.started", "agent": "x",
                                                   "tool": "build", "expected_duration_s": 1000})
    assert reply.status == 200, reply.body
    until(lambda: pushed(server, run)["y"] == 1.0)
    assert pushed(server, run)["z"] == pytest.approx(20 / 1000.4, rel=1e-3)  # the tool runs
    stats = server.stats()
    assert (stats.running, stats.waiting) == (1, 2), "w ended before the event: nothing shown"

    for call in (blocker, y, z):
        call.join(30)
        assert call.status == 200
    assert y.done_at < z.done_at
    assert server.request("DELETE", f"/v1/runs/{run}").status == 200
    wait_released(server)


def test_only_changed_priorities_are_pushed_and_none_once_the_run_ended(server, monkeypatch):
    """a -> b, and c alone (0.02 s an output token). Each applied event pushes the priorities
    it changed, every agent's the first time; an ended run's table is gone, and the end of its
    aborted call pushes nothing."""
    run = start(server, {"name": "ends", "edges": [["a", "b"]], "agents": [
        {"name": "a", "expected_output_tokens": 100}, {"name": "b", "expected_output_tokens": 100},
        {"name": "c", "expected_output_tokens": 50}]})
    sync = server._runner.app[PRIORITY_SYNC]
    sent: list[dict[str, float]] = []
    set_priorities = server.engine.set_priorities
    monkeypatch.setattr(server.engine, "set_priorities",
                        lambda r, p: sent.append(dict(p)) or set_priorities(r, p))
    assert run in sync and pushed(server, run) == {}  # tracked, nothing pushed yet

    def event(body: dict[str, Any], pushes: int) -> None:
        """Posts it; the push follows on the server's next loop turn."""
        assert server.post(f"/v1/runs/{run}/events", body).status == 200
        until(lambda: len(sent) == pushes)

    event({"type": "agent.done", "agent": "b"}, 1)  # a's 2 s are the path; c's 1 s is half
    assert sent == [{"a": 1.0, "b": 0.0, "c": 0.5}]
    event({"type": "agent.done", "agent": "b"}, 1)  # a duplicate: applied never, pushed never
    event({"type": "tool_call.started", "agent": "c", "tool": "t", "expected_duration_s": 1e5},
          2)
    assert sent[1:] == [{"a": pytest.approx(2 / (1 + 1e5)), "c": 1.0}]  # b stays 0: not sent
    event({"type": "tool_call.finished", "agent": "c", "tool": "t"}, 3)
    assert sent[2:] == [{"a": 1.0, "c": 0.5}]
    until(lambda: pushed(server, run) == {"a": 1.0, "b": 0.0, "c": 0.5})  # applied in turn

    long = Call(server, run, "a", 400)
    until(lambda: server.stats().running == 1)
    assert len(sent) == 3  # its submission changed no priority
    assert server.request("DELETE", f"/v1/runs/{run}").status == 200
    long.join(30)
    assert long.status == 409  # run_ended
    wait_released(server)
    assert run not in sync and pushed(server, run) == {}
    assert len(sent) == 3  # the aborted call's end pushed nothing for the ended run


def test_a_call_of_a_done_agent_is_pushed_its_priority_again(server) -> None:
    """b and c, no edge (0.02 s an output token). b done has priority 0, and its new call is
    stamped from the run it found (b's work 0: priority 0 still); the revival is pushed soon
    after, while the call runs: b's work (2 s, less what it generated since) is the critical
    path again."""
    run = start(server, {"name": "revives", "agents": [
        {"name": "b", "expected_output_tokens": 100},
        {"name": "c", "expected_output_tokens": 50}]})
    assert server.post(f"/v1/runs/{run}/events",
                       {"type": "agent.done", "agent": "b"}).status == 200
    until(lambda: pushed(server, run) == {"b": 0.0, "c": 1.0})
    call = Call(server, run, "b", 1500)
    until(lambda: pushed(server, run)["b"] == 1.0)
    assert call.is_alive()  # pushed for the revival, not at the call's end
    assert pushed(server, run)["c"] < 1.0  # c's 1 s are no longer the path (0.5 at first)
    call.join(60)
    assert call.status == 200
    assert server.request("DELETE", f"/v1/runs/{run}").status == 200
    wait_released(server)


def test_a_flood_of_events_costs_one_push_per_interval(server, monkeypatch) -> None:
    """80 events posted back to back on one run: pushed at most once per MIN_PUSH_INTERVAL_S
    (and the first at once), not once per event; the last state is pushed all the same."""
    run = start(server, {"name": "flood", "agents": [
        {"name": "a", "expected_output_tokens": 100}, {"name": "b"}]})
    pushes: list[float] = []
    set_priorities = server.engine.set_priorities
    monkeypatch.setattr(server.engine, "set_priorities",
                        lambda r, p: pushes.append(time.monotonic()) or set_priorities(r, p))
    started = time.monotonic()
    for _ in range(40):
        for body in ({"type": "tool_call.started", "expected_duration_s": 1e5},
                     {"type": "tool_call.finished"}):
            reply = server.post(f"/v1/runs/{run}/events", {**body, "agent": "a", "tool": "t"})
            assert reply.status == 200
    elapsed = time.monotonic() - started
    # The tool is over, so as at first: b's 256 default tokens (5.12 s) are the path, a's 2 s
    # of 5.12 s.
    until(lambda: pushed(server, run) == {"a": 2 / 5.12, "b": 1.0})
    assert len(pushes) <= elapsed / MIN_PUSH_INTERVAL_S + 2 < 80
    assert server.request("DELETE", f"/v1/runs/{run}").status == 200
