"""`kvrt:kv_cache_usage_perc` counts the blocks live requests hold: 0 on an idle daemon, even
while a policy (`ttl`) pins an agent's KV for its tool call, which the pinned gauge shows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvrt.runtime.config import EngineConfig
from kvrt.runtime.engine.protocol import GenerateRequest, SamplingParams
from kvrt.runtime.server.metrics import kv_cache_usage
from tests.server.live_server import LiveServer, live_server


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    config = EngineConfig(kv_cache_memory=4 * 1024**2, max_model_len=512, max_num_seqs=8,
                          policy="ttl")
    yield from live_server(tiny_model, config)


def gauges(server: LiveServer) -> dict[str, float]:
    """The kv gauges once the engine has handled everything sent (its pool checked too)."""

    async def settle() -> None:
        await server.engine.wait_idle()
        server.engine.engine.check_integrity()

    server.call(settle)
    text = server.request("GET", "/metrics").body.decode()
    wanted = ("kvrt:kv_cache_usage_perc", "kvrt:kv_cache_pinned_blocks")
    return {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(wanted)}


def test_usage_is_zero_when_idle_even_with_pinned_blocks(server: LiveServer) -> None:
    graph = server.post("/v1/graphs", {"name": "g", "agents": [
        {"name": "x", "tools": {"search": 30}}]}).json()
    run = server.post("/v1/runs", {"graph_id": graph["id"]}).json()["id"]
    body = {"messages": [{"role": "system", "content": "You look things up. " * 20},
                         {"role": "user", "content": "Search."}],
            "max_tokens": 2, "kvrt": {"run": run, "agent": "x"}}
    assert server.post("/v1/chat/completions", body).status == 200
    assert gauges(server) == {"kvrt:kv_cache_usage_perc": 0.0,
                              "kvrt:kv_cache_pinned_blocks": 0.0}
    event = {"type": "tool_call.started", "agent": "x", "tool": "search"}
    assert server.post(f"/v1/runs/{run}/events", event).status == 200
    pinned = gauges(server)
    assert pinned["kvrt:kv_cache_pinned_blocks"] > 0  # held for the agent, by no request
    assert pinned["kvrt:kv_cache_usage_perc"] == 0.0
    assert server.request("DELETE", f"/v1/runs/{run}").status == 200
    assert gauges(server)["kvrt:kv_cache_pinned_blocks"] == 0.0


def test_usage_counts_a_request_in_flight(server: LiveServer) -> None:
    """While a request runs, its blocks count (so the gauge is not 0 by construction)."""
    seen: list[float] = []

    async def during() -> None:
        request = GenerateRequest("usage-probe", list(range(3, 60)),
                                  SamplingParams(max_tokens=3, ignore_eos=True))
        async for _ in server.engine.generate(request):
            seen.append(kv_cache_usage(server.engine.stats()))

    server.call(during)
    assert seen and seen[0] > 0
    assert gauges(server)["kvrt:kv_cache_usage_perc"] == 0.0
