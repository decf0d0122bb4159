"""What a request asks done to its logits before the draw: `logit_bias`, then the repetition
penalty, then the frequency and presence penalties (vLLM's order), for a batch at once.

    field               over                  each token seen
    ------------------  --------------------  ------------------------------------------------
    logit_bias          (every step)          logit += bias (OpenAI's; a token id's bias)
    repetition_penalty  prompt and output     logit / p where logit > 0, else logit * p (HF)
    frequency_penalty   output only           logit -= f * (times generated)  (OpenAI)
    presence_penalty    output only           logit -= p * (generated at all)  (OpenAI)

Rows that ask for none of these are left alone, and a batch where none does costs nothing.
Counting a row's tokens is one scatter over its history, all rows together: no Python loop over
the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvrt.runtime.engine.protocol import SamplingParams

# (token ids so far, prompt length): what a row's penalties read of its sequence.
History = tuple[Sequence[int], int]


def is_processed(params: SamplingParams) -> bool:
    return bool(params.logit_bias or params.repetition_penalty != 1.0
                or params.presence_penalty or params.frequency_penalty)


def process_logits(logits: torch.Tensor, params: list[SamplingParams],
                   histories: list[History] | None) -> torch.Tensor:
    """The batch's logits (float [N, V]) with each row's bias and penalties applied; a new
    tensor where any row has some, else `logits` itself."""
    rows = [i for i, p in enumerate(params) if is_processed(p)]
    if not rows:
        return logits
    assert histories is not None, "penalties need each row's tokens"
    logits = logits.clone()
    picked = [params[i] for i in rows]
    part = _add_bias(logits[rows], picked)
    if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
           for p in picked):
        prompt_seen, output_counts = _token_counts(part.shape, [histories[i] for i in rows],
                                                   part.device)
        part = _penalize(part, picked, prompt_seen, output_counts)
    logits[rows] = part
    return logits


def _add_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    entries = [(row, token, bias) for row, p in enumerate(params) for token, bias in p.logit_bias
               if token < logits.shape[1]]
    if not entries:
        return logits
    rows, tokens, biases = zip(*entries)
    index = (torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device))
    return logits.index_put(index, torch.tensor(biases, dtype=logits.dtype, device=logits.device),
                            accumulate=True)


def _token_counts(shape: torch.Size, histories: list[History], device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: whether each token occurs in its prompt (bool [N, V]), and how many times it
    was generated (float [N, V]). One extra column takes ids past the logits' width."""
    rows, width = shape
    prompt_rows, prompt_ids, output_rows, output_ids = [], [], [], []
    for row, (token_ids, prompt_len) in enumerate(histories):
        prompt_rows += [row] * prompt_len
        prompt_ids += token_ids[:prompt_len]
        output_rows += [row] * (len(token_ids) - prompt_len)
        output_ids += token_ids[prompt_len:]

    def counts(row_list: list[int], id_list: list[int]) -> torch.Tensor:
        table = torch.zeros(rows, width + 1, device=device)
        ids = torch.tensor(id_list, dtype=torch.int64, device=device).clamp_(max=width)
        index = (torch.tensor(row_list, dtype=torch.int64, device=device), ids)
        table.index_put_(index, torch.ones(len(id_list), device=device), accumulate=True)
        return table[:, :width]

    return counts(prompt_rows, prompt_ids) > 0, counts(output_rows, output_ids)


def _penalize(logits: torch.Tensor, params: list[SamplingParams], prompt_seen: torch.Tensor,
              output_counts: torch.Tensor) -> torch.Tensor:
    device, dtype = logits.device, logits.dtype

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)

    # The schema admits any penalty > 0: one that is 0 in this dtype would make a masked -inf
    # NaN, and a positive logit divided by a tiny one inf (NaN probabilities, a failed step).
    limits = torch.finfo(dtype)
    repetition = column([p.repetition_penalty for p in params]).clamp_min(limits.tiny)
    seen = prompt_seen | (output_counts > 0)
    repeated = torch.where(logits > 0, (logits / repetition).clamp_max(limits.max),
                           logits * repetition)
    logits = torch.where(seen, repeated, logits)
    frequency = column([p.frequency_penalty for p in params])
    presence = column([p.presence_penalty for p in params])
    return logits - frequency * output_counts - presence * (output_counts > 0).to(dtype)
