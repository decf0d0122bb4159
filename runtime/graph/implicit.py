"""Implicit runs: a conversation of an OpenAI client that declared nothing, as a run of one agent.

A model call that names no run but carries a session key (runtime/server/implicit_runs.py: the
body's `prompt_cache_key`, else the X-Session-Id header) belongs to the implicit run of that
key in the caller's tenant, started on first sight (ControlPlane.implicit_run). Its graph is the
tenant's implicit graph, made on first sight too: one agent, IMPLICIT_AGENT, no declared tools,
so what the daemon expects of it (tool durations, calls per pass) is learned from every
implicit run of the tenant. An implicit run is a run like any other (state, listing, idle
expiry, DELETE), shown with `implicit: true`; neither it nor its graph is written to the state
store (a restart forgets them: the key's next call starts a new run).

The agent's tool calls are read off the conversation (ImplicitRun), with no event from the
client:

    moment                                      the agent's tool call
    ------------------------------------------  ---------------------------------------------
    a reply asks for call id (tool name)        started (tool_call.started), predicted: the
                                                tool's learned duration (0 before the first)
    the session's next request answers the id   finished (tool_call.finished): its duration,
      (a `tool` message with that tool_call_id)   reply to request, is learned
    the session's next request does not         abandoned: ended (tool_call.finished to the
      (the user moved on, or asked again)         engine), nothing learned
    a reply calls a tool the request did not    ignored: a client cannot run it
      offer

"The session's next request" is any call of the key: a key names one conversation (as the
OpenAI Agents SDK and coding agents use it); calls of many conversations under one key are
one agent, whose tool calls each next call settles.
"""

from __future__ import annotations

from collections.abc import Iterable, Set

from kvrt.runtime.engine.protocol import AgentEvent
from kvrt.runtime.graph.runs import Run
from kvrt.sdk.protocol.control import AgentSpec, GraphSpec, ToolCallFinished, ToolCallStarted

IMPLICIT_AGENT = "assistant"
IMPLICIT_GRAPH = GraphSpec(name="implicit", agents=[AgentSpec(name=IMPLICIT_AGENT)])

# Distinct tool names an implicit graph learns durations of; calls of further names share
# OTHER_TOOL's. Clients name the tools they offer, so without a bound a tenant could grow its
# graph's estimates without end.
MAX_IMPLICIT_TOOLS = 256
OTHER_TOOL = "(other)"


class ImplicitRun(Run):
    """The run of one session key: a Run whose agent's tool calls follow its conversation
    (see the module docstring)."""

    implicit = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.open_calls: dict[str, str] = {}  # tool call id -> tool, in the order asked for

    def reply_called(self, calls: Iterable[tuple[str, str]], offered: Set[str]
                     ) -> list[AgentEvent]:
        """A reply asked for `calls` ((id, tool name) each) of the tools `offered` by its
        request: the agent is in a tool call per call, until a later request settles it.
        Returns what the engine's policy hears."""
        events = []
        for call_id, name in calls:
            if name not in offered or call_id in self.open_calls:
                continue
            tool = self._tool_key(name)
            self.open_calls[call_id] = tool
            applied = self.apply(ToolCallStarted(agent=IMPLICIT_AGENT, tool=tool,
                                                 id=f"{call_id}.started"))
            if applied is not None:
                events.append(applied)
        return events

    def request_came(self, answered: Set[str]) -> list[AgentEvent]:
        """The session's next request came, answering the tool call ids `answered`: every open
        call ends, the answered ones learning their duration (see the module docstring).
        Returns what the engine's policy hears."""
        events = []
        calls, self.open_calls = self.open_calls, {}
        for call_id, tool in calls.items():
            if call_id in answered:
                applied = self.apply(ToolCallFinished(agent=IMPLICIT_AGENT, tool=tool,
                                                      id=f"{call_id}.finished"))
            else:
                applied = self._abandon(tool)
            if applied is not None:
                events.append(applied)
        return events

    def _abandon(self, tool: str) -> AgentEvent | None:
        """Ends the oldest running call of `tool` without learning from it: its result never
        came, so the time since is no tool's duration."""
        activity = self.agents[0]
        if activity.finish_tool(tool) is None:
            return None
        activity.episode.last_end = self.clock()
        return AgentEvent("tool_call.finished", self.id, IMPLICIT_AGENT)

    def _tool_key(self, name: str) -> str:
        """`name`, or OTHER_TOOL once the graph knows MAX_IMPLICIT_TOOLS others: those it has
        learned a duration or a count of, or this run's pass has started."""
        known = {tool for (_, tool), _ in self.costs.estimates.items()}
        known.update(self.costs.learned.agents[0].tool_calls, self.agents[0].episode.tools)
        if name in known or len(known) < MAX_IMPLICIT_TOOLS:
            return name
        return OTHER_TOOL
