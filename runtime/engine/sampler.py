"""Next-token choice: greedy, or temperature with top-k and top-p, per request."""

from __future__ import annotations

import torch

from kvrt.runtime.engine.protocol import SamplingParams

# A temperature this small is greedy in effect, and dividing logits by it overflows to inf
# (then NaN probabilities): such requests are served greedily (vLLM does the same).
_GREEDY_BELOW = 1e-5


class Sampler:
    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def request_generator(self, params: SamplingParams) -> torch.Generator | None:
        """A seeded request gets its own RNG, so its output does not depend on its batch."""
        if params.seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(params.seed)

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> list[int]:
        """logits: float32 [N, vocab], one row per sequence. Returns one token id per row."""
        greedy = logits.argmax(dim=-1).tolist()
        tokens = []
        for row, (p, generator) in enumerate(zip(params, generators)):
            if p.temperature < _GREEDY_BELOW or p.top_k == 1:
                tokens.append(greedy[row])
            else:
                tokens.append(self._draw(logits[row], p, generator or self.generator))
        return tokens

    def _draw(self, logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
        logits = logits / p.temperature
        if 0 < p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = cumulative - sorted_logits.softmax(-1) >= p.top_p
            logits = logits.scatter(0, order[drop], float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=generator).item())
