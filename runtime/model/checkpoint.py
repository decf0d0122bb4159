"""A checkpoint on disk -> (config, weights under Hugging Face names, tokenizer).

    load_checkpoint(None)              the default model (SmolLM2-135M-Instruct GGUF)
    load_checkpoint("path/to/folder")  a Hugging Face checkpoint: config.json + *.safetensors
    load_checkpoint("path/model.gguf") a GGUF file (llama.cpp), dequantized

Whatever the source, weights carry Hugging Face names (`model.layers.0.self_attn.q_proj.weight`)
and layouts, Q/K rows in Hugging Face order, in the requested dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .tokenizer import Tokenizer


class CheckpointError(Exception):
    """The checkpoint is missing, incomplete, or not something kvrt can load."""


@dataclass(slots=True)
class Checkpoint:
    name: str  # the served model name
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    source: str  # the file or folder it came from


def load_checkpoint(path: str | None, dtype: torch.dtype = torch.float32) -> Checkpoint:
    # The loaders import gguf / safetensors lazily so that importing this module for its types
    # stays cheap, and so that they can import CheckpointError from here.
    if path is None:
        from .default_model import load_default_model

        return load_default_model(dtype)
    target = Path(path).expanduser()
    if target.is_dir():
        from .hf_loader import load_hf_folder

        return load_hf_folder(target, dtype)
    if target.is_file() and target.suffix == ".gguf":
        from .gguf_loader import load_gguf

        return load_gguf(target, dtype)
    if target.is_file():
        raise CheckpointError(f"{target} is a file but not a .gguf; pass a GGUF file or a folder")
    raise CheckpointError(f"no checkpoint at {target}: no such file or folder")


def expected_weight_names(config: ModelConfig) -> list[str]:
    """Every tensor a model of this shape needs, under Hugging Face names."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_layers):
        names.extend(_layer_weight_names(config, f"model.layers.{i}."))
    return names


def _layer_weight_names(config: ModelConfig, prefix: str) -> list[str]:
    attn = prefix + "self_attn."
    names = [prefix + "input_layernorm.weight", prefix + "post_attention_layernorm.weight"]
    names += [f"{attn}{p}_proj.weight" for p in "qkvo"]
    if config.attention_bias:
        names += [f"{attn}{p}_proj.bias" for p in "qkv"]
    if config.qk_norm:
        names += [attn + "q_norm.weight", attn + "k_norm.weight"]
    names += [f"{prefix}mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    return names


def expected_shape(config: ModelConfig, name: str) -> tuple[int, ...]:
    """The Hugging Face shape of weight `name` (one of `expected_weight_names(config)`)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    leaf = ".".join(name.split(".")[-2:])  # "q_proj.weight", "input_layernorm.weight", ...
    shapes: dict[str, tuple[int, ...]] = {
        "q_proj.weight": (q_rows, hidden),
        "k_proj.weight": (kv_rows, hidden),
        "v_proj.weight": (kv_rows, hidden),
        "o_proj.weight": (hidden, q_rows),
        "q_proj.bias": (q_rows,),
        "k_proj.bias": (kv_rows,),
        "v_proj.bias": (kv_rows,),
        "q_norm.weight": (config.head_dim,),
        "k_norm.weight": (config.head_dim,),
        "gate_proj.weight": (inter, hidden),
        "up_proj.weight": (inter, hidden),
        "down_proj.weight": (hidden, inter),
    }
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (config.vocab_size, hidden)
    return shapes.get(leaf, (hidden,))  # the remaining ones are the hidden-size norms


def select_weights(
    config: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype, source: str
) -> dict[str, torch.Tensor]:
    """The weights the model needs, checked against the config and cast to `dtype`.

    Extra tensors are dropped: a tied checkpoint may still store lm_head.weight, and older files
    carry buffers such as rotary_emb.inv_freq.
    """
    names = expected_weight_names(config)
    missing = [n for n in names if n not in tensors]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise CheckpointError(f"{source} lacks {len(missing)} weight(s): {shown}")
    weights = {}
    for name in names:
        tensor = tensors[name]
        if tuple(tensor.shape) != expected_shape(config, name):
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the config implies "
                f"{expected_shape(config, name)}"
            )
        weights[name] = tensor.to(dtype)
    return weights


def require_chat_template(tokenizer: Tokenizer, source: str) -> None:
    # kvrt's agents talk through /v1/chat/completions; a checkpoint without a template would
    # fail on its first chat request instead of at start-up.
    if tokenizer.chat_template is None:
        raise CheckpointError(
            f"{source}: the tokenizer has no chat template (tokenizer_config.json "
            "'chat_template', chat_template.jinja or GGUF tokenizer.chat_template)"
        )
