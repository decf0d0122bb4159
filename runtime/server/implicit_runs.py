"""Any OpenAI client, unchanged: a call that names no run joins its session's implicit run.

A chat or text completion without a `kvrt` run (nor X-Kvrt-* headers) but with a session key,
the body's `prompt_cache_key` (OpenAI's field) or else the SESSION_HEADER header, is a call of
the key's implicit run in the caller's tenant (runtime/graph/implicit.py), attributed to its one
agent, started on first sight; a key of more than 128 characters is a 400 naming its field.
The run is a run like others: GET /v1/runs lists it (`implicit: true`), DELETE ends it, and it
expires after `--run-idle-timeout` idle, its KV released (run_expiry.py). Where the tenant's
run quotas (or the server's `--max-live-runs`) have no room for it, the call is served as
before, unattributed, and the refusal logged: a client that declared nothing gets no 429 for
what kvrt would have done on its behalf.

The agent's tool calls follow the conversation, with no event from the client:

    moment                                  here                      the run (ImplicitRun)
    --------------------------------------  ------------------------  ---------------------
    a request of the session arrives        implicit_context          request_came: its
      (its `tool` messages' tool_call_ids)    (after the body's         open tool calls end,
                                              checks, before its        answered ones learn
                                              prompt is built)          their duration
    the reply asks for tool calls           SessionChatFormatter      reply_called: one tool
      (JSON body: at its end; stream: at       (full / finish)          call per call id
      each choice's last chunk)                                         (of every choice)

Each start and end goes to the engine's policy as the events of a declared run do
(`EngineClient.notify`), and the run's priorities and outlook follow (priority_sync.py): the
next call of a tool whose duration was learned has its KV offloaded and brought back as a
declared tool's is.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping

from aiohttp import web

from kvrt.runtime.engine.protocol import AgentEvent, GenerateOutput
from kvrt.runtime.graph.errors import Conflict, QuotaExceeded
from kvrt.runtime.graph.implicit import IMPLICIT_AGENT, ImplicitRun
from kvrt.runtime.server import app_keys
from kvrt.runtime.server.call_context import CallContext, agent_context
from kvrt.runtime.server.errors import bad_request
from kvrt.runtime.server.openai_logprobs import TokenNames
from kvrt.runtime.server.openai_serving import ChatFormatter, ChoiceResult
from kvrt.runtime.server.priority_sync import PRIORITY_SYNC
from kvrt.sdk.protocol.openai_api import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    SamplingRequest,
    Usage,
)

log = logging.getLogger(__name__)

SESSION_HEADER = "X-Session-Id"
MAX_KEY_LENGTH = 128  # as a run's key (RunSpec.key), and the body's prompt_cache_key

Calls = list[tuple[str, str]]  # (tool call id, tool name) of a reply


def session_key(body: SamplingRequest, headers: Mapping[str, str]) -> str | None:
    """The call's session key: the body's prompt_cache_key, else the header (None: neither)."""
    if body.prompt_cache_key is not None:
        return body.prompt_cache_key
    key = headers.get(SESSION_HEADER)
    if key is not None and not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise bad_request(f"the {SESSION_HEADER} header must be 1 to {MAX_KEY_LENGTH} "
                          f"characters, got {len(key)}", param=SESSION_HEADER)
    return key


def implicit_context(app: web.Application, body: SamplingRequest, headers: Mapping[str, str],
                     tenant: str) -> CallContext | None:
    """The context of an unattributed call in its session's implicit run, which it settles
    (see the module docstring); None for a call with no session key, or one whose run the
    quotas refuse (served unattributed)."""
    key = session_key(body, headers)
    if key is None:
        return None
    try:
        run = app[app_keys.CONTROL].implicit_run(key, tenant)
    except (QuotaExceeded, Conflict) as exc:
        log.warning("session %r of tenant %s served without its implicit run: %s",
                    key, tenant, exc)
        return None
    app[PRIORITY_SYNC].track(run)
    _tell(app, run, run.request_came(answered_calls(body)))
    return agent_context(run, IMPLICIT_AGENT)


def answered_calls(body: SamplingRequest) -> set[str]:
    """The tool call ids the request's `tool` messages answer (none for a text completion)."""
    if not isinstance(body, ChatCompletionRequest):
        return set()
    return {m.tool_call_id for m in body.messages
            if m.role == "tool" and m.tool_call_id is not None}


def chat_formatter(app: web.Application, context: CallContext | None,
                   body: ChatCompletionRequest) -> Callable[..., ChatFormatter]:
    """What makes the call's ChatFormatter (its arguments as ChatFormatter's): one that tells
    the implicit run the reply's tool calls, for a call of one."""
    run = None if context is None else context.run
    if not isinstance(run, ImplicitRun) or not body.tools:
        return ChatFormatter
    session: ImplicitRun = run
    offered = frozenset(tool.function.name for tool in body.tools)

    def called(calls: Calls) -> None:
        # It may have ended (DELETE, expiry) while the call ran: its KV is released, and the
        # engine must hear nothing more of it.
        if app[app_keys.CONTROL].is_live(session):
            _tell(app, session, session.reply_called(calls, offered))

    return functools.partial(SessionChatFormatter, on_calls=called)


class SessionChatFormatter(ChatFormatter):
    """A ChatFormatter that hands the tool calls its reply asks for, (id, name) each as the
    client gets them, to `on_calls` once they are whole: every choice's with the JSON body;
    a choice's with its last chunk in a stream (a stream the client left early reports
    none)."""

    def __init__(self, *args, on_calls: Callable[[Calls], None], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._on_calls = on_calls
        self._streamed: dict[int, Calls] = {}  # choice index -> its calls sent so far

    def full(self, choices: list[ChoiceResult], usage: Usage, names: TokenNames
             ) -> ChatCompletion:
        completion = super().full(choices, usage, names)
        calls = [(call.id, call.function.name) for choice in completion.choices
                 for call in choice.message.tool_calls or []]
        if calls:
            self._on_calls(calls)
        return completion

    def piece(self, output: GenerateOutput, names: TokenNames) -> list[ChatCompletionChunk]:
        return self._seen(super().piece(output, names))

    def finish(self, index: int, reason: str) -> list[ChatCompletionChunk]:
        chunks = self._seen(super().finish(index, reason))
        calls = self._streamed.pop(index, [])
        if calls:
            self._on_calls(calls)
        return chunks

    def _seen(self, chunks: list[ChatCompletionChunk]) -> list[ChatCompletionChunk]:
        for chunk in chunks:
            for choice in chunk.choices:
                self._streamed.setdefault(choice.index, []).extend(
                    (call.id, call.function.name) for call in choice.delta.tool_calls or [])
        return chunks


def _tell(app: web.Application, run: ImplicitRun, events: list[AgentEvent]) -> None:
    """Hands the events to the engine's policy, and moves the run's priorities after them."""
    if not events:
        return
    engine = app[app_keys.ENGINE]
    for event in events:
        engine.notify(event)
    app[PRIORITY_SYNC].soon(run)
