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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple

from kvrt.runtime.engine.constraints import Constraints, Matcher
from kvrt.runtime.engine.decide import carry_out
from kvrt.runtime.engine.executor import Executor
from kvrt.runtime.engine.landing import UploadLandings
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
)
from kvrt.runtime.engine.sampler import Sampler
from kvrt.runtime.engine.scheduler import BatchScheduler, Chunk
from kvrt.runtime.engine.sequence import Sequence
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


@dataclass(frozen=True, slots=True)
class RunRelease:
    aborted: list[str]  # ids of the run's requests that were live, now aborted
    released_blocks: int  # cached blocks no other owner holds now (left in the prefix cache)


@dataclass(slots=True)
class _Live:
    seq: Sequence
    text: OutputText
    matcher: Matcher | None = None  # where its output stands in its grammar, if constrained


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
        self._live: dict[str, _Live] = {}
        self.priorities = Priorities()  # every live call reads its agent's here
        self.landings = UploadLandings()  # predictive uploads: landing vs. the tool's return
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.kv_blocks_in_use_peak = 0  # at any step, once scheduled
        self.shared_text = SharedTextMeter()  # blocks held for segments, when sampled
        self._arrivals = 0
        self._waits_on_moves = False  # the last step ran nothing: its work waits on KV moves

    def validate(self, request: GenerateRequest) -> None:
        """Raises RequestRejected for a request that can never be served; queues nothing."""
        prompt = request.prompt_token_ids
        max_tokens = request.params.max_tokens
        if not prompt:
            raise RequestRejected("the prompt is empty")
        if max_tokens < 1:
            raise RequestRejected(f"max_tokens must be at least 1, got {max_tokens}")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise RequestRejected(f"prompt token ids must be in [0, {self.vocab_size})")
        total = len(prompt) + max_tokens
        if total > self.max_model_len:
            raise RequestRejected(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{total} were requested ({len(prompt)} in the prompt, {max_tokens} to generate)"
            )
        grammar = request.params.grammar
        if grammar is not None and (why := self.constraints.check(grammar)) is not None:
            raise RequestRejected(why)
        blocks = self.kv.blocks_for(total)
        if blocks > self.kv.num_blocks:
            raise RequestRejected(
                f"the request needs {blocks} KV blocks ({total} tokens) but the KV pool holds "
                f"{self.kv.num_blocks}; start the server with a larger --kv-cache-memory"
            )

    def add(self, request: GenerateRequest) -> None:
        self.validate(request)
        if request.request_id in self._live:
            raise RequestRejected(f"request id {request.request_id!r} is already live")
        seq = Sequence(
            request=request,
            table=BlockTable(self.kv.block_size, owner=_owner(request.attribution)),
            arrival=self.clock(),
            order=self._arrivals,
            token_ids=list(request.prompt_token_ids),
            generator=self.sampler.request_generator(request.params),
            priorities=self.priorities,
        )
        text = OutputText(
            request.params, self.tokenizer.detokenizer(), self.tokenizer.eos_token_ids
        )
        grammar = request.params.grammar
        matcher = None if grammar is None else Matcher(grammar)
        self._live[request.request_id] = _Live(seq, text, matcher)
        self._arrivals += 1
        self.prompt_tokens += seq.prompt_len
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        live = self._live.pop(request_id, None)
        if live is None:
            return False
        self.scheduler.finish(live.seq)
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
        self._carry_out(self.policy.on_event(event, self.kv, now))

    def _carry_out(self, decisions: Iterable[Decision]) -> None:
        carry_out(self.kv, decisions, self.landings)

    def set_priorities(self, run: str, priorities: Mapping[str, float]) -> None:
        """The run's agents' new graph priorities (agent -> priority; the others keep theirs):
        their calls, waiting or running, are ordered by them from now on, and the policy hears
        of them. Nothing here is per call: the calls read the table."""
        self.priorities.update(run, priorities)
        self._carry_out(self.policy.on_priorities(run, priorities, self.kv))

    def set_outlook(self, run: str, remaining_s: float,
                    next_use: Mapping[str, float | None]) -> None:
        """The run's remaining critical path (its calls read it) and its agents' predicted
        seconds to their next call, which the policy gets as times on the engine's clock."""
        self.priorities.set_remaining(run, remaining_s)
        now = self.clock()
        due = {agent: None if s is None else now + s for agent, s in next_use.items()}
        carry_out(self.kv, self.policy.on_outlook(run, remaining_s, due, self.kv, now))

    def tick(self) -> None:
        """Completes the KV moves that have landed and lets the policy act on the time (expire
        pins). Each step ticks first; the engine thread also ticks while idle, since an agent
        waits on its tool with no step running."""
        self.kv.finish_moves()
        now = self.clock()
        for owner in self.kv.take_landed_uploads():
            self.landings.landed(owner, now)
        self._carry_out(self.policy.on_step(self.kv, now))

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
                self._carry_out(self.policy.on_stall(self.kv, self.clock()))
            return []
        self.kv_blocks_in_use_peak = max(self.kv_blocks_in_use_peak, self.kv.usage().in_use)
        failed: list[tuple[Chunk, Exception]] = []
        try:
            tokens = self._run(chunks)
        except Exception as error:
            chunks, tokens, failed = self._isolate(chunks, error)
        try:
            emitted = self._update(chunks, tokens)
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
                 ) -> tuple[list[Chunk], list[int], list[tuple[Chunk, Exception]]]:
        """The batch's forward or sampling raised: each chunk runs again alone, so that one
        request's failure (its parameters, its data) fails that request only, and a passing
        fault fails none. Re-running writes the same KV to the same slots. Returns the chunks
        that ran, their tokens in order, and the failed chunks with their errors."""
        if len(chunks) == 1:
            return [], [], [(chunks[0], error)]
        good, tokens, failed = [], [], []
        for chunk in chunks:
            try:
                tokens += self._run([chunk])
                good.append(chunk)
            except Exception as alone:
                failed.append((chunk, alone))
        return good, tokens, failed

    def _run(self, chunks: list[Chunk]) -> list[int]:
        """One forward over the batch; a token for each chunk that wants one, in order. The
        constrained rows are masked to what their grammars allow first."""
        logits = self.executor.run(chunks)
        sampling = [c.seq for c in chunks if c.wants_logits]
        self.constraints.mask(logits, [self._live[s.request_id].matcher for s in sampling])
        return self.sampler.sample(
            logits, [s.request.params for s in sampling], [s.generator for s in sampling]
        )

    def _update(self, chunks: list[Chunk], tokens: list[int]) -> list[Emitted]:
        sampled = self.scheduler.update(chunks, tokens)
        return [self._emit(seq) for seq in sampled]

    def _emit(self, seq: Sequence) -> Emitted:
        """The output increment of a sequence that got a token; ends it on a stop."""
        token = seq.token_ids[-1]
        live = self._live[seq.request_id]
        self.generation_tokens += 1
        text, reason = live.text.add_token(token, seq.num_output)
        if live.matcher is not None:
            live.matcher.accept(token)
            if reason is None and live.matcher.terminated:
                # The grammar admits nothing more (or took a stop token that ignore_eos skips).
                text, reason = text + live.text.finish_text(), "stop"
        if reason is None and len(seq.token_ids) >= self.max_model_len:
            text, reason = text + live.text.finish_text(), "length"
        if reason is not None:
            del self._live[seq.request_id]
            self.scheduler.finish(seq)
            self._carry_out(self.policy.on_finish(seq, self.kv))
        output = GenerateOutput(
            token_ids=[token],
            text=text,
            prompt_tokens=seq.prompt_len,
            cached_tokens=seq.num_cached,
            completion_tokens=seq.num_output,
            finish_reason=reason,
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
        moved = self.kv.tier_counts()
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
            kv_move_failures=self.kv.move_failures(),
            kv_decisions=self.policy.kv_decisions(),
            upload_landing=self.landings.stats(),
            segment_requests=reuse.segment_requests,
            segment_tokens=reuse.segment_tokens,
            segment_reused_tokens=reuse.reused_tokens,
            segment_dropped_tokens=reuse.dropped_tokens,
            shared_text_blocks_per_agent=self.shared_text.per_agent(),
        )

    def check_integrity(self) -> None:
        self.kv.check_integrity()


def _owner(attribution: Attribution) -> tuple[str, str] | None:
    """KV is owned by (run, agent) only when both are known."""
    if attribution.run is None or attribution.agent is None:
        return None
    return attribution.run, attribution.agent
