"""Model shapes: parameter counts and KV bytes against the published figures."""

import json

import pytest

from kvrt.runtime.model.config import ModelConfig
from kvrt.runtime.sim.model_shapes import (
    LLAMA31_8B,
    QWEN25_7B,
    QWEN25_14B,
    SMOLLM2_135M,
    get_shape,
    kv_bytes_per_token,
    layer_parameters,
    parameter_count,
    shape_names,
    weight_bytes,
)


@pytest.mark.parametrize(
    ("shape", "published", "non_embedding"),
    [
        (QWEN25_7B, 7.61e9, 6.53e9),  # Qwen2.5 model card: 7.61B, 6.53B non-embedding
        (LLAMA31_8B, 8.03e9, None),  # Llama 3.1 model card: 8B (8.03B in the safetensors index)
        (QWEN25_14B, 14.7e9, 13.1e9),  # Qwen2.5 model card: 14.7B, 13.1B non-embedding
        (SMOLLM2_135M, 134.5e6, None),  # FACTS.md, counted on the GGUF
    ],
)
def test_parameter_counts_match_the_published_sizes(shape, published, non_embedding):
    assert parameter_count(shape) == pytest.approx(published, rel=0.01)
    if non_embedding is not None:
        assert layer_parameters(shape) == pytest.approx(non_embedding, rel=0.01)


def test_llama_8b_exactly():
    # 32 layers x (q 4096^2 + k, v 4096x1024 + o 4096^2 + mlp 3x4096x14336 + 2 norms of 4096)
    # + embeddings and LM head of 128256 x 4096 + final norm.
    layer = 2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert parameter_count(LLAMA31_8B) == 32 * layer + 2 * 128256 * 4096 + 4096 == 8_030_261_248
    assert weight_bytes(LLAMA31_8B) == 2 * 8_030_261_248


def test_kv_bytes_per_token_in_bf16():
    assert kv_bytes_per_token(LLAMA31_8B) == 2 * 32 * 8 * 128 * 2 == 131072
    assert kv_bytes_per_token(QWEN25_7B) == 2 * 28 * 4 * 128 * 2 == 57344
    assert kv_bytes_per_token(QWEN25_14B) == 2 * 48 * 8 * 128 * 2 == 196608
    assert kv_bytes_per_token(SMOLLM2_135M, dtype_bytes=4) == 2 * 30 * 3 * 64 * 4


def test_registry():
    assert shape_names() == ["qwen2.5-7b", "llama-3.1-8b", "qwen2.5-14b", "smollm2-135m"]
    assert get_shape("Llama-3.1-8B") is LLAMA31_8B
    with pytest.raises(KeyError, match="known"):
        get_shape("gpt-5")


def test_smollm2_shape_is_the_real_checkpoints(default_model_path):
    from kvrt.runtime.model.gguf_loader import cache_folder

    config_file = cache_folder(default_model_path) / "config.json"
    if not config_file.is_file():
        pytest.skip("the default model has not been converted in this cache folder yet")
    assert ModelConfig.from_hf_dict(json.loads(config_file.read_text())) == SMOLLM2_135M
