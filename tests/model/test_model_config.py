"""ModelConfig from both spellings of a config.json, and back (the GGUF cache writes one)."""

from __future__ import annotations

import pytest

from kvrt.runtime.model.config import ModelConfig, ModelConfigError, RopeConfig
from kvrt.runtime.model.gguf_loader import hf_config_dict

BASE = {
    "model_type": "llama",
    "vocab_size": 1000,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "eos_token_id": [7, 9],
    "bos_token_id": 1,
}


def test_rope_theta_spellings_agree():
    old = ModelConfig.from_hf_dict({**BASE, "rope_theta": 500000.0})
    new = ModelConfig.from_hf_dict(
        {**BASE, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}
    )
    assert old == new
    assert old.rope == RopeConfig(theta=500000.0)
    assert (old.head_dim, old.num_kv_heads, old.eos_token_ids) == (16, 2, (7, 9))


def test_llama3_scaling_spellings_agree():
    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    old = ModelConfig.from_hf_dict({**BASE, "rope_theta": 500000.0, "rope_scaling": scaling})
    new = ModelConfig.from_hf_dict({**BASE, "rope_parameters": {**scaling, "rope_theta": 500000.0}})
    assert old == new
    assert (old.rope.kind, old.rope.factor, old.rope.theta) == ("llama3", 32.0, 500000.0)


def test_unsupported_rope_type():
    with pytest.raises(ModelConfigError, match="yarn"):
        ModelConfig.from_hf_dict({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"model_type": "qwen2", "tie_word_embeddings": False},
        {"model_type": "qwen3", "head_dim": 32, "tie_word_embeddings": True},
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 1e6},
        {"eos_token_id": 3, "bos_token_id": None},
    ],
)
def test_hf_config_dict_round_trips(changes):
    config = ModelConfig.from_hf_dict({**BASE, **changes})
    assert ModelConfig.from_hf_dict(hf_config_dict(config)) == config
