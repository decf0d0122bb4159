"""Builds one step's `ForwardBatch` from the scheduled chunks and runs the model on it."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from kvrt.runtime.engine.scheduler import Chunk
from kvrt.runtime.model.llama import ForwardBatch, LlamaModel


class Executor:
    def __init__(self, model: LlamaModel, kv_pool: torch.Tensor) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.device = kv_pool.device

    def build_batch(self, chunks: list[Chunk]) -> ForwardBatch:
        tokens: list[int] = []
        positions, store_slots, kv_slots = [], [], []
        kv_lens, q_starts, logit_rows = [], [0], []
        for chunk in chunks:
            seq, start = chunk.seq, chunk.seq.num_computed
            end = start + chunk.num_tokens
            tokens.extend(seq.token_ids[start:end])
            positions.append(torch.arange(start, end, dtype=torch.int64))
            store_slots.append(seq.table.slots[start:end])
            kv_slots.append(seq.table.slots[:end])
            kv_lens.append(end)
            q_starts.append(q_starts[-1] + chunk.num_tokens)
            if chunk.wants_logits:
                logit_rows.append(q_starts[-1] - 1)
        to = self.device
        return ForwardBatch(
            token_ids=torch.tensor(tokens, dtype=torch.int64, device=to),
            positions=torch.cat(positions).to(to),
            store_slots=torch.cat(store_slots).to(to),
            kv_slots=pad_sequence(kv_slots, batch_first=True).to(to),
            kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=to),
            q_starts=torch.tensor(q_starts, dtype=torch.int32, device=to),
            logit_rows=torch.tensor(logit_rows, dtype=torch.int64, device=to),
        )

    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Float32 logits, one row per chunk that wants them, in chunk order."""
        return self.model.forward(self.build_batch(chunks), self.kv_pool)
