"""init_tiny writes genuine, deterministic HF checkpoints with each architecture's features."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from kvrt.runtime.model.tiny import init_tiny

FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)


def test_same_seed_same_bytes(tmp_path, tiny_checkpoint_dir):
    first = tiny_checkpoint_dir("qwen2")
    second = init_tiny(tmp_path / "again", arch="qwen2", seed=0)
    for name in FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_other_seed_other_weights(tmp_path, tiny_checkpoint_dir):
    a = load_file(tiny_checkpoint_dir("llama") / "model.safetensors")
    b = load_file(init_tiny(tmp_path / "s1", arch="llama", seed=1) / "model.safetensors")
    assert not (a["model.embed_tokens.weight"] == b["model.embed_tokens.weight"]).all()


@pytest.mark.parametrize(
    ("arch", "tied", "has_bias", "has_qk_norm"),
    [("llama", True, False, False), ("qwen2", False, True, False), ("qwen3", False, False, True)],
)
def test_arch_features(tiny_checkpoint_dir, arch, tied, has_bias, has_qk_norm):
    folder = tiny_checkpoint_dir(arch)
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    assert config["model_type"] == arch and config["tie_word_embeddings"] is tied
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert ("lm_head.weight" in weights) is not tied
    assert ("model.layers.0.self_attn.q_proj.bias" in weights) is has_bias
    assert ("model.layers.0.self_attn.q_norm.weight" in weights) is has_qk_norm
    # Norms and biases are randomised: a swapped or dropped one must change the output.
    norm = weights["model.layers.0.input_layernorm.weight"]
    assert not (norm == 1).all()
    # Weights are spread wide enough for clear greedy margins.
    assert 0.25 < weights["model.layers.0.mlp.up_proj.weight"].std() < 0.35


def test_tokenizer_config(tiny_checkpoint_dir):
    folder = tiny_checkpoint_dir("llama")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and "<|im_start|>" in config["chat_template"]
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    assert 256 < len(vocab) + 3 <= 1000
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="arch must be one of"):
        init_tiny(tmp_path, arch="gpt2")
