"""select_kernels: which pair of kernels runs where, and importing kvrt.kernels without Triton."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kvrt import kernels
from kvrt.kernels import (
    kv_store_ref,
    kv_store_triton,
    paged_attention_ref,
    paged_attention_triton,
    select_kernels,
)


@pytest.fixture
def with_triton(monkeypatch):
    monkeypatch.setattr(kernels, "triton_available", lambda: True)


@pytest.fixture
def without_triton(monkeypatch):
    monkeypatch.setattr(kernels, "triton_available", lambda: False)


def test_torch_everywhere(with_triton):
    for device in ("cpu", "cuda"):
        chosen = select_kernels("torch", torch.device(device))
        assert chosen.name == "torch"
        assert chosen.paged_attention is paged_attention_ref and chosen.kv_store is kv_store_ref


def test_auto_is_triton_on_cuda_only(with_triton):
    chosen = select_kernels("auto", torch.device("cuda"))
    assert chosen.name == "triton"
    assert chosen.paged_attention is paged_attention_triton and chosen.kv_store is kv_store_triton
    assert select_kernels("auto", torch.device("cpu")).name == "torch"
    assert select_kernels("auto", "cpu").name == "torch"


def test_auto_falls_back_to_torch_without_triton(without_triton):
    assert select_kernels("auto", torch.device("cuda")).name == "torch"


def test_triton_on_cpu_needs_the_interpreter(with_triton, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        select_kernels("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_kernels("triton", torch.device("cpu")).name == "triton"


def test_triton_without_triton_installed(without_triton):
    with pytest.raises(ValueError, match="pip install"):
        select_kernels("triton", torch.device("cuda"))


def test_unknown_choice():
    with pytest.raises(ValueError, match="unknown kernels"):
        select_kernels("cuda", torch.device("cpu"))


def test_kernels_is_frozen():
    with pytest.raises(AttributeError):
        select_kernels("torch", torch.device("cpu")).name = "other"


IMPORT_CHECK = """
import sys
import torch
import kvrt.kernels as kernels
assert "triton" not in sys.modules, "import kvrt.kernels must not import triton"
sys.modules["triton"] = None  # from here on, as if Triton were not installed
assert not kernels.triton_available()
assert kernels.select_kernels("auto", "cuda").name == "torch"
pool, kv = torch.zeros(2, 1, 2, 4, 1, 8), torch.ones(1, 1, 8)
kernels.kv_store_ref(pool, 0, kv, kv, torch.tensor([5]))
out = kernels.paged_attention_ref(kv.expand(1, 2, 8), pool, 0, torch.tensor([[5]]),
                                  torch.tensor([1], dtype=torch.int32),
                                  torch.tensor([0, 1], dtype=torch.int32), 1.0)
assert torch.equal(out, torch.ones(1, 2, 8))
try:
    kernels.kv_store_triton(pool, 0, kv, kv, torch.tensor([5]))
except RuntimeError as err:
    assert "not installed" in str(err), err
else:
    raise AssertionError("kv_store_triton ran without Triton")
print("ok")
"""


def test_imports_without_triton():
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
