"""GGUF loading: metadata -> config, dequantized weights against transformers' own GGUF loader
(the independent reference), llama.cpp's Q/K permutation per architecture, the conversion cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter, TokenType

from kvrt.runtime.model.checkpoint import CheckpointError, load_checkpoint
from kvrt.runtime.model.config import ModelConfig
from kvrt.runtime.model.gguf_loader import cache_folder, hf_tensor_name, load_gguf
from kvrt.runtime.model.tiny import ARCHS

# HF name -> GGUF name, the inverse of the loader's table, written out independently.
_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


@pytest.fixture(scope="module")
def reference_state_dict(default_model_path) -> dict[str, torch.Tensor]:
    """transformers' float32 model from the same GGUF file (~10 s: loaded once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name, dtype=torch.float32
    )
    return model.state_dict()


def test_default_model_config(default_checkpoint):
    # Read from GGUF metadata on a cold cache, from the converted config.json on a warm one;
    # both must give these values (the tiny-GGUF tests cover gguf_config on its own).
    config = default_checkpoint.config
    assert (config.arch, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert (config.intermediate_size, config.vocab_size, config.max_position) == (1536, 49152, 8192)
    assert config.rope.theta == 100000.0 and config.rope.kind == "default"
    assert config.rms_eps == 1e-5
    assert config.tie_embeddings and not config.attention_bias and not config.qk_norm
    assert (config.eos_token_ids, config.bos_token_id) == ((2,), 1)


def test_default_model_weights_equal_transformers(default_checkpoint, reference_state_dict):
    weights = default_checkpoint.weights
    assert "lm_head.weight" not in weights  # tied; transformers' lm_head is the embedding
    assert set(weights) == set(reference_state_dict) - {"lm_head.weight"}
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in (0, 1, 17, 29):
        p = f"model.layers.{i}."
        names += [f"{p}self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        names += [f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"]
    for name in names:
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name], reference_state_dict[name]), name


def test_default_checkpoint_identity(default_checkpoint, default_model_path):
    assert default_checkpoint.name == "SmolLM2-135M-Instruct"
    assert default_checkpoint.source == str(default_model_path)
    assert default_checkpoint.tokenizer.eos_token_ids == frozenset({2})


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_gguf_loads_back_to_hf_weights(tmp_path, monkeypatch, tiny_checkpoint_dir, arch):
    """A GGUF written the way llama.cpp's converter writes it (Q/K rows permuted for llama
    only) loads back to exactly the HF checkpoint it came from."""
    from safetensors.torch import load_file

    monkeypatch.setenv("KVRT_CACHE_DIR", str(tmp_path / "cache"))
    folder = tiny_checkpoint_dir(arch)
    ours = load_gguf(_write_gguf(folder, tmp_path / f"tiny-{arch}.gguf"))
    assert ours.config == ModelConfig.from_hf_dict(json.loads((folder / "config.json").read_text()))
    hf_weights = load_file(folder / "model.safetensors")
    assert set(ours.weights) == set(hf_weights)
    for name, tensor in hf_weights.items():
        assert torch.equal(ours.weights[name], tensor), name


# qwen3 is left out: transformers' GGUF config mapping ignores attention.key_length and gives
# Qwen3 its default head_dim (128), so it cannot load a head_dim-16 file (real Qwen3 is 128).
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_agrees_with_transformers(tmp_path, monkeypatch, tiny_checkpoint_dir, arch):
    """transformers un-permutes llama's Q/K and nothing else, as llama.cpp permutes."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("KVRT_CACHE_DIR", str(tmp_path / "cache"))
    gguf_path = _write_gguf(tiny_checkpoint_dir(arch), tmp_path / f"tiny-{arch}.gguf")
    ours = load_gguf(gguf_path).weights
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_path.name).state_dict()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_cold_and_warm_agree(tmp_path, monkeypatch, tiny_checkpoint_dir, arch):
    folder = tiny_checkpoint_dir(arch)
    gguf_path = _write_gguf(folder, tmp_path / "tiny.gguf")
    # Set after import: the loader must read it when called.
    monkeypatch.setenv("KVRT_CACHE_DIR", str(tmp_path / "cache"))
    cached = cache_folder(gguf_path)
    assert cached.parent.parent == tmp_path / "cache" and not cached.exists()

    cold = load_checkpoint(str(gguf_path), dtype=torch.bfloat16)
    assert (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()
    warm = load_checkpoint(str(gguf_path), dtype=torch.bfloat16)

    assert (warm.name, warm.source) == (cold.name, cold.source) == ("tiny", str(gguf_path))
    assert warm.config == cold.config
    assert warm.weights.keys() == cold.weights.keys()
    for name, tensor in cold.weights.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(warm.weights[name], tensor), name
    chat = [{"role": "user", "content": "What is 12 times 11?  Paris 😀"}]
    assert warm.tokenizer.render_chat(chat) == cold.tokenizer.render_chat(chat)
    assert warm.tokenizer.encode_chat(chat) == cold.tokenizer.encode_chat(chat)
    assert warm.tokenizer.eos_token_ids == cold.tokenizer.eos_token_ids == frozenset({2})


def test_changed_file_gets_a_new_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRT_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"x")
    before = cache_folder(path)
    path.write_bytes(b"xy")
    assert cache_folder(path) != before


def test_unknown_gguf_tensor_is_an_error():
    assert hf_tensor_name("blk.3.ffn_up.weight") == "model.layers.3.mlp.up_proj.weight"
    with pytest.raises(CheckpointError, match="blk.0.ffn_gate_exps.weight"):
        hf_tensor_name("blk.0.ffn_gate_exps.weight")


def _write_gguf(folder: Path, path: Path) -> Path:
    """Converts an init_tiny folder to an all-F32 GGUF the way llama.cpp's converter does."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    arch = config["model_type"]
    writer = GGUFWriter(str(path), arch)
    _write_metadata(writer, arch, config)
    _write_tokenizer(writer, folder)
    for name, tensor in load_file(folder / "model.safetensors").items():
        array = tensor.float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config["num_attention_heads" if ".q_proj." in name else "num_key_value_heads"]
            array = _llama_cpp_permute(array, heads)
        writer.add_tensor(_gguf_name(name), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_metadata(writer: GGUFWriter, arch: str, config: dict) -> None:
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])


def _write_tokenizer(writer: GGUFWriter, folder: Path) -> None:
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(spec["model"]["vocab"])
    special = {t["content"]: t["id"] for t in spec["added_tokens"]}
    vocab.update(special)
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(special["<|endoftext|>"])
    writer.add_eos_token_id(special["<|im_end|>"])
    writer.add_chat_template(template)


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    # convert_hf_to_gguf.py, LlamaModel.permute
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _gguf_name(hf_name: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_TO_GGUF[rest]}"
