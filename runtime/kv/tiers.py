"""The host tier, and the bookkeeping of block moves between it and the device tier.

The host tier is a second BlockPool keyed by the same content keys (prefix keys carry the
tenant's salt, so a host hit is as safe as a device hit). A move is planned here, its data is
copied by a BlockMover (runtime/kv/mover.py) off the engine's step loop, and it is completed
here, on the engine thread, with success or failure:

    move      prepare (both pools)                       complete: ok         failed
    --------  -----------------------------------------  -------------------  ---------------
    offload   device: cached -> in flight                device: free         device: cached
              host: -> in flight (evicting host LRU)     host: cached, keyed  host: free
    upload    host: cached -> in flight                  host: cached (kept)  host: cached
              device: -> in flight (evicting LRU)        device: cached,      device: free
                                                         keyed

The host keeps its copy after an upload (it is inclusive), so offloading that content again
costs no copy: the device block is simply let go (`drop_on_device`). Only cached blocks move
(nobody reads them); the block pool guarantees no in-flight block is found, evicted or reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from kvrt.runtime.kv.block_pool import BlockPool
from kvrt.runtime.kv.owners import BlockOwners


class Direction(Enum):
    OFFLOAD = "offload"  # device -> host
    UPLOAD = "upload"  # host -> device


@dataclass(frozen=True, slots=True)
class Move:
    direction: Direction
    source: list[int]  # block ids in the tier the content leaves
    target: list[int]  # block ids in the tier it enters, in the same order
    keys: list[bytes]
    token_ids: list[tuple[int, ...]]

    def __len__(self) -> int:
        return len(self.source)


class KVTiers:
    def __init__(self, device: BlockPool, host: BlockPool, device_owners: BlockOwners) -> None:
        """Ownership travels with the content: a block's owners on one tier own its copy on the
        other once the move lands (`host_owners` is the host's ledger, kept like the device's)."""
        self.device, self.host = device, host
        self.device_owners, self.host_owners = device_owners, BlockOwners()
        host.on_drop = self.host_owners.drop_block
        self.offloaded_blocks = self.uploaded_blocks = 0  # completed, since start
        self._arriving: set[bytes] = set()  # keys an unfinished upload brings to the device

    def is_arriving(self, key: bytes) -> bool:
        return key in self._arriving

    def prepare_offload(self, block_ids: list[int]) -> Move | None:
        """Plans copying these device blocks to the host: only cached ones (no reader), only
        those the host lacks, as many as the host can take. None if there is nothing to copy.
        Cached blocks whose content the host already holds are dropped from the device now."""
        moving: list[int] = []
        for block_id in block_ids:
            block = self.device.blocks[block_id]
            if not self.device.is_cached(block_id):
                continue
            assert block.key is not None
            if self.host.lookup(block.key, block.token_ids) is not None:
                self.device.drop_cached(block_id)
            else:
                moving.append(block_id)
        return self._plan(Direction.OFFLOAD, moving)

    def prepare_upload(self, host_block_ids: list[int]) -> Move | None:
        """Plans copying these cached host blocks to the device (as many as it can take now,
        in order: a prefix stays a prefix). None if nothing can move."""
        move = self._plan(Direction.UPLOAD, [b for b in host_block_ids if self.host.is_cached(b)])
        if move is not None:
            self._arriving.update(move.keys)
        return move

    def _plan(self, direction: Direction, cached: list[int]) -> Move | None:
        """Puts as many of these cached source blocks as the target can take in flight, with
        as many target blocks to receive them."""
        source, _, target, _ = self._sides(direction)
        moving = cached[: target.num_allocatable()]
        if not moving:
            return None
        keys = [source.blocks[b].key for b in moving]
        tokens = [source.blocks[b].token_ids for b in moving]
        for block_id in moving:
            source.begin_move_out(block_id)
        return Move(direction, moving, target.begin_move_in(len(moving)), keys,  # type: ignore[arg-type]
                    tokens)

    def complete(self, move: Move, ok: bool) -> int:
        """Applies a finished copy (`ok` False leaves the content where it was); returns how
        many blocks are now findable in the target tier."""
        source, source_owners, target, target_owners = self._sides(move.direction)
        moved = 0
        for src, dst, key, tokens in zip(move.source, move.target, move.keys, move.token_ids):
            landed = target.finish_move_in(dst, key, tokens, ok)
            moved += landed
            if landed:
                for owner in source_owners.owners_of(src):
                    target_owners.claim(owner, [dst])
            # An offload lets the device copy go once the host holds it; an upload keeps the
            # host's copy (inclusive), so the source is kept there in every case.
            keep = move.direction is Direction.UPLOAD or not landed
            source.finish_move_out(src, keep=keep)
        if move.direction is Direction.OFFLOAD:
            self.offloaded_blocks += moved
        else:
            self.uploaded_blocks += moved
            self._arriving.difference_update(move.keys)
        return moved

    def _sides(self, direction: Direction
               ) -> tuple[BlockPool, BlockOwners, BlockPool, BlockOwners]:
        """(source pool, its owners, target pool, its owners) of a move this way."""
        device, host = (self.device, self.device_owners), (self.host, self.host_owners)
        source, target = (device, host) if direction is Direction.OFFLOAD else (host, device)
        return (*source, *target)

    def check_integrity(self) -> None:
        self.device.check_integrity()
        self.host.check_integrity()
        self.host_owners.check_integrity()
        for block_id in self.host_owners.block_ids():
            assert self.host.blocks[block_id].key is not None, f"owned host block {block_id} free"
