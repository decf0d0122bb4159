"""Graceful shutdown: once it begins, new work gets 503 (and /health says "draining"), calls in
flight that finish within the shutdown timeout finish, the rest are aborted with an error, and
the engine's pool holds no request's KV afterwards. In process (`app.drain`), then for real:
`kvrt serve` under SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from kvrt.runtime.config import EngineConfig, ServerLimits
from kvrt.runtime.server.app import drain
from tests.server.live_server import LiveServer, good_chat, live_server, sse_events

SHUTDOWN_S = 1.5
LONG = 1800  # tokens: far more than the shutdown timeout's worth
SHORT = 12
ENGINE = EngineConfig(kv_cache_memory=8 * 1024**2, max_model_len=2048, max_num_seqs=4)


@pytest.fixture
def server(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, ENGINE, limits=ServerLimits(shutdown_timeout_s=SHUTDOWN_S))


async def read_all(resp: aiohttp.ClientResponse, first: list) -> list:
    return first + [event async for event in sse_events(resp)]


async def post_json(session: aiohttp.ClientSession, url: str, body) -> tuple[int, dict, dict]:
    async with session.post(url, json=body) as resp:
        return resp.status, dict(resp.headers), await resp.json()


def in_flight(server: LiveServer) -> int:
    async def read():
        return server.engine.load().in_flight

    return server.call(read)


async def shut_down_under_load(server: LiveServer):
    chat = server.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        longs = [await session.post(chat, json=good_chat(max_tokens=LONG, ignore_eos=True,
                                                         stream=True)) for _ in range(2)]
        firsts = [[await anext(sse_events(resp))] for resp in longs]
        shorts = [asyncio.create_task(post_json(session, chat, good_chat(max_tokens=SHORT,
                                                                         ignore_eos=True)))
                  for _ in range(2)]
        while in_flight(server) < 4:
            await asyncio.sleep(0.01)
        drained = asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(drain(server._runner.app), server.loop))
        await asyncio.sleep(0.05)
        refused = await post_json(session, chat, good_chat())
        async with session.get(server.url + "/health") as resp:
            health = resp.status, await resp.json()
        short_replies = await asyncio.gather(*shorts)
        long_events = [await read_all(resp, first) for resp, first in zip(longs, firsts)]
        return refused, health, short_replies, long_events, await drained


def test_drain_finishes_short_calls_aborts_long_ones_and_frees_all_kv(server) -> None:
    started = time.monotonic()
    refused, health, shorts, longs, aborted = asyncio.run(shut_down_under_load(server))
    assert time.monotonic() - started < SHUTDOWN_S + 3
    status, headers, body = refused
    assert status == 503 and body["error"]["code"] == "draining", body
    assert body["error"]["type"] == "service_unavailable" and int(headers["Retry-After"]) >= 1
    assert health[0] == 503 and health[1]["error"]["code"] == "draining"
    for status, _, body in shorts:
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == SHORT
        assert body["choices"][0]["finish_reason"] == "length"
    for events in longs:
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert error["code"] == "shutting_down" and error["type"] == "service_unavailable"
        assert all("choices" in e for e in events[:-2])
    assert aborted == 2
    stats = server.stats()
    assert (stats.running, stats.waiting, stats.kv_blocks_in_use) == (0, 0, 0)

    async def check():
        await server.engine.wait_idle()
        server.engine.engine.check_integrity()

    server.call(check)


READY = re.compile(r"^kvrt ready: serving (\S+) at (http://\S+)$")


def test_sigterm_drains_then_exits_cleanly(tiny_model: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvrt.runtime.cli", "serve", "--port", "0", "--model",
         str(tiny_model), "--kv-cache-memory", "8MiB", "--max-model-len", "2048",
         "--shutdown-timeout", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"},
    )
    try:
        match = READY.match(proc.stdout.readline().rstrip("\n"))
        assert match, proc.stderr.read() if proc.poll() is not None else "no ready line"
        url = match.group(2)

        async def stream_through_sigterm():
            async with aiohttp.ClientSession() as session:
                resp = await session.post(url + "/v1/chat/completions", json=good_chat(
                    max_tokens=LONG, ignore_eos=True, stream=True))
                first = [await anext(sse_events(resp))]
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                refused = await post_json(session, url + "/v1/chat/completions", good_chat())
                return refused, await read_all(resp, first)

        (status, _, body), events = asyncio.run(stream_through_sigterm())
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert status == 503 and body["error"]["code"] == "draining"
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "shutting_down"
    assert proc.returncode == 0, err
    assert "aborted 1 requests still in flight" in err
    assert "all request KV released" in err and "Traceback" not in err
