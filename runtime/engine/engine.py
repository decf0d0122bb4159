"""The engine: one step is schedule -> run -> update. Single-threaded by design.

The engine owns the executor and the KV; `AsyncEngine` runs it on its own thread. Time comes
from an injected clock, so the same engine can run under a simulated clock. The policy hears of
the agents' events (`notify`), of their new graph priorities (`set_priorities`, kept in the
table its calls read: runtime/engine/priorities.py) and of time passing (`tick`, before each
step and while idle), and the engine carries out what it decides (runtime/engine/decide.py),
timing the uploads it plans ahead against the tools' actual returns (runtime/engine/landing.py).

A step that raises after scheduling aborts the requests of its batch and raises StepFailed
naming them; the engine stays consistent and serves the others. `expire` aborts the requests
past their `timeout_s`.

A request of n > 1 choices is one sequence per choice. Choice 0 computes the prompt; its last
prefill step draws every choice's first token from the prompt's logits (one row each, each
choice with its own generator), and the other choices then fork the prompt's KV
(BatchScheduler.fork) and decode beside it: the prompt is computed once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple

from kvrt.runtime.engine.constraints import Constraints, Matcher, grammar_mismatch
from kvrt.runtime.engine.decide import carry_out
from kvrt.runtime.engine.decision_log import DecisionLog
from kvrt.runtime.engine.executor import Executor
from kvrt.runtime.engine.landing import UploadLandings
from kvrt.runtime.engine.logprobs import token_logprobs
from kvrt.runtime.engine.output import OutputText
from kvrt.runtime.engine.priorities import Priorities
from kvrt.runtime.engine.protocol import (
    AgentEvent,
    AgentResidency,
    Attribution,
    EngineStats,
    GenerateOutput,
    GenerateRequest,
    RequestRejected,
    StepFailed,
    TokenLogprobs,
)
from kvrt.runtime.engine.sampler import Sampler
from kvrt.runtime.engine.scheduler import BatchScheduler, Chunk
from kvrt.runtime.engine.sequence import Sequence, Status
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import KVManager
from kvrt.runtime.kv.reuse.planner import ReusePlanner
from kvrt.runtime.kv.shared_blocks import SharedTextMeter
from kvrt.runtime.model.tokenizer import Tokenizer
from kvrt.runtime.policy.base import Policy
from kvrt.runtime.policy.decisions import Decision


class Emitted(NamedTuple):
    request_id: str
    output: GenerateOutput  # the request's output increment


class Draw(NamedTuple):
    token_id: int
    logprobs: TokenLogprobs | None  # when the request asks for them


@dataclass(frozen=True, slots=True)
class RunRelease:
    aborted: list[str]  # ids of the run's requests that were live, now aborted
    released_blocks: int  # cached blocks no other owner holds now (left in the prefix cache)


@dataclass(slots=True)
class _Live:
    """A live request: a sequence and an output text per choice. `seq` is choice 0 (its
    arrival and attribution are every choice's); `unforked`: the choices still waiting for its
    prompt's logits; `running`: the choices not finished."""

    seqs: list[Sequence]
    texts: list[OutputText]
    unforked: list[Sequence]
    running: int
    # Per choice, where its output stands in the request's grammar; None: unconstrained.
    matchers: list[Matcher] | None = None

    @property
    def seq(self) -> Sequence:
        return self.seqs[0]


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The engine's fixed limits a request is checked against (`Engine.validate`). A value,
    so that a replica's front side (runtime/replicas/) checks requests with no round trip."""

    vocab_size: int
    max_model_len: int
    block_size: int
    num_blocks: int  # the device KV pool's

    def validate(self, request: GenerateRequest) -> None:
        """Raises RequestRejected for a request that can never be served."""
        prompt = request.prompt_token_ids
        max_tokens = request.params.max_tokens
        if not prompt:
            raise RequestRejected("the prompt is empty")
        if max_tokens < 1:
            raise RequestRejected(f"max_tokens must be at least 1, got {max_tokens}")
        if request.params.n < 1:
            raise RequestRejected(f"n must be at least 1, got {request.params.n}")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise RequestRejected(f"prompt token ids must be in [0, {self.vocab_size})")
        total = len(prompt) + max_tokens
        if total > self.max_model_len:
            raise RequestRejected(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{total} were requested ({len(prompt)} in the prompt, {max_tokens} to generate)"
            )
        grammar = request.params.grammar
        if grammar is not None and (why := grammar_mismatch(grammar, self.vocab_size)):
            raise RequestRejected(why)
        blocks = -(-total // self.block_size)
        if blocks > self.num_blocks:
            raise RequestRejected(
                f"the request needs {blocks} KV blocks ({total} tokens) but the KV pool holds "
                f"{self.num_blocks}; start the server with a larger --kv-cache-memory"
            )


class Engine:
    def __init__(
        self,
        executor: Executor,
        kv: KVManager,
        scheduler: BatchScheduler,
        policy: Policy,
        reuse: ReusePlanner,
        sampler: Sampler,
        tokenizer: Tokenizer,
        max_model_len: int,
        clock: Callable[[], float] = time.monotonic,
        decisions: DecisionLog | None = None,
    ) -> None:
        """`scheduler` works on the same `kv`, `policy` and `reuse` (runtime/engine/assembly.py
        builds them together)."""
        self.executor, self.kv, self.scheduler = executor, kv, scheduler
        self.policy, self.reuse = policy, reuse
        self.sampler, self.tokenizer = sampler, tokenizer
        self.max_model_len = max_model_len
        self.clock = clock
        self.vocab_size = executor.vocab_size
        self.constraints = Constraints(self.vocab_size)
        # What never changes and decides whether a request can ever be served.
        self.limits = RequestLimits(self.vocab_size, max_model_len, kv.block_size, kv.num_blocks)
        self._live: dict[str, _Live] = {}
        self.priorities = Priorities()  # every live call reads its agent's here
        self.landings = UploadLandings()  # predictive uploads: landing vs. the tool's return
        # The policy's last decisions carried out, for the live view (the scheduler's too).
        self.decisions = decisions or DecisionLog(clock)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.computed_tokens = 0  # positions the forwards computed (prompts and outputs)
        self.kv_blocks_in_use_peak = 0  # at any step, once scheduled
        self.shared_text = SharedTextMeter()  # blocks held for segments, when sampled
        self._arrivals = 0
        self._waits_on_moves = False  # the last step ran nothing: its work waits on KV moves

    def validate(self, request: GenerateRequest) -> None:
        """Raises RequestRejected for a request that can never be served; queues nothing."""
        self.limits.validate(request)

    def add(self, request: GenerateRequest) -> None:
        self.validate(request)
        if request.request_id in self._live:
            raise RequestRejected(f"request id {request.request_id!r} is already live")
        arrival, n = self.clock(), request.params.n
        seqs = [Sequence(
            request=request,
            table=BlockTable(self.kv.block_size, owner=_owner(request.attribution)),
            arrival=arrival,
            order=self._arrivals,
            token_ids=list(request.prompt_token_ids),
            generator=self.sampler.request_generator(request.params, index),
            priorities=self.priorities,
            index=index,
        ) for index in range(n)]
        texts = [OutputText(request.params, self.tokenizer.detokenizer(),
                            self.tokenizer.eos_token_ids) for _ in range(n)]
        grammar = request.params.grammar
        matchers = None if grammar is None else [Matcher(grammar) for _ in range(n)]
        seq = seqs[0]
        self._live[request.request_id] = _Live(seqs, texts, seqs[1:], n, matchers)
        self._arrivals += 1
        self.prompt_tokens += seq.prompt_len
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        live = self._live.pop(request_id, None)
        if live is None:
            return False
        for seq in live.seqs:
            if seq.status is not Status.FINISHED and seq not in live.unforked:
                self.scheduler.finish(seq)
        return True

    def expire(self) -> list[str]:
        """Aborts the live requests past their deadline (their KV freed); returns their ids."""
        now = self.clock()
        expired = [request_id for request_id, live in self._live.items()
                   if (timeout := live.seq.request.timeout_s) is not None
                   and live.seq.arrival + timeout <= now]
        for request_id in expired:
            self.abort(request_id)
        return expired

    def notify(self, event: AgentEvent) -> None:
        """Hands an agent's control-plane event to the policy, at the clock's time now."""
        now = self.clock()
        if event.kind == "tool_call.finished":
            self.landings.returned((event.run, event.agent), now)
        self._carry_out(self.policy.on_event(event, self.kv, now), event.kind)

    def _carry_out(self, decisions: Iterable[Decision], cause: str) -> None:
        carry_out(self.kv, self.decisions.recording(decisions, cause), self.landings)

    def set_priorities(self, run: str, priorities: Mapping[str, float]) -> None:
        """The run's agents' new graph priorities (agent -> priority; the others keep theirs):
        their calls, waiting or running, are ordered by them from now on, and the policy hears
        of them. Nothing here is per call: the calls read the table."""
        self.priorities.update(run, priorities)
        self._carry_out(self.policy.on_priorities(run, priorities, self.kv), "priorities")

    def set_outlook(self, run: str, remaining_s: float,
                    next_use: Mapping[str, float | None]) -> None:
        """The run's remaining critical path (its calls read it) and its agents' predicted
        seconds to their next call, which the policy gets as times on the engine's clock."""
        self.priorities.set_remaining(run, remaining_s)
        now = self.clock()
        due = {agent: None if s is None else now + s for agent, s in next_use.items()}
        carry_out(self.kv, self.decisions.recording(
            self.policy.on_outlook(run, remaining_s, due, self.kv, now), "outlook"))

    def tick(self) -> None:
        """Completes the KV moves that have landed and lets the policy act on the time (expire
        pins). Each step ticks first; the engine thread also ticks while idle, since an agent
        waits on its tool with no step running."""
        self.kv.finish_moves()
        now = self.clock()
        for owner in self.kv.take_landed_uploads():
            self.landings.landed(owner, now)
        self._carry_out(self.policy.on_step(self.kv, now), "step")

    def close(self) -> None:
        """Lets the KV moves in flight land and stops the mover's thread."""
        self.kv.close()

    def release_run(self, run: str) -> RunRelease:
        """Aborts the run's live requests, then drops its agents' pins, priorities and ownership
        of blocks (the cached ones stay in the prefix cache)."""
        aborted = [
            request_id
            for request_id, live in self._live.items()
            if live.seq.request.attribution.run == run
        ]
        for request_id in aborted:
            self.abort(request_id)
        released = self.kv.release_run(run)
        self.priorities.drop(run)
        self.policy.on_run_end(run)
        self.landings.forget_run(run)
        self.reuse.on_run_end(run)
        return RunRelease(aborted, released)

    def kv_residency(self, run: str) -> dict[str, AgentResidency]:
        """Safe to call from another thread (the ledger locks; the policy copies)."""
        residency = self.kv.residency(run)
        for agent, decision in self.policy.kv_decisions_of(run).items():
            residency[agent] = replace(residency.get(agent, AgentResidency(0, 0)),
                                       decision=decision)
        for (of_run, agent), (tokens, reused) in self.reuse.by_owner.copy().items():
            if of_run == run:
                residency[agent] = replace(residency.get(agent, AgentResidency(0, 0)),
                                           segment_tokens=tokens, segment_reused_tokens=reused)
        return residency

    def live_attributions(self) -> dict[str, Attribution]:
        """Request id -> attribution of every live request. Safe to call from another thread:
        `dict.copy` takes the map in one step under the GIL."""
        return {rid: live.seq.request.attribution for rid, live in self._live.copy().items()}

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def sample_shared_text(self) -> None:
        """Adds the blocks each live agent holds for shared text now (runtime/kv/shared_blocks.py)
        to the mean in the stats. Costs a pass over the running tables: sampled, not per step."""
        self.shared_text.sample(self.scheduler.running, self.kv.block_size)

    def waits_on_moves(self) -> bool:
        """The last step ran nothing and KV moves are in flight: until one lands (or a new
        command comes) another step would decide the same, so a driver waits instead of
        spinning (`on_next_landing`)."""
        return self._waits_on_moves and self.kv.moves_in_flight()

    def on_next_landing(self, callback: Callable[[], None]) -> None:
        """Calls `callback` (from the mover's thread) as soon as a move in flight lands."""
        self.kv.on_next_landing(callback)

    def step(self) -> list[Emitted]:
        self.tick()
        chunks = self.scheduler.schedule()
        self._waits_on_moves = not chunks
        if not chunks:
            if self.scheduler.has_work() and not self.kv.moves_in_flight():
                # Pins hold the pool and nothing lands: the policy must let something go.
                self._carry_out(self.policy.on_stall(self.kv, self.clock()), "stall")
            return []
        self.kv_blocks_in_use_peak = max(self.kv_blocks_in_use_peak, self.kv.usage().in_use)
        failed: list[tuple[Chunk, Exception]] = []
        try:
            draws = self._run(chunks)
        except Exception as error:
            chunks, draws, failed = self._isolate(chunks, error)
        try:
            emitted = self._update(chunks, draws)
        except Exception as error:
            failed += [(chunk, error) for chunk in chunks]
            emitted = []
        if failed:
            # The failed sequences are in an unknown state (KV half written, a token perhaps
            # sampled): they are aborted, their blocks freed. The others never saw the failure.
            ids = [chunk.seq.request_id for chunk, _ in failed]
            for request_id in ids:
                self.abort(request_id)
            error = failed[0][1]
            raise StepFailed(f"engine step failed: {type(error).__name__}: {error}", ids,
                             emitted) from error
        return emitted

    def _isolate(self, chunks: list[Chunk], error: Exception
                 ) -> tuple[list[Chunk], list[Draw], list[tuple[Chunk, Exception]]]:
        """The batch's forward or sampling raised: each chunk runs again alone, so that one
        request's failure (its parameters, its data) fails that request only, and a passing
        fault fails none. Re-running writes the same KV to the same slots. Returns the chunks
        that ran, their tokens in order, and the failed chunks with their errors."""
        if len(chunks) == 1:
            return [], [], [(chunks[0], error)]
        good: list[Chunk] = []
        draws: list[Draw] = []
        failed: list[tuple[Chunk, Exception]] = []
        for chunk in chunks:
            try:
                draws += self._run([chunk])
                good.append(chunk)
            except Exception as alone:
                failed.append((chunk, alone))
        return good, draws, failed

    def _run(self, chunks: list[Chunk]) -> list[Draw]:
        """One forward over the batch; a token for each chunk that wants one, in order (for a
        prompt whose choices fork, one per choice: `_drawing`). The constrained rows are masked
        to what their grammars allow first (logprobs then describe what was sampled from)."""
        logits = self.executor.run(chunks)
        sampling, rows = self._drawing(chunks)
        if len(rows) != logits.shape[0]:
            logits = logits[rows]
        self.constraints.mask(logits, [self._matcher(s) for s in sampling])
        params = [s.request.params for s in sampling]
        tokens = self.sampler.sample(logits, params, [s.generator for s in sampling],
                                     [(s.token_ids, s.prompt_len) for s in sampling])
        return [Draw(*d) for d in zip(tokens, token_logprobs(logits, tokens, params))]

    def _matcher(self, seq: Sequence) -> Matcher | None:
        matchers = self._live[seq.request_id].matchers
        return None if matchers is None else matchers[seq.index]

    def _drawing(self, chunks: list[Chunk]) -> tuple[list[Sequence], list[int]]:
        """The sequences that draw a token from this step's logits, and the logits row each
        reads: each chunk that wants logits, followed by the choices that fork from it."""
        sampling: list[Sequence] = []
        rows: list[int] = []
        for row, seq in enumerate(c.seq for c in chunks if c.wants_logits):
            group = [seq, *self._unforked(seq)]
            sampling += group
            rows += [row] * len(group)
        return sampling, rows

    def _unforked(self, seq: Sequence) -> list[Sequence]:
        """The choices waiting for `seq`'s prompt logits: its request's others, if it is
        choice 0 and has not drawn its first token yet."""
        live = self._live.get(seq.request_id)
        return live.unforked if live is not None and live.seq is seq else []

    def _update(self, chunks: list[Chunk], draws: list[Draw]) -> list[Emitted]:
        self.computed_tokens += sum(chunk.num_tokens for chunk in chunks)
        firsts: list[Draw] = []
        forks: list[tuple[Sequence, Sequence, Draw]] = []
        taken = iter(draws)
        for chunk in chunks:
            if chunk.wants_logits:
                firsts.append(next(taken))
                forks += [(chunk.seq, child, next(taken)) for child in self._unforked(chunk.seq)]
        sampled = self.scheduler.update(chunks, [draw.token_id for draw in firsts])
        for parent, child, draw in forks:  # before any choice ends and frees the prompt
            child.token_ids.append(draw.token_id)
            self.scheduler.fork(parent, child)
            self._live[parent.request_id].unforked = []
        return ([self._emit(seq, draw.logprobs) for seq, draw in zip(sampled, firsts)]
                + [self._emit(child, draw.logprobs) for _, child, draw in forks])

    def _emit(self, seq: Sequence, logprobs: TokenLogprobs | None) -> Emitted:
        """The output increment of a sequence that got a token; ends it on a stop (and the
        request with its last choice)."""
        token = seq.token_ids[-1]
        live = self._live[seq.request_id]
        self.generation_tokens += 1
        output_text = live.texts[seq.index]
        text, reason = output_text.add_token(token, seq.num_output)
        matcher = self._matcher(seq)
        if matcher is not None:
            matcher.accept(token)
            if reason is None and matcher.terminated:
                # The grammar admits nothing more (or took a stop token that ignore_eos skips).
                text, reason = text + output_text.finish_text(), "stop"
        if reason is None and len(seq.token_ids) >= self.max_model_len:
            text, reason = text + output_text.finish_text(), "length"
        if reason is not None:
            live.running -= 1
            if not live.running:
                del self._live[seq.request_id]
            self.scheduler.finish(seq)
            self._carry_out(self.policy.on_finish(seq, self.kv), "finish")
        output = GenerateOutput(
            token_ids=[token],
            text=text,
            prompt_tokens=seq.prompt_len,
            cached_tokens=seq.num_cached,
            completion_tokens=seq.num_output,
            finish_reason=reason,
            index=seq.index,
            logprobs=None if logprobs is None else [logprobs],
        )
        return Emitted(seq.request_id, output)

    def fail_all(self) -> list[str]:
        """Drops every live request (after an engine error); returns their ids."""
        ids = list(self._live)
        for request_id in ids:
            self.abort(request_id)
        return ids

    def stats(self) -> EngineStats:
        usage, scheduler, reuse = self.kv.usage(), self.scheduler, self.reuse
        moved, host = self.kv.tier_counts(), self.kv.host_usage()
        return EngineStats(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            kv_blocks_total=usage.total,
            kv_blocks_in_use=usage.in_use,
            kv_blocks_cached=usage.cached,
            prefix_queries_tokens=scheduler.query_tokens,
            prefix_hits_tokens=scheduler.hit_tokens,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            preemptions=scheduler.preemptions,
            kv_blocks_pinned=self.kv.num_pinned(),
            kv_blocks_in_use_peak=self.kv_blocks_in_use_peak,
            kv_blocks_offloaded=moved.offloaded,
            kv_blocks_uploaded=moved.uploaded,
            kv_blocks_backed_up=moved.backed_up,
            kv_blocks_evicted=self.kv.evicted_blocks(),
            kv_host_blocks_total=host.total if host else 0,
            kv_host_blocks_held=host.in_use + host.cached if host else 0,
            kv_move_failures=self.kv.move_failures(),
            kv_decisions=self.policy.kv_decisions(),
            upload_landing=self.landings.stats(),
            segment_requests=reuse.segment_requests,
            segment_tokens=reuse.segment_tokens,
            segment_reused_tokens=reuse.reused_tokens,
            segment_dropped_tokens=reuse.dropped_tokens,
            shared_text_blocks_per_agent=self.shared_text.per_agent(),
            computed_tokens=self.computed_tokens,
        )

    def check_integrity(self) -> None:
        self.kv.check_integrity()


def _owner(attribution: Attribution) -> tuple[str, str] | None:
    """KV is owned by (run, agent) only when both are known."""
    if attribution.run is None or attribution.agent is None:
        return None
    return attribution.run, attribution.agent
