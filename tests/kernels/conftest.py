"""Fixtures that put the Triton kernels in the mode a test needs, for that test only."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def triton_interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs the Triton kernels in Triton's CPU interpreter (kernels are jitted per mode)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def cuda_triton(monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """A CUDA device with the Triton kernels compiled, not interpreted; skips without CUDA."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return torch.device("cuda")
