"""block_copy: pack/unpack move exactly the named blocks, bit for bit; Triton matches the reference.

Pools hold random bit patterns (NaNs and their payloads included), and blocks are compared as
integers, so any copy that goes through a float conversion, or touches the wrong block, fails.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from kvrt import kernels
from kvrt.kernels import (
    coalesce_runs,
    pack_blocks_ref,
    pack_blocks_triton,
    select_kernels,
    unpack_blocks_ref,
    unpack_blocks_triton,
)

LAYERS, NUM_BLOCKS = 2, 8
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def make_pool(
    dtype: torch.dtype, *, block_size: int = 4, kv_heads: int = 2, head_dim: int = 8, seed: int = 0
) -> Tensor:
    """[NUM_BLOCKS, LAYERS, 2, block_size, kv_heads, head_dim] of random bit patterns."""
    bits = BITS[dtype]
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, LAYERS, 2, block_size, kv_heads, head_dim)
    info = torch.iinfo(bits)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=bits).view(dtype)


def bits(t: Tensor) -> Tensor:
    return t.view(BITS[t.dtype])


def same_bits(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(bits(a).cpu(), bits(b).cpu())


def empty_packed(pool: Tensor, n: int) -> Tensor:
    return torch.empty((n, *pool.shape[1:]), dtype=pool.dtype, device=pool.device)


# -- torch reference ---------------------------------------------------------------------------


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_ref_pack_copies_each_named_block(id_dtype):
    pool = make_pool(torch.float32)
    before = pool.clone()
    ids = [5, 0, 5, 7, 2]  # unsorted, one repeat
    out = empty_packed(pool, len(ids))
    pack_blocks_ref(pool, torch.tensor(ids, dtype=id_dtype), out)
    for i, block in enumerate(ids):
        assert same_bits(out[i], pool[block])
    assert same_bits(pool, before)


def test_ref_unpack_writes_only_the_named_blocks():
    pool, packed = make_pool(torch.float16), make_pool(torch.float16, seed=1)[:3]
    before = pool.clone()
    unpack_blocks_ref(pool, torch.tensor([6, 1, 3]), packed)
    for i, block in enumerate([6, 1, 3]):
        assert same_bits(pool[block], packed[i])
    for block in (0, 2, 4, 5, 7):
        assert same_bits(pool[block], before[block])


# -- Triton against the reference --------------------------------------------------------------

SHAPES = [  # (block_size, kv_heads, head_dim) -> block_numel with LAYERS = 2, CHUNK = 1024
    (4, 1, 8),  # 128: one chunk, mostly masked
    (16, 3, 8),  # 1536: two chunks, the second half masked
    (4, 3, 64),  # 3072: exactly three chunks
]


@pytest.mark.parametrize("block_size,kv_heads,head_dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_pack_matches_ref(triton_device, block_size, kv_heads, head_dim, dtype):
    pool = make_pool(dtype, block_size=block_size, kv_heads=kv_heads, head_dim=head_dim)
    ids = torch.tensor([3, 7, 0, 3, 1])
    expected = empty_packed(pool, 5)
    pack_blocks_ref(pool, ids, expected)
    pool, ids = pool.to(triton_device), ids.to(triton_device)
    before = pool.clone()
    out = empty_packed(pool, 5)
    pack_blocks_triton(pool, ids, out)
    assert same_bits(out, expected)
    assert same_bits(pool, before)


@pytest.mark.parametrize("block_size,kv_heads,head_dim", SHAPES[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_round_trip_into_other_blocks(triton_device, block_size, kv_heads, head_dim, dtype):
    pool = make_pool(dtype, block_size=block_size, kv_heads=kv_heads, head_dim=head_dim)
    pool = pool.to(triton_device)
    src, dst = [6, 2, 5], [0, 7, 3]  # blocks 1 and 4 are in neither list
    packed = empty_packed(pool, 3)
    pack_blocks_triton(pool, torch.tensor(src, device=triton_device), packed)
    moved = pool.clone()
    unpack_blocks_triton(moved, torch.tensor(dst, dtype=torch.int32, device=triton_device), packed)

    expected = pool.clone()
    unpack_blocks_ref(expected, torch.tensor(dst, device=triton_device), packed)
    assert same_bits(moved, expected)
    for s, d in zip(src, dst):
        assert same_bits(moved[d], pool[s])
    for block in set(range(NUM_BLOCKS)) - set(dst):
        assert same_bits(moved[block], pool[block])


def test_triton_strided_ids(triton_device):
    pool = make_pool(torch.float32).to(triton_device)
    ids = torch.tensor([4, -1, 1, -1, 6], device=triton_device)[::2]  # stride 2: 4, 1, 6
    out = empty_packed(pool, 3)
    pack_blocks_triton(pool, ids, out)
    assert same_bits(out, pool[[4, 1, 6]])


def test_empty_ids_copy_nothing(triton_device):
    pool = make_pool(torch.bfloat16).to(triton_device)
    before = pool.clone()
    ids, packed = torch.empty(0, dtype=torch.int64, device=triton_device), empty_packed(pool, 0)
    for fn in (pack_blocks_ref, unpack_blocks_ref, pack_blocks_triton, unpack_blocks_triton):
        fn(pool, ids, packed)
    assert same_bits(pool, before)


# -- argument checks ---------------------------------------------------------------------------


def bad_args(case: str) -> tuple[Tensor, Tensor, Tensor]:
    pool, ids = make_pool(torch.float32), torch.tensor([1, 2])
    packed = empty_packed(pool, 2)
    if case == "pool dims":
        return pool[0], ids, packed[0]
    if case == "buffer shape":
        return pool, ids, empty_packed(pool, 3)
    if case == "buffer dtype":
        return pool, ids, packed.half()
    if case == "float ids":
        return pool, ids.float(), packed
    if case == "2-D ids":
        return pool, ids[None], packed
    if case == "strided pool":
        return pool[::2], ids, packed
    if case == "strided buffer":
        return pool, ids, packed.transpose(3, 4).contiguous().transpose(3, 4)
    if case == "two devices":
        return pool, ids, packed.to("meta")
    raise ValueError(case)


CASES = ["pool dims", "buffer shape", "buffer dtype", "float ids", "2-D ids", "strided pool",
         "strided buffer", "two devices"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fn", [pack_blocks_ref, unpack_blocks_ref])
def test_ref_rejects_bad_args(fn, case):
    with pytest.raises(AssertionError):
        fn(*bad_args(case))


def test_triton_rejects_bad_args(triton_device):
    pool, ids, packed = bad_args("strided buffer")
    with pytest.raises(AssertionError, match="contiguous"):
        unpack_blocks_triton(pool, ids, packed)
    pool = torch.zeros(NUM_BLOCKS, LAYERS, 2, 4, 1, 8, dtype=torch.float64)
    with pytest.raises(AssertionError, match="dtype"):
        pack_blocks_triton(pool, ids, empty_packed(pool, 2))


# -- the kernel bundle and coalesce_runs -------------------------------------------------------


def test_bundles_carry_the_block_copies(monkeypatch):
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    torch_set = select_kernels("torch", torch.device("cpu"))
    assert torch_set.pack_blocks is pack_blocks_ref
    assert torch_set.unpack_blocks is unpack_blocks_ref
    triton_set = select_kernels("auto", torch.device("cuda"))
    assert triton_set.pack_blocks is pack_blocks_triton
    assert triton_set.unpack_blocks is unpack_blocks_triton


@pytest.mark.parametrize(
    "ids,runs",
    [
        ([], []),
        ([4], [(4, 1)]),
        ([0, 1, 2, 3], [(0, 4)]),
        ([7, 3, 4, 5, 9, 8, 4], [(3, 3), (7, 3)]),
        ([10, 2, 2, 12, 11, 0], [(0, 1), (2, 1), (10, 3)]),
        ([5, 3, 1], [(1, 1), (3, 1), (5, 1)]),
    ],
)
def test_coalesce_runs(ids, runs):
    assert coalesce_runs(ids) == runs


# -- compiled on a GPU -------------------------------------------------------------------------


@pytest.mark.gpu
def test_triton_on_cuda_matches_ref(cuda_triton):
    gen = torch.Generator().manual_seed(0)
    shape = (64, 4, 2, 16, 3, 36)  # block_numel 13824: 14 chunks, the last half masked
    pool = torch.randint(-(2**15), 2**15 - 1, shape, generator=gen, dtype=torch.int16)
    pool = pool.view(torch.bfloat16).to(cuda_triton)
    src = torch.randperm(64, generator=gen)[:40].to(cuda_triton)
    dst = torch.randperm(64, generator=gen)[:40].to(cuda_triton, torch.int32)
    packed, expected = empty_packed(pool, 40), empty_packed(pool, 40)
    pack_blocks_triton(pool, src, packed)
    pack_blocks_ref(pool, src, expected)
    assert same_bits(packed, expected)
    moved, expected_pool = pool.clone(), pool.clone()
    unpack_blocks_triton(moved, dst, packed)
    unpack_blocks_ref(expected_pool, dst, packed)
    assert same_bits(moved, expected_pool)
