"""A device copy of a host tensor that grows at its end, kept in step by copying only the rows
from the first one that changed.

A block table's slots (and shifts) live on the host, where the scheduler edits them; each step's
batch needs them on the device. Copying every sequence's whole table every step is O(context)
host work and transfer per step, most of it unchanged since the last step (a decode step adds
one position). The mirror copies `source[changed_from:]` only, into a device buffer that grows
by doubling, so a step costs O(new positions) per sequence.
"""

from __future__ import annotations

import torch


class DeviceMirror:
    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self._buffer = torch.empty(0, dtype=dtype, device=device)
        self._length = 0  # rows of _buffer equal to the source's as of the last sync
        self.rows_copied = 0  # since creation: what the mirror saved shows against the lengths

    def sync(self, source: torch.Tensor, changed_from: int) -> torch.Tensor:
        """The device copy of 1-D `source`, whose rows before `changed_from` are the same as at
        the last sync (rows past the last sync's length count as changed)."""
        length = source.numel()
        start = max(0, min(changed_from, self._length, length))
        if length > self._buffer.numel():
            grown = torch.empty(max(length, 2 * self._buffer.numel()), dtype=self._buffer.dtype,
                                device=self._buffer.device)
            grown[:start] = self._buffer[:start]
            self._buffer = grown
        if length > start:
            self._buffer[start:length].copy_(source[start:length], non_blocking=True)
        self.rows_copied += length - start
        self._length = length
        return self._buffer[:length]
