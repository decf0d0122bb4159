"""Penalties and logit_bias: against values worked out by hand, against transformers'
RepetitionPenaltyLogitsProcessor, and end to end against transformers' greedy generate with a
repetition penalty."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from kvrt.runtime.engine.penalties import process_logits
from kvrt.runtime.engine.protocol import SamplingParams
from kvrt.runtime.engine.sampler import Sampler
from kvrt.runtime.model.tiny import init_tiny
from tests.engine.helpers import make_engine, request, run

ROW = [2.0, -1.0, 0.5, 0.0, 3.0]
# Prompt [0, 1], generated [2, 2, 4].
HISTORY = ([0, 1, 2, 2, 4], 2)


def test_each_penalty_as_worked_out_by_hand() -> None:
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),  # none: left alone
        SamplingParams(frequency_penalty=1.0),  # the output only: prompt tokens 0, 1 untouched
        SamplingParams(logit_bias=((3, 5.0), (1, -100.0))),
        SamplingParams(repetition_penalty=0.5),  # < 1 encourages
    ]
    logits = torch.tensor([ROW] * len(params))
    out = process_logits(logits, params, [HISTORY] * len(params))
    expected = [
        # repetition: seen 0, 1, 2, 4 -> 2/2, -1*2, 0.5/2, 3/2; then frequency (2 twice, 4
        # once) and presence (2 and 4): 0.25 - 1.0 - 0.25, 1.5 - 0.5 - 0.25.
        [1.0, -2.0, -1.0, 0.0, 0.75],
        ROW,
        [2.0, -1.0, 0.5 - 2.0, 0.0, 3.0 - 1.0],
        [2.0, -101.0, 0.5, 5.0, 3.0],
        [4.0, -0.5, 1.0, 0.0, 6.0],
    ]
    assert torch.allclose(out, torch.tensor(expected))
    assert torch.equal(logits, torch.tensor([ROW] * len(params)))  # the input is not changed
    # The draw follows the processed logits: greedy row 0 now picks 0, not 4.
    greedy = [SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5,
                             presence_penalty=0.25), SamplingParams(temperature=0.0)]
    sampler = Sampler(0, torch.device("cpu"))
    assert sampler.sample(torch.tensor([ROW, ROW]), greedy, [None, None],
                          [HISTORY, HISTORY]) == [0, 4]


def test_no_penalty_costs_nothing() -> None:
    logits = torch.tensor([ROW])
    assert process_logits(logits, [SamplingParams()], None) is logits


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 64, generator=generator) * 3
    ids = torch.randint(0, 64, (4, 12), generator=generator)
    reference = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    params = [SamplingParams(repetition_penalty=penalty)] * 4
    # Where the prompt ends does not matter to it: prompt and output both count.
    histories = [(row.tolist(), split) for row, split in zip(ids, [0, 3, 12, 7])]
    assert torch.allclose(process_logits(logits, params, histories), reference)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("tiny") / "llama", arch="llama", seed=2)


def test_greedy_with_a_repetition_penalty_matches_transformers_generate(tiny) -> None:
    prompt = [5, 9, 200, 31, 77, 9, 5, 140, 3, 60]
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                   repetition_penalty=1.8, eos_token_id=None, pad_token_id=0)
    expected = generated[0, len(prompt):].tolist()
    engine = make_engine(tiny)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                            repetition_penalty=1.8)
    got = run(engine, [request("r", prompt, params)])["r"].token_ids
    plain = run(engine, [request("p", prompt, SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True))])["p"].token_ids
    assert got == expected
    assert got != plain  # the penalty changed the answer: the test could fail


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.01])
def test_the_smallest_repetition_penalty_the_schema_admits_samples_a_seen_token(
        temperature: float) -> None:
    # The schema takes any penalty > 0: 1e-300 is 0 in float32, and a positive logit divided by
    # it was inf (then NaN probabilities, a failed step); a masked -inf times it was NaN.
    params = [SamplingParams(repetition_penalty=1e-300, temperature=temperature, seed=1)]
    logits = torch.tensor([[*ROW, float("-inf")]])  # the last token masked by a grammar
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    history = ([0, 1, 2, 2, 4, 5], 2)
    for _ in range(5):
        token, = sampler.sample(logits, params, [sampler.request_generator(params[0])],
                                [history])
        assert token in (0, 2, 4)  # seen, with a positive logit: pushed to the top
