"""Bad input gets OpenAI's error shape with the right status, and the server keeps serving."""

from __future__ import annotations

import json

import pytest

from tests.server.live_server import LiveServer, assert_error_shape, good_chat

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 80  # ~800 tokens > 256
DEEP = b"[" * 100_000 + b"]" * 100_000  # past any decoder's recursion limit


def chat(**fields):
    return good_chat(**fields)


# (id, path, body or raw bytes, extra headers, status, words the message or param must name)
CASES = [
    ("malformed-json", CHAT, b'{"messages": [', {}, 400, "JSON"),
    ("empty-body", CHAT, b"", {}, 400, "JSON"),
    ("not-an-object", CHAT, b"[1, 2]", {}, 400, "object"),
    ("max-tokens-str", CHAT, chat(max_tokens="5"), {}, 400, "max_tokens"),
    ("messages-str", CHAT, {"messages": "hi"}, {}, 400, "messages"),
    ("temperature-str", CHAT, chat(temperature="hot"), {}, 400, "temperature"),
    ("stream-int", CHAT, chat(stream="yes"), {}, 400, "stream"),
    ("kvrt-wrong-type", CHAT, chat(kvrt={"run": 5}), {}, 400, "kvrt.run"),
    ("unknown-model", CHAT, chat(model="gpt-4"), {}, 404, "gpt-4"),
    ("unknown-model-completions", COMPLETIONS, {"model": "x", "prompt": "a"}, {}, 404, "model"),
    ("max-tokens-zero", CHAT, chat(max_tokens=0), {}, 400, "max_tokens"),
    ("max-tokens-negative", CHAT, chat(max_tokens=-3), {}, 400, "max_tokens"),
    ("max-tokens-absurd", CHAT, chat(max_tokens=10**12), {}, 400, "max_tokens"),
    ("max-completion-tokens-zero", CHAT, chat(max_completion_tokens=0), {}, 400,
     "max_completion_tokens"),
    ("prompt-too-long", CHAT, chat(messages=[{"role": "user", "content": LONG_TEXT}]), {}, 400,
     "context length"),
    ("prompt-too-long-stream", CHAT,
     chat(messages=[{"role": "user", "content": LONG_TEXT}], stream=True), {}, 400,
     "context length"),
    ("token-prompt-too-long", COMPLETIONS, {"prompt": [5] * 300}, {}, 400, "context length"),
    ("empty-messages", CHAT, {"messages": []}, {}, 400, "messages"),
    ("missing-messages", CHAT, {"max_tokens": 3}, {}, 400, "messages"),
    ("bad-role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, {}, 400,
     "messages[0].role"),
    ("image-part", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, {}, 400, "image_url"),
    ("n-too-many", CHAT, chat(n=65), {}, 400, "n=65"),
    ("n-0", CHAT, chat(n=0), {}, 400, "n"),
    ("temperature-negative", CHAT, chat(temperature=-1), {}, 400, "temperature"),
    ("top-p-zero", CHAT, chat(top_p=0), {}, 400, "top_p"),
    ("seed-overflow", CHAT, chat(seed=2**64 - 1), {}, 400, "seed"),
    ("empty-stop", CHAT, chat(stop=""), {}, 400, "stop"),
    ("negative-stop-token", CHAT, chat(stop_token_ids=[-1]), {}, 400, "stop_token_ids"),
    ("text-plain", CHAT, json.dumps(good_chat()).encode(), {"Content-Type": "text/plain"}, 415,
     "application/json"),
    ("form-encoded", CHAT, b"a=b", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "application/json"),
    ("batch-prompt", COMPLETIONS, {"prompt": ["a", "b"]}, {}, 400, "batch"),
    ("batch-token-prompts", COMPLETIONS, {"prompt": [[1, 2], [3]]}, {}, 400, "batch"),
    ("empty-prompt", COMPLETIONS, {"prompt": ""}, {}, 400, "empty"),
    ("empty-token-prompt", COMPLETIONS, {"prompt": []}, {}, 400, "prompt"),
    ("prompt-int", COMPLETIONS, {"prompt": 5}, {}, 400, "prompt"),
    ("token-out-of-vocab", COMPLETIONS, {"prompt": [1, 10**6]}, {}, 400, "token ids"),
    ("token-out-of-vocab-stream", COMPLETIONS, {"prompt": [1, 10**6], "stream": True}, {}, 400,
     "token ids"),
    ("text-longer-than-any-context", CHAT,
     chat(messages=[{"role": "user", "content": "a" * 3_000_000}]), {}, 400, "characters"),
    ("completion-text-longer-than-any-context", COMPLETIONS, {"prompt": "a" * 3_000_000}, {},
     400, "characters"),
    ("deep-json-in-a-tool-schema", CHAT,
     b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
     b'"function": {"name": "f", "parameters": {"a": ' + DEEP + b'}}}]}', {}, 400, "nests"),
    ("deep-json-in-tool-call-arguments", CHAT, chat(messages=[
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "f", "arguments": DEEP.decode()}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        {"role": "user", "content": "x"}]), {}, 400, "nests"),
]


@pytest.mark.parametrize(("path", "body", "headers", "status", "names"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_request_is_refused_and_server_keeps_serving(
    server: LiveServer, path: str, body, headers: dict, status: int, names: str
) -> None:
    if isinstance(body, bytes):
        reply = server.request("POST", path, data=body,
                               headers={"Content-Type": "application/json", **headers})
    else:
        reply = server.post(path, body, headers=headers)
    error = assert_error_shape(reply, status)
    assert names.lower() in (error["message"] + " " + str(error["param"])).lower(), error
    assert server.post(CHAT, good_chat(max_tokens=2)).status == 200


def test_wrong_type_names_the_field_in_param(server: LiveServer) -> None:
    error = assert_error_shape(server.post(CHAT, chat(max_tokens="5")), 400)
    assert error["param"] == "max_tokens"
    error = assert_error_shape(server.post(CHAT, {"messages": [{"role": "x"}]}), 400)
    assert error["param"] == "messages[0].role"


def test_context_errors_carry_openai_code(server: LiveServer) -> None:
    error = assert_error_shape(server.post(COMPLETIONS, {"prompt": [5] * 300}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    error = assert_error_shape(server.post(CHAT, chat(max_tokens=10_000)), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"


def test_unknown_route_and_wrong_method(server: LiveServer) -> None:
    assert "/v1/nothing" in assert_error_shape(server.request("GET", "/v1/nothing"), 404)[
        "message"]
    assert "POST" in assert_error_shape(server.request("GET", CHAT), 405)["message"]


def test_missing_content_type_is_taken_as_json(server: LiveServer) -> None:
    reply = server.request("POST", CHAT, data=json.dumps(good_chat(max_tokens=2)).encode(),
                           no_content_type=True)
    assert reply.status == 200, reply.body


def test_no_requests_left_behind(server: LiveServer) -> None:
    stats = server.stats()
    assert (stats.running, stats.waiting, stats.kv_blocks_in_use) == (0, 0, 0)
