"""Where the Triton kernel tests run: compiled on CUDA when there is a GPU, else in Triton's CPU
interpreter. Triton fixes that mode for the whole process when it is first imported, and kvrt
imports it only at the first Triton launch, so setting TRITON_INTERPRET here (before any launch)
is enough; the torch-only tests never import Triton at all.
"""

from __future__ import annotations

import pytest
import torch

from kvrt.kernels._triton_support import interpret_enabled, triton_available, triton_kernels


@pytest.fixture
def triton_device(monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """The device the Triton tests put their tensors on (CUDA, or CPU under the interpreter)."""
    if not triton_available():
        pytest.skip("Triton is not installed")
    if torch.cuda.is_available() and not interpret_enabled():
        return torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        triton_kernels()
    except RuntimeError as err:  # Triton imported in compiled mode earlier by someone else
        pytest.skip(str(err))
    return torch.device("cpu")


@pytest.fixture
def cuda_triton() -> torch.device:
    """A CUDA device with the Triton kernels compiled, not interpreted; skips without CUDA."""
    if not triton_available():
        pytest.skip("Triton is not installed")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if interpret_enabled():
        pytest.skip("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled")
    return torch.device("cuda")
