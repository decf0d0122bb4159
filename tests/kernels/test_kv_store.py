"""kv_store: rows land in exactly their slots (and nowhere else); Triton matches the reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from kvrt.kernels import kv_store_ref, kv_store_triton

LAYERS, LAYER = 3, 1


def make_inputs(
    num_tokens: int, kv_heads: int, head_dim: int, dtype: torch.dtype, *,
    block_size: int = 4, num_blocks: int = 8, slot_dtype: torch.dtype = torch.int64, seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """A NaN pool, and K/V rows for distinct shuffled slots spread over several blocks."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.full((num_blocks, LAYERS, 2, block_size, kv_heads, head_dim), math.nan,
                      dtype=dtype)  # fmt: skip
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(slot_dtype)
    k = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dtype)
    # V as the model makes it: a strided view into one fused projection output.
    fused = torch.randn(num_tokens, 3, kv_heads, head_dim, generator=gen).to(dtype)
    return pool, k, fused[:, 2], slots


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ref_writes_each_row_to_its_slot_only(dtype, slot_dtype):
    pool, k, v, slots = make_inputs(11, 3, 16, dtype, slot_dtype=slot_dtype)
    kv_store_ref(pool, LAYER, k, v, slots)
    block_size = pool.shape[3]
    for i, slot in enumerate(slots.tolist()):
        block, row = divmod(slot, block_size)
        assert torch.equal(pool[block, LAYER, 0, row], k[i])
        assert torch.equal(pool[block, LAYER, 1, row], v[i])
    # Everything else, other layers included, is still the NaN it started as.
    assert int((~pool.isnan()).sum()) == 2 * k.numel()


def test_ref_overwrites_in_place():
    pool, k, v, slots = make_inputs(6, 2, 8, torch.float32)
    kv_store_ref(pool, LAYER, k, v, slots)
    kv_store_ref(pool, LAYER, k * 2, v * 3, slots)
    block, row = divmod(int(slots[0]), pool.shape[3])
    assert torch.equal(pool[block, LAYER, 0, row], k[0] * 2)
    assert torch.equal(pool[block, LAYER, 1, row], v[0] * 3)


def test_ref_rejects_mismatched_dtype():
    pool, k, v, slots = make_inputs(4, 2, 8, torch.float32)
    with pytest.raises(AssertionError, match="dtype"):
        kv_store_ref(pool, LAYER, k.bfloat16(), v.bfloat16(), slots)


@pytest.mark.parametrize(
    "num_tokens,kv_heads,head_dim,block_size",
    [(5, 2, 32, 4), (9, 3, 48, 16), (1, 1, 64, 16)],  # 3 heads and dim 48: padded lanes
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_ref(triton_device, num_tokens, kv_heads, head_dim, block_size, dtype):
    pool, k, v, slots = make_inputs(num_tokens, kv_heads, head_dim, dtype, block_size=block_size)
    expected = pool.clone()
    kv_store_ref(expected, LAYER, k, v, slots)
    pool, k, v, slots = (t.to(triton_device) for t in (pool, k, v, slots))
    kv_store_triton(pool, LAYER, k, v, slots)
    torch.testing.assert_close(pool.cpu(), expected, rtol=0, atol=0, equal_nan=True)


def test_triton_int32_slots(triton_device):
    pool, k, v, slots = make_inputs(7, 2, 16, torch.float32, slot_dtype=torch.int32)
    expected = pool.clone()
    kv_store_ref(expected, LAYER, k, v, slots)
    pool, k, v, slots = (t.to(triton_device) for t in (pool, k, v, slots))
    kv_store_triton(pool, LAYER, k, v, slots)
    torch.testing.assert_close(pool.cpu(), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
def test_triton_on_cuda_matches_ref(cuda_triton):
    pool, k, v, slots = make_inputs(300, 3, 64, torch.bfloat16, block_size=16, num_blocks=40)
    pool, k, v, slots = (t.to(cuda_triton) for t in (pool, k, v, slots))
    expected = pool.clone()
    kv_store_ref(expected, LAYER, k, v, slots)
    kv_store_triton(pool, LAYER, k, v, slots)
    torch.testing.assert_close(pool, expected, rtol=0, atol=0, equal_nan=True)
