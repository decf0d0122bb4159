"""Turns engine outputs into OpenAI responses: one JSON body, or a stream of SSE chunks.

Chat and text completions differ only in the shapes of their responses, so each has a small
formatter class (`Formatter` is either) and the two drivers below serve both. The first engine
output is awaited before any byte is sent, so a request the engine rejects still gets a plain
400 in the error shape, not a broken stream.

A chat that offers tools reads its reply through a tool parser (`tool_parsers`): the whole
text for a JSON body (`ChatFormatter.full`), piece by piece for a stream (`ChatFormatter.piece`
and `ChatFormatter.finish`), which then sends each call as one `tool_calls` delta once it is
complete.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import aclosing

import msgspec
from aiohttp import web
from msgspec import UNSET

from kvrt.runtime.engine.protocol import EngineClient, GenerateRequest
from kvrt.runtime.server.errors import APIError, from_exception
from kvrt.runtime.server.generation import CallObserver, collect, observed_outputs, usage_of
from kvrt.runtime.server.metrics import ServerMetrics
from kvrt.runtime.server.tool_parsers import ParsedCall, StreamEvent, ToolParser
from kvrt.sdk.protocol.openai_api import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    Delta,
    FunctionCall,
    ToolCall,
    ToolCallDelta,
    Usage,
)

log = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ChatFormatter:
    """`tool_parser` is None for a chat that offers no tools (or whose tool_choice is "none"):
    its text is all content. With `parallel_tool_calls` false only the first call of a reply
    is kept. A reply with calls that ended on its own ("stop") finishes with "tool_calls";
    one cut short keeps its reason ("length"), so a client sees that it was cut."""

    def __init__(self, request_id: str, model: str, include_usage: bool,
                 tool_parser: ToolParser | None = None, parallel_tool_calls: bool = True) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())
        self.include_usage = include_usage  # a stream's last chunk carries the usage
        self.usage_field = None if include_usage else UNSET
        self._parser = tool_parser
        self._stream = tool_parser.stream() if tool_parser is not None else None
        self._max_calls = None if parallel_tool_calls else 1
        self._calls_sent = 0

    def head(self) -> ChatCompletionChunk | None:
        return self._chunk(Delta(role="assistant", content=""))

    def piece(self, text: str) -> list[ChatCompletionChunk]:
        if self._stream is None:
            return [self._chunk(Delta(content=text))]
        return self._event_chunks(self._stream.push(text))

    def finish(self, reason: str) -> list[ChatCompletionChunk]:
        chunks = [] if self._stream is None else self._event_chunks(self._stream.finish())
        final = ChatChunkChoice(delta=Delta(), finish_reason=self._reason(reason, self._calls_sent))
        return [*chunks, self._chunk_of([final])]

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )

    def full(self, text: str, reason: str | None, usage: Usage) -> ChatCompletion:
        message = AssistantMessage(content=text)
        if self._parser is not None:
            parsed = self._parser.parse(text)
            calls = parsed.calls[: self._max_calls]
            if calls:
                message = AssistantMessage(
                    content=parsed.content or None,
                    tool_calls=[ToolCall(id=new_call_id(), function=_function(c)) for c in calls],
                )
                reason = self._reason(reason, len(calls))
        choice = ChatChoice(message=message, finish_reason=reason)
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage
        )

    @staticmethod
    def _reason(reason: str | None, calls: int) -> str | None:
        return "tool_calls" if calls and reason == "stop" else reason

    def _event_chunks(self, events: list[StreamEvent]) -> list[ChatCompletionChunk]:
        chunks = []
        for event in events:
            if isinstance(event, str):
                chunks.append(self._chunk(Delta(content=event)))
            elif self._max_calls is None or self._calls_sent < self._max_calls:
                call = ToolCallDelta(index=self._calls_sent, id=new_call_id(),
                                     function=_function(event))
                chunks.append(self._chunk(Delta(tool_calls=[call])))
                self._calls_sent += 1
        return chunks

    def _chunk(self, delta: Delta) -> ChatCompletionChunk:
        return self._chunk_of([ChatChunkChoice(delta=delta)])

    def _chunk_of(self, choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices,
            usage=self.usage_field,
        )


def _function(call: ParsedCall) -> FunctionCall:
    return FunctionCall(name=call.name, arguments=call.arguments)


class CompletionFormatter:
    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())
        self.include_usage = include_usage
        self.usage_field = None if include_usage else UNSET

    def head(self) -> Completion | None:
        return None

    def piece(self, text: str) -> list[Completion]:
        return [self._completion([CompletionChoice(text=text)], self.usage_field)]

    def finish(self, reason: str) -> list[Completion]:
        return [self._completion([CompletionChoice(text="", finish_reason=reason)],
                                 self.usage_field)]

    def usage(self, usage: Usage) -> Completion:
        return self._completion([], usage)

    def full(self, text: str, reason: str | None, usage: Usage) -> Completion:
        return self._completion([CompletionChoice(text=text, finish_reason=reason)], usage)

    def _completion(self, choices: list[CompletionChoice], usage) -> Completion:
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )


Formatter = ChatFormatter | CompletionFormatter


async def respond_json(
    engine: EngineClient, request: GenerateRequest, metrics: ServerMetrics, arrival: float,
    formatter: Formatter, observer: CallObserver | None,
) -> web.Response:
    text, last = await collect(engine, request, metrics, arrival, observer)
    body = formatter.full(text, last.finish_reason, usage_of(last))
    return web.Response(body=_encoder.encode(body), content_type="application/json")


async def respond_stream(
    http_request: web.Request, engine: EngineClient, request: GenerateRequest,
    metrics: ServerMetrics, arrival: float, formatter: Formatter,
    observer: CallObserver | None,
) -> web.StreamResponse:
    async with aclosing(observed_outputs(engine, request, metrics, arrival, observer)) as outputs:
        first = await anext(outputs, None)  # RequestRejected surfaces here, as a 400
        if first is None:
            raise APIError(500, "the engine returned no output", code="engine_error")
        response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        response.content_type = "text/event-stream"
        response.charset = "utf-8"
        try:
            await response.prepare(http_request)  # the client may be gone already
            await _write_events(response, first, outputs, formatter)
        except ConnectionResetError:
            # The client went away; leaving the `aclosing` block aborts the engine request.
            log.info("client disconnected from %s; request aborted", request.request_id)
            return response
        except Exception as exc:
            error = from_exception(exc)
            if error.is_fault():
                log.exception("stream %s failed", request.request_id)
            await _send_quietly(response, error.body())
        await _send_quietly(response, None)
    return response


async def _write_events(response, first, outputs, formatter: Formatter) -> None:
    head = formatter.head()
    if head is not None:
        await _send(response, head)
    output = first
    while True:
        if output.text:
            for event in formatter.piece(output.text):
                await _send(response, event)
        if output.finish_reason is not None:
            for event in formatter.finish(output.finish_reason):
                await _send(response, event)
            if formatter.include_usage:
                await _send(response, formatter.usage(usage_of(output)))
            return
        output = await anext(outputs, None)
        if output is None:
            raise APIError(500, "the engine ended the stream without a finish reason")


# JSON leaves these unescaped, but str.splitlines() (which some SSE readers use) breaks a line
# at each: escaped, a generated token holding one cannot cut an event in two.
_LINE_BREAKS = [(char.encode(), f"\\u{ord(char):04x}".encode()) for char in "\x85\u2028\u2029"]


async def _send(response: web.StreamResponse, event) -> None:
    data = _encoder.encode(event)
    for raw, escape in _LINE_BREAKS:  # (inside JSON they can only be in strings)
        data = data.replace(raw, escape)
    await response.write(b"data: " + data + b"\n\n")


async def _send_quietly(response: web.StreamResponse, event) -> None:
    """Sends `event` (None: the closing `[DONE]`) where the client may already be gone."""
    try:
        if event is None:
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        else:
            await _send(response, event)
    except ConnectionResetError:
        pass
