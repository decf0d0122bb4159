"""A run of an agent graph (`Run`) and one of its agents (`AgentClient`).

An agent's model calls go through `AgentClient.chat` / `.stream`, which attribute them to the run
and agent; its tool calls are reported with `async with agent.tool_call("search"): ...`, so the
daemon knows the agent is waiting (and may move its KV out of the way until the tool returns);
a wait on anything else (a person's answer, say) is `async with agent.wait("interrupt"): ...`.
Every event carries a fresh id, so a retried event is applied once.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal
from urllib.parse import quote

import msgspec

from kvrt.sdk.chat import ChatReply, ChatStream, Message, chat_body, complete, with_system
from kvrt.sdk.errors import KvrtError
from kvrt.sdk.http import Transport
from kvrt.sdk.protocol.control import (
    AgentDone,
    AgentResumed,
    AgentWaiting,
    Event,
    EventAck,
    GraphInfo,
    RunClosed,
    RunInfo,
    RunState,
    ToolCallFinished,
    ToolCallStarted,
)
from kvrt.sdk.protocol.rounds import RoundResult

log = logging.getLogger(__name__)

EventType = Literal["tool_call.started", "tool_call.finished", "agent.done", "agent.waiting",
                    "agent.resumed"]

_state_decoder = msgspec.json.Decoder(RunState)
_ack_decoder = msgspec.json.Decoder(EventAck)
_closed_decoder = msgspec.json.Decoder(RunClosed)
_round_decoder = msgspec.json.Decoder(RoundResult)

# A round's reply is one turn of a conversation, and every agent of the round generates it at
# once: left to the daemon (as an OpenAI chat call without max_tokens is), each would run to
# the end of the model's context, ~8,000 tokens on the default model, for a round that waits on
# its slowest agent. 256 tokens is a few paragraphs, as much as a turn takes; ask for more, or
# None, explicitly.
ROUND_MAX_TOKENS = 256


class Run:
    """A handle to one run: `agent(name)` for its agents, `state()`, `close()`. As an async
    context manager it closes the run on exit."""

    def __init__(self, transport: Transport, info: RunInfo | RunState, graph: GraphInfo) -> None:
        self._transport = transport
        self.id = info.id
        self.graph_id = info.graph_id
        self.graph = graph
        self._path = f"/v1/runs/{quote(info.id, safe='')}"
        self._systems = {agent.name: agent.system for agent in graph.agents}
        self._agents: dict[str, AgentClient] = {}
        self._closed = False

    def agent(self, name: str) -> AgentClient:
        """The client of agent `name` (the daemon answers 404 agent_not_found on its first call
        if the graph has no such agent)."""
        if name not in self._agents:
            self._agents[name] = AgentClient(self, name, self._systems.get(name))
        return self._agents[name]

    async def state(self) -> RunState:
        return await self._transport.request("GET", self._path, _state_decoder, idempotent=True)

    async def event(self, event: Event) -> EventAck:
        """Sends one event (low level; see AgentClient). An event without an id gets a fresh one,
        so that a retry after a lost answer is recognised by the daemon as a duplicate."""
        if event.id is None:
            event = msgspec.structs.replace(event, id=uuid.uuid4().hex)
        return await self._transport.request(
            "POST", self._path + "/events", _ack_decoder, body=event, idempotent=True
        )

    async def close(self) -> RunClosed | None:
        """Ends the run (DELETE) and returns what the daemon released. Closing a closed run is a
        no-op (None); so is a 404 that answers a retry: an earlier attempt closed it."""
        if self._closed:
            return None
        closed = None
        try:
            closed = await self._transport.request("DELETE", self._path, _closed_decoder,
                                                   idempotent=True)
        except KvrtError as exc:
            if not (exc.status == 404 and exc.attempts > 1):
                raise
        self._closed = True
        return closed

    async def __aenter__(self) -> Run:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            await self.close()
        except KvrtError:
            if exc_type is None:
                raise
            log.warning("closing run %s failed while an exception propagated", self.id,
                        exc_info=True)

    async def round(
        self,
        shared: Sequence[Message],
        agents: Mapping[str, Sequence[Message] | Mapping[str, Sequence[Message]]],
        *,
        instruction: Sequence[Message] | None = None,
        max_tokens: int | None = ROUND_MAX_TOKENS,
        temperature: float | None = None,
        **extra: Any,
    ) -> RoundResult:
        """One All-Gather round: each agent reads its own messages, then `shared`, then its
        `after` messages or the common `instruction`, and generates; all at once. `agents` maps
        each agent to its messages, or to `{"messages": [...], "after": [...]}`. An agent's
        declared system prompt goes first, as in `AgentClient.chat`. Never retried.

        `max_tokens` bounds each agent's reply: ROUND_MAX_TOKENS (256) unless given; None
        leaves it to the daemon, which lets each agent generate up to the model's context
        (~8,000 tokens on the default model), and the round waits for the longest."""
        specs: dict[str, dict[str, Any]] = {}
        for name, spec in agents.items():
            own = spec if not isinstance(spec, Mapping) else spec.get("messages", [])
            specs[name] = {"messages": with_system(own, self._systems.get(name))}
            if isinstance(spec, Mapping) and spec.get("after") is not None:
                specs[name]["after"] = list(spec["after"])
        request: dict[str, Any] = {**extra, "shared": list(shared), "agents": specs}
        if instruction is not None:
            request["instruction"] = list(instruction)
        if max_tokens is not None:
            request["max_tokens"] = max_tokens
        if temperature is not None:
            request["temperature"] = temperature
        return await self._transport.request("POST", self._path + "/rounds", _round_decoder,
                                             body=request, idempotent=False)

    def __repr__(self) -> str:
        return f"Run({self.id!r}, graph_id={self.graph_id!r})"


class AgentClient:
    """One agent of a run. `system` is the system prompt the agent was declared with: `chat` and
    `stream` put it first when the messages carry no system (or developer) message, so the
    declared prompt is what the agent's calls actually use."""

    def __init__(self, run: Run, name: str, system: str | None) -> None:
        self.run = run
        self.name = name
        self.system = system

    async def chat(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        **extra: Any,
    ) -> ChatReply:
        """One chat completion attributed to this agent. `extra` goes into the body as is (any
        OpenAI field, or kvrt's extensions such as `ignore_eos`, `top_k`, `seed`)."""
        return await complete(self.run._transport, self._body(messages, max_tokens, temperature,
                                                              extra))

    def stream(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        **extra: Any,
    ) -> ChatStream:
        """A streamed chat completion attributed to this agent: `async for delta in ...`."""
        return ChatStream(self.run._transport, self._body(messages, max_tokens, temperature,
                                                          extra))

    @asynccontextmanager
    async def tool_call(
        self, tool: str, expected_duration_s: float | None = None
    ) -> AsyncIterator[EventAck]:
        """Reports a tool call around the block: tool_call.started on entry, tool_call.finished
        on exit, also when the block raises. The block's exception propagates unchanged; if the
        finish event cannot be sent while it does, the block's exception still wins (the failure
        is logged). Yields the daemon's acknowledgement of the start."""
        ack = await self.event("tool_call.started", tool=tool,
                                     expected_duration_s=expected_duration_s)
        try:
            yield ack
        except BaseException:
            try:
                await self.event("tool_call.finished", tool=tool)
            except Exception:
                log.warning("could not report the end of %s's %s call", self.name, tool,
                            exc_info=True)
            raise
        await self.event("tool_call.finished", tool=tool)

    @asynccontextmanager
    async def wait(self, reason: str = "interrupt", expected_s: float | None = None
                   ) -> AsyncIterator[EventAck]:
        """Reports a wait that is not a tool call around the block (a person's answer, an
        approval): agent.waiting on entry, agent.resumed on exit, also when the block raises
        (as `tool_call`). `expected_s` is the caller's estimate of the wait; without it the
        daemon uses what it learned from this agent's earlier waits for `reason`. The daemon
        treats the wait as a long tool call: the agent's KV may leave the device meanwhile and
        come back for the predicted resume."""
        ack = await self.event("agent.waiting", reason=reason, expected_duration_s=expected_s)
        try:
            yield ack
        except BaseException:
            try:
                await self.event("agent.resumed")
            except Exception:
                log.warning("could not report the end of %s's wait", self.name, exc_info=True)
            raise
        await self.event("agent.resumed")

    async def done(self) -> EventAck:
        """Reports that the agent has finished its part of the run."""
        return await self.event("agent.done")

    async def event(
        self,
        type: EventType,
        *,
        tool: str | None = None,
        expected_duration_s: float | None = None,
        reason: str = "interrupt",
        id: str | None = None,
    ) -> EventAck:
        """Sends one event for this agent (low level). Give `id` to make repeats of the same
        event collapse into one; without it each call is a new event. `tool` is for the
        tool_call events, `reason` for agent.waiting, `expected_duration_s` for both starts."""
        event: Event
        if type == "agent.done":
            event = AgentDone(agent=self.name, id=id)
        elif type == "agent.waiting":
            event = AgentWaiting(agent=self.name, reason=reason,
                                 expected_duration_s=expected_duration_s, id=id)
        elif type == "agent.resumed":
            event = AgentResumed(agent=self.name, id=id)
        elif tool is None:
            raise TypeError(f"a {type} event needs a tool")
        elif type == "tool_call.started":
            event = ToolCallStarted(agent=self.name, tool=tool,
                                    expected_duration_s=expected_duration_s, id=id)
        elif type == "tool_call.finished":
            event = ToolCallFinished(agent=self.name, tool=tool, id=id)
        else:
            raise ValueError(f"unknown event type {type!r}")
        return await self.run.event(event)

    def _body(self, messages: Sequence[Message], max_tokens: int | None,
              temperature: float | None, extra: dict[str, Any]) -> dict[str, Any]:
        return chat_body(messages, max_tokens=max_tokens, temperature=temperature, extra=extra,
                         system=self.system, run=self.run.id, agent=self.name)

    def __repr__(self) -> str:
        return f"AgentClient({self.name!r}, run={self.run.id!r})"
