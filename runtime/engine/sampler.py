"""Next-token choice: greedy, or temperature with top-k and top-p, per request, after the
request's logit bias and penalties (runtime/engine/penalties.py)."""

from __future__ import annotations

import torch

from kvrt.runtime.engine.penalties import History, process_logits
from kvrt.runtime.engine.protocol import SamplingParams

# A temperature this small is greedy in effect, and dividing logits by it overflows to inf
# (then NaN probabilities): such requests are served greedily (vLLM does the same).
_GREEDY_BELOW = 1e-5


class Sampler:
    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def request_generator(self, params: SamplingParams, index: int = 0
                          ) -> torch.Generator | None:
        """A seeded request gets its own RNG, so its output does not depend on its batch; its
        choice `index` (of n) is seeded with seed + index, as vLLM seeds its choices: choice i
        of a request is choice 0 of the same request seeded seed + i."""
        if params.seed is None:
            return None
        # manual_seed takes any 64-bit pattern: wrap rather than overflow at the top.
        seed = (params.seed + index) % 2**64
        return torch.Generator(device=self.device).manual_seed(seed)

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        histories: list[History] | None = None,
    ) -> list[int]:
        """logits: float32 [N, vocab], one row per sequence. Returns one token id per row.
        `histories`: each row's tokens so far and prompt length, which penalties read (needed
        only where a row has some).

        The whole batch is filtered in a few tensor operations (on a GPU, one Python loop per
        row would cost more than the step): greedy rows take the argmax, the rows without a
        seed draw together from the sampler's generator, and each seeded row draws alone from
        its own, so that its output never depends on its batch-mates. One device sync, at the
        end."""
        logits = process_logits(logits, params, histories)
        tokens = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params)
                if not (p.temperature < _GREEDY_BELOW or p.top_k == 1)]
        if rows:
            probs = _filtered_probabilities(logits[rows], [params[i] for i in rows])
            shared = [j for j, i in enumerate(rows) if generators[i] is None]
            if shared:
                drawn = torch.multinomial(probs[shared], 1, generator=self.generator)
                tokens[[rows[j] for j in shared]] = drawn.squeeze(1)
            for j, i in enumerate(rows):
                generator = generators[i]
                if generator is not None:
                    tokens[i] = torch.multinomial(probs[j], 1, generator=generator)[0]
        return tokens.tolist()


def _filtered_probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Each row's distribution after its temperature, top-k (the k largest logits; ties at the
    k-th all stay) and top-p (the smallest prefix of the sorted tokens whose mass reaches
    top_p; the most likely token always stays), computed for every row at once."""
    rows, vocab = logits.shape
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)
    # Shifted by the row's largest first (the distribution is the same): a huge logit (a
    # repetition penalty near 0 pushes seen tokens to the dtype's max) over a small
    # temperature would overflow to inf, and inf - inf is a NaN probability.
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature.unsqueeze(1)
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p for p in params]
    if min(top_k) == vocab and min(top_p) >= 1.0:
        return logits.softmax(-1)
    ordered, order = logits.sort(dim=-1, descending=True)
    kth = ordered.gather(1, torch.tensor(top_k, device=device).unsqueeze(1) - 1)
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    mass = ordered.softmax(-1)
    before = mass.cumsum(-1) - mass  # the mass of the tokens ranked above each one
    # A top_p of 1 drops nothing, even where the rounded cumulative sum passes 1.
    keep_below = torch.tensor([q if q < 1.0 else float("inf") for q in top_p], device=device)
    drop = before >= keep_below.unsqueeze(1)
    # The most likely token stays whatever top_p is: a top_p that rounds to 0 in float32 (the
    # schema asks only > 0) would drop every token, and the draw would fail the whole batch.
    drop[:, 0] = False
    ordered = ordered.masked_fill(drop, float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter(1, order, ordered)
    return filtered.softmax(-1)
