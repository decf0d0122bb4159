"""`--max-messages` (chat requests and rounds: 400 naming the field) and
`--max-events-per-second` (per run, a burst of as many: 429 with Retry-After) over HTTP; the
daemon keeps serving after each refusal."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvrt.runtime.config import ServerLimits
from tests.server.live_server import (
    LiveServer,
    Reply,
    assert_error_shape,
    good_chat,
    live_server,
    start_run,
)

RATE = 2  # events a second per run, and the burst


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    limits = ServerLimits(max_messages=4, max_events_per_s=RATE)
    yield from live_server(tiny_model, limits=limits)


@pytest.fixture(autouse=True)
def kv_returns_to_zero(server: LiveServer) -> Iterator[None]:
    yield

    async def settled():
        await server.engine.wait_idle()
        server.engine.engine.check_integrity()
        return server.engine.stats()

    assert server.call(settled).kv_blocks_in_use == 0


def turns(n: int) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"}
            for i in range(n)]


def test_a_chat_with_too_many_messages_is_a_400(server: LiveServer) -> None:
    error = assert_error_shape(server.post("/v1/chat/completions",
                                           {"messages": turns(5), "max_tokens": 1}), 400)
    assert (error["param"], error["code"]) == ("messages", "too_many_messages")
    assert "5 messages" in error["message"] and "4" in error["message"]
    assert server.post("/v1/chat/completions", {"messages": turns(4), "max_tokens": 1}
                       ).status == 200


def test_a_round_counts_every_message_in_its_body(server: LiveServer) -> None:
    run = start_run(server, "x", "y")
    body: dict[str, Any] = {"shared": turns(2), "max_tokens": 1, "agents": {
        "x": {"messages": turns(1)}, "y": {"messages": turns(1)}}}
    assert server.post(f"/v1/runs/{run}/rounds", body).status == 200  # 4 in all
    body["agents"]["y"]["after"] = turns(1)
    error = assert_error_shape(server.post(f"/v1/runs/{run}/rounds", body), 400)
    assert (error["param"], error["code"]) == ("agents.y.after", "too_many_messages")
    body["agents"]["y"] = {"messages": turns(1)}
    body["instruction"] = turns(2)  # shared 2 + instruction 2: x's message is the fifth
    error = assert_error_shape(server.post(f"/v1/runs/{run}/rounds", body), 400)
    assert error["param"] == "agents.x.messages"
    assert server.request("GET", f"/v1/runs/{run}").json()["agents"][0]["calls"] == 1
    assert server.request("DELETE", f"/v1/runs/{run}").status == 200


def post_all(server: LiveServer, posts: list[tuple[str, dict[str, Any]]]) -> list[Reply]:
    """POSTs one after another on one connection, so that they come within a few ms."""

    async def go() -> list[Reply]:
        replies = []
        async with aiohttp.ClientSession() as session:
            for path, body in posts:
                async with session.post(server.url + path, json=body) as resp:
                    replies.append(Reply(resp.status, dict(resp.headers), await resp.read()))
        return replies

    return asyncio.run(go())


def test_a_run_that_sends_events_too_fast_gets_429_with_retry_after(
        server: LiveServer) -> None:
    run, other = start_run(server, "x"), start_run(server, "x")
    start = {"type": "tool_call.started", "agent": "x", "tool": "search"}
    finish = {"type": "tool_call.finished", "agent": "x", "tool": "search"}
    replies = post_all(server, [(f"/v1/runs/{run}/events", start),
                                (f"/v1/runs/{run}/events", finish),
                                (f"/v1/runs/{run}/events", start),
                                (f"/v1/runs/{other}/events", start)])
    assert [r.status for r in replies] == [200, 200, 429, 200]  # the limit is per run
    error = assert_error_shape(replies[2], 429)
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert replies[2].headers["Retry-After"] == "1"
    state = server.request("GET", f"/v1/runs/{run}").json()
    assert state["event_count"] == 2 and state["agents"][0]["state"] == "idle"
    time.sleep(1 / RATE + 0.05)  # one more token
    assert server.post(f"/v1/runs/{run}/events", start).status == 200
    for run_id in (run, other):
        assert server.request("DELETE", f"/v1/runs/{run_id}").status == 200
    assert server.post("/v1/chat/completions", good_chat()).status == 200
