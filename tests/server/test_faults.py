"""A fault in one engine step (the executor raising) fails that step's calls with a clear error
in OpenAI's shape (a 500, or an error event in a stream), frees their KV, and the server serves
the next calls."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.server.live_server import (
    LiveServer,
    assert_error_shape,
    good_chat,
    sse_events,
    wait_released,
)


def break_next_run(server: LiveServer) -> None:
    executor = server.engine.engine.executor
    real = executor.run

    def broken(chunks):
        executor.run = real
        raise RuntimeError("device fault")

    executor.run = broken


def test_a_failed_step_is_a_500_and_the_next_call_is_served(server: LiveServer) -> None:
    break_next_run(server)
    error = assert_error_shape(server.post("/v1/chat/completions", good_chat()), 500)
    assert error["type"] == "server_error" and error["code"] == "engine_error"
    assert "engine step failed" in error["message"] and "device fault" in error["message"]
    wait_released(server)
    assert_serving(server)


def test_a_failed_step_mid_stream_ends_it_with_an_error_event(server: LiveServer) -> None:
    async def break_mid_stream() -> list:
        body = good_chat(max_tokens=200, ignore_eos=True, stream=True)
        async with aiohttp.ClientSession() as session, session.post(
            server.url + "/v1/chat/completions", json=body
        ) as resp:
            events = []
            async for event in sse_events(resp):
                events.append(event)
                if len(events) == 2:
                    break_next_run(server)
            return events

    events = asyncio.run(break_mid_stream())
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["type"] == "server_error" and "device fault" in error["message"]
    assert all("choices" in e for e in events[:-2])
    wait_released(server)
    assert_serving(server)


def assert_serving(server: LiveServer) -> None:
    reply = server.post("/v1/chat/completions", good_chat())
    assert reply.status == 200 and reply.json()["usage"]["completion_tokens"] == 4
