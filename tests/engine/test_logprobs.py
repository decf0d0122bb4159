"""Logprobs are the model's own distribution (log-softmax of its logits, before penalties and
temperature): checked against transformers' forward of the same checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvrt.runtime.engine.protocol import SamplingParams
from kvrt.runtime.model.tiny import init_tiny
from tests.engine.helpers import make_engine, request, run

PROMPT = [5, 9, 200, 31, 77, 9, 5, 140, 3, 60, 301, 12, 8, 8, 44, 101, 7, 250]  # > one block


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("tiny") / "llama", arch="llama", seed=3)


def _reference(tiny, tokens: list[int]) -> torch.Tensor:
    """transformers' log-softmax at every position of `tokens` (float32)."""
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("extra", [
    {},
    # Penalties and temperature change the draw, not the logprobs reported.
    {"repetition_penalty": 1.5, "frequency_penalty": 0.5, "temperature": 0.7, "seed": 4},
])
def test_logprobs_are_the_models_log_softmax(tiny, extra) -> None:
    settings = {"max_tokens": 10, "temperature": 0.0, "ignore_eos": True, "logprobs": 5, **extra}
    engine = make_engine(tiny)
    result = run(engine, [request("r", PROMPT, SamplingParams(**settings))])["r"]
    generated = result.token_ids
    reference = _reference(tiny, PROMPT + generated[:-1])
    entries = [lp for out in result.outputs for lp in out.logprobs]
    assert [e.token_id for e in entries] == generated
    for step, entry in enumerate(entries):
        row = reference[len(PROMPT) - 1 + step]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=1e-4)
        values, ids = row.topk(5)
        assert [t for t, _ in entry.top] == ids.tolist(), f"step {step}"
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
        if "temperature" not in extra:  # greedy: the sampled token is the most likely one
            assert entry.top[0] == (entry.token_id, pytest.approx(entry.logprob))


def test_no_logprobs_unless_asked_and_zero_top_gives_the_token_only(tiny) -> None:
    engine = make_engine(tiny)
    plain, zero = (run(engine, [request(name, PROMPT, SamplingParams(
        max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=k))])[name]
        for name, k in (("a", None), ("b", 0)))
    assert all(out.logprobs is None for out in plain.outputs)
    assert all(len(out.logprobs) == 1 and out.logprobs[0].top == () for out in zero.outputs)
    assert [out.logprobs[0].token_id for out in zero.outputs] == zero.token_ids
