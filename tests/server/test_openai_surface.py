"""The OpenAI surface agents use, on a live daemon with the tiny model, through the real
`openai` client where a client would read it: logprobs (checked against transformers' forward
of the same checkpoint), n choices (prompt computed once, each choice its own seeded request),
penalties and logit_bias, stop strings kept on request, max_completion_tokens, and the fields
kvrt does not serve refused with a 400 naming them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.server.live_server import (
    LiveServer,
    assert_error_shape,
    good_chat,
    live_server,
    wait_released,
)

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
PROMPT = [5, 9, 200, 31, 77, 9, 5, 140, 3, 60, 301, 12, 8, 8, 44, 101, 7, 250, 19]  # > a block
MESSAGES = [{"role": "user", "content": "Tell me about the quick brown fox."}]
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model)


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _hf_log_softmax(model_path: Path, tokens: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)


# ---- logprobs ---------------------------------------------------------------------------------


def test_completion_logprobs_are_transformers_log_softmax(server, client, tiny_model) -> None:
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, logprobs=3,
                                      temperature=0, extra_body={"ignore_eos": True})
    [choice] = reply.choices
    logprobs = choice.logprobs
    assert logprobs is not None and len(logprobs.tokens) == 6
    names = server.engine.tokenizer

    def name(token_id: int) -> str:
        return names.decode([token_id], skip_special_tokens=False)

    # The reference: transformers' greedy continuation of the same checkpoint, and its
    # log-softmax at each step.
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        tokens = model.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0].tolist()
    generated = tokens[len(PROMPT):]
    assert logprobs.tokens == [name(t) for t in generated]
    reference = _hf_log_softmax(tiny_model, tokens[:-1])
    for step, token in enumerate(generated):
        row = reference[len(PROMPT) - 1 + step]
        assert logprobs.token_logprobs[step] == pytest.approx(row[token].item(), abs=1e-3)
        values, ids = row.topk(3)
        expected: dict[str, float] = {}
        for i, v in zip(ids.tolist(), values.tolist()):  # best first: a shared name keeps it
            expected.setdefault(name(i), v)
        top = logprobs.top_logprobs[step]
        assert set(top) == set(expected)  # greedy: the sampled token is among the best
        assert all(top[k] == pytest.approx(v, abs=1e-3) for k, v in expected.items())
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
    assert choice.text == "".join(logprobs.tokens)


def test_chat_logprobs_parse_and_stream_as_in_the_body(client) -> None:
    kwargs = {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "logprobs": True,
              "top_logprobs": 2, "temperature": 0, "extra_body": {"ignore_eos": True}}
    reply = client.chat.completions.create(**kwargs)
    content = reply.choices[0].logprobs.content
    assert len(content) == 5 == reply.usage.completion_tokens
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    streamed = [entry for chunk in client.chat.completions.create(stream=True, **kwargs)
                for choice in chunk.choices if choice.logprobs is not None
                for entry in choice.logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == \
        [(e.token, round(e.logprob, 4)) for e in content]


def test_no_logprobs_unless_asked(server) -> None:
    body = server.post(CHAT, good_chat(**GREEDY)).json()
    assert body["choices"][0]["logprobs"] is None


# ---- n choices --------------------------------------------------------------------------------


def test_n_choices_compute_the_prompt_once_and_each_is_its_seeded_request(server, client):
    wait_released(server)
    before = server.stats()
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, n=3, max_tokens=5,
                                           temperature=1.0, seed=11,
                                           extra_body={"ignore_eos": True})
    after = server.stats()
    assert [c.index for c in reply.choices] == [0, 1, 2]
    usage = reply.usage
    assert usage.completion_tokens == 15  # summed over the choices
    assert usage.total_tokens == usage.prompt_tokens + 15  # the prompt counted once
    computed_prompt = usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens
    assert after.computed_tokens - before.computed_tokens == computed_prompt + 3 * 4
    assert after.prompt_tokens - before.prompt_tokens == usage.prompt_tokens
    wait_released(server)
    assert server.stats().kv_blocks_in_use == 0
    for i, choice in enumerate(reply.choices):  # choice i is the request seeded 11 + i
        alone = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5,
                                               temperature=1.0, seed=11 + i,
                                               extra_body={"ignore_eos": True})
        assert choice.message.content == alone.choices[0].message.content, i
    assert len({c.message.content for c in reply.choices}) > 1


def test_streamed_choices_carry_their_index(server) -> None:
    body = good_chat(n=2, max_tokens=4, seed=3, stream=True, ignore_eos=True,
                     stream_options={"include_usage": True})
    events = server.stream(CHAT, body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    heads = [c["choices"][0]["index"] for c in chunks[:2]]
    assert heads == [0, 1] and all(c["choices"][0]["delta"]["role"] == "assistant"
                                   for c in chunks[:2])
    finishes = [c["choices"][0]["index"] for c in chunks
                if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        [choice] = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
    whole = server.post(CHAT, {**body, "stream": False}).json()
    assert [c["message"]["content"] for c in whole["choices"]] == [texts[0], texts[1]]
    wait_released(server)


def test_completion_choices_with_legacy_logprobs(client) -> None:
    reply = client.completions.create(model="tiny", prompt="Once upon a time", n=2, max_tokens=3,
                                      logprobs=1, seed=5, extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.usage.completion_tokens == 6
    for choice in reply.choices:
        assert len(choice.logprobs.tokens) == 3 and len(choice.logprobs.top_logprobs) == 3
        assert choice.text == "".join(choice.logprobs.tokens)


# ---- penalties, logit_bias, stop strings, max_completion_tokens -------------------------------


def test_logit_bias_forces_a_token_and_a_repetition_penalty_repeats_the_prompt(server) -> None:
    forced = server.post(COMPLETIONS, {"prompt": PROMPT, "max_tokens": 4, "logprobs": 0,
                                       "logit_bias": {"42": 100}, **GREEDY}).json()
    name = server.engine.tokenizer.decode([42], skip_special_tokens=False)
    assert forced["choices"][0]["logprobs"]["tokens"] == [name] * 4
    plain = server.post(COMPLETIONS, {"prompt": PROMPT, "max_tokens": 12, **GREEDY}).json()
    # A penalty far below 1 draws the prompt's tokens back (greedy, the tiny model's own
    # answer repeats none of them).
    again = server.post(COMPLETIONS, {"prompt": PROMPT, "max_tokens": 12, "logprobs": 0,
                                      "repetition_penalty": 0.05, **GREEDY}).json()
    prompt_names = {server.engine.tokenizer.decode([t], skip_special_tokens=False)
                    for t in PROMPT}
    assert set(again["choices"][0]["logprobs"]["tokens"]) <= prompt_names
    assert again["choices"][0]["text"] != plain["choices"][0]["text"]
    both = server.post(COMPLETIONS, {"prompt": PROMPT, "max_tokens": 4, "presence_penalty": -2,
                                     "frequency_penalty": 1.5, **GREEDY})
    assert both.status == 200, both.body


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_kept_on_request(server, path: str, stream: bool) -> None:
    base = ({"messages": MESSAGES} if path == CHAT else {"prompt": PROMPT}) | {
        "max_tokens": 24, **GREEDY}

    def text_of(**extra) -> tuple[str, str]:
        body = base | extra
        if not stream:
            [choice] = server.post(path, body).json()["choices"]
            return choice["message"]["content"] if path == CHAT else choice["text"], \
                choice["finish_reason"]
        text, reason = "", None
        for chunk in server.stream(path, body | {"stream": True})[:-1]:
            for choice in chunk["choices"]:
                text += (choice["delta"].get("content", "") if path == CHAT else choice["text"])
                reason = choice["finish_reason"] or reason
        return text, reason

    full, _ = text_of()
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3
    cut = full.index(stop)
    assert text_of(stop=[stop]) == (full[:cut], "stop")
    assert text_of(stop=[stop], include_stop_str_in_output=True) == (full[:cut + 3], "stop")


def test_max_completion_tokens_on_chat(server) -> None:
    for extra, expected in (({"max_completion_tokens": 3}, 3),
                            ({"max_completion_tokens": 2, "max_tokens": 5}, 2)):
        body = {"messages": MESSAGES, **GREEDY, **extra}
        reply = server.post(CHAT, body).json()
        assert reply["usage"]["completion_tokens"] == expected
        assert reply["choices"][0]["finish_reason"] == "length"


# ---- fields kvrt refuses, and those it accepts ------------------------------------------------

REFUSED = [
    (CHAT, {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    (CHAT, {"function_call": "auto"}, "function_call"),
    (CHAT, {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    (CHAT, {"modalities": ["text", "audio"]}, "modalities"),
    (CHAT, {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    (CHAT, {"web_search_options": {}}, "web_search_options"),
    (CHAT, {"best_of": 2}, "best_of"),
    (CHAT, {"top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"n": 65}, "n"),
    (CHAT, {"presence_penalty": 2.5}, "presence_penalty"),
    (CHAT, {"repetition_penalty": 0}, "repetition_penalty"),
    (CHAT, {"logit_bias": {"x": 1}}, "logit_bias.x"),
    (CHAT, {"logit_bias": {"99999999": 1}}, "logit_bias.99999999"),
    (CHAT, {"logit_bias": {"5": 101}}, "logit_bias[...]"),  # msgspec names a value so
    (COMPLETIONS, {"echo": True}, "echo"),
    (COMPLETIONS, {"suffix": "the end"}, "suffix"),
    (COMPLETIONS, {"best_of": 1, "n": 2}, "best_of"),
    (COMPLETIONS, {"logprobs": 21}, "logprobs"),
]


@pytest.mark.parametrize(("path", "extra", "param"), REFUSED, ids=[r[2] for r in REFUSED])
def test_unserved_fields_are_a_400_naming_them(server, path: str, extra: dict,
                                               param: str) -> None:
    body = ({"messages": MESSAGES} if path == CHAT else {"prompt": "Hi"}) | {"max_tokens": 2}
    error = assert_error_shape(server.post(path, body | extra), 400)
    assert error["param"] == param or param in error["message"], error
    assert server.post(path, body).status == 200  # the server keeps serving


def test_fields_clients_send_by_default_are_accepted(server) -> None:
    harmless = {"stream_options": {"include_usage": True}, "stream": False, "user": "u1",
                "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
                "parallel_tool_calls": True, "modalities": ["text"], "best_of": 1,
                "functions": None, "reasoning_effort": "low", "n": 1, "logprobs": False}
    reply = server.post(CHAT, {"messages": MESSAGES, "max_tokens": 2, **harmless})
    assert reply.status == 200, reply.body
    completion = server.post(COMPLETIONS, {"prompt": "Hi", "max_tokens": 2, "echo": False,
                                           "suffix": None, "best_of": 1})
    assert completion.status == 200, completion.body
    wait_released(server)


def test_langchain_chat_openai_with_logprobs_and_choices(server) -> None:
    """What LangChain's ChatOpenAI sends by default (stream false, n, logprobs, and its
    stream_options when streaming) is accepted, and its results read back."""
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="tiny", max_tokens=3,
                      logprobs=True, top_logprobs=1, n=2, temperature=0.7, seed=1,
                      max_retries=0)
    result = chat.generate([[HumanMessage("Hello there")]])
    [generations] = result.generations
    assert len(generations) == 2
    for generation in generations:
        content = generation.message.response_metadata["logprobs"]["content"]
        assert 1 <= len(content) <= 3 and all(len(e["top_logprobs"]) == 1 for e in content)
    streamed = list(ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="tiny",
                               max_tokens=3, stream_usage=True, max_retries=0)
                    .stream([HumanMessage("Hello there")]))
    assert sum(chunk.usage_metadata["output_tokens"] for chunk in streamed
               if chunk.usage_metadata) >= 1
    wait_released(server)
