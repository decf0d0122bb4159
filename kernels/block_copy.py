"""Block copy: gather scattered KV blocks into one staging buffer (pack), and scatter back (unpack).

    kv_pool  [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]   contiguous
    packed   [n,          num_layers, 2, block_size, num_kv_heads, head_dim]   contiguous

    pack:    packed[i]             = kv_pool[block_ids[i]]     (ids may repeat, in any order)
    unpack:  kv_pool[block_ids[i]] = packed[i]                 (ids should be distinct)

The pool is block-major, so a block is one contiguous run of
block_numel = num_layers * 2 * block_size * num_kv_heads * head_dim elements; a move to a host
tier packs its blocks, then makes one big copy. `pack_blocks_ref` / `unpack_blocks_ref` (torch,
also the CPU runtime path) and the `_triton` versions share one signature, and copy bits
exactly. Every id must be a valid block (not checked: that would need a device sync); with a
repeated id in unpack, which packed block lands there is unspecified.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvrt.kernels._triton_support import check_launch_device, triton_kernels

# Elements per Triton program: one block is ceil(block_numel / CHUNK) programs.
CHUNK = 1024
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension


def check_block_copy_args(kv_pool: Tensor, block_ids: Tensor, buffer: Tensor) -> None:
    """Cheap shape/dtype/layout checks (no device sync), shared by both implementations."""
    assert kv_pool.dim() == 6 and kv_pool.shape[2] == 2, f"bad kv_pool shape {tuple(kv_pool.shape)}"
    assert block_ids.dim() == 1, f"block_ids must be 1-D, got {tuple(block_ids.shape)}"
    assert block_ids.dtype in (torch.int32, torch.int64), "block_ids must be int32 or int64"
    want = (block_ids.shape[0], *kv_pool.shape[1:])
    assert buffer.shape == want, f"buffer {tuple(buffer.shape)}, want {want}"
    assert buffer.dtype == kv_pool.dtype, f"buffer is {buffer.dtype} but kv_pool {kv_pool.dtype}"
    assert kv_pool.device == buffer.device == block_ids.device, "all tensors on one device"
    # The Triton kernel addresses blocks as flat runs; the reference keeps the same contract.
    assert kv_pool.is_contiguous(), "kv_pool must be contiguous"
    assert buffer.is_contiguous(), "the packed buffer must be contiguous"


def pack_blocks_ref(kv_pool: Tensor, block_ids: Tensor, out: Tensor) -> None:
    check_block_copy_args(kv_pool, block_ids, out)
    torch.index_select(kv_pool, 0, block_ids, out=out)


def unpack_blocks_ref(kv_pool: Tensor, block_ids: Tensor, packed: Tensor) -> None:
    check_block_copy_args(kv_pool, block_ids, packed)
    kv_pool.index_copy_(0, block_ids.long(), packed)


def pack_blocks_triton(kv_pool: Tensor, block_ids: Tensor, out: Tensor) -> None:
    _launch("pack_blocks_kernel", kv_pool, block_ids, out)


def unpack_blocks_triton(kv_pool: Tensor, block_ids: Tensor, packed: Tensor) -> None:
    _launch("unpack_blocks_kernel", kv_pool, block_ids, packed)


def _launch(kernel: str, kv_pool: Tensor, block_ids: Tensor, buffer: Tensor) -> None:
    """Both kernels take (pool, buffer, ids, ...) over a grid of (block, chunk of a block)."""
    check_block_copy_args(kv_pool, block_ids, buffer)
    assert kv_pool.dtype in (torch.float32, torch.float16, torch.bfloat16), "unsupported dtype"
    check_launch_device(kv_pool, block_ids, buffer)
    block_numel = math.prod(kv_pool.shape[1:])
    chunks = -(-block_numel // CHUNK)
    assert chunks <= _MAX_GRID_Y, f"a block of {block_numel} elements needs a bigger CHUNK"
    if block_ids.shape[0] == 0:
        return
    getattr(triton_kernels(), kernel)[(block_ids.shape[0], chunks)](
        kv_pool, buffer, block_ids, block_numel, block_ids.stride(0), CHUNK=CHUNK
    )


def coalesce_runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """The distinct ids, ascending, as (start, length) runs of consecutive ids.

    For callers that move adjacent blocks with one slice copy, `kv_pool[start:start + length]`,
    instead of one copy per block. Order and repeats in `block_ids` do not matter:

        [7, 3, 4, 5, 9, 8, 4]  ->  [(3, 3), (7, 3)]
    """
    runs: list[tuple[int, int]] = []
    for block in sorted(set(block_ids)):
        if runs and sum(runs[-1]) == block:  # start + length: the id just past the last run
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block, 1))
    return runs
