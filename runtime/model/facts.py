"""What a server needs to know of a model without its weights: name, config, tokenizer.

The front daemon of `kvrt serve --replicas N` renders prompts and checks requests while the
replicas load the weights; it reads only the checkpoint's config and tokenizer:

    HF folder   config.json + the tokenizer files
    GGUF file   kvrt's converted copy when there is one (fast), else the GGUF's metadata and
                its tokenizer (the replicas convert and cache it as they load)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CheckpointError, require_chat_template
from .config import ModelConfig
from .tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class ModelFacts:
    name: str  # the served model name, as load_checkpoint names it
    config: ModelConfig
    tokenizer: Tokenizer
    source: str


def read_model_facts(path: str | None) -> ModelFacts:
    """The facts of the checkpoint `load_checkpoint(path)` would load, weights left on disk."""
    if path is None:
        from .default_model import DEFAULT_MODEL_NAME, default_model_path

        return _gguf_facts(default_model_path(), DEFAULT_MODEL_NAME)
    target = Path(path).expanduser()
    if target.is_dir():
        return _folder_facts(target.resolve(), target.resolve().name)
    if target.is_file() and target.suffix == ".gguf":
        return _gguf_facts(target, target.stem)
    if target.is_file():
        raise CheckpointError(f"{target} is a file but not a .gguf; pass a GGUF file or a folder")
    raise CheckpointError(f"no checkpoint at {target}: no such file or folder")


def _folder_facts(folder: Path, name: str, as_saved: bool = False) -> ModelFacts:
    from .hf_loader import read_hf_config, read_tokenizer

    config = read_hf_config(folder)
    return ModelFacts(name, config, read_tokenizer(folder, config, as_saved), str(folder))


def _gguf_facts(path: Path, name: str) -> ModelFacts:
    from .gguf_loader import cache_folder, gguf_config

    path = path.expanduser().resolve()
    cached = cache_folder(path)
    if cached.is_dir():
        facts = _folder_facts(cached, name, as_saved=True)
        return ModelFacts(name, facts.config, facts.tokenizer, str(path))
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    config = gguf_config(GGUFReader(str(path)))  # memory-mapped: the weights stay on disk
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer = Tokenizer(hf, config.eos_token_ids)
    require_chat_template(tokenizer, str(path))
    return ModelFacts(name, config, tokenizer, str(path))
