"""Helpers for tests of the KV bookkeeping."""

from __future__ import annotations

import torch

from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import AdmissionPlan, HostSpec, KVManager, PrefixMatch
from kvrt.runtime.kv.tiers.mover import BlockMover


def host_spec(device_blocks: int, host_blocks: int, block_size: int = 4) -> HostSpec:
    """A host tier with a real BlockMover over tiny CPU tensors (rows of 1 head x 2 dims),
    whose copies a test may start or leave alone."""
    shape = (1, 2, block_size, 1, 2)  # layers, K/V, rows, heads, dims
    return HostSpec(host_blocks, BlockMover(torch.zeros((device_blocks, *shape)),
                                            torch.zeros((host_blocks, *shape))))


def device_plan(kv: KVManager, match: PrefixMatch) -> AdmissionPlan:
    """The admission of a device prefix match (no host fetch)."""
    return AdmissionPlan(match, match.num_blocks * kv.block_size)


def adopt_prefix(kv: KVManager, table: BlockTable, match: PrefixMatch) -> None:
    """An empty table admits the matched cached prefix, and nothing more."""
    plan = device_plan(kv, match)
    kv.allocate(table, plan, plan.computed)
