"""Segments: the token spans of messages whose KV may be reused at another position. A message
marked `"kvrt": {"segment": true}`, every message of a run whose graph declares
`reuse: "approximate"`, and a round's shared messages; each span holds exactly the message as
the (ChatML) template renders it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvrt.runtime.config import EngineConfig
from kvrt.runtime.engine.protocol import GenerateRequest
from kvrt.runtime.model.chat_prompt import message_pieces, segment_spans
from tests.server.live_server import LiveServer, live_server

SHARED = "Mara: the bridge is closed. Tomas: we ran a ferry in '74."


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, EngineConfig(kv_cache_memory=8 * 1024**2,
                                                    max_model_len=512))


@pytest.fixture
def sent(server: LiveServer, monkeypatch) -> list[GenerateRequest]:
    """The requests the daemon hands the engine, in order."""
    requests: list[GenerateRequest] = []
    generate = server.engine.generate

    def recording(request: GenerateRequest):
        requests.append(request)
        return generate(request)

    monkeypatch.setattr(server.engine, "generate", recording)
    return requests


def rendered(server: LiveServer, request: GenerateRequest, span: tuple[int, int]) -> str:
    return server.engine.tokenizer.decode(request.prompt_token_ids[span[0]:span[1]],
                                          skip_special_tokens=False)


def chat(server: LiveServer, messages: list[dict], **extra) -> None:
    reply = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 1, **extra})
    assert reply.status == 200, reply.body


def test_a_marked_message_is_a_segment_spanning_exactly_its_turn(server, sent) -> None:
    chat(server, [{"role": "system", "content": "You are Ines."},
                  {"role": "user", "content": SHARED, "kvrt": {"segment": True}},
                  {"role": "user", "content": "Your turn."}])
    chat(server, [{"role": "user", "content": SHARED}])  # nothing marked
    marked, plain = sent
    assert len(marked.segments) == 1
    assert rendered(server, marked, marked.segments[0]) == (
        f"<|im_start|>user\n{SHARED}<|im_end|>\n")
    assert plain.segments == ()
    bad = server.post("/v1/chat/completions", {"max_tokens": 1, "messages": [
        {"role": "user", "content": "x", "kvrt": {"segmnt": True}}]})
    assert bad.status == 400


def test_every_message_of_an_approximate_graphs_run_is_a_segment(server, sent) -> None:
    graph = server.post("/v1/graphs", {"name": "town", "reuse": "approximate",
                                       "agents": [{"name": "ines"}]}).json()
    run = server.post("/v1/runs", {"graph_id": graph["id"]}).json()["id"]
    messages = [{"role": "system", "content": "You are Ines."},
                {"role": "user", "content": SHARED}, {"role": "user", "content": "Go."}]
    chat(server, messages, kvrt={"run": run, "agent": "ines"})
    (request,) = sent
    spans = request.segments
    assert len(spans) == 3 and spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # back to back
    assert [rendered(server, request, s) for s in spans] == [
        f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    tail = server.engine.tokenizer.decode(request.prompt_token_ids[spans[-1][1]:],
                                          skip_special_tokens=False)
    assert tail == "<|im_start|>assistant\n"  # the generation prompt belongs to no message


def test_a_rounds_shared_messages_are_segments_in_every_agents_prompt(server, sent) -> None:
    graph = server.post("/v1/graphs", {"name": "pair", "agents": [{"name": "a"},
                                                                  {"name": "b"}]}).json()
    run = server.post("/v1/runs", {"graph_id": graph["id"]}).json()["id"]
    reply = server.post(f"/v1/runs/{run}/rounds", {
        "shared": [{"role": "user", "content": SHARED}],
        "agents": {"a": {"messages": [{"role": "system", "content": "You are A."}]},
                   "b": {"messages": [{"role": "system", "content": "You are B, who is new."},
                                      {"role": "user", "content": "Hi."}]}},
        "instruction": [{"role": "user", "content": "Your turn."}], "max_tokens": 1})
    assert reply.status == 200, reply.body
    assert len(sent) == 2
    starts = set()
    for request in sent:
        (span,) = request.segments
        assert rendered(server, request, span) == f"<|im_start|>user\n{SHARED}<|im_end|>\n"
        starts.add(span[0])
    assert len(starts) == 2  # the same text at two positions


def test_pieces_that_do_not_add_up_to_the_prompt_give_no_segments(server) -> None:
    tokenizer = server.engine.tokenizer
    turns = [{"role": "user", "content": "hello"}]
    prompt = tokenizer.encode_chat(turns)
    pieces = tokenizer.encode_pieces(message_pieces(tokenizer, turns))
    assert segment_spans(pieces, [True], prompt) != ()
    assert segment_spans(pieces, [True], [7, *prompt]) == ()
