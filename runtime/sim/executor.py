"""The simulated executor: no model, no KV tensors; each step advances a simulated clock.

`SimExecutor` is an Executor (runtime/engine/executor.py): `run(chunks)` prices the step with the
cost model, advances the clock by that much, and returns logits whose argmax is a token id
drawn from a hash of each sampling sequence's last token and position: deterministic (the same
prompt gives the same output, so prefix caching behaves as with a real model), varied, cheap.

The logits may be narrower than the vocabulary (`logit_width`): the sampler reads token ids as
column indices, so ids below the width are still valid ids, and the step's logits and argmax
cost width, not vocabulary, per row (a 152k vocabulary at 256 rows: ~65 ms a step on a laptop
core, more than the rest of a simulated step).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

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


def step_parts(chunks: Iterable[Chunk]) -> list[StepPart]:
    """The cost model's view of a step, read before the engine advances `num_computed`."""
    return [
        StepPart(c.num_tokens, c.end, c.wants_logits) for c in chunks
    ]


class SimExecutor:
    def __init__(
        self,
        cost_model: CostModel,
        clock: SimClock | None,
        vocab_size: int,
        exclude_token_ids: Iterable[int] = (),
        seed: int = 0,
        logit_width: int | None = None,
    ) -> None:
        """Sampled ids are drawn from [0, logit_width) (default: the whole vocabulary), never
        from `exclude_token_ids`. With no clock, a step only records its time
        (`last_step_seconds`): the caller lets it pass (the sim driver sleeps it on its
        virtual-time event loop, so requests arriving meanwhile are handled at their time)."""
        self.cost_model, self.clock = cost_model, clock
        self.vocab_size = vocab_size  # the tokenizer's
        self.logit_width = min(logit_width or vocab_size, vocab_size)
        excluded = set(exclude_token_ids)
        self._choices = [t for t in range(self.logit_width) if t not in excluded]
        if not self._choices:
            raise ValueError("every token id is excluded; nothing could be sampled")
        self._seed = _mix(seed)
        self.totals = SimTotals()
        self.last_step_seconds = 0.0

    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Float32 logits [chunks that want them, logit_width], in chunk order."""
        parts = step_parts(chunks)
        seconds = self.cost_model.step_time(parts)
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
