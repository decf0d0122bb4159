"""A live daemon under `--policy ttl`: tool-call events reach the engine's policy, which pins the
agent's cached KV while the tool runs and lets it go on the agent's next call, at the end of the
run, or when the tool's time-to-live runs out."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvrt.runtime.config import EngineConfig
from tests.server.live_server import LiveServer, live_server

SYSTEM = "You are one of many agents. " * 12  # a prompt of several full KV blocks


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    config = EngineConfig(kv_cache_memory=4 * 1024**2, max_model_len=512, max_num_seqs=8,
                          policy="ttl")
    yield from live_server(tiny_model, config)


def _run(server: LiveServer) -> str:
    graph = server.post("/v1/graphs", {"name": "ttl", "agents": [
        {"name": "x", "tools": {"search": 4}}, {"name": "y"}]}).json()
    return server.post("/v1/runs", {"graph_id": graph["id"]}).json()["id"]


def _chat(server: LiveServer, run: str, agent: str, user: str,
          system: str = SYSTEM) -> dict[str, Any]:
    """One greedy 4-token call of `agent`, attributed to `run`; its usage."""
    body = {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": user}],
            "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "kvrt": {"run": run, "agent": agent}}
    reply = server.post("/v1/chat/completions", body)
    assert reply.status == 200, reply.body
    return reply.json()["usage"]


def _event(server: LiveServer, run: str, **body: Any) -> None:
    reply = server.post(f"/v1/runs/{run}/events", body)
    assert reply.status == 200, reply.body


def _stats(server: LiveServer):
    """The engine's stats once it has handled every command sent so far (events included)."""

    async def settled():
        await server.engine.wait_idle()
        server.engine.engine.check_integrity()
        return server.engine.stats()

    return server.call(settled)


def _ttl_left(server: LiveServer, run: str, agent: str) -> float:
    """Seconds until the agent's pin expires (the daemon's engine runs on time.monotonic)."""
    policy = server.engine.engine.policy
    return policy.expiries[run, agent] - time.monotonic()


def _device_blocks(server: LiveServer, run: str, agent: str) -> int:
    agents = server.request("GET", f"/v1/runs/{run}").json()["agents"]
    return {a["name"]: a["kv"]["device_blocks"] for a in agents}[agent]


def test_a_tool_call_pins_the_agents_kv_until_its_next_call(server: LiveServer) -> None:
    run = _run(server)
    first = _chat(server, run, "x", "Search for it.")
    _chat(server, run, "y", "Wait.")
    held = _device_blocks(server, run, "x")
    computed = first["prompt_tokens"] + 4 - 1  # the last token sampled has no KV
    assert held == computed // 16  # its full blocks stay cached
    assert (_stats(server).kv_blocks_pinned, _stats(server).kv_blocks_in_use) == (0, 0)

    _event(server, run, type="tool_call.started", agent="x", tool="search")
    stats = _stats(server)
    assert (stats.kv_blocks_pinned, stats.kv_blocks_in_use) == (held, held)  # y's not pinned
    assert 5 < _ttl_left(server, run, "x") <= 6  # the declared 4 s with a margin of 1.5
    _event(server, run, type="tool_call.finished", agent="x", tool="search")
    assert _stats(server).kv_blocks_pinned == held  # kept for the call that follows

    again = _chat(server, run, "x", "Search for it.")  # the same prompt, the same blocks
    cached = again["prompt_tokens_details"]["cached_tokens"]
    assert cached == (first["prompt_tokens"] - 1) // 16 * 16  # leaving one token to compute
    stats = _stats(server)
    assert (stats.kv_blocks_pinned, stats.kv_blocks_in_use) == (0, 0)

    _event(server, run, type="tool_call.started", agent="x", tool="search")
    assert _stats(server).kv_blocks_pinned == held
    closed = server.request("DELETE", f"/v1/runs/{run}").json()
    assert closed["released_blocks"] >= held
    stats = _stats(server)
    assert (stats.kv_blocks_pinned, stats.kv_blocks_in_use) == (0, 0)


def test_duplicate_and_agent_done_events(server: LiveServer) -> None:
    run = _run(server)
    _chat(server, run, "x", "Look it up.")
    held = _device_blocks(server, run, "x")
    start = {"type": "tool_call.started", "agent": "x", "tool": "search", "id": "s1"}
    _event(server, run, **start)
    _event(server, run, **start)  # a retry: the policy does not hear it again
    assert _stats(server).kv_blocks_pinned == held
    _event(server, run, type="agent.done", agent="x")
    stats = _stats(server)
    assert (stats.kv_blocks_pinned, stats.kv_blocks_in_use) == (0, 0)
    server.request("DELETE", f"/v1/runs/{run}")


def test_a_pin_expires_while_the_daemon_is_idle(server: LiveServer) -> None:
    run = _run(server)
    _chat(server, run, "x", "Quick lookup.")
    # The client predicts 1 s: a TTL of 1.5 s, then the engine's idle tick lets the KV go.
    _event(server, run, type="tool_call.started", agent="x", tool="search",
           expected_duration_s=1.0)
    assert _stats(server).kv_blocks_pinned > 0
    assert _ttl_left(server, run, "x") <= 1.5  # the client's estimate, not the declared 4 s
    deadline = time.monotonic() + 10
    while _stats(server).kv_blocks_pinned and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = _stats(server)
    assert (stats.kv_blocks_pinned, stats.kv_blocks_in_use) == (0, 0)
    assert _device_blocks(server, run, "x") > 0  # still cached, merely evictable again
    server.request("DELETE", f"/v1/runs/{run}")
