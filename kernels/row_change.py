"""Row change: how much each of some KV rows differs from a base row, over every layer (the diff
encode of shared segments: a reader's recomputed rows against the master copy's).

    kv_pool  [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]   (0 = K, 1 = V)
    change[i] = sum over layers of  |K(rows[i]) - R(shifts[i]) K(base[i])| / |K(base[i])|
                                  + |V(rows[i]) - V(base[i])| / |V(base[i])|

with |.| the L2 norm over heads and dims, and R the RoPE rotation (rotate-half) by a position
shift: the base row was computed `shift` positions earlier than the row it is compared with.
`row_change_ref` (torch, also the CPU runtime path) and `row_change_triton` share one signature
and return float32 [n].
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvrt.kernels._triton_support import check_launch_device, next_power_of_2, triton_kernels
from kvrt.kernels.paged_attention import rotate_by_shift

_TINY = 1e-6  # a zero base row (never in a real model) must not divide by zero


def check_row_change_args(kv_pool: Tensor, rows: Tensor, base: Tensor, shifts: Tensor,
                          inv_freq: Tensor) -> None:
    assert kv_pool.dim() == 6 and kv_pool.shape[2] == 2, f"bad kv_pool shape {tuple(kv_pool.shape)}"
    assert rows.dim() == base.dim() == shifts.dim() == 1, "rows, base and shifts are 1-D"
    assert rows.numel() == base.numel() == shifts.numel(), "one base row and shift per row"
    assert inv_freq.numel() * 2 == kv_pool.shape[5], "inv_freq has head_dim / 2 entries"
    assert kv_pool.device == rows.device == base.device == shifts.device, "one device"


def row_change_ref(kv_pool: Tensor, rows: Tensor, base: Tensor, shifts: Tensor,
                   inv_freq: Tensor) -> Tensor:
    check_row_change_args(kv_pool, rows, base, shifts, inv_freq)
    block_size = kv_pool.shape[3]
    mine = kv_pool[rows // block_size, :, :, rows % block_size].float()  # [n, L, 2, H, D]
    theirs = kv_pool[base // block_size, :, :, base % block_size].float()
    layers = kv_pool.shape[1]
    theirs[:, :, 0] = rotate_by_shift(theirs[:, :, 0], shifts[:, None].expand(-1, layers),
                                      inv_freq.float())
    diff = (mine - theirs).flatten(3).norm(dim=3)  # [n, L, 2]
    return (diff / theirs.flatten(3).norm(dim=3).clamp_min(_TINY)).sum(dim=(1, 2))


def row_change_triton(kv_pool: Tensor, rows: Tensor, base: Tensor, shifts: Tensor,
                      inv_freq: Tensor) -> Tensor:
    check_row_change_args(kv_pool, rows, base, shifts, inv_freq)
    check_launch_device(kv_pool, rows, base, shifts, inv_freq)
    out = torch.empty(rows.numel(), dtype=torch.float32, device=kv_pool.device)
    if rows.numel() == 0:
        return out
    _, layers, _, block_size, heads, dim = kv_pool.shape
    triton_kernels().row_change_kernel[(rows.numel(),)](
        kv_pool, rows.contiguous(), base.contiguous(), shifts.contiguous(),
        inv_freq.float().contiguous(), out,
        *kv_pool.stride(), layers,
        BLOCK_SIZE=block_size, NUM_HEADS=heads, HALF=dim // 2,
        HEADS_PAD=next_power_of_2(heads), HALF_PAD=next_power_of_2(dim // 2), TINY=_TINY,
    )  # fmt: skip
    return out
