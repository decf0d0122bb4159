"""Copies a move's KV blocks between the device pool tensor and the host's, off the step loop.

`Mover` is what the host tier needs of a copier; `BlockMover` copies real tensors, and the
simulator's link (runtime/sim/link.py) prices copies on a simulated clock instead.

One worker thread per direction runs that direction's copies in order (on CUDA each issues
them on its own side stream and waits for it, so the step's kernels on the default stream never
wait on a copy, and an upload never queues behind offloads: PCIe and the GPU's copy engines
work both ways at once). A move is one transfer, however scattered its blocks: the source
blocks are packed into one contiguous staging buffer (kernels/block_copy.py: a Triton gather on
the GPU, torch on the CPU), the buffer crosses tiers in one copy, and is unpacked into the
target blocks.

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


class BlockMover:
    def __init__(self, device_kv: Tensor, host_kv: Tensor, pack: PackFn = pack_blocks_ref,
                 unpack: PackFn = unpack_blocks_ref) -> None:
        assert device_kv.shape[1:] == host_kv.shape[1:] and device_kv.dtype == host_kv.dtype
        self.device_kv, self.host_kv = device_kv, host_kv
        self._pack, self._unpack = pack, unpack
        self._workers = {d: ThreadPoolExecutor(1, thread_name_prefix=f"kvrt-kv-{d.value}")
                         for d in Direction}
        self._streams = {d: torch.cuda.Stream(device_kv.device) if device_kv.is_cuda else None
                         for d in Direction}
        self._lock = threading.Lock()
        self.block_bytes = device_kv[0].numel() * device_kv.element_size()
        self.bytes_moved = 0
        self.seconds = 0.0  # worker time spent copying: with bytes_moved, the observed bandwidth

    def start(self, move: Move) -> Future[None]:
        return self._workers[move.direction].submit(self.copy, move)

    def copy(self, move: Move) -> None:
        """Runs on the worker thread (or inline, for tests)."""
        started = time.perf_counter()
        if move.direction is Direction.OFFLOAD:
            source, target = self.device_kv, self.host_kv
        else:
            source, target = self.host_kv, self.device_kv
        stream = self._streams[move.direction]
        if stream is not None:
            # The step that last wrote these blocks ran on the default stream.
            stream.wait_stream(torch.cuda.current_stream(self.device_kv.device))
            with torch.cuda.stream(stream):
                self._transfer(move, source, target)
            stream.synchronize()
        else:
            self._transfer(move, source, target)
        with self._lock:
            self.bytes_moved += len(move) * self.block_bytes
            self.seconds += time.perf_counter() - started

    def _transfer(self, move: Move, source: Tensor, target: Tensor) -> None:
        source_ids = torch.tensor(move.source, dtype=torch.int64, device=source.device)
        target_ids = torch.tensor(move.target, dtype=torch.int64, device=target.device)
        staging = torch.empty((len(move), *source.shape[1:]), dtype=source.dtype,
                              device=source.device)
        self._pack(source, source_ids, staging)
        if staging.device != target.device:
            staging = staging.to(target.device, non_blocking=target.is_cuda)
        self._unpack(target, target_ids, staging)

    def close(self) -> None:
        for worker in self._workers.values():
            worker.shutdown(wait=True)
