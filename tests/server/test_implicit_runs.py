"""Any OpenAI client, unchanged: a live daemon makes a run of each session key (the body's
`prompt_cache_key` or the X-Session-Id header), per tenant, and follows its tool loop with no
event from the client; a call's vLLM `priority` orders the engine's waiting calls.

The tiny models cannot write a tool call. So where a test needs a reply that calls a tool, the
client's request is served for real (the tiny model answers in prose) and the reply that calls
the tool is then made on the server's loop from a call's text (`reply_calling`) by what the chat
route makes its replies with (implicit_runs.chat_formatter, for the session's run): the same
code that reads a generated reply. What follows, the client's next request with the results,
is real HTTP again. tests/server/test_implicit_runs_default_model.py runs the loop with the
real default model writing its calls.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from kvrt.runtime.config import DEFAULT_TENANT, ControlConfig, EngineConfig
from kvrt.runtime.engine.protocol import GenerateOutput
from kvrt.runtime.graph.implicit import IMPLICIT_AGENT
from kvrt.runtime.server import app_keys
from kvrt.runtime.server.call_context import agent_context
from kvrt.runtime.server.implicit_runs import SESSION_HEADER, SessionChatFormatter, chat_formatter
from kvrt.runtime.server.openai_logprobs import TokenNames
from kvrt.runtime.server.openai_serving import ChoiceResult
from kvrt.runtime.server.tool_parsers import make_tool_parser
from kvrt.sdk.protocol.openai_api import PromptTokensDetails, Usage, chat_request_decoder
from tests.server.live_server import (
    SMALL_ENGINE,
    LiveServer,
    assert_error_shape,
    live_server,
    sse_events,
    tokencake_engine,
    wait_released,
)

KEY_A, KEY_B = "sk-tenant-a", "sk-tenant-b"
A, B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
# The fallback's tools block is long in the tiny tokenizer's tokens (~450): room for it.
TOOLS_ENGINE = replace(SMALL_ENGINE, kv_cache_memory=8 * 1024**2, max_model_len=2048)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
# Tests of one server share its tenant's implicit graph, and so what it learned of each tool:
# each test calls a tool of its own.
FORECAST = {"type": "function", "function": {"name": "get_forecast"}}
USAGE = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2,
              prompt_tokens_details=PromptTokensDetails(cached_tokens=0))
NAMES = TokenNames(None)  # type: ignore[arg-type]  # no logprobs: no token is named


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, TOOLS_ENGINE, api_keys=((KEY_A, "a"), (KEY_B, "b")))


def client(server: LiveServer, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def new_key() -> str:
    return f"conv-{uuid.uuid4().hex[:8]}"


def ask(server: LiveServer, key: str, messages: list[dict[str, Any]], **extra: Any
        ) -> ChatCompletion:
    """One chat call of the session `key` through the openai client, as tenant A."""
    return client(server).chat.completions.create(
        model="tiny", messages=messages, max_tokens=2, prompt_cache_key=key,
        **{"tools": [WEATHER], **extra})


def reply_calling(server: LiveServer, key: str, body: dict[str, Any], *calls: str,
                  tenant: str = "a") -> ChatCompletion:
    """The reply to `body` (a request of session `key`) had the model written a call of each
    tool in `calls`, as the chat route makes it (see the module docstring)."""
    text = "".join(f'<tool_call>\n{{"name": "{name}", "arguments": {{}}}}\n</tool_call>\n'
                   for name in calls)

    async def make() -> bytes:
        app = server.app
        run = app[app_keys.CONTROL].implicit_run(key, tenant)
        decoded = chat_request_decoder.decode(json.dumps(body))
        formatter = chat_formatter(app, agent_context(run, IMPLICIT_AGENT), decoded)(
            "chatcmpl-test", "tiny", False, tool_parser=app[app_keys.TOOL_PARSER])
        reply = formatter.full([ChoiceResult(0, [text], "stop")], USAGE, NAMES)
        return msgspec.json.encode(reply)

    return ChatCompletion.model_validate_json(server.call(make))


def runs(server: LiveServer, headers: dict[str, str] = A, **query: str) -> list[dict[str, Any]]:
    path = "/v1/runs" + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
    reply = server.request("GET", path, headers=headers)
    assert reply.status == 200, reply.body
    return reply.json()["data"]


def session_run(server: LiveServer, key: str, headers: dict[str, str] = A) -> dict[str, Any]:
    [run] = runs(server, headers, key=key)
    reply = server.request("GET", f"/v1/runs/{run['id']}", headers=headers)
    assert reply.status == 200, reply.body
    return reply.json()


def agent(state: dict[str, Any]) -> dict[str, Any]:
    [only] = state["agents"]
    assert only["name"] == IMPLICIT_AGENT
    return only


def tool_estimate(state: dict[str, Any], tool: str) -> dict[str, Any] | None:
    found = [t for t in state["tools"] if t["tool"] == tool]
    return found[0] if found else None


def next_call_in(server: LiveServer, key: str, tenant: str = "a") -> float | None:
    """The predicted seconds to the session's next model call, as the priority sync sends it
    to the engine with the run's outlook (Run.next_use)."""
    async def read() -> float | None:
        run = server.app[app_keys.CONTROL].implicit_run(key, tenant)
        return run.next_use(0, run.criticality())

    return server.call(read)


def end(server: LiveServer, run_id: str, headers: dict[str, str] = A) -> None:
    assert server.request("DELETE", f"/v1/runs/{run_id}", headers=headers).status == 200
    wait_released(server)
    assert server.engine.kv_residency(run_id) == {}


def test_a_session_key_makes_one_implicit_run_listed_and_shown(server) -> None:
    key, hello = new_key(), [{"role": "user", "content": "Hello"}]
    before = len(runs(server))
    ask(server, key, hello)
    ask(server, key, hello)
    # The header is the same session as the body's key.
    client(server).chat.completions.create(model="tiny", messages=hello, max_tokens=2,
                                           extra_headers={SESSION_HEADER: key})
    client(server).completions.create(model="tiny", prompt="Hi", max_tokens=2,
                                      extra_headers={SESSION_HEADER: key})
    client(server).chat.completions.create(model="tiny", messages=hello, max_tokens=2)  # none
    listed = runs(server)
    assert len(listed) == before + 1
    [run] = [r for r in listed if r["key"] == key]
    assert run["implicit"] is True and run["status"] == "live"
    state = session_run(server, key)
    assert state["implicit"] is True and state["id"] == run["id"]
    assert agent(state)["calls"] == 4 and agent(state)["state"] == "idle"
    graphs = server.request("GET", "/v1/graphs", headers=A).json()["data"]
    [graph] = [g for g in graphs if g["id"] == run["graph_id"]]
    assert graph["implicit"] is True and [a["name"] for a in graph["agents"]] == [IMPLICIT_AGENT]
    assert graph["live_runs"] >= 1
    end(server, run["id"])


def test_a_declared_run_wins_over_the_session_key(server) -> None:
    graph = server.post("/v1/graphs", {"name": "g", "agents": [{"name": "w"}]}, headers=A).json()
    declared = server.post("/v1/runs", {"graph_id": graph["id"]}, headers=A).json()["id"]
    key = new_key()
    ask(server, key, [{"role": "user", "content": "Hi"}],
        extra_body={"kvrt": {"run": declared, "agent": "w"}})
    assert runs(server, key=key) == []
    state = server.request("GET", f"/v1/runs/{declared}", headers=A).json()
    assert state["implicit"] is False and state["agents"][0]["calls"] == 1
    end(server, declared)
    assert server.request("DELETE", f"/v1/graphs/{graph['id']}", headers=A).status == 200


def test_a_reply_s_tool_call_lasts_until_the_results_arrive_and_is_learned(server) -> None:
    key = new_key()
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    ask(server, key, messages)
    first = reply_calling(server, key, {"messages": messages, "tools": [WEATHER]}, "get_weather")
    replied = time.monotonic()
    [call] = first.choices[0].message.tool_calls
    during = agent(session_run(server, key))
    assert (during["state"], during["tool"]) == ("tool_call", "get_weather")
    assert during["tool_calls"] == 1
    assert next_call_in(server, key) == 0.0  # nothing learned of the tool: predicted 0 s
    time.sleep(0.4)  # the tool runs
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "18C"}]
    ask(server, key, messages)
    elapsed = time.monotonic() - replied
    state = session_run(server, key)
    assert agent(state)["state"] == "idle"
    learned = tool_estimate(state, "get_weather")
    assert learned is not None and learned["observations"] == 1
    assert 0.4 <= learned["estimate_seconds"] <= elapsed

    # The next call of the tool is predicted to take what was learned: the agent's next model
    # call, in the outlook the engine is sent (prefetch goes by it), is that far off.
    again = reply_calling(server, key, {"messages": messages, "tools": [WEATHER]}, "get_weather")
    during = agent(session_run(server, key))
    assert during["state"] == "tool_call" and during["tool_calls"] == 2
    assert 0.3 <= next_call_in(server, key) <= learned["estimate_seconds"]
    [call] = again.choices[0].message.tool_calls
    messages += [again.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "19C"}]
    ask(server, key, messages)
    assert tool_estimate(session_run(server, key), "get_weather")["observations"] == 2
    end(server, session_run(server, key)["id"])


def test_a_request_without_the_results_ends_the_tool_call_and_learns_nothing(server) -> None:
    key = new_key()
    messages = [{"role": "user", "content": "Forecast for Oslo?"}]
    ask(server, key, messages, tools=[FORECAST])
    reply_calling(server, key, {"messages": messages, "tools": [FORECAST]}, "get_forecast")
    assert agent(session_run(server, key))["tool"] == "get_forecast"
    time.sleep(0.2)
    ask(server, key, [{"role": "user", "content": "Never mind. Hello!"}])  # the user moved on
    state = session_run(server, key)
    assert agent(state)["state"] == "idle" and agent(state)["tool_calls"] == 1
    assert tool_estimate(state, "get_forecast") is None  # no duration learned
    end(server, state["id"])


def test_sessions_are_scoped_per_tenant(server) -> None:
    key, hello = new_key(), [{"role": "user", "content": "Hello"}]
    ask(server, key, hello)
    client(server, KEY_B).chat.completions.create(model="tiny", messages=hello, max_tokens=2,
                                                  prompt_cache_key=key)
    mine, theirs = session_run(server, key, A), session_run(server, key, B)
    assert mine["id"] != theirs["id"] and mine["graph_id"] != theirs["graph_id"]
    assert agent(mine)["calls"] == agent(theirs)["calls"] == 1
    hidden = server.request("GET", f"/v1/runs/{theirs['id']}", headers=A)
    assert_error_shape(hidden, 404)
    assert all(r["id"] != theirs["id"] for r in runs(server, A))
    end(server, mine["id"], A)
    end(server, theirs["id"], B)


@pytest.mark.parametrize(("field", "value", "param"), [
    ("prompt_cache_key", "", "prompt_cache_key"),
    ("prompt_cache_key", "k" * 129, "prompt_cache_key"),
    ("prompt_cache_key", 7, "prompt_cache_key"),
    ("priority", 1.5, "priority"),
    ("priority", "high", "priority"),
    ("priority", True, "priority"),
    ("priority", 2**40, "priority"),
])
def test_a_bad_key_or_priority_is_a_400_naming_it(server, field, value, param) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, field: value}
    error = assert_error_shape(server.post("/v1/chat/completions", body, headers=A), 400)
    assert error["param"] == param
    assert server.post("/v1/chat/completions", {**body, field: None} if field != "priority"
                       else {**body, field: 3}, headers=A).status == 200


def test_a_session_header_too_long_is_a_400_naming_it(server) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    reply = server.post("/v1/chat/completions", body, headers={**A, SESSION_HEADER: "k" * 129})
    assert assert_error_shape(reply, 400)["param"] == SESSION_HEADER


def test_a_streamed_reply_reports_the_calls_the_client_reads() -> None:
    """SessionChatFormatter's stream: the (id, name) pairs it reports are the calls the openai
    client assembles from its chunks, each choice's once its last chunk is made."""
    reported: list[list[tuple[str, str]]] = []
    formatter = SessionChatFormatter("chatcmpl-1", "tiny", False,
                                     tool_parser=make_tool_parser("hermes"),
                                     on_calls=reported.append)
    texts = [('Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}'
              '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'),
             '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>']
    chunks = formatter.head(2)
    for i in range(0, max(map(len, texts)), 7):
        for index, text in enumerate(texts):  # the two choices' pieces interleaved
            if text[i:i + 7]:
                chunks += formatter.piece(GenerateOutput(
                    token_ids=[], text=text[i:i + 7], prompt_tokens=0, cached_tokens=0,
                    completion_tokens=0, index=index), NAMES)
    assert reported == []  # not before a choice is whole
    chunks += formatter.finish(1, "stop")
    chunks += formatter.finish(0, "stop")
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate_json(msgspec.json.encode(chunk)))
    choices = sorted(state.get_final_completion().choices, key=lambda c: c.index)
    assert reported == [[(c.id, c.function.name) for c in choices[i].message.tool_calls]
                        for i in (1, 0)]
    assert [[name for _, name in calls] for calls in reported] == [
        ["get_time"], ["get_weather", "get_time"]]


# ---- idle expiry ------------------------------------------------------------------------------

IDLE_S = 1.0


@pytest.fixture(scope="module")
def expiring(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, TOOLS_ENGINE,
                           control=ControlConfig(run_idle_timeout_s=IDLE_S))


def test_an_idle_session_expires_and_its_kv_is_released(expiring) -> None:
    key = new_key()
    system = "You answer questions about the weather. " * 8  # full KV blocks to hold
    chat = client(expiring, "unused").chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": system},
                                {"role": "user", "content": "Hi"}],
        max_tokens=2, prompt_cache_key=key)
    assert chat.usage.prompt_tokens > 16
    run = session_run(expiring, key, {})
    assert agent(run)["kv"]["device_blocks"] > 0  # the session's KV, held for its next call
    deadline = time.monotonic() + 10 * IDLE_S
    while (state := expiring.request("GET", f"/v1/runs/{run['id']}").json())["status"] == "live":
        assert time.monotonic() < deadline, "the idle session never expired"
        time.sleep(0.05)
    assert state["status"] == "expired" and state["implicit"] is True
    assert agent(state)["kv"]["device_blocks"] == 0
    assert expiring.engine.kv_residency(run["id"]) == {}
    wait_released(expiring)
    # The key's next call is a new run.
    client(expiring, "unused").chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        prompt_cache_key=key)
    live = [r for r in runs(expiring, {}, key=key) if r["status"] == "live"]
    assert len(live) == 1 and live[0]["id"] != run["id"]


# ---- the learned duration drives offload and prefetch (tokencake) -----------------------------

POOL_BLOCKS = 96


@pytest.fixture(scope="module")
def tokencake(tiny_model: Path) -> Iterator[LiveServer]:
    engine = replace(tokencake_engine(tiny_model, POOL_BLOCKS), max_model_len=1024)
    yield from live_server(tiny_model, engine)


def fill(server: LiveServer) -> None:
    """Other calls leave their KV cached in the pool until fewer than a quarter of its blocks
    are free: the pool is under pressure (tokencake's `pressure_free_fraction`)."""
    for i in range(60):
        stats = server.stats()
        if stats.kv_blocks_total - stats.kv_blocks_in_use - stats.kv_blocks_cached < (
                stats.kv_blocks_total / 4):
            return
        reply = server.post("/v1/completions", {
            "prompt": f"Helper {uuid.uuid4().hex} number {i} remembers: " + "facts " * 60,
            "max_tokens": 1})
        assert reply.status == 200, reply.body
    raise AssertionError("the pool never came under pressure")


def test_a_learned_tool_duration_sends_the_session_s_kv_to_the_host_and_back(tokencake) -> None:
    server, key = tokencake, new_key()
    system = "You are a coding agent that runs the tests. " * 10

    def kv() -> dict[str, Any]:
        return agent(session_run(server, key, {}))["kv"]

    def until(condition, seconds: float = 10.0) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)

    messages: list[Any] = [{"role": "system", "content": system},
                           {"role": "user", "content": "Run the tests."}]
    tests_tool = {"type": "function", "function": {"name": "run_tests"}}
    body = {"messages": messages, "tools": [tests_tool]}

    def turn() -> tuple[ChatCompletion, int, ChatCompletion]:
        """The client's request (with the last call's result, if any) in a pool under
        pressure, the KV blocks its session then holds on the device, then a reply calling
        run_tests."""
        fill(server)
        chat = client(server, "unused").chat.completions.create(
            model="tiny", messages=messages, tools=[tests_tool], max_tokens=2,
            prompt_cache_key=key)
        held = kv()["device_blocks"]
        reply = reply_calling(server, key, body, "run_tests", tenant=DEFAULT_TENANT)
        return chat, held, reply

    def answer(reply: ChatCompletion, result: str) -> None:
        [call] = reply.choices[0].message.tool_calls
        messages.extend([reply.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": result}])

    _, _, first = turn()
    until(lambda: kv()["decision"] is not None)
    assert kv()["decision"] == "keep:short_tool"  # nothing learned: predicted 0 s
    time.sleep(1.5)  # the tests run
    answer(first, "3 passed")
    chat, held, second = turn()  # learns ~1.5 s; the reply calls the tool again
    assert held > 0
    until(lambda: kv()["decision"] == "offload")
    until(lambda: kv()["host_blocks"] > 0 and kv()["device_blocks"] < held)
    # Brought back before the predicted return, with no request from the client yet.
    until(lambda: kv()["device_blocks"] >= held, seconds=5.0)
    assert agent(session_run(server, key, {}))["state"] == "tool_call"
    answer(second, "3 passed")
    again = client(server, "unused").chat.completions.create(
        model="tiny", messages=messages, tools=[tests_tool], max_tokens=2, prompt_cache_key=key)
    # It reads what came back: its prompt extends the last one, all but a block of which hit.
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= chat.usage.prompt_tokens // 16 * 16 - 16 > 0
    server.engine.engine.check_integrity()
    end(server, session_run(server, key, {})["id"], {})


# ---- vLLM's priority for unattributed calls ---------------------------------------------------


@pytest.fixture(scope="module", params=[("lru", {}), ("kvrt", {}),
                                        ("tokencake", {"cross_run": "false"})],
                ids=lambda p: p[0] + "".join(f":{k}={v}" for k, v in p[1].items()))
def one_at_a_time(request, tiny_model: Path) -> Iterator[LiveServer]:
    # One running call at a time: whatever the policy, the waiting calls' vLLM priorities
    # decide who is admitted next.
    policy, options = request.param
    engine = EngineConfig(kv_cache_memory=4 * 1024**2, max_model_len=256, max_num_seqs=1,
                          policy=policy, policy_options=options)
    yield from live_server(tiny_model, engine)


def queued(server: LiveServer) -> int:
    async def read() -> int:
        return server.engine.load().queued_requests

    return server.call(read)


@pytest.mark.parametrize("priorities", [(5, -5), (-5, 5), (0, -1)])
def test_a_lower_vllm_priority_is_served_first(one_at_a_time, priorities) -> None:
    server = one_at_a_time

    async def scenario() -> list[int]:
        finished: list[int] = []
        async with aiohttp.ClientSession() as session:
            url = server.url + "/v1/completions"
            blocker = await session.post(url, json={
                "prompt": "Busy", "max_tokens": 48, "ignore_eos": True, "stream": True})
            await anext(sse_events(blocker))  # running: the next calls wait behind it

            async def call(priority: int) -> None:
                # Several tokens each: one call ends steps before the next can start.
                async with session.post(url, json={
                        "prompt": f"p{priority}", "max_tokens": 8, "ignore_eos": True,
                        "priority": priority}) as reply:
                    assert reply.status == 200, await reply.text()
                finished.append(priority)

            tasks = []
            for priority in priorities:  # in this order of arrival
                tasks.append(asyncio.create_task(call(priority)))
                deadline = time.monotonic() + 10
                while queued(server) < len(tasks):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
            async for _ in sse_events(blocker):
                pass
            blocker.release()
            await asyncio.gather(*tasks)
        return finished

    assert asyncio.run(scenario()) == sorted(priorities)
    wait_released(server)


def test_a_reply_that_ends_after_its_session_was_deleted_starts_no_tool_call(server) -> None:
    key = new_key()
    ask(server, key, [{"role": "user", "content": "Hi"}])
    run_id = session_run(server, key)["id"]
    body = chat_request_decoder.decode(json.dumps({
        "messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER]}))

    async def reply_after_delete() -> tuple[bytes, dict[str, str]]:
        app = server.app
        run = app[app_keys.CONTROL].implicit_run(key, "a")
        formatter = chat_formatter(app, agent_context(run, IMPLICIT_AGENT), body)(
            "chatcmpl-test", "tiny", False, tool_parser=app[app_keys.TOOL_PARSER])
        app[app_keys.CONTROL].end_run(run.id, "a")  # DELETE while the call runs
        text = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
        reply = formatter.full([ChoiceResult(0, [text], "stop")], USAGE, NAMES)
        return msgspec.json.encode(reply), run.open_calls

    reply, open_calls = server.call(reply_after_delete)
    assert ChatCompletion.model_validate_json(reply).choices[0].message.tool_calls
    assert open_calls == {}
    assert_error_shape(server.request("GET", f"/v1/runs/{run_id}", headers=A), 404)
    wait_released(server)
