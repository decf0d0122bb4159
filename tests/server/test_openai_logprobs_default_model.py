"""Logprobs of the real default model (SmolLM2-135M-Instruct) through the daemon and the openai
client, against transformers' float32 forward of the same GGUF file."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import torch

from kvrt.runtime.config import EngineConfig
from tests.server.live_server import LiveServer, live_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm() -> Iterator[LiveServer]:
    config = EngineConfig(model=None, kv_cache_memory=64 * 1024**2, max_model_len=2048)
    yield from live_server(None, config, served_model_name=None)


def test_greedy_logprobs_match_transformers(smollm: LiveServer, default_model_path) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = smollm.engine.tokenizer
    prompt = tokenizer.encode("The capital of France is")
    client = openai.OpenAI(base_url=smollm.url + "/v1", api_key="unused", max_retries=0)
    reply = client.completions.create(model=smollm.engine.model_name, prompt=prompt,
                                      max_tokens=8, temperature=0, logprobs=5,
                                      extra_body={"ignore_eos": True})
    logprobs = reply.choices[0].logprobs
    model = AutoModelForCausalLM.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        tokens = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0].tolist()
        reference = torch.log_softmax(model(torch.tensor([tokens[:-1]])).logits[0], dim=-1)
    generated = tokens[len(prompt):]
    assert logprobs.tokens == [tokenizer.decode([t], skip_special_tokens=False)
                               for t in generated]
    for step, token in enumerate(generated):
        row = reference[len(prompt) - 1 + step]
        assert logprobs.token_logprobs[step] == pytest.approx(row[token].item(), abs=5e-3)
        values, ids = row.topk(5)
        top = logprobs.top_logprobs[step]
        for token_id, value in zip(ids.tolist(), values.tolist()):
            name = tokenizer.decode([token_id], skip_special_tokens=False)
            assert top[name] == pytest.approx(value, abs=5e-3) or top[name] > value
