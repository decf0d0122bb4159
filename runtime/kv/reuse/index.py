"""The segment index: where the KV of a segment (text that may be reused at any position) lies in
the device pool, found by the segment's content alone.

When a sequence computes a segment in its own context, at the position where the segment sits
in its prompt, that copy (the master) is indexed under (salt, token ids) as soon as the blocks
holding it are keyed: full of computed KV, never written again. Another prompt holding the same
text anywhere reads the copy's rows in place, through a splice in its block table
(runtime/kv/block_table.py), at a position shift.

A copy covers a prefix of its segment: the rows in keyed blocks (the block holding a segment's
end may still be filling when the copy is first offered; the copy grows as it fills). It leaves
the index the moment any of its blocks' content goes (evicted, dropped, moved to the host).

A finished call's output is offered too (`offer_output`): its KV exists from decoding, and in an
All-Gather round the next round's shared text is the agents' outputs, each wrapped in a message
(a role header, the speaker's name). `find_within` finds such a copy inside a segment, by a
probe over the first PROBE tokens of each output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrt.runtime.kv.block_table import blocks_of
from kvrt.runtime.kv.prefix_hash import ROOT_KEY, block_key


@dataclass(frozen=True, slots=True)
class SegmentCopy:
    token_ids: tuple[int, ...]  # the whole segment (confirms a hit)
    start: int  # the position of its first token where it was computed
    slots: torch.Tensor  # the slot of each row it covers, in order: a prefix of the segment
    block_ids: tuple[int, ...]  # the distinct blocks those rows lie in
    probe: int | None = None  # an output's: the hash of (salt, its first PROBE tokens)
    salt: bytes = b""  # an output's tenant salt: a probe hit of another tenant is no hit

    @property
    def length(self) -> int:
        return self.slots.numel()


PROBE = 8  # tokens an output copy is found by


def segment_key(salt: bytes, token_ids: tuple[int, ...]) -> bytes:
    return block_key(ROOT_KEY, salt, token_ids)


def _probe(salt: bytes, token_ids: tuple[int, ...]) -> int:
    # In-process only: Python's hash is enough; a hit is confirmed by the salt and the tokens.
    return hash((salt, token_ids))


@dataclass(frozen=True, slots=True)
class Within:
    """A copy found inside a segment: its rows match the segment from `offset` on, for
    `length` rows."""

    offset: int
    copy: SegmentCopy
    length: int


class SegmentIndex:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._copies: dict[bytes, SegmentCopy] = {}
        self._keys_of_block: dict[int, set[bytes]] = {}
        self._outputs: dict[int, set[bytes]] = {}  # probe -> keys of output copies

    def __len__(self) -> int:
        return len(self._copies)

    def find(self, key: bytes, token_ids: tuple[int, ...]) -> SegmentCopy | None:
        copy = self._copies.get(key)
        return copy if copy is not None and copy.token_ids == token_ids else None

    def offer(self, key: bytes, token_ids: tuple[int, ...], start: int,
              slots: torch.Tensor, probe: int | None = None, salt: bytes = b"") -> bool:
        """Indexes the rows `slots` (in keyed blocks) as the copy of the segment computed at
        `start`, unless the index has one at least as long; True if it took this one."""
        known = self._copies.get(key)
        if slots.numel() == 0 or (known is not None and known.length >= slots.numel()):
            return False
        if known is not None:
            self._forget(key, known)
        block_ids = blocks_of(slots, self.block_size)
        self._copies[key] = SegmentCopy(token_ids, start, slots, block_ids, probe, salt)
        for block_id in block_ids:
            self._keys_of_block.setdefault(block_id, set()).add(key)
        if probe is not None:
            self._outputs.setdefault(probe, set()).add(key)
        return True

    def offer_output(self, salt: bytes, token_ids: tuple[int, ...], start: int,
                     slots: torch.Tensor) -> bool:
        """Indexes a call's output (generated at `start`, its rows in keyed blocks)."""
        if len(token_ids) < PROBE:
            return False
        return self.offer(segment_key(salt, token_ids), token_ids, start, slots,
                          _probe(salt, token_ids[:PROBE]), salt)

    def find_within(self, salt: bytes, token_ids: tuple[int, ...]) -> Within | None:
        """The output copy matching the most rows of a run inside `token_ids`, if any."""
        best = None
        for offset in range(len(token_ids) - PROBE + 1):
            for key in self._outputs.get(_probe(salt, token_ids[offset:offset + PROBE]), ()):
                copy = self._copies[key]
                if copy.salt != salt:  # a collision of Python's hash across tenants
                    continue
                length = _common_prefix(copy.token_ids[:copy.length], token_ids[offset:])
                if best is None or length > best.length:
                    best = Within(offset, copy, length)
        return best

    def drop_block(self, block_id: int) -> None:
        """The block's content is gone: every copy with rows in it leaves the index."""
        for key in self._keys_of_block.pop(block_id, set()):
            self._forget(key, self._copies[key])

    def _forget(self, key: bytes, copy: SegmentCopy) -> None:
        del self._copies[key]
        if copy.probe is not None:
            _discard(self._outputs, copy.probe, key)
        for block_id in copy.block_ids:
            _discard(self._keys_of_block, block_id, key)

    def block_ids(self) -> set[int]:
        return set(self._keys_of_block)

    def check_integrity(self) -> None:
        """The two maps mirror each other."""
        for key, copy in self._copies.items():
            assert all(key in self._keys_of_block[b] for b in copy.block_ids), f"bad copy {key!r}"
        for block_id, keys in self._keys_of_block.items():
            assert keys and all(block_id in self._copies[k].block_ids for k in keys)
        for probe, keys in self._outputs.items():
            assert keys and all(self._copies[k].probe == probe for k in keys)


def _discard(keys_of: dict, at: int, key: bytes) -> None:
    """Removes `key` from the set at `at` (if there), and the set once empty."""
    keys = keys_of.get(at)
    if keys is not None:
        keys.discard(key)
        if not keys:
            del keys_of[at]


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
