"""The real default model (SmolLM2-135M-Instruct) behind the daemon, through the openai client:
the one test that shows the served text is actual language, not just well-formed JSON."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from kvrt.runtime.config import EngineConfig
from tests.server.live_server import LiveServer, live_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm() -> Iterator[LiveServer]:
    config = EngineConfig(model=None, kv_cache_memory=64 * 1024**2, max_model_len=2048)
    yield from live_server(None, config, served_model_name=None)


def test_default_model_answers_a_question(smollm: LiveServer) -> None:
    client = openai.OpenAI(base_url=smollm.url + "/v1", api_key="unused", max_retries=0)
    [model] = client.models.list()
    assert model.id == "SmolLM2-135M-Instruct"
    chat = client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0)
    assert "Paris" in chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length")
