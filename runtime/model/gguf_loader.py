"""GGUF files (llama.cpp): metadata -> ModelConfig, dequantized weights under HF names.

Reading a GGUF is slow on a small CPU (the default 135M model: GGUFReader ~2-5 s, dequantizing
~2.3 s, transformers' GGUF tokenizer build ~4.6 s), so the first load converts the file into a
Hugging Face folder in the cache (config.json, model.safetensors holding the dequantized float32
weights, tokenizer files) and later loads read that folder (well under a second).

Q/K rows: llama.cpp's converter permutes the rows of attn_q / attn_k for the `llama`
architecture only, because llama.cpp's LLAMA graph applies RoPE to adjacent pairs (x0, x1) while
Hugging Face Llama rotates the two halves of each head (x_i, x_{i+d/2}). Its `qwen2` and `qwen3`
converters write HF order unchanged (those graphs use NEOX-style RoPE, the HF layout), and
transformers' GGUF loader likewise un-permutes llama only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpoint, CheckpointError, require_chat_template, select_weights
from .config import ARCHITECTURES, ModelConfig, ModelConfigError, RopeConfig
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "KVRT_CACHE_DIR"  # where converted GGUFs go; default ~/.cache/kvrt
CACHE_FORMAT = 1  # bump when the converted folder's content changes

_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def load_gguf(
    path: str | Path, dtype: torch.dtype = torch.float32, name: str | None = None
) -> Checkpoint:
    """Loads a GGUF file as a Checkpoint, through the conversion cache. `name` defaults to the
    file's stem."""
    from .hf_loader import load_hf_folder

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise CheckpointError(f"no GGUF file at {path}")
    name = name or path.stem
    cached = cache_folder(path)
    if cached.is_dir():
        try:
            checkpoint = load_hf_folder(cached, dtype, name, tokenizer_as_saved=True)
        except CheckpointError as err:
            raise CheckpointError(
                f"{err} (kvrt's cached conversion of {path}: delete it to convert again)"
            ) from None
        return replace(checkpoint, source=str(path))
    converted = convert_gguf(path)
    try:
        converted.save(cached)
    except OSError as err:  # a read-only cache costs start-up time, not correctness
        log.warning("could not cache the converted %s in %s: %s", path.name, cached, err)
    weights = {k: v.to(dtype) for k, v in converted.weights.items()}
    return Checkpoint(name, converted.config, weights, converted.tokenizer, source=str(path))


def cache_dir() -> Path:
    # Read at call time, so a test or a CLI flag can redirect it after import.
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "kvrt").expanduser()


def cache_folder(path: Path) -> Path:
    """The converted copy of `path`; a new file (size or mtime changed) gets a new folder."""
    stat = path.stat()
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)
    return cache_dir() / "gguf" / f"{stem}-{stat.st_size}-{stat.st_mtime_ns}-v{CACHE_FORMAT}"


@dataclass(slots=True)
class ConvertedGguf:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # float32, HF names and row order, checked against config
    tokenizer: Tokenizer

    def save(self, folder: Path) -> None:
        """Writes an HF checkpoint folder; it appears whole or not at all (rename)."""
        from safetensors.torch import save_file

        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        try:
            (tmp / "config.json").write_text(json.dumps(hf_config_dict(self.config), indent=2))
            save_file(self.weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            self.tokenizer.hf.save_pretrained(str(tmp))
            os.rename(tmp, folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not folder.is_dir():  # else another process finished the same conversion first
                raise


def convert_gguf(path: Path) -> ConvertedGguf:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    reader = GGUFReader(str(path))
    config = gguf_config(reader)
    # Checked before anything is cached, so the cache never holds a folder that fails to load.
    weights = select_weights(config, gguf_weights(reader, config), torch.float32, str(path))
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer = Tokenizer(hf, config.eos_token_ids)
    require_chat_template(tokenizer, str(path))
    return ConvertedGguf(config, weights, tokenizer)


def gguf_config(reader: Any) -> ModelConfig:
    """ModelConfig from GGUF metadata (see llama.cpp's gguf-py constants for the keys)."""
    fields = _Fields(reader)
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelConfigError(
            f"unsupported GGUF architecture {arch!r}; kvrt serves {ARCHITECTURES}"
        )
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        # Llama 3.1-style RoPE scaling stored as per-frequency factors; not mapped yet.
        raise ModelConfigError("GGUF with rope_freqs (Llama 3.1 RoPE scaling) is not supported")
    hidden = int(fields.require(f"{arch}.embedding_length"))
    heads = int(fields.require(f"{arch}.attention.head_count"))
    head_dim = int(fields.get(f"{arch}.attention.key_length") or hidden // heads)
    rotary = fields.get(f"{arch}.rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        raise ModelConfigError(f"partial RoPE ({rotary} of {head_dim} dims) is not supported")
    eos = [fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
    return ModelConfig(
        arch=arch,
        vocab_size=len(fields.require("tokenizer.ggml.tokens", raw=True).data),
        hidden_size=hidden,
        intermediate_size=int(fields.require(f"{arch}.feed_forward_length")),
        num_layers=int(fields.require(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(fields.get(f"{arch}.attention.head_count_kv") or heads),
        head_dim=head_dim,
        max_position=int(fields.require(f"{arch}.context_length")),
        rms_eps=_f32(fields.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        rope=_rope(fields, arch),
        tie_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm=arch == "qwen3",
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        bos_token_id=_opt_int(fields.get("tokenizer.ggml.bos_token_id")),
    )


def _rope(fields: _Fields, arch: str) -> RopeConfig:
    theta = _f32(fields.get(f"{arch}.rope.freq_base") or 10000.0)
    kind = fields.get(f"{arch}.rope.scaling.type") or "none"
    if kind == "none":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(
            theta=theta, kind="linear", factor=_f32(fields.require(f"{arch}.rope.scaling.factor"))
        )
    raise ModelConfigError(f"unsupported GGUF RoPE scaling {kind!r}; kvrt supports linear")


def gguf_weights(reader: Any, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32, under its HF name, Q/K rows in HF order."""
    from gguf.quants import dequantize

    weights = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        array = dequantize(tensor.data, tensor.tensor_type)
        if config.arch == "llama":
            array = _unpermute_qk(array, name, config)
        # The reader memory-maps the file read-only; torch wants memory it may write.
        weights[name] = torch.from_numpy(np.require(array, np.float32, ["C", "W"]))
    return weights


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise CheckpointError(f"unexpected GGUF tensor {gguf_name!r}; kvrt cannot place it")
    layer, kind, leaf = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{leaf}"


def _unpermute_qk(array: np.ndarray, name: str, config: ModelConfig) -> np.ndarray:
    """Undoes llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py) on Q/K weights and biases:
    within each head, llama.cpp interleaves the two rotary halves; HF keeps them apart."""
    if ".q_proj." in name:
        heads = config.num_heads
    elif ".k_proj." in name:
        heads = config.num_kv_heads
    else:
        return array
    rows = array.shape[0]
    return (
        array.reshape(heads, rows // heads // 2, 2, *array.shape[1:])
        .swapaxes(1, 2)
        .reshape(array.shape)
    )


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """A Hugging Face config.json for `config`; `ModelConfig.from_hf_dict` reads it back equal."""
    model_type = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[config.arch]
    rope: dict[str, Any] = {"rope_theta": config.rope.theta, "rope_type": config.rope.kind}
    if config.rope.kind != "default":
        rope.update(
            factor=config.rope.factor,
            low_freq_factor=config.rope.low_freq_factor,
            high_freq_factor=config.rope.high_freq_factor,
            original_max_position_embeddings=config.rope.original_max_position,
        )
    return {
        "architectures": [f"{model_type.capitalize()}ForCausalLM"],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position,
        "rms_norm_eps": config.rms_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": config.attention_bias,
        "eos_token_id": list(config.eos_token_ids),
        "bos_token_id": config.bos_token_id,
    }


class _Fields:
    """GGUF metadata by key, decoded to Python values."""

    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields

    def get(self, key: str) -> Any:
        field = self._fields.get(key)
        return None if field is None else field.contents()

    def require(self, key: str, raw: bool = False) -> Any:
        field = self._fields.get(key)
        if field is None:
            raise ModelConfigError(f"GGUF metadata lacks {key}")
        return field if raw else field.contents()


def _f32(value: Any) -> float:
    # GGUF stores float32; its shortest decimal is the value the converter read (1e-05, not
    # 9.999999747378752e-06), which keeps the config equal to the original config.json.
    return float(str(np.float32(value)))


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
