"""The engine stops under a live stream and stays down: the stream ends with an error event,
/health says 503 and new generations fail with a 500 in the error shape, while the server
itself keeps answering."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from kvrt.runtime.config import EngineConfig
from tests.server.live_server import (
    LiveServer,
    assert_error_shape,
    good_chat,
    live_server,
    sse_events,
)


async def stop_engine_mid_stream(server: LiveServer) -> list:
    body = good_chat(max_tokens=1800, ignore_eos=True, stream=True)
    async with aiohttp.ClientSession() as session, session.post(
        server.url + "/v1/chat/completions", json=body
    ) as resp:
        events, stopped = [], False
        async for event in sse_events(resp):
            events.append(event)
            if len(events) == 3 and not stopped:
                server.call(server.engine.stop)
                stopped = True
        return events


@pytest.fixture(scope="module")
def stopped(tiny_model: Path) -> Iterator[tuple[LiveServer, list]]:
    config = EngineConfig(kv_cache_memory=8 * 1024**2, max_model_len=2048)
    for server in live_server(tiny_model, config):
        yield server, asyncio.run(stop_engine_mid_stream(server))


def test_stream_ends_with_an_error_event(stopped) -> None:
    _, events = stopped
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["type"] == "server_error" and "shutting down" in error["message"]
    assert all("choices" in e for e in events[:-2])


def test_health_is_503(stopped) -> None:
    error = assert_error_shape(stopped[0].request("GET", "/health"), 503)
    assert error["type"] == "service_unavailable"


@pytest.mark.parametrize("stream", [False, True])
def test_generation_is_a_500(stopped, stream: bool) -> None:
    reply = stopped[0].post("/v1/chat/completions", good_chat(stream=stream))
    error = assert_error_shape(reply, 500)
    assert error["type"] == "server_error" and "engine" in error["message"]


def test_other_routes_still_answer(stopped) -> None:
    assert stopped[0].request("GET", "/v1/models").status == 200
    assert stopped[0].request("GET", "/metrics").status == 200
