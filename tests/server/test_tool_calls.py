"""Tool calling: tools in the prompt (a tools-aware template and kvrt's fallback), the 400s, and
a reply's calls in OpenAI's shapes.

The tiny models cannot write a tool call, so over HTTP the tests check what goes in (the prompt's
token count, against transformers' own rendering where the template knows tools) and that the
reply is served. The way from reply text to `tool_calls` is tested on text, through the serving
layer's conversion: `ChatFormatter.full` (JSON body) and `ChatFormatter.piece` /
`ChatFormatter.finish` (stream), whose output the `openai` client's own types must read.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import msgspec
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from transformers import AutoTokenizer

from kvrt.runtime.engine.protocol import GenerateOutput
from kvrt.runtime.model.chat_prompt import render_prompt
from kvrt.runtime.model.tokenizer import Tokenizer
from kvrt.runtime.model.tool_prompt import PromptTools, template_uses_tools
from kvrt.runtime.server.openai_logprobs import TokenNames
from kvrt.runtime.server.openai_requests import message_dicts
from kvrt.runtime.server.openai_serving import ChatFormatter, ChoiceResult
from kvrt.runtime.server.tool_parsers import make_tool_parser
from kvrt.sdk.protocol.openai_api import ChatMessage, PromptTokensDetails, Usage
from tests.server.live_server import (
    SMALL_ENGINE,
    LiveServer,
    assert_error_shape,
    good_chat,
    live_server,
)

CHAT = "/v1/chat/completions"
# The fallback's tools block is long in the tiny tokenizer's tokens (~450): room for it.
TOOLS_ENGINE = replace(SMALL_ENGINE, kv_cache_memory=8 * 1024**2, max_model_len=2048)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
# A conversation through one tool call, as an OpenAI client sends it ...
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
]
# ... and as transformers' chat templates take it: arguments as an object.
TEMPLATE_MESSAGES = [
    *MESSAGES[:2],
    {"role": "assistant", "content": "", "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
]

# A small template in the manner of Qwen2.5's: tools in the system turn, calls as <tool_call>
# JSON with `tojson` arguments, tool results as <tool_response> user turns.
QWEN_STYLE_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\nCall one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>"
    "<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}{%- if message.content %}{{- '\\n' + message.content }}"
    "{%- endif %}{%- for call in message.tool_calls %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' }}"
    "{{- call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response>"
    "<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def with_template(folder: Path, out: Path, template: str) -> Path:
    """A copy of a checkpoint folder whose tokenizer carries `template`."""
    shutil.copytree(folder, out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def tools_server(tiny_model: Path) -> Iterator[LiveServer]:
    """The tiny model with its plain ChatML template: kvrt's fallback renders the tools."""
    yield from live_server(tiny_model, TOOLS_ENGINE)


@pytest.fixture(scope="module")
def native_folder(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_template(tiny_model, tmp_path_factory.mktemp("native") / "m", QWEN_STYLE_TEMPLATE)


@pytest.fixture(scope="module")
def native_server(native_folder: Path) -> Iterator[LiveServer]:
    """The tiny model with a tools-aware template, which renders the tools itself."""
    yield from live_server(native_folder, TOOLS_ENGINE)


def prompt_tokens(server: LiveServer, **fields) -> int:
    body = {"messages": MESSAGES, "max_tokens": 1, **fields}
    reply = server.post(CHAT, body)
    assert reply.status == 200, reply.body
    return reply.json()["usage"]["prompt_tokens"]


# ---- rendering -----------------------------------------------------------------------------


def test_which_templates_render_tools_themselves(tiny_checkpoint_dir) -> None:
    plain = Tokenizer.from_pretrained(tiny_checkpoint_dir("llama")).chat_template
    assert plain is not None and not template_uses_tools(plain)
    assert template_uses_tools(QWEN_STYLE_TEMPLATE)
    assert template_uses_tools("{% for t in tools %}{{ t }}{% endfor %}")
    # A variable of the template's own named "tools" is not the caller's tools.
    assert not template_uses_tools("{% set tools = [] %}{{ tools }}")


def test_tools_aware_template_gets_the_tools_and_messages_as_they_are(native_folder) -> None:
    hf = AutoTokenizer.from_pretrained(native_folder)
    ours = Tokenizer(hf)
    rendered = ours.render_chat(TEMPLATE_MESSAGES, tools=PromptTools(TOOLS))
    assert rendered == hf.apply_chat_template(TEMPLATE_MESSAGES, tools=TOOLS, tokenize=False,
                                              add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n<tools>\n")
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            in rendered)  # arguments written as an object, not as a quoted string
    assert "<|im_start|>user\n<tool_response>\n18C\n</tool_response><|im_end|>\n" in rendered

    asked = ours.render_chat(TEMPLATE_MESSAGES, tools=PromptTools(TOOLS, "Call `get_time`."))
    assert asked.startswith("<|im_start|>system\nYou are terse.\n\nCall `get_time`.\n\n# Tools")
    alone = ours.render_chat(TEMPLATE_MESSAGES[1:], tools=PromptTools(TOOLS, "Call `get_time`."))
    assert alone.startswith("<|im_start|>system\nCall `get_time`.\n\n# Tools")


def test_fallback_renders_tools_calls_and_results_as_text(tiny_checkpoint_dir) -> None:
    ours = Tokenizer.from_pretrained(tiny_checkpoint_dir("llama"))
    rendered = ours.render_chat(TEMPLATE_MESSAGES, tools=PromptTools(TOOLS, "Call `get_time`."))
    system, rest = rendered.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\nYou are terse.\n\nCall `get_time`.\n\n# Tools")
    assert f"<tools>\n{json.dumps(WEATHER_TOOL)}\n{json.dumps(TIME_TOOL)}\n</tools>" in system
    assert "<tool_call>" in system and "<tool_response>" in system  # the format is explained
    assert rest == (
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    # Without tools the history is still written the same way, and no tools block is added.
    bare = ours.render_chat(TEMPLATE_MESSAGES)
    assert bare == "<|im_start|>system\nYou are terse.<|im_end|>\n" + rest
    # A chat without tools and without tool messages renders exactly as the template alone.
    plain = [{"role": "user", "content": "hi"}]
    assert ours.render_chat(plain) == ours.hf.apply_chat_template(
        plain, tokenize=False, add_generation_prompt=True)
    # No system message: the tools get one of their own, first.
    assert ours.render_chat(plain, tools=PromptTools(TOOLS)).startswith(
        "<|im_start|>system\n# Tools\n\n")


# ---- over HTTP: the prompt -----------------------------------------------------------------


def test_native_template_prompt_equals_transformers_rendering(native_server: LiveServer,
                                                              native_folder: Path) -> None:
    hf = AutoTokenizer.from_pretrained(native_folder)

    def reference(**kw) -> int:
        text = hf.apply_chat_template(TEMPLATE_MESSAGES, tokenize=False,
                                      add_generation_prompt=True, **kw)
        return len(hf.encode(text, add_special_tokens=False))

    assert prompt_tokens(native_server, tools=TOOLS) == reference(tools=TOOLS)
    assert prompt_tokens(native_server, tools=TOOLS, tool_choice="auto") == reference(tools=TOOLS)
    assert prompt_tokens(native_server) == reference()
    assert prompt_tokens(native_server, tools=TOOLS, tool_choice="none") == reference()
    assert prompt_tokens(native_server, tools=TOOLS, tool_choice="required") > reference(
        tools=TOOLS)  # the instruction is in the prompt


def test_fallback_prompt_holds_the_tools(tools_server: LiveServer) -> None:
    without = prompt_tokens(tools_server)
    offered = prompt_tokens(tools_server, tools=TOOLS)
    assert offered > without + 100  # the tools block is really in the prompt
    assert prompt_tokens(tools_server, tools=[WEATHER_TOOL]) < offered
    assert prompt_tokens(tools_server, tools=TOOLS, tool_choice="none") == without
    named = {"type": "function", "function": {"name": "get_time"}}
    assert prompt_tokens(tools_server, tools=TOOLS, tool_choice=named) > offered
    assert prompt_tokens(tools_server, tools=TOOLS, tool_choice="required") > offered
    assert prompt_tokens(tools_server, tools=TOOLS, parallel_tool_calls=False) > offered


def test_segments_of_a_chat_with_tools(tools_server: LiveServer) -> None:
    """A tool result marked as a segment spans exactly its own turn, tools block or not."""
    engine, messages = tools_server.engine, msgspec.convert(MESSAGES, list[ChatMessage])
    turns = message_dicts(messages, "messages")
    for tools in (None, PromptTools(TOOLS)):
        prompt = render_prompt(engine.tokenizer, turns, [False, False, False, True], tools)
        [(start, end)] = prompt.segments
        assert engine.tokenizer.decode(prompt.token_ids[start:end],
                                       skip_special_tokens=False) == (
            "<|im_start|>user\n<tool_response>\n18C\n</tool_response><|im_end|>\n")


def test_chat_with_tools_and_tool_history_is_answered(tools_server: LiveServer) -> None:
    body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "auto",
            "parallel_tool_calls": True, "max_tokens": 4, "ignore_eos": True, "temperature": 0}
    reply = tools_server.post(CHAT, body)
    assert reply.status == 200, reply.body
    [choice] = reply.json()["choices"]
    assert choice["finish_reason"] == "length"
    assert isinstance(choice["message"]["content"], str)
    events = tools_server.stream(CHAT, {**body, "stream": True})
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == choice["message"]["content"]  # greedy: the same reply either way


def test_openai_client_sends_tools_and_reads_the_reply(tools_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=tools_server.url + "/v1", api_key="unused", max_retries=0)
    kw = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 3,
          "temperature": 0, "extra_body": {"ignore_eos": True}}
    chat = client.chat.completions.create(**kw, tool_choice="auto")
    assert chat.choices[0].finish_reason == "length"
    assert chat.choices[0].message.tool_calls is None
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="get_date"):
        client.chat.completions.create(
            **kw, tool_choice={"type": "function", "function": {"name": "get_date"}})


# ---- over HTTP: bad input ------------------------------------------------------------------


def chat(**fields):
    return good_chat(**{"tools": TOOLS, **fields})


def with_message(message: dict) -> list[dict]:
    return [*MESSAGES[:2], message]


NAMED_UNKNOWN = {"type": "function", "function": {"name": "get_date"}}
# (id, body, the words the message or param must hold, the param)
BAD = [
    ("duplicate-tool-names", chat(tools=[WEATHER_TOOL, TIME_TOOL, WEATHER_TOOL]),
     "`get_weather`", "tools[2].function.name"),
    ("tool-choice-unknown-name", chat(tool_choice=NAMED_UNKNOWN), "`get_date`",
     "tool_choice.function.name"),
    ("tool-choice-name-without-tools", good_chat(tool_choice=NAMED_UNKNOWN), "`get_date`",
     "tool_choice.function.name"),
    ("required-without-tools", good_chat(tool_choice="required"), "needs tools", "tool_choice"),
    ("tool-choice-unknown-word", chat(tool_choice="always"), "always", "tool_choice"),
    ("tool-message-without-id", chat(messages=with_message({"role": "tool", "content": "18C"})),
     "tool_call_id", "messages[2].tool_call_id"),
    ("tool-calls-on-a-user-message", chat(messages=[{**MESSAGES[2], "role": "user"}]),
     "only assistant", "messages[0].tool_calls"),
    ("arguments-not-json", chat(messages=with_message({**MESSAGES[2], "tool_calls": [{
        "id": "c", "type": "function", "function": {"name": "f", "arguments": "{city"}}]})),
     "JSON object", "messages[2].tool_calls[0].function.arguments"),
    ("arguments-an-object-not-text", chat(messages=with_message({**MESSAGES[2], "tool_calls": [{
        "id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]})),
     "str", "messages[2].tool_calls[0].function.arguments"),
    ("tool-type", chat(tools=[{"type": "retrieval", "function": {"name": "f"}}]), "retrieval",
     "tools[0].type"),
    ("tool-without-function", chat(tools=[{"type": "function"}]), "function", "tools[0]"),
    ("function-name-with-space", chat(tools=[{"function": {"name": "get weather"}}]), "regex",
     "tools[0].function.name"),
    ("parameters-not-an-object", chat(tools=[{"function": {"name": "f", "parameters": 3}}]),
     "object", "tools[0].function.parameters"),
    ("parallel-tool-calls-text", chat(parallel_tool_calls="yes"), "bool", "parallel_tool_calls"),
]


@pytest.mark.parametrize(("body", "words", "param"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_tool_input_is_a_clear_400(tools_server: LiveServer, body: dict, words: str,
                                       param: str) -> None:
    error = assert_error_shape(tools_server.post(CHAT, body), 400)
    assert words.lower() in error["message"].lower(), error
    assert error["param"] == param, error
    assert tools_server.post(CHAT, good_chat(max_tokens=2)).status == 200


# ---- from reply text to OpenAI's shapes (the serving layer's conversion) ----------------------

USAGE = Usage(prompt_tokens=10, completion_tokens=30, total_tokens=40,
              prompt_tokens_details=PromptTokensDetails(cached_tokens=0))
REPLY = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
         '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")


def formatter(parallel: bool = True) -> ChatFormatter:
    return ChatFormatter("chatcmpl-1", "tiny", False, make_tool_parser("hermes"), parallel)


NAMES = TokenNames(None)  # type: ignore[arg-type]  # no logprobs: no token is named


def text_output(text: str) -> GenerateOutput:
    return GenerateOutput(token_ids=[], text=text, prompt_tokens=0, cached_tokens=0,
                          completion_tokens=0)


def full(text: str, reason: str = "stop", parallel: bool = True) -> ChatCompletion:
    body = formatter(parallel).full([ChoiceResult(0, [text], reason)], USAGE, NAMES)
    return ChatCompletion.model_validate_json(msgspec.json.encode(body))


def streamed(text: str, reason: str = "stop", parallel: bool = True,
             piece: int = 1) -> tuple[list[ChatCompletionChunk], ChatCompletion]:
    """The stream of `text` in pieces of `piece` characters, as the openai client reads it: its
    chunks, and the completion the client's own stream accumulator builds from them."""
    chat = formatter(parallel)
    events = chat.head(1)
    for i in range(0, len(text), piece):
        events += chat.piece(text_output(text[i:i + piece]), NAMES)
    events += chat.finish(0, reason)
    chunks = [ChatCompletionChunk.model_validate_json(msgspec.json.encode(e)) for e in events]
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    return chunks, state.current_completion_snapshot  # (its final form refuses "length")


def calls_of(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def test_full_reply_with_calls() -> None:
    reply = full(REPLY)
    [choice] = reply.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will check."
    assert calls_of(choice.message) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    ids = [c.id for c in choice.message.tool_calls]
    assert all(CALL_ID.match(i) for i in ids) and len(set(ids)) == 2
    assert all(c.type == "function" for c in choice.message.tool_calls)
    only_calls = full(REPLY.split("\n", 1)[1]).choices[0].message
    assert only_calls.content is None and len(only_calls.tool_calls) == 2


def test_full_reply_without_calls_is_content_as_generated() -> None:
    for text in ("Paris is sunny.\n", '<tool_call>{"name": oops}</tool_call>', ""):
        [choice] = full(text).choices
        assert choice.message.content == text and choice.message.tool_calls is None
        assert choice.finish_reason == "stop"
    hi = formatter().full([ChoiceResult(0, ["hi"], "stop")], USAGE, NAMES)
    body = msgspec.json.decode(msgspec.json.encode(hi))
    assert "tool_calls" not in body["choices"][0]["message"]  # left out, as OpenAI does


def test_streamed_reply_with_calls_reads_as_the_full_one() -> None:
    expected = full(REPLY).choices[0]
    for piece in (1, 2, 5, 7, len(REPLY)):
        chunks, final = streamed(REPLY, piece=piece)
        [choice] = final.choices
        assert choice.message.content == expected.message.content
        assert calls_of(choice.message) == calls_of(expected.message)
        assert choice.finish_reason == "tool_calls" == chunks[-1].choices[0].finish_reason
        deltas = [c.choices[0].delta for c in chunks]
        sent = [d.tool_calls[0] for d in deltas if d.tool_calls]
        assert [c.index for c in sent] == [0, 1] and all(CALL_ID.match(c.id) for c in sent)
        assert not any("<" in (d.content or "") for d in deltas)  # no tag, not half of one


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    assert calls_of(full(REPLY, parallel=False).choices[0].message) == [
        ("get_weather", {"city": "Paris"})]
    _, final = streamed(REPLY, parallel=False)
    assert calls_of(final.choices[0].message) == [("get_weather", {"city": "Paris"})]


def test_a_reply_cut_short_keeps_its_finish_reason() -> None:
    assert full(REPLY, reason="length").choices[0].finish_reason == "length"
    chunks, _ = streamed(REPLY, reason="length", piece=4)
    assert chunks[-1].choices[0].finish_reason == "length"
    # Cut inside the JSON of a call: no call, the text stays content.
    cut = REPLY[:40]
    [choice] = full(cut, reason="length").choices
    assert choice.message.content == cut and choice.message.tool_calls is None
    _, final = streamed(cut, reason="length", piece=3)
    assert final.choices[0].message.content == cut
