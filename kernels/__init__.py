"""kvrt.kernels: the engine's kernels, each a Triton kernel beside its torch reference.

    op               torch reference (CPU path)   Triton (CUDA path)
    paged_attention  paged_attention_ref          paged_attention_triton
    kv_store         kv_store_ref                 kv_store_triton
    pack_blocks      pack_blocks_ref              pack_blocks_triton     (module block_copy)
    unpack_blocks    unpack_blocks_ref            unpack_blocks_triton   (module block_copy)
    row_change       row_change_ref               row_change_triton

Both versions of an op share one signature (see the op's module); the @triton.jit bodies live in
`_triton_jit`, which is imported only at the first Triton launch. Triton is optional: this package
imports without it, and `select_kernels` picks the set the runtime calls. `rotate_by_shift` is
the torch rotation of stored K by a position shift, for callers that materialise shifted blocks;
`coalesce_runs` groups block ids into runs of adjacent blocks, for one slice copy per run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvrt.kernels._triton_support import TRITON_INTERPRET_ENV, interpret_enabled, triton_available
from kvrt.kernels.block_copy import (
    coalesce_runs,
    pack_blocks_ref,
    pack_blocks_triton,
    unpack_blocks_ref,
    unpack_blocks_triton,
)
from kvrt.kernels.kv_store import kv_store_ref, kv_store_triton
from kvrt.kernels.paged_attention import (
    paged_attention_ref,
    paged_attention_triton,
    rotate_by_shift,
)
from kvrt.kernels.row_change import row_change_ref, row_change_triton

__all__ = [
    "Kernels",
    "coalesce_runs",
    "kv_store_ref",
    "kv_store_triton",
    "pack_blocks_ref",
    "pack_blocks_triton",
    "paged_attention_ref",
    "paged_attention_triton",
    "rotate_by_shift",
    "row_change_ref",
    "row_change_triton",
    "select_kernels",
    "triton_available",
    "unpack_blocks_ref",
    "unpack_blocks_triton",
]

KERNEL_CHOICES = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Kernels:
    paged_attention: Callable[..., torch.Tensor]
    kv_store: Callable[..., None]
    pack_blocks: Callable[..., None]
    unpack_blocks: Callable[..., None]
    row_change: Callable[..., torch.Tensor]
    name: str  # "torch" or "triton", for logs and reports


_TORCH = Kernels(
    paged_attention=paged_attention_ref,
    kv_store=kv_store_ref,
    pack_blocks=pack_blocks_ref,
    unpack_blocks=unpack_blocks_ref,
    row_change=row_change_ref,
    name="torch",
)
_TRITON = Kernels(
    paged_attention=paged_attention_triton,
    kv_store=kv_store_triton,
    pack_blocks=pack_blocks_triton,
    unpack_blocks=unpack_blocks_triton,
    row_change=row_change_triton,
    name="triton",
)


def select_kernels(choice: str, device: torch.device) -> Kernels:
    """The kernels for `device`: "auto" is Triton on CUDA when Triton is installed, else torch.

    "triton" is refused, with the reason, where it cannot run: Triton missing, or a non-CUDA
    device outside Triton's interpreter (TRITON_INTERPRET=1, meant for tests).
    """
    device = torch.device(device)
    if choice == "torch":
        return _TORCH
    if choice == "auto":
        return _TRITON if device.type == "cuda" and triton_available() else _TORCH
    if choice != "triton":
        raise ValueError(f"unknown kernels {choice!r}; choose one of {KERNEL_CHOICES}")
    if not triton_available():
        raise ValueError("kernels 'triton' need Triton: pip install 'kvrt[triton]'")
    if device.type != "cuda" and not interpret_enabled():
        raise ValueError(
            f"kernels 'triton' need a CUDA device, not {device.type!r} "
            f"(only tests run them on CPU, with {TRITON_INTERPRET_ENV}=1); use 'torch' or 'auto'"
        )
    return _TRITON
