"""Turns engine outputs into OpenAI responses: one JSON body, or a stream of SSE chunks.

Chat and text completions differ only in the shapes of their responses, so each has a small
formatter class (`Formatter` is either) and the two drivers below serve both. The first engine
output is awaited before any byte is sent, so a request the engine rejects still gets a plain
400 in the error shape, not a broken stream.

A request of n choices gets them all in one body, or interleaved in one stream, each chunk
naming its choice by `index`; usage counts the prompt once and sums the choices' tokens, as
OpenAI does. Logprobs, when asked, ride with the text of the tokens they describe
(openai_logprobs.py); a stream whose text is held back (a possible stop string, a tool call
being read) sends them in a chunk of their own, so none is lost.

A chat that offers tools reads each choice's reply through a tool parser (`tool_parsers`): the whole
text for a JSON body (`ChatFormatter.full`), piece by piece for a stream (`ChatFormatter.piece`
and `ChatFormatter.finish`), which then sends each call as one `tool_calls` delta once it is
complete.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field

import msgspec
from aiohttp import web
from msgspec import UNSET

from kvrt.runtime.engine.protocol import (
    EngineClient,
    GenerateOutput,
    GenerateRequest,
    TokenLogprobs,
)
from kvrt.runtime.server.errors import APIError, from_exception
from kvrt.runtime.server.generation import CallObserver, observed_outputs
from kvrt.runtime.server.metrics import ServerMetrics
from kvrt.runtime.server.openai_logprobs import TokenNames, chat_logprobs, completion_logprobs
from kvrt.runtime.server.tool_parsers import ParsedCall, StreamEvent, ToolCallStream, ToolParser
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
    PromptTokensDetails,
    ToolCall,
    ToolCallDelta,
    Usage,
)

log = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ChoiceResult:
    """One choice of a request, whole: its text, why it ended, its logprobs if asked."""

    index: int
    texts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    completion_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def add(self, output: GenerateOutput) -> None:
        self.texts.append(output.text)
        if output.logprobs is not None:
            self.logprobs = (self.logprobs or []) + output.logprobs
        self.completion_tokens = output.completion_tokens
        if output.finish_reason is not None:
            self.finish_reason = output.finish_reason


def request_usage(last: GenerateOutput, completion_tokens: int) -> Usage:
    """The request's usage: its prompt once (from any output), and the tokens of all its
    choices."""
    return Usage(
        prompt_tokens=last.prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=last.prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=last.cached_tokens),
    )


class ChatFormatter:
    """`tool_parser` is None for a chat that offers no tools (or whose tool_choice is "none"):
    its text is all content. With `parallel_tool_calls` false only the first call of a reply
    is kept. A reply with calls that ended on its own ("stop") finishes with "tool_calls";
    one cut short keeps its reason ("length"), so a client sees that it was cut. Each choice
    of a stream has its own tool parser's stream and call count."""

    def __init__(self, request_id: str, model: str, include_usage: bool,
                 tool_parser: ToolParser | None = None, parallel_tool_calls: bool = True) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())
        self.include_usage = include_usage  # a stream's last chunk carries the usage
        self.usage_field = None if include_usage else UNSET
        self._parser = tool_parser
        self._streams: dict[int, ToolCallStream] = {}
        self._max_calls = None if parallel_tool_calls else 1
        self._calls_sent: dict[int, int] = {}

    def head(self, n: int) -> list[ChatCompletionChunk]:
        return [self._chunk(i, Delta(role="assistant", content="")) for i in range(n)]

    def piece(self, output: GenerateOutput, names: TokenNames) -> list[ChatCompletionChunk]:
        index = output.index
        stream = self._stream(index)
        if stream is None:
            chunks = [self._chunk(index, Delta(content=output.text))] if output.text else []
        else:
            chunks = self._event_chunks(index, stream.push(output.text)) if output.text else []
        if output.logprobs is not None:
            logprobs = chat_logprobs(output.logprobs, names)
            if not chunks:  # its text is held back: the logprobs go on their own
                chunks = [self._chunk(index, Delta())]
            chunks[0].choices[0].logprobs = logprobs
        return chunks

    def finish(self, index: int, reason: str) -> list[ChatCompletionChunk]:
        stream = self._stream(index)
        chunks = [] if stream is None else self._event_chunks(index, stream.finish())
        final = ChatChunkChoice(index=index, delta=Delta(),
                                finish_reason=self._reason(reason, self._calls_sent.get(index, 0)))
        return [*chunks, self._chunk_of([final])]

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )

    def full(self, choices: list[ChoiceResult], usage: Usage, names: TokenNames
             ) -> ChatCompletion:
        return ChatCompletion(id=self.id, created=self.created, model=self.model,
                              choices=[self._choice(c, names) for c in choices], usage=usage)

    def _choice(self, result: ChoiceResult, names: TokenNames) -> ChatChoice:
        text, reason = result.text, result.finish_reason
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
        logprobs = None if result.logprobs is None else chat_logprobs(result.logprobs, names)
        return ChatChoice(index=result.index, message=message, finish_reason=reason,
                          logprobs=logprobs)

    def _stream(self, index: int) -> ToolCallStream | None:
        if self._parser is None:
            return None
        if index not in self._streams:
            self._streams[index] = self._parser.stream()
        return self._streams[index]

    @staticmethod
    def _reason(reason: str | None, calls: int) -> str | None:
        return "tool_calls" if calls and reason == "stop" else reason

    def _event_chunks(self, index: int, events: list[StreamEvent]) -> list[ChatCompletionChunk]:
        chunks = []
        for event in events:
            sent = self._calls_sent.get(index, 0)
            if isinstance(event, str):
                chunks.append(self._chunk(index, Delta(content=event)))
            elif self._max_calls is None or sent < self._max_calls:
                call = ToolCallDelta(index=sent, id=new_call_id(), function=_function(event))
                chunks.append(self._chunk(index, Delta(tool_calls=[call])))
                self._calls_sent[index] = sent + 1
        return chunks

    def _chunk(self, index: int, delta: Delta) -> ChatCompletionChunk:
        return self._chunk_of([ChatChunkChoice(index=index, delta=delta)])

    def _chunk_of(self, choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices,
            usage=self.usage_field,
        )


def _function(call: ParsedCall) -> FunctionCall:
    return FunctionCall(name=call.name, arguments=call.arguments)


class CompletionFormatter:
    """Legacy logprobs carry each token's offset in its choice's text, kept per choice."""

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())
        self.include_usage = include_usage
        self.usage_field = None if include_usage else UNSET
        self._offsets: dict[int, int] = {}

    def head(self, n: int) -> list[Completion]:
        return []

    def piece(self, output: GenerateOutput, names: TokenNames) -> list[Completion]:
        if not output.text and output.logprobs is None:
            return []
        choice = CompletionChoice(text=output.text, index=output.index,
                                  logprobs=self._logprobs(output.index, output.logprobs, names))
        return [self._completion([choice], self.usage_field)]

    def finish(self, index: int, reason: str) -> list[Completion]:
        return [self._completion([CompletionChoice(text="", index=index, finish_reason=reason)],
                                 self.usage_field)]

    def usage(self, usage: Usage) -> Completion:
        return self._completion([], usage)

    def full(self, choices: list[ChoiceResult], usage: Usage, names: TokenNames) -> Completion:
        return self._completion([CompletionChoice(
            text=c.text, index=c.index, finish_reason=c.finish_reason,
            logprobs=self._logprobs(c.index, c.logprobs, names)) for c in choices], usage)

    def _logprobs(self, index: int, entries: list[TokenLogprobs] | None, names: TokenNames):
        if entries is None:
            return None
        logprobs, self._offsets[index] = completion_logprobs(
            entries, names, self._offsets.get(index, 0))
        return logprobs

    def _completion(self, choices: list[CompletionChoice], usage) -> Completion:
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )


Formatter = ChatFormatter | CompletionFormatter


async def collect_choices(
    engine: EngineClient, request: GenerateRequest, metrics: ServerMetrics, arrival: float,
    observer: CallObserver | None = None,
) -> tuple[list[ChoiceResult], Usage]:
    """Runs the request to its end: each choice whole, by index, and the request's usage."""
    choices = [ChoiceResult(i) for i in range(request.params.n)]
    last: GenerateOutput | None = None
    async with aclosing(observed_outputs(engine, request, metrics, arrival, observer)) as outputs:
        async for last in outputs:
            choices[last.index].add(last)
    if last is None:
        raise APIError(500, "the engine returned no output", code="engine_error")
    return choices, request_usage(last, sum(c.completion_tokens for c in choices))


async def respond_json(
    engine: EngineClient, request: GenerateRequest, metrics: ServerMetrics, arrival: float,
    formatter: Formatter, observer: CallObserver | None,
) -> web.Response:
    choices, usage = await collect_choices(engine, request, metrics, arrival, observer)
    body = formatter.full(choices, usage, TokenNames(engine.tokenizer))
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
            await _write_events(response, first, outputs, formatter, request.params.n,
                                TokenNames(engine.tokenizer))
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


async def _write_events(response, first, outputs, formatter: Formatter, n: int,
                        names: TokenNames) -> None:
    """Each output's chunks as they come; each choice's finish; then, once all n have ended,
    the usage (if asked)."""
    for head in formatter.head(n):
        await _send(response, head)
    completion: dict[int, int] = {}
    output = first
    while True:
        for event in formatter.piece(output, names):
            await _send(response, event)
        if output.finish_reason is not None:
            for event in formatter.finish(output.index, output.finish_reason):
                await _send(response, event)
            completion[output.index] = output.completion_tokens
            if len(completion) == n:
                if formatter.include_usage:
                    await _send(response, formatter.usage(
                        request_usage(output, sum(completion.values()))))
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
