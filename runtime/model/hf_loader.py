"""Hugging Face checkpoint folders: config.json + *.safetensors (sharded or not) + tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, CheckpointError, require_chat_template, select_weights
from .config import ModelConfig, ModelConfigError
from .tokenizer import Tokenizer

SHARD_INDEX = "model.safetensors.index.json"


def load_hf_folder(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
    *,
    tokenizer_as_saved: bool = False,
) -> Checkpoint:
    """Loads a Hugging Face checkpoint folder; `name` defaults to the folder's name.
    `tokenizer_as_saved`: see `Tokenizer.from_pretrained` (for folders kvrt wrote)."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint folder at {folder}")
    config = read_hf_config(folder)
    weights = select_weights(config, read_safetensors(folder), dtype, str(folder))
    tokenizer = read_tokenizer(folder, config, as_saved=tokenizer_as_saved)
    return Checkpoint(
        name=name or folder.name,
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        source=str(folder),
    )


def read_hf_config(folder: Path) -> ModelConfig:
    raw = _read_json(folder / "config.json", required=True)
    if raw.get("use_sliding_window"):
        # Qwen2 can window some layers' attention; kvrt attends to the whole context.
        raise ModelConfigError(f"{folder}: sliding-window attention is not supported")
    return ModelConfig.from_hf_dict(raw)


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the folder's safetensors files, as stored (dtype unchanged)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(folder):
        tensors.update(load_file(str(path)))
    return tensors


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / SHARD_INDEX
    if index.is_file():
        # The index names the shards; stray *.safetensors (e.g. a consolidated copy) are ignored.
        weight_map = _read_json(index, required=True).get("weight_map", {})
        shards = sorted({folder / shard for shard in weight_map.values()})
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: {SHARD_INDEX} names missing shard(s) {missing}")
        return shards
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{folder} has no *.safetensors weights (PyTorch .bin files are not supported)"
        )
    return files


def read_tokenizer(folder: Path, config: ModelConfig, as_saved: bool = False) -> Tokenizer:
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model)")
    generation = _read_json(folder / "generation_config.json", required=False)
    eos_ids = [*config.eos_token_ids, *_as_ids(generation.get("eos_token_id"))]
    tokenizer = Tokenizer.from_pretrained(folder, eos_ids, as_saved=as_saved)
    require_chat_template(tokenizer, str(folder))
    return tokenizer


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path.parent} has no {path.name}; is it a checkpoint folder?")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
