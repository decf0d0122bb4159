"""The point of the graph knowledge, end to end: a ReAct agent built with LangGraph's
`create_react_agent`, on a daemon under `tokencake` with a small device pool and a host tier.
While its tool runs, the model node's KV goes to the host (the tool call is the agent's, not
the ToolNode's), and it is back on the device before the tool's declared duration is up, while
the tool still runs: brought back for the predicted return, not when the tool ends."""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langgraph.prebuilt import create_react_agent

from kvrt.sdk import Client
from kvrt.sdk.langgraph import KvrtChatModel, close, register
from tests.sdk.langgraph_models import ToolCaller
from tests.sdk.test_langgraph import run_of, thread
from tests.server.live_server import LiveServer, live_server, tokencake_engine, wait_released

POOL_BLOCKS = 48
SYSTEM = "You are one of many agents. " * 12  # a prompt of several full KV blocks
DECLARED_S = 1.5  # the tool's declared duration
TOOL_S = 3.0  # how long it really takes: longer, so an upload at its end comes too late
TOLERANCE_S = 0.6


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, tokencake_engine(tiny_model, POOL_BLOCKS))


def fill_the_pool(server: LiveServer, model: KvrtChatModel) -> None:
    """Other work (no run) leaves cached KV behind until the pool is under pressure."""
    for i in range(20):
        now = server.stats()
        if now.kv_blocks_total - now.kv_blocks_in_use - now.kv_blocks_cached < POOL_BLOCKS / 4:
            return
        model.invoke(f"Helper number {i} remembers: " + "facts " * 60)
    raise AssertionError("the pool never came under pressure")


def engine_idle(server: LiveServer) -> None:
    """No call runs."""
    deadline = time.monotonic() + 5.0
    while server.stats().running:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_react_agents_kv_leaves_during_its_tool_and_is_back_before_it_returns(
        server: LiveServer) -> None:
    started: list[float] = []

    @tool
    async def slow(query: str) -> str:
        """A slow search."""
        started.append(time.monotonic())
        await asyncio.sleep(TOOL_S)
        return query

    model = KvrtChatModel(base_url=server.url, max_tokens=2, temperature=0,
                          extra_body={"ignore_eos": True})
    # The tool starts once the engine runs no call (the agent's reply is back).
    caller = ToolCaller(kvrt=model, tool="slow", args={"query": "kv"}, system=SYSTEM,
                        settle=lambda: engine_idle(server))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = create_react_agent(caller, [slow])
    fill_the_pool(server, model)

    async def go() -> list[tuple[float, Any]]:
        samples: list[tuple[float, Any]] = []
        async with Client(server.url) as client:
            graph = await register(compiled, client, name="react-tc",
                                   agents={"tools": {"tools": {"slow": DECLARED_S}}})
            graph_id = graph.config["metadata"]["kvrt_graph_id"]
            invocation = asyncio.create_task(
                graph.ainvoke({"messages": [HumanMessage("Search.")]}, thread("t-tc")))
            while not invocation.done():
                if started:
                    [agent] = (await run_of(client, graph_id, "t-tc")).agents
                    samples.append((time.monotonic() - started[0], agent))
                await asyncio.sleep(0.05)
            await invocation
            await close(graph, "t-tc")
        return samples

    samples = asyncio.run(go())
    during = [(t, a) for t, a in samples if a.state == "tool_call"]
    away = [a.kv for _, a in during if a.kv.host_blocks > 0 and a.kv.device_blocks == 0]
    assert away and away[0].decision == "offload", [(round(t, 2), a.kv) for t, a in during[:3]]
    held = away[0].host_blocks
    # Back on the device by the declared return (plus a little), while the tool still runs.
    back = [t for t, a in during if a.kv.device_blocks >= held]
    assert back and back[0] <= DECLARED_S + TOLERANCE_S < TOOL_S - TOLERANCE_S
    assert during[-1][0] > DECLARED_S + TOLERANCE_S  # the tool was still running then
    wait_released(server)
