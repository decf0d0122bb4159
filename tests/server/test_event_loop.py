"""Nothing heavy runs on the daemon's event loop: while one client's prompt of megabytes or
round of 2,000 agents is built, /health answers (tiny model, given a context of 131,072 tokens
so that a text of megabytes can be a prompt). The bound asserted is a generous 1 s on this
shared machine; the 100 ms goal is measured by `make bench-loop`
(runtime/bench/loop_latency.py).

Also: a round costs one critical path, and a call whose run ends while its prompt is built is
refused (404) rather than queued for a run that is gone.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvrt.runtime.config import EngineConfig
from kvrt.runtime.engine.protocol import EngineError, GenerateOutput, GenerateRequest
from kvrt.runtime.graph.runs import Run
from kvrt.runtime.model.tiny import init_tiny
from kvrt.runtime.server.round_routes import START_BATCH
from tests.server.live_server import (
    HELD_S,
    LiveServer,
    Reply,
    live_server,
    start_run,
    wait_released,
    workers_busy,
)

LONG_CONTEXT = 131_072
AGENTS = 2_000
POLL_S = 0.01
BOUND_S = 1.0
# Every agent's prompt holds this (~360 tokens): rendering and tokenizing 2,000 of them takes
# over a second of CPU here.
NEWS = " ".join(f"Item {k}: the bridge on road {k} is closed, take the ferry at pier {k}."
                for k in range(8))


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = init_tiny(tmp_path_factory.mktemp("tiny-long") / "llama", arch="llama", seed=0)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = LONG_CONTEXT  # RoPE: any length is a position
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def server(long_model: Path) -> Iterator[LiveServer]:
    config = EngineConfig(kv_cache_memory=48 * 1024**2, max_model_len=LONG_CONTEXT,
                          max_num_seqs=64)
    yield from live_server(long_model, config)


def send_while_polling(server: LiveServer, path: str, body: bytes) -> tuple[Reply, list[float]]:
    """POSTs `body` (JSON, encoded beforehand) while polling /health every POLL_S; returns the
    reply and the latency of each poll that began before the reply came."""

    async def go() -> tuple[Reply, list[float]]:
        latencies: list[float] = []
        async with aiohttp.ClientSession() as session:
            async def post() -> Reply:
                async with session.post(server.url + path, data=body,
                                        headers={"Content-Type": "application/json"}) as resp:
                    return Reply(resp.status, dict(resp.headers), await resp.read())

            task = asyncio.create_task(post())
            while not task.done():
                started = time.perf_counter()
                async with session.get(server.url + "/health") as resp:
                    assert resp.status == 200, await resp.text()
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(POLL_S)
            return await task, latencies

    return asyncio.run(go())


def chat_body(text: str) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": text}],
                       "max_tokens": 1}).encode()


def char_limit(server: LiveServer) -> int:
    return server.engine.max_model_len * server.engine.tokenizer.max_token_chars * 2


def assert_never_stalled(latencies: list[float]) -> None:
    assert len(latencies) >= 3, latencies  # polls came while the request was being handled
    assert max(latencies) < BOUND_S, sorted(latencies)[-5:]


def test_health_answers_while_the_largest_body_is_refused(server) -> None:
    largest = server.config.limits.max_body_bytes - 1024  # a text longer than any prompt
    body = chat_body("lorem ipsum " * (largest // 12))
    reply, latencies = send_while_polling(server, "/v1/chat/completions", body)
    error = reply.json()["error"]
    assert (reply.status, error["param"], error["code"]) == (
        400, "messages", "context_length_exceeded")
    assert "characters" in error["message"]  # refused from its length, before tokenizing
    assert_never_stalled(latencies)


def test_health_answers_while_a_text_just_under_the_limit_is_tokenized(server) -> None:
    text = "lorem ipsum " * (char_limit(server) // 12 - 1)  # ~3 s of tokenization here
    assert len(text) < char_limit(server)
    reply, latencies = send_while_polling(server, "/v1/chat/completions", chat_body(text))
    error = reply.json()["error"]
    assert (reply.status, error["param"], error["code"]) == (
        400, "messages", "context_length_exceeded")
    assert "tokens" in error["message"] and "characters" not in error["message"]
    assert_never_stalled(latencies)


def test_health_answers_while_a_completion_prompt_is_tokenized(server) -> None:
    text = "lorem ipsum " * (char_limit(server) // 12 - 1)
    body = json.dumps({"prompt": text, "max_tokens": 1}).encode()
    reply, latencies = send_while_polling(server, "/v1/completions", body)
    error = reply.json()["error"]
    assert (reply.status, error["param"], error["code"]) == (
        400, "prompt", "context_length_exceeded")
    assert_never_stalled(latencies)


def round_of(agents: list[str]) -> dict[str, Any]:
    """The news first and each agent's question after it: the engine computes the news once
    (a cached prefix), but every prompt is rendered and tokenized whole."""
    return {"shared": [{"role": "user", "content": NEWS}],
            "agents": {name: {"messages": [], "after": [
                {"role": "user", "content": f"You are {name}. Say what you do next."}]}
                for name in agents},
            "max_tokens": 1, "ignore_eos": True}


def test_health_answers_while_a_round_of_2000_agents_is_admitted(server, monkeypatch) -> None:
    agents = [f"agent{i}" for i in range(AGENTS)]
    run = start_run(server, *agents)
    callers = count_criticality_callers(monkeypatch)
    reply, latencies = send_while_polling(
        server, f"/v1/runs/{run}/rounds", json.dumps(round_of(agents)).encode())
    assert reply.status == 200, reply.body
    result = reply.json()
    assert list(result["agents"]) == agents
    assert all(out["usage"]["completion_tokens"] == 1 for out in result["agents"].values())
    assert_never_stalled(latencies)
    # One critical path for the round's admission; the others are the pushes after calls end
    # (PrioritySync.soon: at most one per 10 ms, each computing it in `push`).
    assert [c for c in callers if c != "PrioritySync.push"] == ["round_contexts"]
    wait_released(server)


def count_criticality_callers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Patches Run.criticality to record who calls it (a function's qualified name)."""
    callers: list[str] = []
    original = Run.criticality

    def counted(run: Run):
        callers.append(sys._getframe(1).f_code.co_qualname)
        return original(run)

    monkeypatch.setattr(Run, "criticality", counted)
    return callers


def test_a_call_whose_run_ends_while_its_prompt_is_built_is_refused(server) -> None:
    run = start_run(server, "alice")
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1,
            "kvrt": {"run": run, "agent": "alice"}}
    replies: list[Reply] = []
    chat = threading.Thread(target=lambda: replies.append(
        server.post("/v1/chat/completions", body)))
    with workers_busy(server):
        chat.start()
        time.sleep(0.5)  # the chat passed its checks and waits for a worker
        assert not replies
        assert server.request("DELETE", f"/v1/runs/{run}").status == 200
    chat.join(30)
    [reply] = replies
    assert reply.status == 404, reply.body
    assert reply.json()["error"]["code"] == "run_not_found"
    wait_released(server)


@pytest.mark.parametrize("kind", ["chat", "completion", "round"])
def test_a_text_longer_than_any_prompt_is_refused_without_waiting_for_a_worker(
        server, kind) -> None:
    too_long = "lorem ipsum " * (char_limit(server) // 12 + 1)
    if kind == "chat":
        path, body, param = "/v1/chat/completions", json.loads(chat_body(too_long)), "messages"
    elif kind == "completion":
        path, body, param = "/v1/completions", {"prompt": too_long, "max_tokens": 1}, "prompt"
    else:
        run = start_run(server, "alice", "bob")
        body = round_of(["alice", "bob"])
        body["agents"]["bob"]["messages"] = [{"role": "system", "content": too_long}]
        path, param = f"/v1/runs/{run}/rounds", "agents.bob"
    with workers_busy(server):
        started = time.monotonic()
        reply = server.post(path, body)
        assert time.monotonic() - started < HELD_S / 3  # answered while the workers were held
    error = reply.json()["error"]
    assert (reply.status, error["param"], error["code"]) == (
        400, param, "context_length_exceeded")
    assert "characters" in error["message"]


def test_a_failed_round_ends_the_calls_of_every_agent(server, monkeypatch) -> None:
    """The round's calls start START_BATCH at a time: the first call's failure cancels the
    round before the second batch starts, and the run counts every agent's call ended, started
    or not."""
    agents = [f"agent{i}" for i in range(3 * START_BATCH)]
    run = start_run(server, *agents)
    generate = server.engine.generate

    async def failing(request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        if request.attribution.agent == "agent0":
            raise EngineError("injected fault")
        async for output in generate(request):
            yield output

    monkeypatch.setattr(server.engine, "generate", failing)
    reply = server.post(f"/v1/runs/{run}/rounds", round_of(agents))
    assert reply.status == 500, reply.body
    assert "injected fault" in reply.json()["error"]["message"]
    states = server.request("GET", f"/v1/runs/{run}").json()["agents"]
    assert [(a["state"], a["calls"]) for a in states] == [("idle", 1)] * len(agents)
    wait_released(server)
