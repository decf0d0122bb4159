"""What a policy decides about the KV; the engine carries it out (runtime/engine/decide.py).

    decision          the engine, through the KV manager and the host tier
    ----------------  ---------------------------------------------------------------------
    Pin(owner)        keeps the owner's keyed device blocks from eviction (one reference each)
    Unpin(owner)      gives exactly those references back
    Offload(owner)    moves the owner's cached device blocks to the host tier
    Upload(owner,     brings back what the owner's last offload sent to the host; `due`, for
      due)            an upload planned ahead, is when the policy predicts the KV is needed
                      (its tool's return): the engine records when it lands against the actual
                      return (runtime/engine/landing.py)
    Backup(blocks)    copies these keyed device blocks to the host, leaving them on the device
    Retain(owner, l)  sets the owner's retention level l (0..7, default 2): its device blocks,
                      now and later, are evicted after every cached block of a lower level
                      (a soft hint: unlike a pin, they stay evictable)
    Prefetch(owner)   brings the owner's KV on the host and not on the device back up, as an
                      upload, earliest in their prompts first, no more than fits in free blocks
                      and cached ones of levels below the owner's (it never preempts)

Each is safe whatever the state: pinning an owner that holds nothing pins nothing, unpinning
one that holds no pin gives nothing back, and without a host tier the moves do nothing. A
retention level outside 0..7 is a policy's bug: the KV manager raises ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrt.runtime.kv.owners import Owner


@dataclass(frozen=True, slots=True)
class Pin:
    owner: Owner


@dataclass(frozen=True, slots=True)
class Unpin:
    owner: Owner


@dataclass(frozen=True, slots=True)
class Offload:
    owner: Owner


@dataclass(frozen=True, slots=True)
class Upload:
    owner: Owner
    due: float | None = None  # the predicted return it aims to land before; None: wanted now


@dataclass(frozen=True, slots=True)
class Backup:
    block_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Retain:
    owner: Owner
    level: int


@dataclass(frozen=True, slots=True)
class Prefetch:
    owner: Owner


Decision = Pin | Unpin | Offload | Upload | Backup | Retain | Prefetch
