"""The simulated executor: no model, no KV tensors; each step advances a simulated clock.

`SimExecutor` is an Executor (runtime/engine/executor.py): `run(chunks)` prices the step with the
cost model, advances the clock by that much, and returns logits whose argmax is a token id
drawn from a hash of each sampling sequence's last token and position: deterministic (the same
prompt gives the same output, so prefix caching behaves as with a real model), varied, cheap.
The ids are drawn from `choices`: the tokenizer's word tokens (words.py), so an output quoted
in a later prompt re-tokenizes to the ids it was sampled as, as a real model's text does.

It is also the KV's row operations (KVRows, runtime/kv/rows.py), as the real executor is, with
no rows to touch: each call is priced by the cost model (`rows_time`) and its time added to the
step being post-processed, the one whose forward computed what the call compares or moves:

    KVRows call             the real engine's work           priced as
    ----------------------  -------------------------------  ---------------------------
    change(rows, base, s)   the diff encode reads both rows  2n rows read
    copy(source, target)    a compaction moves n rows        n rows read + n rows written

`change` cannot say which rows changed most without KV: it ranks the rows in order, first
highest, so the diff encode keeps the first rows of each recomputed head (those right after the
reader's own context, whose attention to it differs most from the master's: CacheBlend's and
EPIC's observation). Only how many rows it keeps changes the memory it saves, and that is the
policy's `diff_keep`, as on the real engine.

The logits may be narrower than the vocabulary (`logit_width`): the sampler reads token ids as
column indices, so ids below the width are still valid ids, and the step's logits and argmax
cost width, not vocabulary, per row (a 152k vocabulary at 256 rows: ~65 ms a step on a laptop
core, more than the rest of a simulated step).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from kvrt.kernels.paged_attention import decode_reads
from kvrt.runtime.engine.scheduler import Chunk
from kvrt.runtime.sim.cost_model import CostModel, StepPart

_MASK = (1 << 64) - 1
_PEAK = 10.0  # the chosen token's logit; every other logit is 0


class SimClock:
    """Simulated seconds. Pass it (or its `now`) as the Engine's clock."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    __call__ = now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back ({seconds} s)")
        self._now += seconds


@dataclass(slots=True)
class SimTotals:
    steps: int = 0
    seconds: float = 0.0  # simulated time spent in steps
    tokens: int = 0  # new tokens computed (prefill and decode)
    sampled: int = 0  # sequences that sampled a token
    rows_compared: int = 0  # KVRows.change: rows compared with their base rows
    rows_copied: int = 0  # KVRows.copy: rows moved
    rows_seconds: float = 0.0  # the two's simulated time (in `seconds` too)


def step_parts(chunks: Iterable[Chunk]) -> list[StepPart]:
    """The cost model's view of a step, read before the engine advances `num_computed`."""
    return [
        StepPart(c.num_tokens, c.end, c.wants_logits) for c in chunks
    ]


def kv_rows_read(chunks: Sequence[Chunk]) -> int | None:
    """The KV rows a step reads on kvrt's torch path: when any sequence in the batch reads
    spliced rows, the decodes (one new token each) read the shared blocks once, whole, and
    each its other rows (`decode_reads`, the kernel's own rule); a prefill chunk reads its whole
    context. None when no table has spliced rows (every context is read, as priced by
    default)."""
    if all(c.seq.table.shifts is None for c in chunks):
        return None
    rows, blocks, shifts, readers = 0, [], [], []
    for index, chunk in enumerate(chunks):
        if chunk.num_tokens > 1:
            rows += chunk.end
            continue
        table = chunk.seq.table
        blocks.append(table.slots[:chunk.end] // table.block_size)
        shifts.append(torch.zeros(chunk.end, dtype=torch.int64) if table.shifts is None
                      else table.shifts[:chunk.end].long())
        readers.append(torch.full((chunk.end,), index, dtype=torch.int64))
    if not blocks:
        return rows
    reads = decode_reads(torch.cat(blocks), torch.cat(shifts), torch.cat(readers))
    private = int((~reads.shared).sum())
    shared = int(reads.shared_block.sum())
    return rows + private + shared * chunks[0].seq.table.block_size


class SimExecutor:
    def __init__(
        self,
        cost_model: CostModel,
        clock: SimClock | None,
        vocab_size: int,
        choices: Sequence[int],
        seed: int = 0,
        logit_width: int | None = None,
    ) -> None:
        """Sampled ids are drawn from `choices` (words.py's word tokens), each below
        `logit_width` (default: just above the largest). With no clock, a step only records
        its time (`last_step_seconds`): the caller lets it pass (the sim driver sleeps it on its
        virtual-time event loop, so requests arriving meanwhile are handled at their time)."""
        self.cost_model, self.clock = cost_model, clock
        self.vocab_size = vocab_size  # the tokenizer's
        if not choices:
            raise ValueError("no token id to sample")
        self.logit_width = logit_width or max(choices) + 1
        if min(choices) < 0 or max(choices) >= self.logit_width:
            raise ValueError(f"sampled ids must lie in [0, {self.logit_width})")
        self._choices = list(choices)
        self._seed = _mix(seed)
        self.totals = SimTotals()
        self.last_step_seconds = 0.0

    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Float32 logits [chunks that want them, logit_width], in chunk order."""
        parts = step_parts(chunks)
        read = kv_rows_read(chunks) if self.cost_model.device.shared_reads_once else None
        seconds = self.cost_model.step_time(parts, read)
        if self.clock is not None:
            self.clock.advance(seconds)
        self.last_step_seconds = seconds
        totals = self.totals
        totals.steps += 1
        totals.seconds += seconds
        totals.tokens += sum(p.new_tokens for p in parts)
        rows = [self._next_token(c) for c in chunks if c.wants_logits]
        totals.sampled += len(rows)
        logits = torch.zeros((len(rows), self.logit_width), dtype=torch.float32)
        if rows:
            logits[torch.arange(len(rows)), torch.tensor(rows)] = _PEAK
        return logits

    def change(self, rows: torch.Tensor, base: torch.Tensor, shift: int) -> torch.Tensor:
        """KVRows.change, priced: the rows in order, first highest (see the module)."""
        count = rows.numel()
        self.totals.rows_compared += count
        self._charge(self.cost_model.rows_time(2 * count))
        return -torch.arange(count, dtype=torch.float32)

    def copy(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """KVRows.copy, priced: nothing to move."""
        count = source.numel()
        self.totals.rows_copied += count
        self._charge(self.cost_model.rows_time(count, count))

    def _charge(self, seconds: float) -> None:
        """Adds `seconds` to the step being post-processed."""
        if self.clock is not None:
            self.clock.advance(seconds)
        self.last_step_seconds += seconds
        self.totals.seconds += seconds
        self.totals.rows_seconds += seconds

    def _next_token(self, chunk: Chunk) -> int:
        position = chunk.end - 1
        token = chunk.seq.token_ids[position]
        key = _mix(_mix(self._seed ^ token) ^ position)
        return self._choices[key % len(self._choices)]


def _mix(x: int) -> int:
    """splitmix64's finaliser: a stable integer hash (never Python's `hash()`)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)
