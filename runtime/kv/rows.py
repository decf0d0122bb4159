"""What the KV bookkeeping asks of the KV tensor itself: copying rows and comparing them.

The real engine's executor implements it over the block-major pool (runtime/engine/executor.py);
a simulation has no KV tensor and passes None, so nothing that needs one happens there.
"""

from __future__ import annotations

from typing import Protocol

import torch


class KVRows(Protocol):
    def copy(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Copies KV rows (slots) of every layer within the pool. A target may be another
        pair's source: every source is read before any target is written."""
        ...

    def change(self, rows: torch.Tensor, base: torch.Tensor, shift: int) -> torch.Tensor:
        """How much each row (slot) changed from its base row seen at `shift`, over every layer:
        float32 [n] on the CPU (kernels/row_change.py)."""
        ...
