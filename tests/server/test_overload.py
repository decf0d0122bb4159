"""Overload: past the queue bounds a request gets 429 with Retry-After at once; a request that can
never fit gets 400 whatever the load; an oversized body gets 413; all in OpenAI's error shape,
and the server keeps serving. One sequence runs at a time, so a few requests fill the queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from kvrt.runtime.config import EngineConfig, ServerLimits
from kvrt.runtime.engine.protocol import EngineLoad
from kvrt.runtime.server.admission import Admission
from kvrt.runtime.server.errors import APIError
from tests.server.live_server import (
    LiveServer,
    assert_error_shape,
    good_chat,
    live_server,
    sse_events,
    start_run,
    wait_released,
    workers_busy,
)

LONG = 1000  # tokens a long request would generate: seconds of work, always closed early
MAX_QUEUED_TOKENS = 300
MAX_BODY = 16 * 1024
# 85 blocks of 16 tokens (1,360 tokens): fewer than max_model_len, so a prompt can be too big
# for the pool yet within the context.
ENGINE = EngineConfig(kv_cache_memory=1024**2, max_model_len=2048, max_num_seqs=1)


@pytest.fixture(scope="module")
def busy(tiny_model: Path) -> Iterator[LiveServer]:
    limits = ServerLimits(max_queued_requests=2, max_queued_tokens=MAX_QUEUED_TOKENS,
                          max_body_bytes=MAX_BODY)
    yield from live_server(tiny_model, ENGINE, limits=limits)


def completion(prompt_tokens: int, max_tokens: int = LONG, **extra):
    return {"prompt": [5 + i % 50 for i in range(prompt_tokens)], "max_tokens": max_tokens,
            "ignore_eos": True, **extra}


def load(server: LiveServer) -> EngineLoad:
    async def read():
        return server.engine.load()

    return server.call(read)


async def wait_for(server: LiveServer, queued: int) -> None:
    deadline = time.monotonic() + 10
    while load(server).queued_requests != queued:
        assert time.monotonic() < deadline, f"queue never reached {queued}: {load(server)}"
        await asyncio.sleep(0.02)


def assert_idle_and_consistent(server: LiveServer) -> None:
    wait_released(server)
    after = load(server)
    assert (after.queued_requests, after.queued_tokens, after.in_flight) == (0, 0, 0)


async def with_a_full_queue(server: LiveServer, queued_prompt: int, probe):
    """One long stream runs; long requests of `queued_prompt` tokens wait (two, or as many as
    the token bound lets in); then `probe(session)` runs and its result is returned. Every
    connection is closed afterwards, which aborts the requests."""
    async with aiohttp.ClientSession() as session:
        running = await session.post(server.url + "/v1/completions",
                                     json=completion(8, stream=True))
        await anext(sse_events(running))  # it produced output: out of the queue
        fits = min(2, MAX_QUEUED_TOKENS // queued_prompt)
        waiting = [asyncio.create_task(session.post(server.url + "/v1/completions",
                                                    json=completion(queued_prompt)))
                   for _ in range(fits)]
        await wait_for(server, fits)
        try:
            return await probe(session)
        finally:
            running.close()
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)


async def refused(session: aiohttp.ClientSession, url: str, body) -> tuple[int, dict, dict]:
    started = time.monotonic()
    async with session.post(url, json=body) as resp:
        assert time.monotonic() - started < 1.0  # refused at once, not queued
        return resp.status, dict(resp.headers), await resp.json()


@pytest.mark.parametrize("stream", [False, True])
def test_past_max_queued_requests_a_request_gets_429_with_retry_after(busy, stream) -> None:
    async def probe(session):
        return await refused(session, busy.url + "/v1/chat/completions",
                             good_chat(stream=stream))

    status, headers, body = asyncio.run(with_a_full_queue(busy, 8, probe))
    assert status == 429, body
    assert int(headers["Retry-After"]) >= 1
    error = body["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
    assert "2 requests" in error["message"]
    assert_idle_and_consistent(busy)
    assert busy.post("/v1/chat/completions", good_chat()).status == 200  # still serving


def test_a_round_is_refused_by_its_count_before_its_prompts_are_built(busy) -> None:
    """With every prompt worker held, a round the queue's count refuses is refused at once:
    its prompts are never rendered or tokenized."""
    run = start_run(busy, "a", "b")
    body = {"agents": {"a": {}, "b": {}}, "shared": [{"role": "user", "content": "News."}],
            "max_tokens": 2}

    async def probe(session):
        with workers_busy(busy):
            return await refused(session, f"{busy.url}/v1/runs/{run}/rounds", body)

    status, _, reply = asyncio.run(with_a_full_queue(busy, 8, probe))
    assert status == 429 and reply["error"]["code"] == "queue_full", reply
    assert busy.request("DELETE", f"/v1/runs/{run}").status == 200
    assert_idle_and_consistent(busy)


def test_past_max_queued_tokens_a_request_gets_429(busy) -> None:
    async def probe(session):
        return await refused(session, busy.url + "/v1/completions", completion(150))

    status, headers, body = asyncio.run(with_a_full_queue(busy, 200, probe))  # one waits
    assert status == 429, body
    assert body["error"]["code"] == "queue_full" and "200 prompt tokens" in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1
    assert_idle_and_consistent(busy)


def test_an_empty_queue_takes_a_prompt_longer_than_the_token_bound(busy) -> None:
    reply = busy.post("/v1/completions", completion(MAX_QUEUED_TOKENS + 100, max_tokens=2))
    assert reply.status == 200, reply.body
    assert reply.json()["usage"]["prompt_tokens"] == MAX_QUEUED_TOKENS + 100
    assert_idle_and_consistent(busy)


def test_a_request_that_can_never_fit_is_a_400_even_when_the_queue_is_full(busy) -> None:
    async def probe(session):
        return await refused(session, busy.url + "/v1/completions", completion(1400, 10))

    status, _, body = asyncio.run(with_a_full_queue(busy, 8, probe))
    assert status == 400, body
    assert body["error"]["code"] == "request_rejected" and "KV pool" in body["error"]["message"]
    assert_idle_and_consistent(busy)


def test_an_oversized_body_is_a_413_in_the_error_shape(busy) -> None:
    huge = good_chat(messages=[{"role": "user", "content": "x" * MAX_BODY}])
    error = assert_error_shape(busy.post("/v1/chat/completions", huge), 413)
    assert error["type"] == "invalid_request_error"
    assert str(MAX_BODY) in error["message"]
    assert busy.post("/v1/chat/completions", good_chat()).status == 200


def test_retry_after_follows_the_drain_rate() -> None:
    admission = Admission(ServerLimits(max_queued_requests=4, max_queued_tokens=1000))

    def retry_after(load: EngineLoad, prompt: int = 10) -> int:
        with pytest.raises(APIError) as refused:
            admission.check_queue(load, prompt)
        assert refused.value.status == 429
        return refused.value.retry_after_s

    assert retry_after(EngineLoad(4, 40, 5, None)) == 1  # no rate known yet
    assert retry_after(EngineLoad(4, 40, 5, 0.5)) == 2  # one request to drain, at 0.5 per s
    assert retry_after(EngineLoad(6, 60, 7, 0.5)) == 6  # three to drain
    # 1,000 tokens queued in 2 requests: this prompt of 600 needs 600 of them gone, 2 requests.
    assert retry_after(EngineLoad(2, 1000, 3, 0.25), prompt=600) == 8
    assert retry_after(EngineLoad(400, 400, 401, 0.01)) == 60  # capped
    admission.check_queue(EngineLoad(3, 990, 4, None), 10)  # fits: no error
