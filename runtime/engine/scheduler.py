"""Continuous batching with chunked prefill under a per-step token budget.

`schedule()`: running sequences first (oldest admission first; a decode costs one token, a
prefill continues with as much of its prompt as the budget allows), preempting by the policy
when the pool runs dry; then waiting sequences in the policy's admission order (within the classes
of vLLM's request `priority`, which unattributed calls carry: Sequence.request_rank), interleaved by
tenant (engine/fair_share.py), while the budget, the sequence limit and the pool allow,
skipping those the reuse planner holds (their shared text is being computed by another) and
those whose prompt prefix a running prefill is computing (engine/shared_prefill.py).
Sequences join and leave the batch between steps. A prefill chunk steps over the spans its
sequence reads from another copy (splices).

`update(chunks, tokens)`: after the step ran, its KV exists: full blocks are keyed (the policy
hears of them), segment copies are offered to the index, and each sampled token is appended.

The scheduler reaches the KV only through the KV manager's admission contract
(runtime/kv/manager.py) and the reuse planner; the policy's decisions are carried out on the KV
as they are made.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrt.runtime.engine.decide import carry_out
from kvrt.runtime.engine.decision_log import DecisionLog
from kvrt.runtime.engine.fair_share import fair_order
from kvrt.runtime.engine.sequence import Sequence, Status
from kvrt.runtime.engine.shared_prefill import SharedPrefill
from kvrt.runtime.kv.block_table import next_chunk
from kvrt.runtime.kv.manager import AdmissionPlan, KVManager
from kvrt.runtime.kv.reuse.planner import ReusePlanner
from kvrt.runtime.policy.base import Policy


@dataclass(frozen=True, slots=True)
class Chunk:
    seq: Sequence
    num_tokens: int  # positions of this sequence computed this step, from seq.num_computed on
    end: int  # ... up to here: positions in [num_computed, end) that a splice covers are read

    @property
    def wants_logits(self) -> bool:
        """The chunk reaches the end of the sequence, so its last token samples the next one."""
        return self.end == len(self.seq.token_ids)


class BatchScheduler:
    def __init__(self, kv: KVManager, policy: Policy, reuse: ReusePlanner, max_num_seqs: int,
                 max_num_batched_tokens: int, decisions: DecisionLog | None = None) -> None:
        """`decisions`: where the policy's decisions at admission are recorded (the engine's
        log; its write-through backups at `on_keyed` are counted in the stats, not logged)."""
        self.kv, self.policy, self.reuse = kv, policy, reuse
        self.decisions = decisions
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens
        self.shared_prefill = SharedPrefill(kv)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.query_tokens = 0  # prefix-cache counters over first admissions, in tokens
        self.hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)
        self.reuse.on_add(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Chunk]:
        budget = self.token_budget
        chunks: list[Chunk] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            end, count = next_chunk(seq.table.splices, seq.num_computed, budget,
                                    len(seq.token_ids))
            if not self._make_room(seq, end, chunks):
                continue
            chunks.append(Chunk(seq, count, end))
            budget -= count
        self.waiting.sort(key=lambda s: (s.request_rank, self.policy.admission_key(s)))
        for seq in fair_order(self.waiting, self.running):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if self.reuse.hold(seq):  # its shared text is being computed by another
                continue
            plan = self.kv.plan_admission(seq.token_ids, seq.salt, budget, seq.table.owner)
            if plan.wait:  # its KV is on its way up: admitted once it has landed
                break
            if self.shared_prefill.hold(seq, plan):  # its prefix is being computed
                continue
            chunk = self._admit(seq, plan, budget)
            if chunk is None:
                break
            self.waiting.remove(seq)
            chunks.append(chunk)
            budget -= chunk.num_tokens
        return chunks

    def update(self, chunks: list[Chunk], tokens: list[int]) -> list[Sequence]:
        """The step computed these chunks and sampled `tokens` for those that want logits (in
        order): keys what it filled, offers what it computed for reuse, appends the tokens.
        Returns the sequences that got a token, in order."""
        sampled = [chunk.seq for chunk in chunks if chunk.wants_logits]
        keyed: list[int] = []
        for chunk in chunks:
            seq = chunk.seq
            prefill = seq.num_computed < seq.prompt_len
            seq.num_computed = chunk.end
            new = self.kv.key_full_blocks(seq.table, seq.token_ids, seq.num_computed, seq.salt)
            if prefill or new:  # a decode step that keys no block grows no segment copy
                self.reuse.on_computed(seq)
            self.shared_prefill.keyed(seq)
            keyed += new
        if keyed:
            carry_out(self.kv, self.policy.on_keyed(keyed, self.kv))
        for seq, token in zip(sampled, tokens):
            seq.token_ids.append(token)
        return sampled

    def _make_room(self, seq: Sequence, end: int, scheduled: list[Chunk]) -> bool:
        """Grows seq's table, preempting others (never one already in this step's batch)."""
        while not self.kv.can_grow(seq.table, end):
            taken = {id(c.seq) for c in scheduled}
            candidates = [s for s in self.running if id(s) not in taken and s is not seq]
            if candidates:  # the victim comes from the last-served class (request_rank)
                last = max(s.request_rank for s in candidates)
                candidates = [s for s in candidates if s.request_rank == last]
            victim = self.policy.victim(candidates) if candidates else seq
            self.preempt(victim)
            if victim is seq:
                return False
        self.kv.grow(seq.table, end)
        return True

    def _admit(self, seq: Sequence, plan: AdmissionPlan, budget: int) -> Chunk | None:
        splices = self.reuse.plan(seq, plan.computed)
        end, count = next_chunk(splices, plan.computed, budget, len(seq.token_ids))
        # Checked before allocating, so a refused admission leaves the cached blocks untouched
        # (their LRU order and their owners stay as they were).
        if not self.kv.can_allocate(plan, end, splices):
            self.reuse.forget(seq)
            return None
        self.kv.allocate(seq.table, plan, end, splices)
        seq.num_computed = plan.computed
        if not seq.admitted_once:  # prefix-cache statistics count each request once
            seq.admitted_once = True
            reused = self.reuse.count_admission(seq, splices)
            seq.num_cached = seq.num_computed + reused
            self.query_tokens += seq.prompt_len
            self.hit_tokens += seq.num_cached
        seq.status = Status.RUNNING
        self.running.append(seq)
        self.shared_prefill.admitted(seq)
        admitted = self.policy.on_admit(seq, self.kv)
        carry_out(self.kv, admitted if self.decisions is None
                  else self.decisions.recording(admitted, "admit"))
        return Chunk(seq, count, end)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child`, another choice of `parent`'s request, whose first token was just drawn from
        the logits of parent's prompt (child.token_ids: the prompt and that token), reads the
        prompt's KV from parent's table (kv.fork) and decodes from the next step on, beside
        it. Where it cannot (no block for the copy, or a table that splices) it waits, and its
        admission computes what the prefix cache lacks. A child with segments always waits:
        the reuse planner follows the sequences that compute segments themselves. A fork
        joins the running batch even past max_num_seqs (which then admits nobody new until
        it is below again): its prompt's KV is held now, and waiting would waste it."""
        child.admitted_once = True  # the request was counted once, by parent's admission
        child.num_cached = parent.num_cached
        if not child.segments and self.kv.fork(parent.table, child.table, parent.prompt_len):
            child.num_computed = parent.prompt_len
            child.status = Status.RUNNING
            self.running.append(child)
        else:
            self.add(child)

    def preempt(self, seq: Sequence) -> None:
        """Gives the sequence's blocks back; it is recomputed later (prompt and output so far)."""
        self.running.remove(seq)
        self.kv.free(seq.table)
        self.reuse.forget(seq)
        self.shared_prefill.forget(seq)
        seq.num_computed = 0
        self.preemptions += 1
        self.add(seq)

    def finish(self, seq: Sequence) -> None:
        """Removes a finished or aborted sequence wherever it is and frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.reuse.on_finish(seq)
        self.shared_prefill.forget(seq)
        self.kv.free(seq.table)
        seq.status = Status.FINISHED
