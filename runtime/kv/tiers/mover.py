"""Copies a move's KV blocks between the device pool tensor and the host's, off the step loop.

`Mover` is what the host tier needs of a copier; `BlockMover` copies real tensors, and the
simulator's link (runtime/sim/link.py) prices copies on a simulated clock instead.

One worker thread per direction runs that direction's copies in order (on CUDA each issues
them on its own side stream and waits for it, so the step's kernels on the default stream never
wait on a copy, and an upload never queues behind offloads: PCIe and the GPU's copy engines
work both ways at once). A move's scattered blocks cross tiers in one copy per staging chunk.
The block-copy kernels (kernels/block_copy.py: Triton on the GPU, torch on the CPU) only ever
see the device pool and device tensors, since compiled Triton cannot touch host memory; the
host side is torch's own gather and scatter:

    offload  device pool -pack-> device staging -copy-> host staging -index_copy_-> host_kv
    upload   host_kv -index_select-> host staging -copy-> device staging -unpack-> device pool

On CUDA the host staging is pinned, so its copies run asynchronously on the side stream, which
the worker waits for before the move completes. On the CPU the two staging buffers are one (no
copy between them). Each direction keeps its staging buffers, grown on demand up to
`staging_bytes`; a bigger move goes through in chunks of that size, so the staging memory (on
the device too) stays bounded however many blocks a policy moves at once.

The blocks a move touches are in flight in both pools (runtime/kv/block_pool.py), so nothing
else reads or writes them while the worker copies; the engine thread applies the result
(`KVTiers.complete`) once the future is done, success or failure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch
from torch import Tensor

from kvrt.kernels.block_copy import pack_blocks_ref, unpack_blocks_ref
from kvrt.runtime.kv.tiers.moves import Direction, Move

PackFn = Callable[[Tensor, Tensor, Tensor], None]

STAGING_BYTES = 64 * 1024**2  # per direction and side: a chunk of a move


class Mover(Protocol):
    """Copies the data of moves planned by KVTiers. Contract: `start` returns a future that is
    done once the copy has ended (its exception set if it failed); the copies of one direction
    land in the order they started; `close` lets the copies in flight end. `bytes_moved` and
    `seconds` (time spent copying) give the observed bandwidth."""

    block_bytes: int
    bytes_moved: int
    seconds: float

    def start(self, move: Move) -> Future[None]: ...

    def close(self) -> None: ...


class _Staging:
    """One direction's staging buffers (touched by that direction's worker only): `device` on
    the device pool's device, `host` on the CPU (pinned on CUDA); the same tensor on the CPU.
    They only grow (doubling, up to `capacity` blocks), since pinning memory is slow."""

    def __init__(self, like: Tensor, capacity: int) -> None:
        self._like, self._capacity = like, capacity
        self.device = self.host = like.new_empty((0, *like.shape[1:]))

    def take(self, blocks: int) -> tuple[Tensor, Tensor]:
        """Views of `blocks` (at most `capacity`) blocks in each buffer, contiguous."""
        assert blocks <= self._capacity
        if self.device.shape[0] < blocks:
            size = min(self._capacity, max(blocks, 2 * self.device.shape[0]))
            shape = (size, *self._like.shape[1:])
            self.device = self._like.new_empty(shape)
            on_cpu = self._like.device.type == "cpu"
            self.host = self.device if on_cpu else torch.empty(
                shape, dtype=self._like.dtype, pin_memory=self._like.is_cuda)
        device = self.device[:blocks]
        return device, device if self.host is self.device else self.host[:blocks]


class BlockMover:
    def __init__(self, device_kv: Tensor, host_kv: Tensor, pack: PackFn = pack_blocks_ref,
                 unpack: PackFn = unpack_blocks_ref, staging_bytes: int = STAGING_BYTES) -> None:
        assert device_kv.shape[1:] == host_kv.shape[1:] and device_kv.dtype == host_kv.dtype
        if host_kv.device.type != "cpu":
            raise ValueError(f"the host tier's KV must be in CPU memory, not {host_kv.device}")
        if device_kv.untyped_storage().data_ptr() == host_kv.untyped_storage().data_ptr():
            raise ValueError("the device pool and the host tier's KV must be separate tensors")
        self.device_kv, self.host_kv = device_kv, host_kv
        self._pack, self._unpack = pack, unpack
        self._workers = {d: ThreadPoolExecutor(1, thread_name_prefix=f"kvrt-kv-{d.value}")
                         for d in Direction}
        self._streams = {d: torch.cuda.Stream(device_kv.device) if device_kv.is_cuda else None
                         for d in Direction}
        self._lock = threading.Lock()
        self.block_bytes = device_kv[0].numel() * device_kv.element_size()
        self.chunk_blocks = max(1, staging_bytes // self.block_bytes)
        self._staging = {d: _Staging(device_kv, self.chunk_blocks) for d in Direction}
        self.bytes_moved = 0
        self.seconds = 0.0  # worker time spent copying: with bytes_moved, the observed bandwidth

    def start(self, move: Move) -> Future[None]:
        return self._workers[move.direction].submit(self.copy, move)

    def copy(self, move: Move) -> None:
        """Runs on the worker thread (or inline, for tests)."""
        started = time.perf_counter()
        stream = self._streams[move.direction]
        if stream is not None:
            # The step that last wrote (or read) these blocks ran on the default stream.
            stream.wait_stream(torch.cuda.current_stream(self.device_kv.device))
            with torch.cuda.stream(stream):
                self._chunks(move, stream)
        else:
            self._chunks(move, None)
        with self._lock:
            self.bytes_moved += len(move) * self.block_bytes
            self.seconds += time.perf_counter() - started

    def _chunks(self, move: Move, stream: torch.cuda.Stream | None) -> None:
        copy = self._offload if move.direction is Direction.OFFLOAD else self._upload
        staging, step = self._staging[move.direction], self.chunk_blocks
        for at in range(0, len(move), step):
            source, target = move.source[at:at + step], move.target[at:at + step]
            copy(source, target, *staging.take(len(source)), stream)

    def _offload(self, device_ids: list[int], host_ids: list[int], device_buf: Tensor,
                 host_buf: Tensor, stream: torch.cuda.Stream | None) -> None:
        self._kernel(self._pack, device_ids, device_buf)
        if host_buf is not device_buf:
            host_buf.copy_(device_buf, non_blocking=stream is not None)
        if stream is not None:
            stream.synchronize()  # host_buf holds the blocks only once the copy has run
        self.host_kv.index_copy_(0, torch.tensor(host_ids, dtype=torch.int64), host_buf)

    def _upload(self, host_ids: list[int], device_ids: list[int], device_buf: Tensor,
                host_buf: Tensor, stream: torch.cuda.Stream | None) -> None:
        torch.index_select(self.host_kv, 0, torch.tensor(host_ids, dtype=torch.int64),
                           out=host_buf)
        if host_buf is not device_buf:
            device_buf.copy_(host_buf, non_blocking=stream is not None)
        self._kernel(self._unpack, device_ids, device_buf)
        if stream is not None:
            stream.synchronize()  # the blocks are in the pool (and host_buf free) once it has run

    def _kernel(self, kernel: PackFn, device_ids: list[int], device_buf: Tensor) -> None:
        """Runs a block-copy kernel on the device pool: never on host_kv or a host tensor
        (compiled Triton would refuse them)."""
        pool = self.device_kv
        if device_buf.device != pool.device or device_buf.data_ptr() == self.host_kv.data_ptr():
            raise RuntimeError(f"a block-copy kernel was handed a buffer on {device_buf.device}; "
                               f"the mover gives kernels tensors on {pool.device} only")
        kernel(pool, torch.tensor(device_ids, dtype=torch.int64, device=pool.device), device_buf)

    def close(self) -> None:
        for worker in self._workers.values():
            worker.shutdown(wait=True)
