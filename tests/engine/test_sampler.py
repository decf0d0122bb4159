"""The sampler: a vanishing temperature is greedy, not NaN probabilities (schemathesis found a
500 there)."""

from __future__ import annotations

import torch

from kvrt.runtime.engine.protocol import SamplingParams
from kvrt.runtime.engine.sampler import Sampler


def test_a_vanishing_temperature_samples_greedily() -> None:
    sampler = Sampler(0, torch.device("cpu"))
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9], [1.0, 0.0, 4.0, 3.5]])
    for temperature in (1e-30, 5e-324, 1e-6):
        tokens = sampler.sample(logits, [SamplingParams(temperature=temperature)] * 2,
                                [None, None])
        assert tokens == [1, 2], temperature
    # A real temperature still draws: over many draws, the second-best token comes up too.
    drawn = {sampler.sample(logits[:1], [SamplingParams(temperature=1.0)], [None])[0]
             for _ in range(200)}
    assert {1, 3} <= drawn
