"""Client disconnects abort their request in the engine and free its KV; attribution from the
body and headers reaches the engine's request. Long requests need a long context here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from kvrt.runtime.config import EngineConfig
from tests.server.live_server import LiveServer, live_server, sse_events

LONG = 1800  # tokens a request would generate if nobody stopped it (seconds of work)


@pytest.fixture(scope="module")
def long_server(tiny_model: Path) -> Iterator[LiveServer]:
    config = EngineConfig(kv_cache_memory=8 * 1024**2, max_model_len=2048, max_num_seqs=4)
    yield from live_server(tiny_model, config)


def long_chat(**extra):
    return {"messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": LONG, "ignore_eos": True, **extra}


def wait_until_idle(server: LiveServer, timeout: float = 5.0):
    """Polls until no request is running or waiting and no KV block is referenced."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()
        if (stats.running, stats.waiting, stats.kv_blocks_in_use) == (0, 0, 0):
            return stats
        assert time.monotonic() < deadline, f"engine still busy after disconnect: {stats}"
        time.sleep(0.02)


def check_integrity(server: LiveServer) -> None:
    async def check():
        await server.engine.wait_idle()
        server.engine.engine.check_integrity()

    server.call(check)


def test_disconnect_mid_stream_frees_kv(long_server: LiveServer) -> None:
    before = long_server.stats().generation_tokens

    async def read_a_little_then_leave() -> None:
        async with aiohttp.ClientSession() as session:
            resp = await session.post(long_server.url + "/v1/chat/completions",
                                      json=long_chat(stream=True))
            events = sse_events(resp)
            for _ in range(3):
                await anext(events)
            assert long_server.stats().running == 1
            resp.close()  # drops the connection mid-stream

    asyncio.run(read_a_little_then_leave())
    stats = wait_until_idle(long_server)
    assert stats.generation_tokens - before < LONG  # aborted, not run to its end
    check_integrity(long_server)


def test_disconnect_mid_request_frees_kv(long_server: LiveServer) -> None:
    before = long_server.stats().generation_tokens

    async def give_up_waiting() -> None:
        timeout = aiohttp.ClientTimeout(total=0.3)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            with pytest.raises(asyncio.TimeoutError):
                await session.post(long_server.url + "/v1/chat/completions", json=long_chat())

    asyncio.run(give_up_waiting())
    stats = wait_until_idle(long_server)
    assert stats.generation_tokens - before < LONG
    check_integrity(long_server)


def live_attributions(server: LiveServer):
    """The attribution of each request the engine holds, by request id (read on the server
    loop, between the engine's outputs)."""

    async def read():
        return server.engine.engine.live_attributions()

    return server.call(read)


@pytest.fixture(scope="module")
def run_id(long_server: LiveServer) -> str:
    """A run of planner (3 s of tool work) -> writer (1 s), beside an unconnected `other`
    (1 s): planner and writer lie on the 4 s critical path, other has 3 s of slack."""
    graph = long_server.post("/v1/graphs", {"name": "attribution", "agents": [
        {"name": "planner", "tools": {"search": 3}, "expected_output_tokens": 0},
        {"name": "writer", "tools": {"check": 1}, "expected_output_tokens": 0},
        {"name": "other", "tools": {"check": 1}, "expected_output_tokens": 0},
    ], "edges": [["planner", "writer"]]}).json()
    return long_server.post("/v1/runs", {"graph_id": graph["id"]}).json()["id"]


@pytest.mark.parametrize(("body_kvrt", "headers", "expected"), [
    ({"run": "RUN", "agent": "planner"}, {}, ("RUN", "planner", 1.0)),
    (None, {"X-Kvrt-Run": "RUN", "X-Kvrt-Agent": "writer"}, ("RUN", "writer", 1.0)),
    ({"agent": "other"}, {"X-Kvrt-Run": "RUN", "X-Kvrt-Agent": "writer"},
     ("RUN", "other", 0.25)),
    (None, {}, (None, None, 0.0)),
], ids=["body", "headers", "body-wins", "none"])
def test_attribution_and_priority_reach_the_engine(long_server: LiveServer, run_id: str,
                                                   body_kvrt, headers, expected) -> None:
    def fill(value):
        return run_id if value == "RUN" else value

    body_kvrt = {k: fill(v) for k, v in body_kvrt.items()} if body_kvrt else None
    headers = {k: fill(v) for k, v in headers.items()}
    body = long_chat(stream=True) | ({"kvrt": body_kvrt} if body_kvrt else {})

    async def look_while_running():
        async with aiohttp.ClientSession() as session:
            resp = await session.post(long_server.url + "/v1/chat/completions", json=body,
                                      headers=headers)
            first = await anext(sse_events(resp))
            found = live_attributions(long_server).get(first["id"])
            resp.close()
            return found

    attribution = asyncio.run(look_while_running())
    assert attribution is not None, "the request was no longer live"
    got = (attribution.run, attribution.agent, attribution.priority)
    assert got == (fill(expected[0]), expected[1], pytest.approx(expected[2]))
    wait_until_idle(long_server)
