"""A real daemon on loopback for the server tests: the real engine and the app served by
`start_site` (as `kvrt serve` does) on its own uvloop thread, on port 0.

Tests are plain functions; they talk HTTP with aiohttp's client (`LiveServer.request` /
`LiveServer.stream`, each on a fresh client loop) or with the `openai` client, and run code on
the server's loop with `LiveServer.call` (the engine is only touched from that loop).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from kvrt.runtime.config import EngineConfig, ServeConfig
from kvrt.runtime.engine.async_engine import AsyncEngine
from kvrt.runtime.model.checkpoint import load_checkpoint
from kvrt.runtime.server.app import create_app
from kvrt.runtime.server.prompt_workers import PROMPT_WORKERS
from kvrt.runtime.server.serve import start_site

# Small enough that "too long" prompts are cheap to build; KV pool of a few hundred blocks.
SMALL_ENGINE = EngineConfig(kv_cache_memory=4 * 1024**2, max_model_len=256, max_num_seqs=8)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class LiveServer:
    def __init__(self, engine: AsyncEngine, config: ServeConfig) -> None:
        self.engine = engine
        self.config = config
        self.loop = uvloop.new_event_loop()
        self.url = ""
        self._runner = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server")

    def start(self) -> LiveServer:
        self._thread.start()
        app = self.app = create_app(self.config, self.engine)
        self._runner, self.url = self.call(lambda: start_site(app, "127.0.0.1", 0))
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self.call(self._runner.cleanup)  # stops the engine (app cleanup_ctx)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def call(self, fn: Callable[[], Awaitable[Any]], timeout: float = 30) -> Any:
        """Runs `fn()` on the server's loop and returns its result."""

        async def run() -> Any:
            return await fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stats(self):
        async def stats():
            return self.engine.stats()

        return self.call(stats)

    def request(self, method: str, path: str, *, json_body: Any = None, data: bytes | None = None,
                headers: dict[str, str] | None = None, no_content_type: bool = False) -> Reply:
        skip = ["Content-Type"] if no_content_type else []

        async def go() -> Reply:
            async with aiohttp.ClientSession(skip_auto_headers=skip) as session, session.request(
                method, self.url + path, json=json_body, data=data, headers=headers
            ) as resp:
                return Reply(resp.status, dict(resp.headers), await resp.read())

        return asyncio.run(go())

    def post(self, path: str, body: Any, **kw: Any) -> Reply:
        return self.request("POST", path, json_body=body, **kw)

    def stream(self, path: str, body: Any, headers: dict[str, str] | None = None) -> list[Any]:
        """POSTs a streaming request; returns its SSE data payloads (JSON, or the "[DONE]")."""

        async def go() -> list[Any]:
            events: list[Any] = []
            async with aiohttp.ClientSession() as session, session.post(
                self.url + path, json=body, headers=headers
            ) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.content_type == "text/event-stream"
                async for event in sse_events(resp):
                    events.append(event)
            return events

        return asyncio.run(go())


async def sse_events(resp: aiohttp.ClientResponse):
    """Yields each `data:` payload of an SSE response, parsed as JSON except `[DONE]`."""
    buffer = b""
    async for piece in resp.content.iter_any():
        buffer += piece
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            assert event.startswith(b"data: "), event
            payload = event[len(b"data: "):]
            yield payload.decode() if payload == b"[DONE]" else json.loads(payload)


def good_chat(**extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4, **extra}


def start_run(server: LiveServer, *agents: str) -> str:
    """Declares a graph of `agents` (no edges) and starts a run of it; returns the run id."""
    graph = server.post("/v1/graphs", {"name": "t", "agents": [{"name": a} for a in agents]})
    assert graph.status == 201, graph.body
    run = server.post("/v1/runs", {"graph_id": graph.json()["id"]})
    assert run.status == 201, run.body
    return run.json()["id"]


def assert_error_shape(reply: Reply, status: int) -> dict[str, Any]:
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


def listed(server: LiveServer, path: str, limit: int = 100,
           headers: dict[str, str] | None = None) -> list[Any]:
    """Every item of a listing (GET /v1/graphs or /v1/runs, `path` with its filters), page by
    page, each page checked: at most `limit` items, first_id and last_id its ends."""
    items: list[Any] = []
    query = f"{path}{'&' if '?' in path else '?'}limit={limit}"
    while True:
        reply = server.request("GET", query + (f"&after={items[-1]['id']}" if items else ""),
                               headers=headers)
        assert reply.status == 200, reply.body
        page = reply.json()
        assert page["object"] == "list" and len(page["data"]) <= limit
        ends = [page["data"][0]["id"], page["data"][-1]["id"]] if page["data"] else [None, None]
        assert [page["first_id"], page["last_id"]] == ends
        items += page["data"]
        if not page["has_more"]:
            return items


def live_server(model: Path | None, engine_config: EngineConfig = SMALL_ENGINE,
                served_model_name: str | None = "tiny", **serve: Any) -> Iterator[LiveServer]:
    """Body of a module fixture: one engine + daemon for the module (model None: the default
    SmolLM2). `serve`: more ServeConfig fields (api_keys, limits, state_dir, ...)."""
    engine_config = replace(engine_config, model=None if model is None else str(model))
    config = ServeConfig(host="127.0.0.1", port=0, served_model_name=served_model_name,
                         engine=engine_config, **serve)
    engine = AsyncEngine.create(config.engine, config.served_model_name)
    server = LiveServer(engine, config).start()
    try:
        yield server
    finally:
        server.stop()


def wait_released(server: LiveServer, timeout: float = 10.0) -> None:
    """Waits until no request runs, waits or holds KV, then checks the pool's integrity."""
    deadline = time.monotonic() + timeout
    while (stats := server.stats()).running or stats.waiting or stats.kv_blocks_in_use:
        assert time.monotonic() < deadline, f"the engine is still busy: {stats}"
        time.sleep(0.02)

    async def check() -> None:
        await server.engine.wait_idle()
        server.engine.engine.check_integrity()

    server.call(check)


def tokencake_engine(model: Path, pool_blocks: int) -> EngineConfig:
    """`tokencake` over a device pool of `pool_blocks` 16-token float32 blocks and a host tier
    four times as large: small enough that a few agents put it under pressure."""
    block_bytes = 16 * load_checkpoint(str(model)).config.kv_bytes_per_token * 4
    return EngineConfig(kv_cache_memory=pool_blocks * block_bytes,
                        host_cache_memory=4 * pool_blocks * block_bytes,
                        max_model_len=512, max_num_seqs=8, policy="tokencake")


HELD_S = 30.0  # the longest `workers_busy` holds the workers


@contextmanager
def workers_busy(server: LiveServer) -> Iterator[None]:
    """Every prompt worker waits until the block ends: builds queue meanwhile."""
    workers = server.app[PROMPT_WORKERS]
    gate = threading.Event()

    async def occupy() -> None:
        for _ in range(workers.threads):
            asyncio.ensure_future(workers.run(lambda _model: gate.wait(HELD_S)))

    server.call(occupy)
    try:
        yield
    finally:
        gate.set()
