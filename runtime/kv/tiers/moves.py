"""The bookkeeping of block moves between the device tier and the host tier.

The host tier is a second BlockPool keyed by the same content keys (prefix keys carry the
tenant's salt, so a host hit is as safe as a device hit). A move is planned here, its data is
copied by a Mover (mover.py) off the engine's step loop, and it is completed here, on the
engine thread, with success or failure:

    move      prepare (both pools)                       complete: ok         failed
    --------  -----------------------------------------  -------------------  ---------------
    offload   device: cached -> in flight                device: free         device: cached
              host: -> in flight (evicting host LRU)     host: cached, keyed  host: free
    upload    host: cached -> in flight                  host: cached (kept)  host: cached
              device: -> in flight (evicting LRU)        device: cached,      device: free
                                                         keyed
    backup    device: keyed (in use or cached), + 1 ref  device: - 1 ref      device: - 1 ref
              host: -> in flight (evicting host LRU)     host: cached, keyed  host: free

The host keeps its copy after an upload (it is inclusive), so offloading that content again
costs no copy: the device block is simply let go. Only cached blocks move (nobody reads them);
the block pool guarantees no in-flight block is found, evicted or reused. A backup copies a
keyed device block to the host and leaves it where it is, readable (a keyed block is full and
never written again); the reference it holds while the copy runs keeps it from eviction, and
once it lands, an eviction on the device drops nothing the host lacks. A landed backup is a
spare copy, so it goes to the front of the host's LRU (evicted first); when the device lets the
content go, the host copy is its last and moves to the back.
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
    positions: list[int]  # each block's index in its prompt (Block.position)
    keep_source: bool = False  # a backup: the source stays where it is, referenced meanwhile

    def __len__(self) -> int:
        return len(self.source)


@dataclass(frozen=True, slots=True)
class TierCounts:
    """Blocks whose move landed, since start."""

    offloaded: int = 0  # device -> host
    uploaded: int = 0  # host -> device
    backed_up: int = 0  # copied to the host, kept on the device


@dataclass(frozen=True, slots=True)
class Offload:
    move: Move | None  # the copies to make (None: the host held all of it, or had no room)
    host_blocks: list[int]  # where the content is, or will be once `move` lands, in order


class KVTiers:
    def __init__(self, device: BlockPool, host_blocks: int, device_owners: BlockOwners) -> None:
        """Ownership travels with the content: a block's owners on one tier own its copy on the
        other once the move lands (`host_owners` is the host's ledger, kept like the device's).
        The device pool's owner calls `left_device` from its `on_unkey`."""
        self.device, self.device_owners, self.host_owners = device, device_owners, BlockOwners()
        self.host = BlockPool(host_blocks, on_drop=self.host_owners.drop_block)
        # Completed, since start.
        self.offloaded_blocks = self.uploaded_blocks = self.backed_up_blocks = 0
        self._arriving: set[bytes] = set()  # keys an unfinished upload brings to the device

    def counts(self) -> TierCounts:
        return TierCounts(self.offloaded_blocks, self.uploaded_blocks, self.backed_up_blocks)

    def is_arriving(self, key: bytes) -> bool:
        return key in self._arriving

    def prepare_offload(self, block_ids: list[int]) -> Offload:
        """Moves these device blocks to the host: only cached ones (no reader). Those whose
        content the host holds already leave the device now; the others are planned for
        copying, as many as the host can take."""
        held: dict[int, int] = {}
        moving: list[int] = []
        for block_id in block_ids:
            if not self.device.is_cached(block_id):
                continue
            host_id = self._on_host(block_id)
            if host_id is None:
                moving.append(block_id)
            else:
                self.device.drop_cached(block_id)
                self.offloaded_blocks += 1
                held[block_id] = host_id
        move = self._plan(Direction.OFFLOAD, moving)
        if move is not None:
            held.update(zip(move.source, move.target))
        return Offload(move, [held[b] for b in block_ids if b in held])

    def offloadable(self, block_ids: list[int]) -> int:
        """How many of these device blocks `prepare_offload` would take off the device now."""
        cached = [b for b in block_ids if self.device.is_cached(b)]
        held = sum(1 for b in cached if self._on_host(b) is not None)
        return held + min(len(cached) - held, self.host.num_allocatable())

    def prepare_backup(self, block_ids: list[int]) -> Move | None:
        """Plans copying these keyed device blocks (in use or cached) to the host, leaving
        them on the device: those the host lacks, as many as it can take."""
        copying = [b for b in block_ids if self.device.blocks[b].key is not None
                   and not self.device.is_in_flight(b) and self._on_host(b) is None]
        return self._plan(Direction.OFFLOAD, copying, keep_source=True)

    def _on_host(self, device_block: int) -> int | None:
        block = self.device.blocks[device_block]
        return self.host.lookup(block.key, block.token_ids)  # type: ignore[arg-type]

    def missing_on_device(self, host_block_ids: list[int]) -> list[int]:
        """Those of these host blocks that could be uploaded: cached (no move holds them) and
        holding content the device lacks (a block moving to the device is not cached here)."""
        host, device = self.host.blocks, self.device
        return [b for b in host_block_ids if self.host.is_cached(b)
                and device.lookup(host[b].key, host[b].token_ids) is None]  # type: ignore[arg-type]

    def prepare_upload(self, host_block_ids: list[int]) -> Move | None:
        """Plans copying these cached host blocks to the device, those it lacks (as many as it
        can take now, in order: a prefix stays a prefix). None if nothing can move."""
        move = self._plan(Direction.UPLOAD, self.missing_on_device(host_block_ids))
        if move is not None:
            self._arriving.update(move.keys)
        return move

    def _plan(self, direction: Direction, blocks: list[int],
              keep_source: bool = False) -> Move | None:
        """Puts as many of these source blocks as the target can take in flight, with as many
        target blocks to receive them. A move takes cached blocks out of the source's LRU and
        index; a backup (`keep_source`) only adds a reader, so they stay readable there."""
        source, _, target, _ = self._sides(direction)
        moving = blocks[: target.num_allocatable()]
        if not moving:
            return None
        keys = [source.blocks[b].key for b in moving]
        tokens = [source.blocks[b].token_ids for b in moving]
        positions = [source.blocks[b].position for b in moving]
        for block_id in moving:
            if keep_source:
                source.acquire(block_id)
            else:
                source.begin_move_out(block_id)
        return Move(direction, moving, target.begin_move_in(len(moving)), keys,  # type: ignore[arg-type]
                    tokens, positions, keep_source)

    def complete(self, move: Move, ok: bool) -> int:
        """Applies a finished copy (`ok` False leaves the content where it was); returns how
        many blocks are now findable in the target tier."""
        source, source_owners, target, target_owners = self._sides(move.direction)
        moved = 0
        for src, dst, key, tokens, position in zip(move.source, move.target, move.keys,
                                                   move.token_ids, move.positions):
            landed = target.finish_move_in(dst, key, tokens, ok, position)
            moved += landed
            if landed:
                for owner in source_owners.owners_of(src):
                    target_owners.claim(owner, [dst])
                if target_owners.has_levels:  # it lands at its owners' retention level
                    target.set_retention(dst, target_owners.retention_levels([dst])[0])
            if move.keep_source:
                source.release([src])
                if landed:  # a spare copy while the device holds one: the host's first to go
                    target.set_recency(dst, recent=False)
                continue
            # An offload lets the device copy go once the host holds it; an upload keeps the
            # host's copy (inclusive), so the source is kept there in every case.
            keep = move.direction is Direction.UPLOAD or not landed
            source.finish_move_out(src, keep=keep)
        if move.keep_source:
            self.backed_up_blocks += moved
        elif move.direction is Direction.OFFLOAD:
            self.offloaded_blocks += moved
        else:
            self.uploaded_blocks += moved
            self._arriving.difference_update(move.keys)
        return moved

    def left_device(self, key: bytes, tokens: tuple[int, ...]) -> None:
        """The device let this content go: the host's copy, if any, is now the only one, and
        the last the host should evict."""
        host_id = self.host.lookup(key, tokens)
        if host_id is not None:
            self.host.set_recency(host_id, recent=True)

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
