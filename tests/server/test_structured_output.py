"""Structured output over HTTP: response_format and tool calls that always parse.

The tiny random-weight model writes nonsense, so whatever it writes under a grammar is the
grammar's doing: every reply is checked with an independent validator (jsonschema_rs) against
the schema the request sent, in JSON bodies and in streams, as the `openai` client reads them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import jsonschema_rs
import openai
import pytest

from tests.server.live_server import (
    SMALL_ENGINE,
    LiveServer,
    assert_error_shape,
    live_server,
    wait_released,
)

CHAT = "/v1/chat/completions"
# Room for the fallback's tools block (~450 tiny tokens) and replies of a few hundred tokens.
ENGINE = replace(SMALL_ENGINE, kv_cache_memory=16 * 1024**2, max_model_len=2048)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 8},
                                  "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search",
    "parameters": {"type": "object",
                   "properties": {"terms": {"type": "array", "minItems": 1, "maxItems": 3,
                                            "items": {"type": "string", "maxLength": 5}},
                                  "limit": {"type": "integer", "minimum": 1, "maximum": 50}},
                   "required": ["terms"]}}}
NO_PARAMETERS = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, SEARCH, NO_PARAMETERS]
PARAMETERS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"})
              for t in TOOLS}

RECIPE = {
    "$defs": {"step": {"type": "object",
                       "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9},
                                      "verb": {"enum": ["mix", "bake", "rest"]}},
                       "required": ["n", "verb"]}},
    "type": "object",
    "properties": {"title": {"type": "string", "minLength": 1, "maxLength": 10},
                   "vegan": {"type": "boolean"},
                   "steps": {"type": "array", "items": {"$ref": "#/$defs/step"},
                             "minItems": 1, "maxItems": 3},
                   "serves": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 8},
                                        {"type": "null"}]}},
    "required": ["title", "vegan", "steps", "serves"]}


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dir) -> Iterator[LiveServer]:
    yield from live_server(tiny_checkpoint_dir(), ENGINE)


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Plan my day"}], "max_tokens": 400,
            "temperature": 1.0, **fields}


def valid(schema: dict[str, Any], value: Any) -> bool:
    return jsonschema_rs.validator_for(schema).is_valid(value)


def assert_valid_calls(calls: list[Any], allowed: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.function.name in allowed
        arguments = json.loads(call.function.arguments)
        assert valid(PARAMETERS[call.function.name], arguments), call.function.arguments


@pytest.fixture
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as c:
        yield c
    wait_released(server)


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_replies_validate(client: openai.OpenAI, seed: int) -> None:
    reply = client.chat.completions.create(model="tiny", seed=seed, **chat(
        messages=[{"role": "user", "content": "A recipe"}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "recipe", "schema": RECIPE, "strict": True}}))
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert valid(RECIPE, json.loads(choice.message.content))


@pytest.mark.parametrize("seed", range(3))
def test_json_object_replies_are_objects(client: openai.OpenAI, seed: int) -> None:
    reply = client.chat.completions.create(model="tiny", seed=seed, **chat(
        max_tokens=60, response_format={"type": "json_object"}))
    text = reply.choices[0].message.content
    if reply.choices[0].finish_reason == "stop":  # an open object may run to max_tokens
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


def test_a_streamed_json_schema_reply_validates(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="tiny", seed=5, stream=True, **chat(
        response_format={"type": "json_schema",
                         "json_schema": {"name": "recipe", "schema": RECIPE}}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert valid(RECIPE, json.loads(text))


@pytest.mark.parametrize("seed", range(3))
def test_required_tool_choice_is_always_a_valid_call(client: openai.OpenAI, seed: int) -> None:
    reply = client.chat.completions.create(model="tiny", seed=seed, tools=TOOLS,
                                           tool_choice="required", parallel_tool_calls=False,
                                           **chat())
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    assert_valid_calls(choice.message.tool_calls, set(PARAMETERS))


@pytest.mark.parametrize("seed", range(3))
def test_parallel_required_calls_are_all_valid(client: openai.OpenAI, seed: int) -> None:
    """A random model may go on calling to max_tokens (the last call then cut short, and left
    as content); every call it completes is valid."""
    reply = client.chat.completions.create(model="tiny", seed=seed, tools=TOOLS,
                                           tool_choice="required", **chat())
    choice = reply.choices[0]
    assert choice.finish_reason in ("tool_calls", "length")
    assert_valid_calls(choice.message.tool_calls, set(PARAMETERS))
    if choice.finish_reason == "tool_calls":
        assert choice.message.content is None


@pytest.mark.parametrize("seed", range(3))
def test_a_named_function_is_the_one_called_once(client: openai.OpenAI, seed: int) -> None:
    reply = client.chat.completions.create(
        model="tiny", seed=seed, tools=TOOLS,  # parallel calls allowed: still one
        tool_choice={"type": "function", "function": {"name": "search"}}, **chat())
    calls = reply.choices[0].message.tool_calls
    assert len(calls) == 1
    assert_valid_calls(calls, {"search"})
    assert reply.choices[0].message.content is None


def test_streamed_calls_are_valid(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="tiny", seed=3, stream=True, tools=TOOLS,
                                            tool_choice="required", **chat(max_tokens=1000))
    calls, reasons = [], []
    for chunk in stream:
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            reasons.append(choice.finish_reason)
    assert reasons[-1] in ("tool_calls", "length")
    assert_valid_calls(calls, set(PARAMETERS))
    assert [c.index for c in calls] == list(range(len(calls)))


def test_auto_tool_choice_serves_text_or_valid_calls(client: openai.OpenAI) -> None:
    for seed in range(3):
        reply = client.chat.completions.create(model="tiny", seed=seed, tools=TOOLS,
                                               tool_choice="auto", **chat(max_tokens=40))
        message = reply.choices[0].message
        if message.tool_calls:
            assert_valid_calls(message.tool_calls, set(PARAMETERS))
        assert "<tool_call>" not in (message.content or "")


def test_auto_tools_with_a_response_schema_give_the_json_or_calls(client: openai.OpenAI) -> None:
    for seed in range(3):
        reply = client.chat.completions.create(
            model="tiny", seed=seed, tools=TOOLS, parallel_tool_calls=False, **chat(
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "recipe", "schema": RECIPE}}))
        message = reply.choices[0].message
        if message.tool_calls:
            assert_valid_calls(message.tool_calls, set(PARAMETERS))
        else:
            assert valid(RECIPE, json.loads(message.content))


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({"tools": [WEATHER, {"type": "function", "function": {
        "name": "bad", "parameters": {"type": "object", "properties": {
            "zip": {"type": "string", "pattern": "(unclosed"}}}}}]},
     "tools[1].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
])
def test_a_schema_that_cannot_compile_is_a_400_naming_it(server: LiveServer, fields, param):
    error = assert_error_shape(server.post(CHAT, chat(max_tokens=4, **fields)), 400)
    assert error["param"] == param
    ok = server.post(CHAT, chat(max_tokens=4, response_format={"type": "json_object"}))
    assert ok.status == 200, ok.body  # the server goes on serving
    wait_released(server)


def test_a_schema_is_compiled_once(server: LiveServer) -> None:
    """The grammars' cache is keyed by the schema: the same schema (as another dict) gives the
    same compiled grammar; another schema, another."""
    from kvrt.runtime.server.grammars import GRAMMARS

    grammars = server.app[GRAMMARS]
    first = grammars.json_schema(json.loads(json.dumps(RECIPE)), "schema")
    assert grammars.json_schema(json.loads(json.dumps(RECIPE)), "schema") is first
    assert grammars.json_schema({"type": "object"}, "schema") is not first


def test_schemas_are_closed_only_where_that_narrows() -> None:
    from kvrt.runtime.server.grammars import closed_schema, generated

    point = {"type": "object", "properties": {"x": {"type": "integer"}}}
    closed = closed_schema({"type": "object", "properties": {"p": point, "properties": point},
                            "allOf": [point], "$defs": {"pt": point},
                            "additionalProperties": True})
    assert "additionalProperties" not in point  # the schema sent is not changed
    assert closed["additionalProperties"] is True  # said by the schema: kept
    assert closed["properties"]["p"]["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False  # a key's name
    assert closed["$defs"]["pt"]["additionalProperties"] is False
    assert closed["allOf"] == [point]
    one_of = {"oneOf": [point, {"type": "object", "properties": {"y": {"type": "string"}}}]}
    assert {k: v for k, v in generated(one_of).items() if k != "x-guidance"} == one_of


def test_each_of_n_choices_follows_the_schema(client: openai.OpenAI) -> None:
    """Each choice has its own matcher: all validate, and they differ (each its own draw)."""
    reply = client.chat.completions.create(model="tiny", seed=11, n=3, **chat(
        response_format={"type": "json_schema",
                         "json_schema": {"name": "recipe", "schema": RECIPE}}))
    assert len(reply.choices) == 3
    replies = [json.loads(choice.message.content) for choice in reply.choices]
    assert all(valid(RECIPE, r) for r in replies)
    assert all(choice.finish_reason == "stop" for choice in reply.choices)
    assert len({json.dumps(r) for r in replies}) > 1
