"""KV store: scatter this step's new K and V rows into their slots of the paged pool.

    kv_pool  [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]   (0 = K, 1 = V)
    slot     = block * block_size + row

`kv_store_ref` (torch, also the CPU runtime path) and `kv_store_triton` share one signature.
Every slot must be a valid pool slot (no -1 "skip" entries); with duplicate slots the row
written last is unspecified.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvrt.kernels._triton_support import check_launch_device, next_power_of_2, triton_kernels


def check_kv_store_args(kv_pool: Tensor, layer: int, k: Tensor, v: Tensor, slots: Tensor) -> None:
    """Cheap shape/dtype checks (no device sync), shared by both implementations."""
    assert kv_pool.dim() == 6 and kv_pool.shape[2] == 2, f"bad kv_pool shape {tuple(kv_pool.shape)}"
    assert 0 <= layer < kv_pool.shape[1], f"layer {layer} out of range"
    want = (slots.shape[0], kv_pool.shape[4], kv_pool.shape[5])
    assert k.shape == want and v.shape == want, f"k/v {tuple(k.shape)}, want {want}"
    assert k.dtype == v.dtype == kv_pool.dtype, "k, v and kv_pool must share a dtype"
    assert slots.dim() == 1 and not slots.is_floating_point(), "slots must be a 1-D int tensor"
    assert k.device == v.device == slots.device == kv_pool.device, "all tensors on one device"


def kv_store_ref(kv_pool: Tensor, layer: int, k: Tensor, v: Tensor, slots: Tensor) -> None:
    check_kv_store_args(kv_pool, layer, k, v, slots)
    block_size = kv_pool.shape[3]
    slots = slots.long()
    blocks, rows = slots // block_size, slots % block_size
    kv_pool[blocks, layer, 0, rows] = k
    kv_pool[blocks, layer, 1, rows] = v


def kv_store_triton(kv_pool: Tensor, layer: int, k: Tensor, v: Tensor, slots: Tensor) -> None:
    check_kv_store_args(kv_pool, layer, k, v, slots)
    assert kv_pool.dtype in (torch.float32, torch.float16, torch.bfloat16), "unsupported dtype"
    check_launch_device(kv_pool, k, v, slots)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    triton_kernels().kv_store_kernel[(num_tokens,)](
        kv_pool, k, v, slots, layer,
        *kv_pool.stride(), *k.stride(), *v.stride(), slots.stride(0),
        BLOCK_SIZE=kv_pool.shape[3],
        NUM_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=next_power_of_2(num_kv_heads),
        DIM_PAD=next_power_of_2(head_dim),
    )  # fmt: skip
