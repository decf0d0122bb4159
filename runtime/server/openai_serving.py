"""Turns engine outputs into OpenAI responses: one JSON body, or a stream of SSE chunks.

Chat and text completions differ only in their shapes, so each has a small `Shapes` class and
the two drivers below serve both. The first engine output is awaited before any byte is sent,
so a request the engine rejects still gets a plain 400 in the error shape, not a broken stream.
"""

from __future__ import annotations

import logging
import time
from contextlib import aclosing

import msgspec
from aiohttp import web
from msgspec import UNSET

from kvrt.runtime.engine.protocol import EngineClient, GenerateRequest
from kvrt.runtime.server.errors import APIError, from_exception
from kvrt.runtime.server.generation import CallObserver, collect, tracked, usage_of
from kvrt.runtime.server.metrics import ServerMetrics
from kvrt.sdk.protocol.openai_api import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    Delta,
    Usage,
)

log = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()


class ChatShapes:
    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())
        self.usage_field = None if include_usage else UNSET

    def head(self) -> ChatCompletionChunk | None:
        return self._chunk([ChatChunkChoice(delta=Delta(role="assistant", content=""))])

    def piece(self, text: str) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(delta=Delta(content=text))])

    def finish(self, reason: str) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(delta=Delta(), finish_reason=reason)])

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )

    def full(self, text: str, reason: str | None, usage: Usage) -> ChatCompletion:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=reason)
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage
        )

    def _chunk(self, choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices,
            usage=self.usage_field,
        )


class CompletionShapes:
    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())
        self.usage_field = None if include_usage else UNSET

    def head(self) -> Completion | None:
        return None

    def piece(self, text: str) -> Completion:
        return self._completion([CompletionChoice(text=text)], self.usage_field)

    def finish(self, reason: str) -> Completion:
        return self._completion([CompletionChoice(text="", finish_reason=reason)],
                                self.usage_field)

    def usage(self, usage: Usage) -> Completion:
        return self._completion([], usage)

    def full(self, text: str, reason: str | None, usage: Usage) -> Completion:
        return self._completion([CompletionChoice(text=text, finish_reason=reason)], usage)

    def _completion(self, choices: list[CompletionChoice], usage) -> Completion:
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )


Shapes = ChatShapes | CompletionShapes


async def respond_json(
    engine: EngineClient, request: GenerateRequest, metrics: ServerMetrics, arrival: float,
    shapes: Shapes, observer: CallObserver | None,
) -> web.Response:
    text, last = await collect(engine, request, metrics, arrival, observer)
    body = shapes.full(text, last.finish_reason, usage_of(last))
    return web.Response(body=_encoder.encode(body), content_type="application/json")


async def respond_stream(
    http_request: web.Request, engine: EngineClient, request: GenerateRequest,
    metrics: ServerMetrics, arrival: float, shapes: Shapes, include_usage: bool,
    observer: CallObserver | None,
) -> web.StreamResponse:
    async with aclosing(tracked(engine, request, metrics, arrival, observer)) as outputs:
        first = await anext(outputs, None)  # RequestRejected surfaces here, as a 400
        if first is None:
            raise APIError(500, "the engine returned no output", code="engine_error")
        response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        response.content_type = "text/event-stream"
        await response.prepare(http_request)
        try:
            await _write_events(response, first, outputs, shapes, include_usage)
        except ConnectionResetError:
            # The client went away; leaving the `aclosing` block aborts the engine request.
            log.info("client disconnected from %s; request aborted", request.request_id)
            return response
        except Exception as exc:
            error = from_exception(exc)
            if error.status >= 500:
                log.exception("stream %s failed", request.request_id)
            await _send_quietly(response, error.body())
        await _send_quietly(response, None)
    return response


async def _write_events(response, first, outputs, shapes: Shapes, include_usage: bool) -> None:
    head = shapes.head()
    if head is not None:
        await _send(response, head)
    output = first
    while True:
        if output.text:
            await _send(response, shapes.piece(output.text))
        if output.finish_reason is not None:
            await _send(response, shapes.finish(output.finish_reason))
            if include_usage:
                await _send(response, shapes.usage(usage_of(output)))
            return
        output = await anext(outputs, None)
        if output is None:
            raise APIError(500, "the engine ended the stream without a finish reason")


async def _send(response: web.StreamResponse, event) -> None:
    await response.write(b"data: " + _encoder.encode(event) + b"\n\n")


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
