"""Chat calls: the request body, the reply of a plain call, and a streamed reply.

`ChatReply` and `ChatStream` are the SDK's own small shapes over OpenAI's: the text, the finish
reason and the token counts (with the prompt tokens the daemon found in its KV cache), which is
what an agent application reads; the full OpenAI objects stay on the wire.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from kvrt.sdk.errors import error_from_event
from kvrt.sdk.http import Transport, decode
from kvrt.sdk.protocol.errors import ErrorResponse
from kvrt.sdk.protocol.openai_api import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    ToolCall,
    Usage,
)

CHAT_PATH = "/v1/chat/completions"
SYSTEM_ROLES = ("system", "developer")

Message = Mapping[str, Any] | ChatMessage

_completion_decoder = msgspec.json.Decoder(ChatCompletion)
_chunk_decoder = msgspec.json.Decoder(ChatCompletionChunk)
_error_event_decoder = msgspec.json.Decoder(ErrorResponse)


class ChatUsage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV the daemon already held

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def of(cls, usage: Usage) -> ChatUsage:
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.prompt_tokens_details.cached_tokens,
        )


class ChatReply(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    content: str  # "" when the reply is only tool calls
    finish_reason: str | None
    usage: ChatUsage
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)


def chat_body(
    messages: Sequence[Message],
    *,
    max_tokens: int | None,
    temperature: float | None,
    extra: Mapping[str, Any],
    system: str | None = None,
    run: str | None = None,
    agent: str | None = None,
) -> dict[str, Any]:
    """The JSON body of a chat call. `system` goes first unless the messages carry a system (or
    developer) message already; `run`/`agent` attribute the call (and win over `extra`)."""
    body: dict[str, Any] = {**extra, "messages": with_system(messages, system)}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    if run is not None:
        body["kvrt"] = {"run": run, "agent": agent}
    return body


def with_system(messages: Sequence[Message], system: str | None) -> list[Message]:
    """`messages`, with `system` first unless they carry a system (or developer) message."""
    msgs = list(messages)
    if system is not None and not any(_role(m) in SYSTEM_ROLES for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def _role(message: Message) -> Any:
    return message.role if isinstance(message, ChatMessage) else message.get("role")


async def complete(transport: Transport, body: dict[str, Any]) -> ChatReply:
    """One plain (non-streamed) chat call; never retried, since it would generate twice."""
    reply = await transport.request(
        "POST", CHAT_PATH, _completion_decoder, body={**body, "stream": False}, idempotent=False
    )
    choice = reply.choices[0]
    return ChatReply(
        id=reply.id,
        content=choice.message.content or "",
        finish_reason=choice.finish_reason,
        usage=ChatUsage.of(reply.usage),
        tool_calls=choice.message.tool_calls or [],
    )


class ChatStream:
    """A streamed chat reply: an async iterator of text deltas. Once iteration ends, `text`
    holds the whole reply and `finish_reason` and `usage` are set (usage is always asked for).
    An error answer, or an error event mid-stream, raises KvrtError from the iteration.

    The call is sent when iteration starts. Leaving the loop early leaves the HTTP response open
    until the stream is closed: use `async with agent.stream(...) as s: async for d in s: ...`,
    or `await s.aclose()`, to close it at once (the daemon then aborts the generation).
    """

    def __init__(self, transport: Transport, body: dict[str, Any]) -> None:
        options = {**(body.get("stream_options") or {}), "include_usage": True}
        self._transport = transport
        self._body = {**body, "stream": True, "stream_options": options}
        self._iterator = self._deltas()
        self.id: str | None = None
        self.text = ""
        self.finish_reason: str | None = None
        self.usage: ChatUsage | None = None

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> str:
        return await self._iterator.__anext__()

    async def aclose(self) -> None:
        await self._iterator.aclose()

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _deltas(self):
        async with self._transport.stream(CHAT_PATH, self._body) as resp:
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue  # the blank line between events, or an SSE comment
                payload = line[len(b"data:"):].strip()
                if payload == b"[DONE]":
                    break
                chunk = self._chunk(payload, resp.status)
                self.id = chunk.id
                if chunk.usage:
                    self.usage = ChatUsage.of(chunk.usage)
                for choice in chunk.choices:
                    if choice.finish_reason is not None:
                        self.finish_reason = choice.finish_reason
                    if isinstance(choice.delta.content, str) and choice.delta.content:
                        self.text += choice.delta.content
                        yield choice.delta.content

    @staticmethod
    def _chunk(payload: bytes, status: int) -> ChatCompletionChunk:
        try:
            return _chunk_decoder.decode(payload)
        except msgspec.ValidationError:
            pass  # not a chunk: an error event, or something unexpected (decode() says which)
        raise error_from_event(decode(_error_event_decoder, payload, status).error)
