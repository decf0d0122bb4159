"""BlockMover: the block-copy kernels only ever see the device pool (compiled Triton cannot touch
host memory), and a move offloaded then uploaded comes back bit for bit, through the torch
kernels, the Triton ones (interpreted on the CPU, compiled on CUDA), chunked or not.

Pools hold random bit patterns (NaNs and their payloads included) and are compared as integers,
so any copy through a float conversion, or to the wrong block, fails.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from kvrt.kernels.block_copy import (
    pack_blocks_ref,
    pack_blocks_triton,
    unpack_blocks_ref,
    unpack_blocks_triton,
)
from kvrt.runtime.kv.tiers.mover import BlockMover
from kvrt.runtime.kv.tiers.moves import Direction, Move

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
DEVICE_BLOCKS, HOST_BLOCKS = 10, 12
BLOCK_SHAPE = (2, 2, 4, 3, 8)  # layers, k/v, block_size, kv_heads, head_dim: 384 elements


def random_pool(blocks: int, dtype: torch.dtype, seed: int) -> Tensor:
    bits = BITS[dtype]
    info = torch.iinfo(bits)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(info.min, info.max, (blocks, *BLOCK_SHAPE), generator=gen,
                         dtype=bits).view(dtype)


def same_bits(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(BITS[a.dtype]).cpu(),
                                              b.view(BITS[b.dtype]).cpu())


def move(direction: Direction, source: list[int], target: list[int]) -> Move:
    n = len(source)
    return Move(direction, source, target, [b""] * n, [()] * n, [0] * n)


class Recording:
    """Wraps a block-copy function, noting the pool tensor each call was handed."""

    def __init__(self, fn, name: str, calls: list[tuple[str, Tensor]]) -> None:
        self.fn, self.name, self.calls = fn, name, calls

    def __call__(self, kv_pool: Tensor, block_ids: Tensor, buffer: Tensor) -> None:
        self.calls.append((self.name, kv_pool))
        self.fn(kv_pool, block_ids, buffer)


@pytest.mark.parametrize("direction", list(Direction))
def test_the_kernels_are_handed_the_device_pool_only(direction: Direction) -> None:
    device_kv = random_pool(DEVICE_BLOCKS, torch.float32, seed=0)
    host_kv = random_pool(HOST_BLOCKS, torch.float32, seed=1)
    calls: list[tuple[str, Tensor]] = []
    mover = BlockMover(device_kv, host_kv, Recording(pack_blocks_ref, "pack", calls),
                       Recording(unpack_blocks_ref, "unpack", calls))
    if direction is Direction.OFFLOAD:
        mover.copy(move(direction, [3, 7], [0, 11]))
    else:
        mover.copy(move(direction, [0, 11], [3, 7]))
    want = "pack" if direction is Direction.OFFLOAD else "unpack"
    assert [name for name, _ in calls] == [want]  # the host side is torch's gather/scatter
    assert all(pool is device_kv for _, pool in calls)
    mover.close()


def round_trip(device_kv: Tensor, pack, unpack, staging_bytes: int | None = None) -> None:
    """Offloads 5 scattered device blocks, uploads them into other device blocks; checks every
    block of both pools, bit for bit, after each."""
    host_kv = random_pool(HOST_BLOCKS, device_kv.dtype, seed=9)
    kwargs = {} if staging_bytes is None else {"staging_bytes": staging_bytes}
    mover = BlockMover(device_kv, host_kv, pack, unpack, **kwargs)
    device_before, host_before = device_kv.clone(), host_kv.clone()
    source, host_ids, back = [8, 0, 5, 2, 9], [11, 3, 4, 0, 7], [1, 6, 3, 4, 7]

    mover.start(move(Direction.OFFLOAD, source, host_ids)).result()
    for s, h in zip(source, host_ids):
        assert same_bits(host_kv[h], device_before[s])
    for h in set(range(HOST_BLOCKS)) - set(host_ids):
        assert same_bits(host_kv[h], host_before[h])
    assert same_bits(device_kv, device_before)  # an offload reads the device pool only

    host_after = host_kv.clone()
    mover.start(move(Direction.UPLOAD, host_ids, back)).result()
    for s, d in zip(source, back):
        assert same_bits(device_kv[d], device_before[s])
    for d in set(range(DEVICE_BLOCKS)) - set(back):
        assert same_bits(device_kv[d], device_before[d])
    assert same_bits(host_kv, host_after)  # the host keeps its copy (inclusive)
    assert mover.bytes_moved == 10 * mover.block_bytes
    mover.close()


BLOCK_BYTES = 384 * 4  # float32


@pytest.mark.parametrize("staging_bytes", [None, 2 * BLOCK_BYTES],
                         ids=["one chunk", "chunks of 2 blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_round_trip_on_the_cpu_is_bit_exact(dtype, staging_bytes) -> None:
    round_trip(random_pool(DEVICE_BLOCKS, dtype, seed=0), pack_blocks_ref, unpack_blocks_ref,
               staging_bytes)


@pytest.mark.parametrize("staging_bytes", [None, 2 * BLOCK_BYTES],
                         ids=["one chunk", "chunks of 2 blocks"])
def test_a_round_trip_through_the_triton_kernels_is_bit_exact(triton_device,
                                                             staging_bytes) -> None:
    """Interpreted on the CPU, or compiled where there is a GPU."""
    device_kv = random_pool(DEVICE_BLOCKS, torch.float32, seed=0).to(triton_device)
    round_trip(device_kv, pack_blocks_triton, unpack_blocks_triton, staging_bytes)


def test_staging_is_reused_and_bounded() -> None:
    device_kv = random_pool(DEVICE_BLOCKS, torch.float32, seed=0)
    mover = BlockMover(device_kv, torch.zeros((HOST_BLOCKS, *BLOCK_SHAPE)),
                       staging_bytes=3 * BLOCK_BYTES)
    assert mover.chunk_blocks == 3
    mover.copy(move(Direction.OFFLOAD, [0, 1], [0, 1]))
    staging = mover._staging[Direction.OFFLOAD]
    first = staging.device.data_ptr()
    mover.copy(move(Direction.OFFLOAD, [2], [2]))  # fits: the same buffer
    assert staging.device.data_ptr() == first
    mover.copy(move(Direction.OFFLOAD, list(range(7)), list(range(5, 12))))  # in chunks of 3
    assert staging.device.shape[0] == 3  # grown, never past a chunk
    assert staging.host is staging.device  # on the CPU, one buffer: no copy between them
    device_buf, host_buf = staging.take(2)
    assert host_buf is device_buf
    assert same_bits(mover.host_kv[5:12], device_kv[:7])
    mover.close()


def test_a_host_tensor_cannot_be_the_device_pool() -> None:
    pool = torch.zeros((4, *BLOCK_SHAPE))
    with pytest.raises(ValueError, match="separate tensors"):
        BlockMover(pool, pool)
    with pytest.raises(ValueError, match="CPU memory"):
        BlockMover(pool, torch.zeros((4, *BLOCK_SHAPE), device="meta"))


@pytest.mark.gpu
def test_a_round_trip_on_cuda_with_pinned_staging_is_bit_exact(cuda_triton) -> None:
    device_kv = random_pool(DEVICE_BLOCKS, torch.bfloat16, seed=0).to(cuda_triton)
    with pytest.raises(ValueError, match="CUDA tensors"):  # compiled Triton refuses host memory
        pack_blocks_triton(device_kv.cpu(), torch.tensor([0]), device_kv[:1].cpu())
    round_trip(device_kv, pack_blocks_triton, unpack_blocks_triton, 2 * 384 * 2)
    mover = BlockMover(device_kv, torch.zeros((HOST_BLOCKS, *BLOCK_SHAPE), dtype=torch.bfloat16),
                       pack_blocks_triton, unpack_blocks_triton)
    mover.start(move(Direction.OFFLOAD, [1, 2], [3, 4])).result()
    mover.start(move(Direction.UPLOAD, [3, 4], [5, 6])).result()
    for direction in Direction:
        staging = mover._staging[direction]
        assert staging.device.is_cuda and staging.host.is_pinned()
    assert same_bits(device_kv[5:7], device_kv[1:3])
    mover.close()
