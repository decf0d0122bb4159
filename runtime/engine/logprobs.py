"""The logprobs a request asks for (`SamplingParams.logprobs`): the sampled token's and the k
most likely tokens', from the log-softmax of the logits the sampler is given, before bias,
penalties, temperature, top-k and top-p (vLLM's default, "raw" logprobs): what the model thinks,
whichever way the token was then drawn. A request under a grammar (engine/constraints.py) is
masked before the sampler, so its logprobs are of the masked distribution, the tokens it could
draw (as vLLM's are under structured output). Computed for the rows that ask, in one pass, with one
device sync."""

from __future__ import annotations

import torch

from kvrt.runtime.engine.protocol import SamplingParams, TokenLogprobs

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs; the server refuses more


def token_logprobs(logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]
                   ) -> list[TokenLogprobs | None]:
    """One entry per row: None where the row asks for no logprobs."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(params)
    if not rows:
        return out
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)
    chosen_ids = torch.tensor([tokens[i] for i in rows], device=logits.device)
    chosen = logprobs.gather(1, chosen_ids.unsqueeze(1)).squeeze(1).tolist()
    k = min(max(params[i].logprobs or 0 for i in rows), logprobs.shape[1])
    top_values, top_ids = (logprobs.topk(k, dim=-1) if k else (None, None))
    values = top_values.tolist() if top_values is not None else None
    ids = top_ids.tolist() if top_ids is not None else None
    for j, i in enumerate(rows):
        want = params[i].logprobs or 0
        top = () if values is None or ids is None else tuple(zip(ids[j][:want], values[j][:want]))
        out[i] = TokenLogprobs(tokens[i], chosen[j], top)
    return out
