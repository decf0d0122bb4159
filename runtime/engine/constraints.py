"""Constrained decoding: the grammar a request's output must follow, and the one place where
grammars meet the logits.

A request that asks for structured output (a JSON schema, a tool call) carries a compiled
`Grammar` in its SamplingParams; the server compiles it (runtime/server/grammars.py, llguidance)
off the event loop. The engine gives each such sequence its own `Matcher` when it is added, and
every step:

    logits [N, vocab] --Constraints.mask--> rows of constrained sequences: tokens the grammar
                                            forbids set to -inf (free rows untouched)
                      --Sampler.sample--->  tokens
    token accepted    --Matcher.accept-->   the grammar advances; `terminated` once it accepted
                                            a stop token (the request then finishes "stop")

A stop token (EOS) is allowed only where the grammar may end, so a constrained reply that stops
on its own is complete; a grammar that admits nothing more ends the request ("stop") without
waiting for the EOS. The mask is a packed bitmask (32 tokens per int32), filled by each matcher
in Rust and applied to the constrained rows in a few tensor operations: no Python loop over the
vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True, eq=False)
class Grammar:
    """A grammar compiled for one tokenizer. `compiled` is an llguidance LLMatcher in its
    initial state, never advanced: each sequence's matcher is a copy of it (cheap; building
    one parses the grammar). `vocab_size` is the width of the logits it was compiled for;
    `key` says what it was compiled from (for logs and tests)."""

    compiled: Any
    vocab_size: int
    key: str


class Matcher:
    """Where one sequence's output stands in its grammar. `ll` is llguidance's LLMatcher, for
    `Constraints` to fill the masks of a batch in one parallel call."""

    __slots__ = ("ll",)

    def __init__(self, grammar: Grammar) -> None:
        self.ll = grammar.compiled.deep_copy()

    def accept(self, token_id: int) -> bool:
        """Advances past `token_id`; False if the grammar forbids it (which the mask rules out
        for a sampled token): the matcher is then in error, and its mask allows nothing."""
        return bool(self.ll.consume_token(token_id))

    @property
    def terminated(self) -> bool:
        """The output is complete: the grammar took a stop token, or admits nothing more."""
        return bool(self.ll.is_stopped())


def grammar_mismatch(grammar: Grammar, vocab_size: int) -> str | None:
    """Why a model of `vocab_size` tokens cannot serve `grammar`, or None."""
    if grammar.vocab_size != vocab_size:
        return (f"the grammar was compiled for a vocabulary of {grammar.vocab_size} tokens; "
                f"the model has {vocab_size}")
    return None


class Constraints:
    """Applies the masks of a batch's constrained rows to its logits, in place."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._bitmask: torch.Tensor | None = None  # [rows, ceil(vocab / 32)] int32, grown
        self._executor: Any = None  # llguidance's thread pool, made on first use
        self._byte_masks: dict[torch.device, ByteMask] = {}

    def mask(self, logits: torch.Tensor, matchers: list[Matcher | None]) -> None:
        """logits: [N, vocab], row i for the sequence whose matcher is matchers[i] (None: a free
        row, left as it is)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        with torch.inference_mode():  # the executor's logits are inference tensors
            self._mask_rows(logits, matchers, rows)

    def _mask_rows(self, logits: torch.Tensor, matchers: list[Matcher | None],
                   rows: list[int]) -> None:
        from llguidance import LLExecutor
        from llguidance.torch import fill_next_token_bitmask_par

        if self._executor is None:
            self._executor = LLExecutor()
        bitmask = self._bitmask_for(len(rows))
        # The matchers compute their masks on llguidance's threads, the GIL released.
        fill_next_token_bitmask_par(
            self._executor, [(matchers[i].ll, j) for j, i in enumerate(rows)],  # type: ignore
            bitmask)
        byte_mask = self._byte_masks.get(logits.device)
        if byte_mask is None:
            byte_mask = self._byte_masks[logits.device] = ByteMask(logits.device)
        bias = byte_mask.biases(bitmask.to(logits.device, non_blocking=True), logits.shape[1])
        if len(rows) == len(matchers):
            logits.add_(bias)
        else:
            logits.index_add_(0, torch.tensor(rows, device=logits.device), bias)

    def _bitmask_for(self, rows: int) -> torch.Tensor:
        if self._bitmask is None or self._bitmask.shape[0] < rows:
            words = (self.vocab_size + 31) // 32
            self._bitmask = torch.zeros(max(rows, 16), words, dtype=torch.int32)
        return self._bitmask[:rows]


class ByteMask:
    """Packed bitmasks (bit t % 32 of word t // 32: token t allowed) as additive biases on one
    device: 0 where allowed, -inf where forbidden. Each byte of a bitmask (8 tokens: int32 words
    are little-endian on every device torch runs on) selects its row of a [256, 8] table: one
    lookup, ~5x faster on a CPU than unpacking the bits with shifts. Its buffers live between
    steps: fresh multi-megabyte tensors each step would cost page faults on a CPU."""

    def __init__(self, device: torch.device) -> None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        self.table = torch.where(bits.bool(), 0.0, float("-inf")).to(device)
        self._bytes = torch.empty(0, dtype=torch.int64, device=device)
        self._bias = torch.empty(0, 8, device=device)

    def biases(self, words: torch.Tensor, vocab: int) -> torch.Tensor:
        """words: [rows, ceil(vocab / 32)] int32 -> [rows, vocab] float32 (a view of a buffer
        that the next call overwrites)."""
        count = words.numel() * 4
        if self._bytes.numel() < count:
            self._bytes = torch.empty(count, dtype=torch.int64, device=self.table.device)
            self._bias = torch.empty(count, 8, device=self.table.device)
        index, bias = self._bytes[:count], self._bias[:count]
        index.copy_(words.contiguous().view(torch.uint8).view(-1))
        torch.index_select(self.table, 0, index, out=bias)
        return bias.view(words.shape[0], -1)[:, :vocab]
