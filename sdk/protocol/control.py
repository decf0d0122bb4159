"""Control-plane wire schemas: agent graphs, runs, and the events clients report.

Requests refuse unknown fields (a misspelt `expected_iteration` must not pass silently), and the
limits below live in the types, so /openapi.json shows them and msgspec names the field that
breaks one. Checks that need the whole graph (unknown agents in an edge, duplicate names, loops)
are the daemon's, after decoding.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

# Documented limits of one graph. A graph of 4,096 agents recomputes its priorities in a few
# milliseconds (see the control-plane benchmark); the limits keep one request from taking more.
MAX_AGENTS = 4096
MAX_EDGES = 65536
MAX_TOOLS_PER_AGENT = 64
MAX_EXPECTED_ITERATIONS = 1000
DEFAULT_EXPECTED_ITERATIONS = 2  # of a loop whose edges do not say

# Listings (GET /v1/graphs, GET /v1/runs) come in pages of `limit` items, OpenAI's bounds.
DEFAULT_PAGE_LIMIT = 20
MAX_PAGE_LIMIT = 100

# Names travel in X-Kvrt-Agent headers too, so no control characters.
Name = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
Seconds = Annotated[float, Meta(ge=0, le=7 * 24 * 3600)]
Id = Annotated[str, Meta(min_length=1, max_length=128)]

AgentStatus = Literal["idle", "queued", "generating", "tool_call", "waiting", "done"]
# "interrupted": the run was live when the daemon stopped; a daemon started on the same state
# dir (--state-dir) shows it, and deletes it, but refuses its events and calls (409).
# "expired": it was idle past --run-idle-timeout and its KV was released; readable for as long
# again (or until deleted), then forgotten; it refuses events and calls too (409).
RunStatus = Literal["live", "interrupted", "expired"]
Reuse = Literal["exact", "approximate"]


# ---- graphs --------------------------------------------------------------------------------


class AgentSpec(Struct, kw_only=True, forbid_unknown_fields=True):
    """One agent. `tools` maps each tool it may call to the seconds a call is expected to take;
    `expected_output_tokens` and the tools make up the agent's expected work; `importance`
    scales its priority (0 = never preferred)."""

    name: Name
    system: str | None = None
    tools: Annotated[dict[Name, Seconds], Meta(max_length=MAX_TOOLS_PER_AGENT)] = {}
    expected_output_tokens: Annotated[int, Meta(ge=0, le=1_000_000)] | None = None
    importance: Annotated[float, Meta(ge=0, le=1000)] = 1.0


class EdgeSpec(Struct, kw_only=True, forbid_unknown_fields=True):
    """An edge in object form; `[from, to]` is the short form. `expected_iterations` is only
    meaningful on an edge of a loop (a cycle), and says how often the loop is expected to run."""

    source: Name = msgspec.field(name="from")
    target: Name = msgspec.field(name="to")
    expected_iterations: Annotated[int, Meta(ge=1, le=MAX_EXPECTED_ITERATIONS)] | None = None


class GraphSpec(Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/graphs. `reuse: "approximate"` is stored now and acted on by a later release."""

    name: Annotated[str, Meta(min_length=1, max_length=200)]
    agents: Annotated[list[AgentSpec], Meta(min_length=1, max_length=MAX_AGENTS)]
    edges: Annotated[
        list[tuple[Name, Name] | EdgeSpec], Meta(max_length=MAX_EDGES)
    ] = []
    reuse: Reuse = "exact"


class AgentInfo(Struct, kw_only=True):
    name: str
    system: str | None
    tools: dict[str, float]
    expected_output_tokens: int
    importance: float
    expected_seconds: float  # the agent's expected work in a pass: generation plus tool calls
    priority: float  # importance x criticality (1 on the critical path, less with slack)
    on_critical_path: bool
    # Learned from the graph's episodes, the declaration a prior worth one (None: an older
    # daemon). Model calls per episode, and output tokens per call.
    expected_calls: float | None = None
    output_tokens_per_call: float | None = None


class Edge(Struct, kw_only=True):
    source: str = msgspec.field(name="from")
    target: str = msgspec.field(name="to")
    in_loop: bool
    expected_iterations: int  # of the edge's declared loop; 1 for an edge outside any loop


class Transition(Struct, kw_only=True):
    """A transition observed in the graph's runs: agent `to`'s activity followed `from`'s.
    "__start__" and "__end__" stand for an episode's beginning and end. `share`: count over
    the transitions out of `from` (None before any); `likely`: whether the edge counts towards
    priorities (declared, and its share not negligible once `from` has been observed)."""

    source: str = msgspec.field(name="from")
    target: str = msgspec.field(name="to")
    count: int
    share: float | None
    likely: bool


class TransitionCount(Struct, kw_only=True):
    """A transition observed in one run (see Transition)."""

    source: str = msgspec.field(name="from")
    target: str = msgspec.field(name="to")
    count: int


class GraphInfo(Struct, kw_only=True):
    id: str
    object: Literal["graph"] = "graph"
    name: str
    created: int
    reuse: Reuse
    agents: list[AgentInfo]
    edges: list[Edge]
    critical_path: list[str]
    critical_path_seconds: float
    live_runs: int
    # Every declared edge (count 0 until taken) and the observed "__start__"/"__end__" rows.
    transitions: list[Transition] = []
    episodes: int = 0  # passes through the graph folded into its statistics, over its runs
    # What it counts against --max-graph-bytes-per-tenant: its declaration as compact JSON,
    # every field written (None: an older daemon).
    declared_bytes: int | None = None
    implicit: bool = False  # the tenant's implicit graph, of its sessions' runs (RunInfo)


class GraphList(Struct, kw_only=True):
    """A page of GET /v1/graphs (`?limit=N&after=ID`), in creation order: up to `limit`
    graphs, fewer once their declarations pass 1 MiB together. `has_more`: another page
    follows; ask for it with `after=last_id`. Defaults: an older daemon sent no pages."""

    object: Literal["list"] = "list"
    data: list[GraphInfo]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class Deleted(Struct, kw_only=True):
    id: str
    object: str
    deleted: bool = True


# ---- runs ----------------------------------------------------------------------------------


class RunSpec(Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/runs. With a `key` (a framework's thread id, say), the graph's live run of that
    key is returned if there is one (200), and a new run is started only if not (201): callers
    that start the same key at once all get the same run."""

    graph_id: Id
    key: Id | None = None


class KVResidency(Struct, kw_only=True):
    device_blocks: int  # blocks holding the agent's KV in device memory
    host_blocks: int  # ... offloaded to the host tier
    shared_blocks: int  # of those, blocks another agent (of any run) holds too
    # The policy's last decision on this KV when a tool call started, and why: "offload",
    # "keep:no_pressure", "keep:short_tool", ... (None: no decision yet, or not this policy).
    decision: str | None = None
    # Tokens of segments (shared text) in the agent's calls, and of those the ones it reads in
    # place from another agent's copy instead of storing them (position-independent reuse: not
    # computed, or recomputed and then let go by the diff encode; rows it copied are not
    # counted: they are stored again).
    segment_tokens: int = 0
    segment_reused_tokens: int = 0


class ToolEstimate(Struct, kw_only=True):
    """The expected duration of one (agent, tool), learned from the graph's runs."""

    agent: str
    tool: str
    declared_seconds: float | None  # from the graph declaration
    observations: int  # finished calls seen, in every run of the graph
    estimate_seconds: float | None  # what predictions use: learned if observed, else declared


class AgentState(Struct, kw_only=True):
    name: str
    state: AgentStatus
    priority: float
    on_critical_path: bool
    remaining_seconds: float  # expected work left, from progress and tool estimates
    requests: int  # model calls in flight
    # Defaults, so that an SDK can read a daemon older than these fields.
    calls: int = 0  # model calls finished (or aborted)
    tool_calls: int = 0  # tool calls reported started (a repeated start is not counted)
    generated_tokens: int
    tool: str | None  # the tool it waits on, in state tool_call
    waiting: str | None = None  # the reason it waits (agent.waiting), in state waiting
    kv: KVResidency


class RunInfo(Struct, kw_only=True):
    id: str
    object: Literal["run"] = "run"
    graph_id: str
    created: int
    event_count: int
    key: str | None = None  # the key it was started with (RunSpec.key)
    status: RunStatus = "live"
    # A session's run, which no client declared: its key is the calls' prompt_cache_key or
    # X-Session-Id, its graph the tenant's implicit one (README "Any OpenAI agent, unchanged").
    implicit: bool = False


class RunState(Struct, kw_only=True):
    id: str
    object: Literal["run"] = "run"
    graph_id: str
    created: int
    event_count: int
    key: str | None = None
    status: RunStatus = "live"
    implicit: bool = False  # as RunInfo's
    critical_path: list[str]
    critical_path_seconds: float  # remaining
    agents: list[AgentState]
    tools: list[ToolEstimate]
    # Full per-agent copies of the run's segments over what reuse stored (masters + diffs):
    # 1.0 with no reuse; None when its calls had no segments.
    segment_kv_compression: float | None = None
    transitions: list[TransitionCount] = []  # observed in this run, over all its episodes
    episodes: int = 0  # its passes through the graph that have ended
    # The engine replicas holding its agents' KV (`kvrt serve --replicas N`): one, unless
    # the run is larger than one replica's share, or an agent moved; empty with one engine.
    replicas: list[str] = []


class RunClosed(Struct, kw_only=True):
    """DELETE /v1/runs/{id}: the run is over; `released_blocks` cached KV blocks were held by it
    alone: they stay in the prefix cache (evictable) for later prompts that read the same text."""

    id: str
    object: Literal["run"] = "run"
    deleted: bool = True
    released_blocks: int


class RunList(Struct, kw_only=True):
    """A page of GET /v1/runs (`?graph_id=&key=&limit=&after=`), as GraphList."""

    object: Literal["list"] = "list"
    data: list[RunInfo]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


# ---- events --------------------------------------------------------------------------------


class _Event(Struct, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    """`id`, when given, makes a retried event a no-op (the SDK sets one on every event)."""

    agent: Name
    id: Id | None = None


class ToolCallStarted(_Event, tag="tool_call.started"):
    tool: Name
    expected_duration_s: Seconds | None = None  # the client's estimate for this call


class ToolCallFinished(_Event, tag="tool_call.finished"):
    tool: Name


class AgentDone(_Event, tag="agent.done"):
    pass


class AgentWaiting(_Event, tag="agent.waiting"):
    """The agent waits on something that is not a tool call: a person (`reason: "interrupt"`, a
    LangGraph thread interrupted for input), an external approval, a timer. Its KV idles as
    during a long tool, and is treated so (offloaded, and brought back for the predicted
    resume). The wait ends with agent.resumed, or with the agent's next model call.
    `expected_duration_s`: the client's estimate; without it, the one learned from the
    graph's earlier waits of this agent and reason."""

    reason: Name = "interrupt"
    expected_duration_s: Seconds | None = None


class AgentResumed(_Event, tag="agent.resumed"):
    """The wait the agent reported (agent.waiting) is over; its next call is near."""


Event = ToolCallStarted | ToolCallFinished | AgentDone | AgentWaiting | AgentResumed


class EventAck(Struct, kw_only=True):
    run: str
    agent: str
    state: AgentStatus
    event_count: int
    duplicate: bool  # the event repeated one already applied and changed nothing


graph_spec_decoder = msgspec.json.Decoder(GraphSpec)
run_spec_decoder = msgspec.json.Decoder(RunSpec)
event_decoder = msgspec.json.Decoder(Event)

# For /openapi.json: every Struct the control-plane routes read or write.
SCHEMA_TYPES = (
    GraphSpec, GraphInfo, GraphList, Deleted, RunSpec, RunInfo, RunState, RunList, RunClosed,
    Event, EventAck,
)
