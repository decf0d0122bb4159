"""Runs a step's batch: `Executor` is what the engine needs of it; `ModelExecutor` builds one
step's `ForwardBatch` from the scheduled chunks and runs the model on it, and owns the KV pool
tensor (so it also does the KV's row operations, runtime/kv/rows.py). The simulator's executor
(runtime/sim/executor.py) prices a step instead of running it."""

from __future__ import annotations

from typing import Protocol

import torch
from torch.nn.utils.rnn import pad_sequence

from kvrt.runtime.engine.scheduler import Chunk
from kvrt.runtime.model.llama import ForwardBatch, LlamaModel


class Executor(Protocol):
    vocab_size: int

    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Float32 logits, one row per chunk that wants them, in chunk order (the row may be
        narrower than the vocabulary: a token id is its column)."""
        ...


class ModelExecutor:
    def __init__(self, model: LlamaModel, kv_pool: torch.Tensor) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.device = kv_pool.device
        self.vocab_size = model.config.vocab_size

    def build_batch(self, chunks: list[Chunk]) -> ForwardBatch:
        """One step's batch. Each table's slots come from its device mirror (only what changed
        since the last step is copied up), so the host work is O(new positions), not O(context)."""
        to = self.device
        tokens: list[int] = []
        positions, store_slots, kv_slots, kv_shifts = [], [], [], []
        kv_lens, q_starts, logit_rows = [], [0], []
        gapped = False  # a chunk steps over spliced positions: queries carry their positions
        for chunk in chunks:
            seq = chunk.seq
            table_slots, table_shifts = seq.table.on_device(to)
            runs = seq.table.own_positions(seq.num_computed, chunk.end)
            gapped |= len(runs) > 1
            for a, b in runs:
                tokens.extend(seq.token_ids[a:b])
                positions.append(torch.arange(a, b, dtype=torch.int64))
                store_slots.append(table_slots[a:b])
            end = runs[-1][1]  # the last computed position's successor: what it sees
            kv_slots.append(table_slots[:end])
            kv_shifts.append(None if table_shifts is None else table_shifts[:end])
            kv_lens.append(end)
            q_starts.append(q_starts[-1] + chunk.num_tokens)
            if chunk.wants_logits:
                logit_rows.append(q_starts[-1] - 1)
        shifts = None
        if any(s is not None for s in kv_shifts):
            shifts = pad_sequence(
                [torch.zeros(len(k), dtype=torch.int32, device=to) if s is None else s
                 for s, k in zip(kv_shifts, kv_slots)], batch_first=True)
        all_positions = torch.cat(positions).to(to)
        return ForwardBatch(
            token_ids=torch.tensor(tokens, dtype=torch.int64, device=to),
            positions=all_positions,
            store_slots=torch.cat(store_slots),
            kv_slots=pad_sequence(kv_slots, batch_first=True),
            kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=to),
            q_starts=torch.tensor(q_starts, dtype=torch.int32, device=to),
            logit_rows=torch.tensor(logit_rows, dtype=torch.int64, device=to),
            kv_shifts=shifts,
            q_positions=all_positions if gapped else None,
        )

    def copy(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """KVRows.copy: rows of every layer within the pool."""
        block_size = self.kv_pool.shape[3]
        source, target = source.to(self.device), target.to(self.device)
        rows = self.kv_pool[source // block_size, :, :, source % block_size]  # [n, L, 2, H, D]
        self.kv_pool[target // block_size, :, :, target % block_size] = rows

    def change(self, rows: torch.Tensor, base: torch.Tensor, shift: int) -> torch.Tensor:
        """KVRows.change (kernels/row_change.py)."""
        shifts = torch.full((rows.numel(),), shift, dtype=torch.int32, device=self.device)
        return self.model.kernels.row_change(
            self.kv_pool, rows.to(self.device), base.to(self.device), shifts,
            self.model.rotary.inv_freq).cpu()

    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        return self.model.forward(self.build_batch(chunks), self.kv_pool)
