"""The seam between the server and the engine: what a request asks for and what comes back.

The server sees the engine only through `EngineClient`; nothing reaches through it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

# Part of this seam (the results of kv_residency, recent_decisions and stats): the server
# imports them from here.
from kvrt.runtime.engine.decision_log import RecentDecisions
from kvrt.runtime.engine.landing import LandingStats
from kvrt.runtime.kv.owners import AgentResidency

if TYPE_CHECKING:
    from kvrt.runtime.engine.constraints import Grammar
    from kvrt.runtime.model.tokenizer import Tokenizer

FinishReason = Literal["stop", "length", "abort"]


class EngineError(Exception):
    """Base of the errors the engine raises to its callers; the server maps them to HTTP."""


class RequestRejected(EngineError):
    """The request can never be served as asked (e.g. prompt + max_tokens exceed the context or
    the KV pool). Raised at submission, before anything is queued."""


class RunEnded(EngineError):
    """The request's run was ended (DELETE /v1/runs/{id}) while it was in flight."""


class RequestTimedOut(EngineError):
    """The request outlived its `timeout_s` (queue time included) and was aborted."""


class ShuttingDown(EngineError):
    """The server is shutting down and aborted the request (it did not finish in time)."""


NO_REPLICA_RETRY_S = 5  # Retry-After when no replica is ready (one is starting, or restarting)


class ReplicaUnavailable(EngineError):
    """The replica holding the request died, or no replica is ready (`kvrt serve --replicas`).
    The replica's KV is lost and nothing else: the call may be retried after `retry_after_s`
    seconds, and is then served by a live replica."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:  # crosses processes (Ray) with its field
        return (type(self), (str(self), self.retry_after_s))


class StepFailed(EngineError):
    """One engine step raised for some of its requests: those were aborted (their KV freed);
    the others go on, and `emitted` holds what the step gave them. `request_ids` are the
    aborted ones; the (first) cause is chained."""

    def __init__(self, message: str, request_ids: list[str],
                 emitted: list[Any] | None = None) -> None:
        super().__init__(message)
        self.request_ids = request_ids
        self.emitted = emitted or []


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # -- choices, logprobs, penalties (runtime/engine/penalties.py, logprobs.py) --
    n: int = 1  # choices; the prompt is computed once, and each choice forks its KV
    # None: no logprobs; k >= 0: each sampled token's logprob and the k most likely tokens'.
    # They describe the model's distribution (log-softmax of the logits the sampler is given),
    # before logit_bias, penalties, temperature, top-k and top-p: vLLM's default.
    logprobs: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: minus this once per token already generated
    frequency_penalty: float = 0.0  # OpenAI's: minus this per time a token was generated
    repetition_penalty: float = 1.0  # HF/vLLM's, over prompt and output: > 1 discourages
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    include_stop_str_in_output: bool = False  # vLLM's: a matched stop string stays in the text
    # Constrained decoding (runtime/engine/constraints.py): the output follows this grammar,
    # compiled by the server for the engine's vocabulary. None: free text.
    grammar: Grammar | None = None


@dataclass(frozen=True, slots=True)
class Attribution:
    """Which run and agent a call belongs to (the `kvrt` body object or X-Kvrt-* headers)."""

    run: str | None = None
    agent: str | None = None
    # The agent's graph priority when the call was made (higher first); `set_priorities`
    # overrides it while the call lives.
    priority: float = 0.0


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    salt: bytes = b""  # tenant salt, set by the server, never from the body
    tenant: str = ""  # whose call it is: the scheduler shares batch slots among tenants
    attribution: Attribution = field(default_factory=Attribution)
    # Token spans [start, end) of the prompt that are segments: text whose KV may be reused at
    # another position (marked messages, or every message of an "approximate" graph's calls).
    segments: tuple[tuple[int, int], ...] = ()
    # Seconds the request may live from its arrival at the engine, queue included; past it,
    # it is aborted with RequestTimedOut. None: no limit.
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """A sampled token's logprob and the `SamplingParams.logprobs` most likely tokens' (best
    first), all from the same distribution (see SamplingParams.logprobs)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class GenerateOutput:
    """One increment of one choice's output. Each choice's last has `finish_reason` set; the
    request ends once all `SamplingParams.n` choices have ended."""

    token_ids: list[int]  # new tokens since the previous output
    text: str  # new text since the previous output (stop strings already cut)
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache
    completion_tokens: int  # total so far
    finish_reason: FinishReason | None = None
    index: int = 0  # which choice (of SamplingParams.n) this output belongs to
    # One per token of `token_ids` when SamplingParams.logprobs is set, else None.
    logprobs: list[TokenLogprobs] | None = None


AgentEventKind = Literal["tool_call.started", "tool_call.finished", "agent.done"]


@dataclass(frozen=True, slots=True)
class AgentEvent:
    """A control-plane event of one agent, handed to the engine's policy (`EngineClient.notify`).
    `predicted_s`: for tool_call.started, the seconds the call is expected to take (None: no
    prediction; the control plane sends 0 for a tool never declared nor observed)."""

    kind: AgentEventKind
    run: str
    agent: str
    predicted_s: float | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_in_use: int  # referenced by live requests or pinned by the policy
    kv_blocks_cached: int  # unreferenced but still indexed (evictable)
    prefix_queries_tokens: int  # counters since start
    prefix_hits_tokens: int
    prompt_tokens: int
    generation_tokens: int
    preemptions: int
    kv_blocks_pinned: int = 0  # of the blocks in use, those the policy pins (e.g. `ttl`)
    kv_blocks_in_use_peak: int = 0  # the most in use at any step since start
    kv_blocks_offloaded: int = 0  # moved to the host tier since start
    kv_blocks_uploaded: int = 0  # moved back from it
    kv_blocks_backed_up: int = 0  # copied to it, and kept on the device
    kv_blocks_evicted: int = 0  # cached device blocks taken for other content since start
    kv_host_blocks_total: int = 0  # the host tier's blocks (0: no host tier)
    kv_host_blocks_held: int = 0  # of those, holding KV (read by a move, or cached)
    kv_move_failures: dict[str, int] = field(default_factory=dict)  # failed copies, by direction
    kv_decisions: dict[str, int] = field(default_factory=dict)  # the policy's, at tool calls
    # The policy's predictive uploads: their landing against the tool's actual return.
    upload_landing: LandingStats = field(default_factory=LandingStats)
    segment_requests: int = 0  # requests with segments, admitted (with reuse off too)
    segment_tokens: int = 0  # tokens in their segments
    segment_reused_tokens: int = 0  # of those, read from another copy: not computed or stored
    segment_dropped_tokens: int = 0  # recomputed, then read from the master (diff encode)
    # Blocks a live agent holds for its segments, masters amortized over their readers, as the
    # pool sees them (runtime/kv/shared_blocks.py): the mean over the samples taken so far
    # (AsyncEngine.sample_shared_text); None before any sample saw one.
    shared_text_blocks_per_agent: float | None = None
    # Positions the forwards computed since start, prompt and output (a choice of n > 1 forks
    # its prompt's KV: the prompt counts once).
    computed_tokens: int = 0

    @property
    def segment_held_tokens(self) -> int:
        """Segment tokens the calls holding them store: all but those read in place. Tokens,
        not blocks: `shared_text_blocks_per_agent` is what the pool holds for them."""
        return self.segment_tokens - self.segment_reused_tokens - self.segment_dropped_tokens


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What the engine holds now, seen from the event loop (for admission and draining)."""

    queued_requests: int  # submitted, no output yet (waiting, or in their first prefill)
    queued_tokens: int  # their prompt tokens
    in_flight: int  # every live generate() call: queued or producing output
    drain_per_s: float | None  # requests leaving the queue per second lately; None: unknown


ReplicaState = Literal["starting", "ready", "down"]


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One engine replica behind the daemon (`kvrt serve --replicas`), as the front sees it."""

    name: str
    state: ReplicaState  # down: died, or failed to start; Ray restarts it (then starting)
    restarts: int  # times it came back after dying
    runs: int  # live runs with agents placed on it
    agents: int  # live agents placed on it
    load: EngineLoad
    stats: EngineStats | None  # its latest figures; None before it first reported


class EngineClient(Protocol):
    model_name: str
    max_model_len: int
    tokenizer: Tokenizer  # kvrt.runtime.model.tokenizer.Tokenizer: chat template, encode, decode

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Streams the request's output. Raises RequestRejected before yielding if the request
        can never be served. Closing the iterator early (client gone) aborts the request and
        frees its KV."""
        ...

    def validate(self, request: GenerateRequest) -> None:
        """Raises RequestRejected for a request that can never be served; queues nothing."""
        ...

    def load(self) -> EngineLoad:
        """The queue and the live calls now. Cheap; call it from the event loop."""
        ...

    async def abort_all(self, error: EngineError) -> int:
        """Aborts every live request (their KV freed); each call ends with `error`. Returns how
        many there were."""
        ...

    def stats(self) -> EngineStats: ...

    def is_alive(self) -> bool: ...

    def kv_residency(self, run: str) -> dict[str, AgentResidency]:
        """Per agent of `run`: the device blocks holding its KV now (in use or cached) and how
        many of them another owner (another agent, or another run's) also holds. Agents holding
        no block are absent. Cheap and safe to call from the event loop."""
        ...

    def recent_decisions(self) -> RecentDecisions:
        """The policy's last decisions the engine carried out (a bounded ring, oldest first)
        and the engine's clock now. Cheap and safe to call from the event loop."""
        ...

    def notify(self, event: AgentEvent) -> None:
        """Hands an applied (not duplicate) control-plane event to the engine's policy. Fire and
        forget: it never blocks the loop; once the engine is down the event is dropped."""
        ...

    def set_priorities(self, run: str, priorities: Mapping[str, float]) -> None:
        """The new graph priorities (agent -> priority) of some of `run`'s agents; the others
        keep theirs. From when the engine applies it (between steps, in order with the other
        commands) a call of such an agent, waiting or running, has that priority instead of the
        one stamped on it (`Attribution.priority`), and the policy hears of it (its
        reservations). Fire and forget, like `notify`; once the engine is down it is dropped.
        Ending the run (`release_run`) drops its agents' entries."""
        ...

    def set_outlook(self, run: str, remaining_s: float,
                    next_use: Mapping[str, float | None]) -> None:
        """The run's outlook as of now: its remaining critical path in seconds (its calls
        report it as `remaining_s`), and per agent the predicted seconds to its next model call
        (None: it is done; inf: no call is predicted). The policy hears of it (`on_outlook`,
        with the times made absolute on the engine's clock). Fire and forget, like `notify`."""
        ...

    def replicas(self) -> list[ReplicaStatus]:
        """The replicas behind this client, one entry each; empty for a single engine."""
        ...

    def replica_of(self, run: str) -> list[str]:
        """The replicas holding the run's agents (names; usually one); empty for a single
        engine, or a run with no agent placed yet."""
        ...

    async def release_run(self, run: str) -> int:
        """Ends the run: its in-flight requests stop with `RunEnded`, its ownership of blocks and
        its agents' pins are dropped. Returns how many cached blocks no other owner holds now:
        they stay in the prefix cache, evictable, for later prompts that read the same text."""
        ...
