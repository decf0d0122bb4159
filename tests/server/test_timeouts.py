"""Request timeouts: a request older than `request_timeout_s`, queue time included, is aborted in
the engine and its KV freed; a JSON call gets 504 in OpenAI's error shape, a stream ends with an
error event, and the server goes on serving."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvrt.runtime.config import EngineConfig, ServerLimits
from kvrt.runtime.engine.protocol import GenerateRequest, SamplingParams
from tests.server.live_server import (
    LiveServer,
    assert_error_shape,
    good_chat,
    live_server,
    start_run,
    wait_released,
)

TIMEOUT_S = 1.0
LONG = 1800  # tokens: far more than a second of work


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    engine = EngineConfig(kv_cache_memory=8 * 1024**2, max_model_len=2048, max_num_seqs=1)
    yield from live_server(tiny_model, engine, limits=ServerLimits(request_timeout_s=TIMEOUT_S))


def long_chat(**extra):
    return good_chat(max_tokens=LONG, ignore_eos=True, **extra)


def test_a_json_call_past_its_time_gets_504(server: LiveServer) -> None:
    before = server.stats().generation_tokens
    started = time.monotonic()
    reply = server.post("/v1/chat/completions", long_chat())
    elapsed = time.monotonic() - started
    error = assert_error_shape(reply, 504)
    assert error["code"] == "request_timeout" and error["type"] == "server_error"
    assert "time limit" in error["message"]
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 2
    assert server.stats().generation_tokens - before < LONG  # aborted, not run to its end
    wait_released(server)


def test_a_stream_past_its_time_ends_with_an_error_event(server: LiveServer) -> None:
    events = server.stream("/v1/chat/completions", long_chat(stream=True))
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "request_timeout" and error["type"] == "server_error"
    assert all("choices" in e for e in events[:-2]) and len(events) > 3  # it did stream first
    wait_released(server)


def test_queue_time_counts(server: LiveServer) -> None:
    """One sequence runs at a time, and one with no time limit holds it: a short call queued
    behind it times out while it waits, without ever running."""
    params = SamplingParams(max_tokens=LONG, temperature=0.0, ignore_eos=True)

    async def occupy():
        outputs = server.engine.generate(GenerateRequest("occupier", [5] * 8, params))
        await anext(outputs)
        return outputs

    occupier = server.call(occupy)
    try:
        reply = server.post("/v1/chat/completions", good_chat(max_tokens=2))
        assert server.stats().running == 1  # the occupier still runs: the call never did
    finally:
        server.call(occupier.aclose)
    error = assert_error_shape(reply, 504)
    assert error["code"] == "request_timeout"
    wait_released(server)
    reply = server.post("/v1/chat/completions", good_chat(max_tokens=2, ignore_eos=True))
    assert reply.status == 200 and reply.json()["choices"][0]["finish_reason"] == "length"


def test_a_round_past_its_time_gets_the_504_a_chat_call_gets(server: LiveServer) -> None:
    """A round's calls run in a task group: their failure arrives wrapped in an exception
    group, and must come out as what the same failure is on the chat route, not a 500."""
    run = start_run(server, "a", "b")
    body = {"shared": [{"role": "user", "content": "Go on."}],
            "agents": {"a": {"messages": []}, "b": {"messages": []}},
            "max_tokens": LONG, "ignore_eos": True}
    reply = server.post(f"/v1/runs/{run}/rounds", body)
    error = assert_error_shape(reply, 504)
    assert error["code"] == "request_timeout" and "time limit" in error["message"]
    wait_released(server)
