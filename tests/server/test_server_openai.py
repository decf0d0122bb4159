"""OpenAI endpoints through the real engine: shapes, streaming, usage, sampling fields."""

from __future__ import annotations

import openai
import pytest

from tests.server.live_server import LiveServer, good_chat, start_run

# Long enough to span more than one 16-token KV block, so a repeat can hit the prefix cache.
SYSTEM = ("You are a helpful assistant. The agents share their notes with each other, and each "
          "agent reads what the others wrote before it writes its own answer.")


def chat_body(content: str = "What is two plus two?", **extra):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]
    return {"model": "tiny", "messages": messages, "max_tokens": 6, **extra}


def check_usage(usage: dict) -> None:
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > 0
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]


def test_chat_completion_shape(server: LiveServer) -> None:
    reply = server.post("/v1/chat/completions", chat_body(max_tokens=5, ignore_eos=True))
    assert reply.status == 200, reply.body
    body = reply.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage",
                         "system_fingerprint"}
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "tiny" and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert body["usage"]["completion_tokens"] == 5
    check_usage(body["usage"])


def test_completion_shape_string_and_token_prompt(server: LiveServer) -> None:
    for prompt in ("Once upon a time", [46, 208, 1, 7], [[46, 208]]):
        reply = server.post("/v1/completions",
                            {"prompt": prompt, "max_tokens": 3, "ignore_eos": True})
        assert reply.status == 200, reply.body
        body = reply.json()
        assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
        assert body["model"] == "tiny"
        [choice] = body["choices"]
        assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
        assert choice["finish_reason"] == "length" and choice["logprobs"] is None
        assert body["usage"]["completion_tokens"] == 3
        check_usage(body["usage"])
    assert body["usage"]["prompt_tokens"] == 2  # the token-id prompt is taken as is


def test_completions_default_to_16_tokens(server: LiveServer) -> None:
    body = server.post("/v1/completions", {"prompt": "The quick", "ignore_eos": True}).json()
    assert body["usage"]["completion_tokens"] == 16


def test_chat_stream_chunks(server: LiveServer) -> None:
    whole = server.post("/v1/chat/completions", chat_body(temperature=0, ignore_eos=True)).json()
    events = server.stream("/v1/chat/completions",
                           chat_body(temperature=0, ignore_eos=True, stream=True))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny" for c in chunks)
    assert all("usage" not in c for c in chunks)  # only sent when include_usage asks for it
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "length"}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]  # greedy: same text either way


def test_stream_include_usage(server: LiveServer) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True}, max_tokens=4,
                     ignore_eos=True)
    events = server.stream("/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    *chunks, last = events[:-1]
    assert all(c["usage"] is None for c in chunks)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4
    check_usage(last["usage"])


def test_completion_stream_with_usage(server: LiveServer) -> None:
    whole = server.post("/v1/completions", {"prompt": "The capital of France", "max_tokens": 5,
                                            "temperature": 0, "ignore_eos": True}).json()
    events = server.stream("/v1/completions", {
        "prompt": "The capital of France", "max_tokens": 5, "temperature": 0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    *chunks, last = events[:-1]
    assert all(c["object"] == "text_completion" for c in events[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert last["choices"] == [] and last["usage"] == whole["usage"] | {
        "prompt_tokens_details": last["usage"]["prompt_tokens_details"]}


def test_repeated_prompt_reports_cached_tokens(server: LiveServer) -> None:
    body = chat_body("Tell me about the harbour and the boats.")
    first = server.post("/v1/chat/completions", body).json()["usage"]
    second = server.post("/v1/chat/completions", body).json()["usage"]
    assert first["prompt_tokens"] == second["prompt_tokens"] > 16
    assert second["prompt_tokens_details"]["cached_tokens"] >= 16


def test_stop_string_cuts_the_text(server: LiveServer) -> None:
    base = {"prompt": "Once upon a time there was", "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}
    text = server.post("/v1/completions", base).json()["choices"][0]["text"]
    stop = next(text[i:i + 2] for i in range(4, len(text) - 2) if text[i:i + 2].strip())
    body = server.post("/v1/completions", base | {"stop": [stop, "\x00never"]}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == text[: text.index(stop)]
    single = server.post("/v1/completions", base | {"stop": stop}).json()["choices"][0]
    assert single["text"] == choice["text"]


def test_seed_reproducible_with_temperature(server: LiveServer) -> None:
    def sample(seed: int) -> str:
        body = chat_body(temperature=1.0, seed=seed, max_tokens=12, ignore_eos=True)
        return server.post("/v1/chat/completions", body).json()["choices"][0]["message"]["content"]

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10))


def test_kvrt_extensions_accepted(server: LiveServer) -> None:
    kvrt = {"run": start_run(server, "a"), "agent": "a"}
    body = good_chat(top_k=5, top_p=0.9, stop_token_ids=[3], user="u", kvrt=kvrt,
                     logit_bias={}, frequency_penalty=0, tools=None, max_completion_tokens=3,
                     ignore_eos=True)
    del body["max_tokens"]
    reply = server.post("/v1/chat/completions", body)  # no `model`: the served one is assumed
    assert reply.status == 200, reply.body
    assert reply.json()["usage"]["completion_tokens"] == 3


def test_content_parts_and_developer_role(server: LiveServer) -> None:
    body = {"messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                      {"type": "text", "text": "there"}]}],
            "max_tokens": 2}
    assert server.post("/v1/chat/completions", body).status == 200


def test_models_endpoint(server: LiveServer) -> None:
    body = server.request("GET", "/v1/models").json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == "tiny" and card["object"] == "model" and card["owned_by"] == "kvrt"
    assert card["max_model_len"] == 256


def test_official_openai_client(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    run = start_run(server, "a1")
    assert [m.id for m in client.models.list()] == ["tiny"]

    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=4,
        temperature=0, extra_body={"ignore_eos": True, "kvrt": {"run": run, "agent": "a1"}})
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 4
    assert chat.usage.prompt_tokens_details.cached_tokens >= 0

    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=4,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 4

    completion = client.completions.create(model="tiny", prompt="Once", max_tokens=3,
                                           extra_body={"ignore_eos": True})
    assert completion.choices[0].finish_reason == "length"

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    assert "messages" in str(caught.value)
