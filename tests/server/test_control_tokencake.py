"""A live daemon under `--policy tokencake` with a host tier: an agent that starts a long tool
while the device pool is under pressure has its KV moved to the host, visible in the run's
state and the metrics, and brought back when the tool returns, for its next call to reuse."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.live_server import LiveServer, live_server, tokencake_engine
from tests.server.test_control_ttl import _chat as chat
from tests.server.test_control_ttl import _event as event
from tests.server.test_control_ttl import _stats as stats
from tests.server.test_server_metrics import parse_metrics

SYSTEM = "You are one of many agents. " * 12  # a prompt of several full KV blocks
POOL_BLOCKS = 48


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, tokencake_engine(tiny_model, POOL_BLOCKS))


def until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def kv_of(server: LiveServer, run: str, agent: str) -> dict[str, int]:
    agents = server.request("GET", f"/v1/runs/{run}").json()["agents"]
    return {a["name"]: a["kv"] for a in agents}[agent]


def test_a_long_tool_under_pressure_sends_the_kv_to_the_host_and_back(server) -> None:
    graph = server.post("/v1/graphs", {"name": "tc", "agents": [
        {"name": "coder", "tools": {"tests": 60}}, {"name": "helper"}]}).json()
    run = server.post("/v1/runs", {"graph_id": graph["id"]}).json()["id"]
    first = chat(server, run, "coder", "Write the parser.", SYSTEM)
    held = kv_of(server, run, "coder")["device_blocks"]
    assert held > 0
    for i in range(20):  # other work fills the pool with cached KV: under pressure
        now = stats(server)
        if now.kv_blocks_total - now.kv_blocks_in_use - now.kv_blocks_cached < POOL_BLOCKS / 4:
            break
        chat(server, run, "helper", "Go.", f"Helper number {i} remembers: " + "facts " * 60)
    event(server, run, type="tool_call.started", agent="coder", tool="tests")
    until(lambda: stats(server).kv_blocks_offloaded >= held)
    state = kv_of(server, run, "coder")
    assert (state["device_blocks"], state["host_blocks"]) == (0, held)
    assert state["decision"] == "offload" and kv_of(server, run, "helper")["decision"] is None
    _, samples = parse_metrics(server.request("GET", "/metrics").body.decode())
    labels = frozenset({("model_name", "tiny"), ("decision", "offload")})
    assert samples[("kvrt:kv_tier_decisions_total", labels)] == 1
    assert samples[("kvrt:kv_offloaded_blocks_total", frozenset({("model_name", "tiny")}))] == held

    event(server, run, type="tool_call.finished", agent="coder", tool="tests")
    until(lambda: stats(server).kv_blocks_uploaded >= held)
    assert kv_of(server, run, "coder")["device_blocks"] == held
    # Its next call reuses what came back: the whole system prompt's full blocks.
    again = chat(server, run, "coder", "Fix the failing test.", SYSTEM)
    system_tokens = len(server.engine.tokenizer.encode_chat([
        {"role": "system", "content": SYSTEM}]))
    assert again["prompt_tokens_details"]["cached_tokens"] >= (system_tokens - 16) // 16 * 16 > 0
    assert first["prompt_tokens"] > system_tokens
    server.engine.engine.check_integrity()
    # The run's end takes the policy's memory of its agents with it.
    policy = server.engine.engine.policy
    assert any(owner[0] == run for owner in policy.last_decision)
    assert server.request("DELETE", f"/v1/runs/{run}").status == 200
    assert not any(owner[0] == run for state in (policy.away, policy.reserved, policy.lent,
                                                policy.last_decision) for owner in state)
