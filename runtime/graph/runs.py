"""A run: one execution of an agent graph, with each agent's activity and its remaining work.

An agent's state follows from what is in flight, in this order of precedence:

    generating   a model call of the agent has produced output and not finished
    queued       a model call was submitted and has produced nothing yet
    tool_call    a tool call was started (event) and not finished
    waiting      agent.waiting was reported (a person, say) and neither agent.resumed nor a
                 model call of the agent came since
    done         the client said agent.done (a later call or tool start revives the agent)
    idle         none of the above

Events are idempotent. An event with an `id` seen before is a no-op; without an id, a start of
a tool already running, a finish of a tool already finished (and not restarted), and a done of
a done agent are no-ops too. Only applied events count in `event_count`. Starts with distinct
ids of a tool already running are concurrent calls (parallel instances of one node, as a
LangGraph `Send` fan-out makes): each finish ends the oldest, and the agent is in its tool call
until the last one ends. An agent waits on one thing at a time: agent.waiting while it waits
and agent.resumed while it does not are no-ops.

An agent's remaining work (CostModel) is what is left of its learned expected work in the
current episode (runtime/graph/learning.py, runtime/graph/episodes.py): 0 once done; else

    (max(expected calls - calls started, 0) x tokens per call
     + sum over calls in flight of max(tokens per call - their tokens so far, 0))
      x seconds_per_output_token
    + sum over its tools of max(expected calls - calls started, 0) x the tool's estimate
    + what is left of its running tool calls and wait (predicted - elapsed, at least 0)

with the counts of the current episode. Waits are not in the expected work (a person's
answer is not the agent's work), only a running one is.

To the engine's policy a wait is a tool call (its KV idles the same way): agent.waiting is
handed on as tool_call.started, with the predicted seconds of the wait (the client's, else the
learned estimate of (agent, "wait:<reason>"), else 0), and agent.resumed as
tool_call.finished. A model call of a waiting agent ends its wait too (on admission the
policy brings its KV back on demand).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from types import MappingProxyType

from kvrt.runtime.config import DEFAULT_TENANT
from kvrt.runtime.engine.protocol import AgentEvent
from kvrt.runtime.graph.critical_path import Criticality, critical_path
from kvrt.runtime.graph.declaration import Agent, AgentGraph
from kvrt.runtime.graph.episodes import AgentEpisode, RunEpisodes
from kvrt.runtime.graph.errors import Conflict, NotFound
from kvrt.runtime.graph.learning import LearnedGraph
from kvrt.runtime.graph.token_bucket import TokenBucket
from kvrt.runtime.graph.tool_estimates import ToolEstimates
from kvrt.sdk.protocol.control import (
    AgentDone,
    AgentResumed,
    AgentStatus,
    AgentWaiting,
    Event,
    RunStatus,
    ToolCallFinished,
    ToolCallStarted,
)

_REMEMBERED_EVENT_IDS = 4096  # per run; a retry comes within seconds, not thousands of events


@dataclass(slots=True)
class ToolCall:
    started: float  # clock seconds
    predicted: float  # expected seconds of this call


_NO_REQUESTS: frozenset[str] = frozenset()
_NO_TOOLS: Mapping[str, list[ToolCall]] = MappingProxyType({})
_NO_TOKENS: Mapping[str, int] = MappingProxyType({})


@dataclass(slots=True)
class AgentActivity:
    """One agent's activity in a run. A run holds one per agent of its graph (up to 4,096),
    and most of them stay idle: what is in flight is kept in containers made on first use and
    dropped once empty, so that an idle agent costs its counters and its episode only (some
    300 bytes, not 1 KB: see README "Quotas"). Read them through the properties; change them
    through the verbs."""

    _queued: set[str] | None = None  # request ids
    _generating: set[str] | None = None
    _call_tokens: dict[str, int] | None = None  # of each call in flight
    _tools: dict[str, list[ToolCall]] | None = None  # running, by tool name
    _finished_tools: set[str] | None = None  # finished and not restarted
    generated_tokens: int = 0
    calls: int = 0  # model calls ended (finished, failed or aborted)
    tool_calls: int = 0  # tool calls started (applied start events)
    waiting: tuple[str, ToolCall] | None = None  # (reason, the wait) since agent.waiting
    last_call_end: float = float("-inf")  # clock seconds
    done: bool = False
    episode: AgentEpisode = field(default_factory=AgentEpisode)

    @property
    def queued(self) -> AbstractSet[str]:
        return self._queued or _NO_REQUESTS

    @property
    def generating(self) -> AbstractSet[str]:
        return self._generating or _NO_REQUESTS

    @property
    def call_tokens(self) -> Mapping[str, int]:
        return self._call_tokens or _NO_TOKENS

    @property
    def tools(self) -> Mapping[str, list[ToolCall]]:
        return self._tools or _NO_TOOLS

    @property
    def state(self) -> AgentStatus:
        if self._generating:
            return "generating"
        if self._queued:
            return "queued"
        if self._tools:
            return "tool_call"
        if self.waiting is not None:
            return "waiting"
        return "done" if self.done else "idle"

    def queue(self, request_id: str) -> None:
        """A model call was submitted."""
        self._queued = _with(self._queued, request_id)
        self._call_tokens = self._call_tokens or {}
        self._call_tokens[request_id] = 0

    def produce(self, request_id: str, tokens: int) -> None:
        """The call produced `tokens` more output tokens: it is generating."""
        self._queued = _without(self._queued, request_id)
        self._generating = _with(self._generating, request_id)
        self._call_tokens = self._call_tokens or {}
        self._call_tokens[request_id] = self._call_tokens.get(request_id, 0) + tokens

    def end_call(self, request_id: str) -> tuple[bool, int]:
        """The call ended: (whether it was still in flight, its output tokens)."""
        was_open = request_id in self.queued or request_id in self.generating
        self._queued = _without(self._queued, request_id)
        self._generating = _without(self._generating, request_id)
        tokens = 0
        if self._call_tokens is not None:
            tokens = self._call_tokens.pop(request_id, 0)
            self._call_tokens = self._call_tokens or None
        return was_open, tokens

    def start_tool(self, tool: str, call: ToolCall) -> None:
        self._tools = self._tools or {}
        self._tools.setdefault(tool, []).append(call)
        self._finished_tools = _without(self._finished_tools, tool)

    def finish_tool(self, tool: str) -> ToolCall | None:
        """Ends the oldest running call of `tool` (None if none runs); the last one ended, the
        tool counts as finished."""
        if self._tools is None or not (calls := self._tools.get(tool)):
            return None
        call = calls.pop(0)
        if not calls:
            del self._tools[tool]
            self._tools = self._tools or None
            self._finished_tools = _with(self._finished_tools, tool)
        return call

    def tool_finished(self, tool: str) -> bool:
        """Whether `tool` finished and was not started again."""
        return self._finished_tools is not None and tool in self._finished_tools


def _with(items: set[str] | None, item: str) -> set[str]:
    """`items` (made if None) with `item` added."""
    items = items if items is not None else set()
    items.add(item)
    return items


def _without(items: set[str] | None, item: str) -> set[str] | None:
    """`items` without `item`; None once empty (an idle agent holds no set)."""
    if items is not None:
        items.discard(item)
    return items or None


@dataclass(slots=True)
class CostModel:
    """What an agent's remaining work costs, in seconds (see the module docstring): the
    graph's learned means, shared by every run of the graph."""

    seconds_per_output_token: float
    learned: LearnedGraph

    @property
    def estimates(self) -> ToolEstimates:
        """The tool durations learned from every run of the graph (the learned graph's)."""
        return self.learned.estimates

    def work(self, agent: Agent, activity: AgentActivity | None = None, now: float = 0.0) -> float:
        """`activity` None: the whole expected work of a pass (a fresh run's)."""
        if activity is not None and activity.done:
            return 0.0
        learned = self.learned
        means, episodes = learned.agents[learned.graph.index[agent.name]], learned.episodes
        per_call = means.tokens_per_call
        part = activity.episode if activity is not None else None
        calls = means.expected_calls(episodes) - (part.calls if part is not None else 0)
        tokens = max(calls, 0.0) * per_call
        seconds = 0.0
        for tool in means.tool_calls:
            left = means.expected_tool_calls(tool, episodes) - (
                part.tools.get(tool, 0) if part is not None else 0)
            if left > 0:
                seconds += left * self.estimates.seconds(agent.name, tool)
        if activity is None:
            return tokens * self.seconds_per_output_token + seconds
        for produced in activity.call_tokens.values():
            tokens += max(per_call - produced, 0.0)
        for calls_of_tool in activity.tools.values():
            for call in calls_of_tool:
                seconds += max(call.predicted - (now - call.started), 0.0)
        if activity.waiting is not None:
            wait = activity.waiting[1]
            seconds += max(wait.predicted - (now - wait.started), 0.0)
        return tokens * self.seconds_per_output_token + seconds


@dataclass(slots=True)
class AgentCall:
    """One model call of an agent, reported by the server as its output arrives."""

    activity: AgentActivity
    request_id: str
    clock: Callable[[], float]

    def produced(self, tokens: int) -> None:
        self.activity.produce(self.request_id, tokens)
        self.activity.generated_tokens += tokens

    def ended(self) -> None:
        activity = self.activity
        was_open, tokens = activity.end_call(self.request_id)
        if was_open:  # a second ended() of the same call must not count it twice
            activity.last_call_end = self.clock()
            activity.calls += 1
            activity.episode.ended_calls += 1
            activity.episode.ended_tokens += tokens
            activity.episode.last_end = self.clock()


class Run:
    """`key`: what the client started it with (a framework's thread id), so that starting the
    same key again finds this run (see ControlPlane.start_run). `tenant`: who started it; no
    one else sees it. An "interrupted" run (live when the daemon stopped) takes no events and
    no calls: `apply` and `submit_call` raise Conflict `run_interrupted`; nor does an
    "expired" one (Conflict `run_expired`; see `idle_deadline`). `event_budget`, if any,
    limits the rate of its events (see `admit_event`)."""

    implicit = False  # a run of a session key, not declared (runtime/graph/implicit.py)

    def __init__(self, run_id: str, graph_id: str, graph: AgentGraph, costs: CostModel,
                 created: int, clock: Callable[[], float], key: str | None = None, *,
                 tenant: str = DEFAULT_TENANT, status: RunStatus = "live",
                 event_budget: TokenBucket | None = None) -> None:
        self.id, self.graph_id, self.graph, self.key = run_id, graph_id, graph, key
        self.costs, self.created, self.clock = costs, created, clock
        self.tenant, self.status, self.event_budget = tenant, status, event_budget
        # An interrupted run takes no events and no calls (check_live): nothing changes its
        # agents, so they can all be one idle activity, which keeps the restart of a daemon
        # that stopped with many runs of large graphs short.
        self.agents = ([AgentActivity()] * len(graph.agents) if status == "interrupted"
                       else [AgentActivity() for _ in graph.agents])
        self.episodes = RunEpisodes(costs.learned, self.agents)
        self.event_count = 0
        self.rounds = 0  # All-Gather rounds started (POST /v1/runs/{id}/rounds)
        # Its last event, call or start by its key. An interrupted run never expires (and is
        # made as the daemon opens, before the loop whose clock it reads runs).
        self.last_active = clock() if status == "live" else float("-inf")
        self._event_ids: OrderedDict[str, None] = OrderedDict()

    def agent_index(self, name: str) -> int:
        index = self.graph.index.get(name)
        if index is None:
            raise NotFound("agent", f"run {self.id} has no agent {name!r}; its graph "
                                    f"{self.graph_id} declares {_names(self.graph)}")
        return index

    def check_live(self) -> None:
        if self.status == "interrupted":
            raise Conflict("run_interrupted", f"run {self.id} was interrupted: it was live when "
                           "the daemon stopped, and takes no events or calls; start a new run "
                           "(and DELETE this one)")
        if self.status == "expired":
            raise Conflict("run_expired", f"run {self.id} expired: it was idle longer than the "
                           "server's --run-idle-timeout, and its KV was released; start a new "
                           "run (its key starts a fresh one)")

    def touch(self) -> None:
        """The client used the run: its idle time starts again."""
        self.last_active = self.clock()

    def idle_deadline(self, timeout_s: float) -> float | None:
        """When the run expires if nothing happens before (clock seconds): `timeout_s` after
        its last activity, or after the predicted end of its running tools and waits if that
        is later (a long tool is no abandonment; a tool that never reports back is). None
        while a model call of it is in flight: a call in flight is activity."""
        last = self.last_active
        for activity in self.agents:
            if activity.queued or activity.generating:
                return None
            last = max(last, activity.last_call_end)
            pending = [call for calls in activity.tools.values() for call in calls]
            if activity.waiting is not None:
                pending.append(activity.waiting[1])
            last = max([last, *(call.started + call.predicted for call in pending)])
        return last + timeout_s

    def expire(self) -> None:
        """The run was idle past its deadline (ControlPlane.expire): it ends as a DELETE
        ends it, and stays readable as "expired"."""
        self.end()
        self.status = "expired"

    def admit_event(self) -> float:
        """Counts an event against the run's budget: 0.0 if it may be handled, else the
        seconds until one may."""
        return 0.0 if self.event_budget is None else self.event_budget.take(self.clock())

    def apply(self, event: Event) -> AgentEvent | None:
        """Applies an event; returns what the engine's policy hears of it, or None for a
        duplicate. A started tool call carries its predicted seconds: the client's estimate,
        else the learned or declared one."""
        self.check_live()
        self.touch()
        index = self.agent_index(event.agent)
        if event.id is not None and event.id in self._event_ids:
            return None
        applied = self._apply(index, event)
        if applied is None:
            return None
        self.event_count += 1
        if event.id is not None:
            self._event_ids[event.id] = None
            if len(self._event_ids) > _REMEMBERED_EVENT_IDS:
                self._event_ids.popitem(last=False)
        return applied

    def agent_state(self, name: str) -> AgentStatus:
        return self.agents[self.agent_index(name)].state

    def _apply(self, index: int, event: Event) -> AgentEvent | None:
        activity, name = self.agents[index], event.agent
        if isinstance(event, ToolCallStarted):
            if event.tool in activity.tools and event.id is None:
                return None
            predicted = (event.expected_duration_s if event.expected_duration_s is not None
                         else self.costs.estimates.seconds(name, event.tool))
            activity.start_tool(event.tool, ToolCall(self.clock(), predicted))
            activity.tool_calls += 1
            self.episodes.tool_started(index, event.tool)
            activity.done = False
            return AgentEvent("tool_call.started", self.id, name, predicted)
        if isinstance(event, ToolCallFinished):
            call = activity.finish_tool(event.tool)
            if call is None:
                if activity.tool_finished(event.tool):
                    return None
                raise Conflict("tool_not_started", f"agent {name!r} of run {self.id} reports "
                               f"tool {event.tool!r} finished, but no call of it was started")
            now = self.clock()
            self.costs.estimates.observe(name, event.tool, now - call.started)
            activity.episode.last_end = now
            return AgentEvent("tool_call.finished", self.id, name)
        if isinstance(event, AgentWaiting):
            if activity.waiting is not None:
                return None
            key = wait_key(event.reason)
            predicted = (event.expected_duration_s if event.expected_duration_s is not None
                         else self.costs.estimates.seconds(name, key))
            activity.waiting = (event.reason, ToolCall(self.clock(), predicted))
            activity.episode.active = True
            activity.done = False
            return AgentEvent("tool_call.started", self.id, name, predicted)
        if isinstance(event, AgentResumed):
            return (None if not self._end_wait(index)
                    else AgentEvent("tool_call.finished", self.id, name))
        assert isinstance(event, AgentDone)
        if activity.done:
            return None
        activity.done = True
        self.episodes.agent_done()
        return AgentEvent("agent.done", self.id, name)

    def _end_wait(self, index: int) -> bool:
        """Ends the agent's wait, if it has one, learning how long it took."""
        activity = self.agents[index]
        if activity.waiting is None:
            return False
        reason, wait = activity.waiting
        activity.waiting = None
        now = self.clock()
        self.costs.estimates.observe(self.graph.agents[index].name, wait_key(reason),
                                     now - wait.started)
        activity.episode.last_end = now
        return True

    # -- model calls (the server reports them) -------------------------------------------------

    def submit_call(self, index: int, request_id: str) -> AgentCall:
        """A model call of the agent is queued: counts the transition it makes (episodes.py)."""
        self.check_live()
        self.touch()
        self._end_wait(index)
        self.episodes.call_submitted(index, self.clock())
        activity = self.agents[index]
        activity.queue(request_id)
        activity.done = False
        return AgentCall(activity, request_id, self.clock)

    def end(self) -> None:
        """The run is over (DELETE): its episode in progress ends and is folded."""
        if self.status == "live":
            self.episodes.end()

    # -- priorities ------------------------------------------------------------------------------

    def criticality(self) -> Criticality:
        """The critical path over the remaining work, as of now."""
        now = self.clock()
        work = [self.costs.work(agent, activity, now)
                for agent, activity in zip(self.graph.agents, self.agents)]
        return critical_path(self.costs.learned.structure(), work)

    def priority(self, index: int, criticality: Criticality) -> float:
        if self.agents[index].done:
            return 0.0
        return self.graph.agents[index].importance * criticality.criticality(index)

    def next_use(self, index: int, criticality: Criticality) -> float | None:
        """Predicted seconds until the agent's next model call, as of `criticality`; None once
        it is done:

            state                 next use
            --------------------  -------------------------------------------------------
            done                  None
            queued, generating    0
            tool_call, waiting    max(what is left of its tools and wait, start_after)
            idle, work left       start_after: the longest remaining path into it
            idle, no work left    inf: the graph expects none, but the agent is not done
        """
        activity = self.agents[index]
        if activity.done:
            return None
        if activity.queued or activity.generating:
            return 0.0
        now = self.clock()
        pending = [call for calls in activity.tools.values() for call in calls]
        if activity.waiting is not None:
            pending.append(activity.waiting[1])
        if not pending and index < len(criticality.costs) and criticality.costs[index] <= 0:
            return float("inf")
        left = max((call.predicted - (now - call.started) for call in pending), default=0.0)
        return max(left, criticality.start_after(index))


def wait_key(reason: str) -> str:
    """The tool-estimate key of an agent's waits for `reason`."""
    return f"wait:{reason}"


def _names(graph: AgentGraph) -> str:
    names = [agent.name for agent in graph.agents]
    shown = ", ".join(repr(n) for n in names[:10])
    return shown + (f" and {len(names) - 10} more" if len(names) > 10 else "")
