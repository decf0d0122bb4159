"""A plain OpenAI tool loop against the real default model (SmolLM2-135M-Instruct), with no
kvrt field, header or event: only `prompt_cache_key`. The model writes the tool calls itself
(three worked examples in the conversation make it call `get_weather` at temperature 0), and
the daemon follows the loop: the session's implicit run is in a tool call between the reply
and the request that brings the result, learns the tool's duration from it, and predicts the
next call of the tool with it. One reply is streamed, one is a JSON body."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from kvrt.runtime.config import EngineConfig
from tests.server.live_server import LiveServer, live_server, wait_released
from tests.server.test_implicit_runs import (
    agent,
    next_call_in,
    session_run,
    tool_estimate,
)

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def examples() -> list[dict[str, Any]]:
    """Three questions, each answered by a call, its result and a sentence."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You answer weather questions by calling get_weather."}]
    for i, (city, weather) in enumerate([("Paris", "18C"), ("Rome", "25C"), ("Oslo", "3C")]):
        messages += [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{i}", "type": "function", "function": {
                    "name": "get_weather", "arguments": f'{{"city": "{city}"}}'}}]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": weather},
            {"role": "assistant", "content": f"It is {weather} in {city}."}]
    return messages


@pytest.fixture(scope="module")
def smollm() -> Iterator[LiveServer]:
    config = EngineConfig(model=None, kv_cache_memory=64 * 1024**2, max_model_len=2048)
    yield from live_server(None, config, served_model_name=None)


def test_an_unchanged_openai_tool_loop_is_followed_as_a_run(smollm: LiveServer) -> None:
    client = openai.OpenAI(base_url=smollm.url + "/v1", api_key="unused", max_retries=0)
    key = f"conv-{uuid.uuid4().hex[:8]}"
    messages = examples()

    def ask(city: str, stream: bool = False) -> tuple[str, dict[str, Any]]:
        """Asks about `city`; returns the reply's call id and the assistant message."""
        messages.append({"role": "user", "content": f"What is the weather in {city}?"})
        args = dict(model=MODEL, messages=messages, tools=[WEATHER], temperature=0,
                    max_tokens=40, prompt_cache_key=key)
        if stream:
            with client.chat.completions.stream(**args) as events:
                for _ in events:
                    pass
                message = events.get_final_completion().choices[0].message
        else:
            message = client.chat.completions.create(**args).choices[0].message
        assert message.tool_calls, f"the model answered without a call: {message.content!r}"
        [call] = message.tool_calls
        assert call.function.name == "get_weather" and city in call.function.arguments
        return call.id, message.model_dump(exclude_none=True)

    call_id, message = ask("Berlin")
    replied = time.monotonic()
    during = agent(session_run(smollm, key, {}))
    assert (during["state"], during["tool"]) == ("tool_call", "get_weather")
    assert next_call_in(smollm, key, "default") == 0.0  # nothing learned yet
    time.sleep(0.5)  # the tool runs
    messages += [message, {"role": "tool", "tool_call_id": call_id, "content": "12C"}]

    # The result arrives with the next question; the model calls the tool again.
    call_id, message = ask("Madrid", stream=True)
    state = session_run(smollm, key, {})
    learned = tool_estimate(state, "get_weather")
    assert learned is not None and learned["observations"] == 1
    assert 0.5 <= learned["estimate_seconds"] <= time.monotonic() - replied
    assert agent(state)["state"] == "tool_call" and agent(state)["tool_calls"] == 2
    assert 0 < next_call_in(smollm, key, "default") <= learned["estimate_seconds"]
    assert state["implicit"] is True and agent(state)["calls"] == 2

    assert smollm.request("DELETE", f"/v1/runs/{state['id']}").status == 200
    wait_released(smollm)
