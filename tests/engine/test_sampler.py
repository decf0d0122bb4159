"""The sampler: a vanishing temperature is greedy, not NaN probabilities (schemathesis found a
500 there)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


# Softmax of these logits, by hand: e^2, e^1, e^0.5, e^0, e^-1 = 7.389, 2.718, 1.649, 1.0, 0.368
# over 13.124: 0.563, 0.207, 0.126, 0.076, 0.028.
ROW = [2.0, 1.0, 0.5, 0.0, -1.0]


def _draws(params: list[SamplingParams], count: int) -> list[list[int]]:
    """`count` batched draws of a batch with one row per params (all rows ROW): per row, the
    tokens drawn."""
    sampler = Sampler(1, torch.device("cpu"))
    logits = torch.tensor([ROW] * len(params))
    out: list[list[int]] = [[] for _ in params]
    for _ in range(count):
        for row, token in enumerate(sampler.sample(logits, params, [None] * len(params))):
            out[row].append(token)
    return out


def test_each_row_of_a_batch_keeps_its_own_top_k_and_top_p() -> None:
    params = [
        SamplingParams(temperature=1.0, top_k=3),   # {0, 1, 2}
        SamplingParams(temperature=1.0, top_p=0.6),  # 0.563 < 0.6: {0, 1}
        SamplingParams(temperature=1.0, top_p=0.5),  # 0.563 reaches it alone: {0}
        SamplingParams(temperature=0.0),             # greedy: 0
        SamplingParams(temperature=1.0),             # everything
        SamplingParams(temperature=1.0, top_k=4, top_p=0.75),  # 0.563 + 0.207 = 0.770: {0, 1}
    ]
    draws = _draws(params, 1500)
    assert [set(d) for d in draws] == [{0, 1, 2}, {0, 1}, {0}, {0}, {0, 1, 2, 3, 4}, {0, 1}]
    # Frequencies follow the renormalised probabilities: top_k=3 keeps 0.563/0.896 = 0.628 on
    # token 0; top_p=0.6 keeps 0.563/0.770 = 0.731.
    assert abs(draws[0].count(0) / 1500 - 0.628) < 0.05
    assert abs(draws[1].count(0) / 1500 - 0.731) < 0.05
    assert abs(draws[4].count(4) / 1500 - 0.028) < 0.015


def test_tokens_tied_at_the_kth_logit_all_stay() -> None:
    sampler = Sampler(2, torch.device("cpu"))
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    drawn = {sampler.sample(logits, [SamplingParams(temperature=1.0, top_k=2)], [None])[0]
             for _ in range(300)}
    assert drawn == {0, 1, 2}


def test_a_seeded_row_draws_the_same_whatever_its_batch() -> None:
    sampler = Sampler(3, torch.device("cpu"))
    seeded = SamplingParams(temperature=1.0, seed=11)
    logits = torch.tensor([ROW] * 4)

    def tokens_of(batch: list[SamplingParams], row: int) -> list[int]:
        generators = [sampler.request_generator(p) for p in batch]
        return [sampler.sample(logits[: len(batch)], batch, generators)[row] for _ in range(30)]

    alone = tokens_of([seeded], 0)
    among = tokens_of([SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=2),
                       SamplingParams(temperature=0.0), seeded], 3)
    assert alone == among and len(set(alone)) > 1


def test_a_top_p_that_rounds_to_zero_keeps_the_most_likely_token_and_its_batch_mates() -> None:
    sampler = Sampler(4, torch.device("cpu"))
    logits = torch.tensor([ROW, ROW])
    params = [SamplingParams(temperature=1.0, top_p=1e-50), SamplingParams(temperature=1.0)]
    drawn = [sampler.sample(logits, params, [None, None]) for _ in range(200)]
    assert {first for first, _ in drawn} == {0}  # only the most likely token is left
    assert len({second for _, second in drawn}) > 1  # the batch-mate still draws freely


# Every value the API's schema admits (sdk/protocol/openai_api.py): temperature in [0, 2],
# top_p in (0, 1], top_k >= 0 once -1 is mapped to 0, any int64 seed.
_PARAMS = st.builds(
    SamplingParams,
    temperature=st.one_of(st.floats(0, 2), st.sampled_from([0.0, 5e-324, 1e-5, 2.0])),
    top_p=st.one_of(st.floats(5e-324, 1.0, exclude_min=False), st.sampled_from([1e-50, 1.0])),
    top_k=st.integers(0, 12),
    seed=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
)
_LOGIT = st.one_of(st.floats(-30, 30), st.sampled_from([0.0, 1e4, -1e4, 88.0, -88.0]))


@settings(max_examples=150, deadline=None)
@given(batch=st.lists(_PARAMS, min_size=1, max_size=6), data=st.data())
def test_no_sampling_parameter_fails_its_row_or_its_batch_mates(batch, data) -> None:
    vocab = 9
    rows = [data.draw(st.lists(_LOGIT, min_size=vocab, max_size=vocab)) for _ in batch]
    logits = torch.tensor(rows, dtype=torch.float32)
    sampler = Sampler(0, torch.device("cpu"))
    tokens = sampler.sample(logits, batch, [sampler.request_generator(p) for p in batch])
    assert len(tokens) == len(batch) and all(0 <= t < vocab for t in tokens)
    for row, (p, token) in enumerate(zip(batch, tokens)):
        if p.temperature < 1e-5 or p.top_k == 1:
            assert token == int(logits[row].argmax())
        elif 0 < p.top_k < vocab:  # among the k largest (ties at the k-th included)
            assert logits[row, token] >= logits[row].topk(p.top_k).values[-1]
