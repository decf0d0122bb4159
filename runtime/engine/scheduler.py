"""Continuous batching with chunked prefill under a per-step token budget.

Each step: running sequences first (oldest admission first; a decode costs one token, a prefill
continues with as much of its prompt as the budget allows), preempting by the policy when the
pool runs dry; then waiting sequences in the policy's admission order, while the budget, the
sequence limit and the pool allow, skipping those the KV Collector holds (their shared text
is being computed by another). Sequences join and leave the batch between steps. A prefill
chunk steps over the spans its sequence reads from another copy (splices).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvrt.runtime.engine.collector import KVCollector
from kvrt.runtime.engine.sequence import Sequence, Status
from kvrt.runtime.kv.block_table import next_chunk
from kvrt.runtime.kv.manager import KVManager
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
    def __init__(
        self, kv: KVManager, policy: Policy, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.kv = kv
        self.policy = policy
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens
        self.collector = KVCollector(kv, policy.reuse)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.preemptions = 0
        # Set by the engine when there is a host tier: starts uploading host blocks, True if
        # any are on their way.
        self.request_upload: Callable[[list[int]], bool] | None = None

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

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
        self.waiting.sort(key=self.policy.admission_key)
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if self.collector.hold(seq):  # its shared text is being computed by another
                continue
            chunk = self._admit(seq, budget)
            if chunk is None:
                break
            self.waiting.remove(seq)
            chunks.append(chunk)
            budget -= chunk.num_tokens
        return chunks

    def _make_room(self, seq: Sequence, num_tokens: int, scheduled: list[Chunk]) -> bool:
        """Grows seq's table, preempting others (never one already in this step's batch)."""
        while not self.kv.can_grow(seq.table, num_tokens):
            taken = {id(c.seq) for c in scheduled}
            candidates = [s for s in self.running if id(s) not in taken and s is not seq]
            victim = self.policy.victim(candidates) if candidates else seq
            self.preempt(victim)
            if victim is seq:
                return False
        self.kv.grow(seq.table, num_tokens)
        return True

    def _admit(self, seq: Sequence, budget: int) -> Chunk | None:
        match = self.kv.match_prefix(seq.token_ids, seq.request.salt)
        if self.request_upload is not None:
            host = self.kv.match_host(seq.token_ids, seq.request.salt, match)
            if host.arriving:
                return None  # its KV is on its way up: admitted once it has landed
            if host.block_ids:
                # Brought up only if it could then be admitted: uploaded blocks sit cached,
                # and the growth of the running would evict them again before it is.
                loaded = (match.num_blocks + len(host.block_ids)) * self.kv.block_size
                count = min(len(seq.token_ids) - loaded, budget)
                if not self.kv.can_admit(match, loaded + count):
                    return None
                if self.request_upload(host.block_ids):
                    return None
        computed = match.num_blocks * self.kv.block_size
        splices = self.collector.plan(seq, computed)
        end, count = next_chunk(splices, computed, budget, len(seq.token_ids))
        # Checked before adopting, so a refused admission leaves the cached blocks untouched
        # (their LRU order and their owners stay as they were).
        if not self.kv.can_admit(match, end, splices):
            self.collector.forget(seq)
            return None
        self.kv.adopt_prefix(seq.table, match)
        self.kv.splice(seq.table, splices)
        seq.num_computed = computed
        self.kv.grow(seq.table, end)
        if not seq.admitted_once:  # prefix-cache statistics count each request once
            seq.admitted_once = True
            reused = self.collector.count_admission(seq, splices)
            seq.num_cached = seq.num_computed + reused
            self.kv.record_query(seq.prompt_len, seq.num_cached)
        seq.status = Status.RUNNING
        self.running.append(seq)
        self.policy.on_admit(seq, self.kv)
        return Chunk(seq, count, end)

    def preempt(self, seq: Sequence) -> None:
        """Gives the sequence's blocks back; it is recomputed later (prompt and output so far)."""
        self.running.remove(seq)
        self.kv.free(seq.table)
        self.collector.forget(seq)
        seq.num_computed = 0
        self.preemptions += 1
        self.add(seq)

    def finish(self, seq: Sequence) -> None:
        """Removes a finished or aborted sequence wherever it is and frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.collector.on_finish(seq)
        self.kv.free(seq.table)
        seq.status = Status.FINISHED
