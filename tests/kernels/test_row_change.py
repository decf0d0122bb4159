"""row_change: each row's relative distance from its base row, summed over layers, with the base
row's K seen at the row's position; Triton matches the reference."""

from __future__ import annotations

import pytest
import torch

from kvrt.kernels import row_change_ref, row_change_triton
from kvrt.runtime.model.rope import RotaryTable, apply_rotary

LAYERS, BLOCK_SIZE, NUM_BLOCKS, HEADS, DIM = 3, 4, 6, 2, 8
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, DIM, 2).float() / DIM))


def rope_at(x: torch.Tensor, position: int) -> torch.Tensor:
    """x [heads, dim] with RoPE at `position`: the model's own tables, not the kernel's math."""
    cos, sin = RotaryTable(INV_FREQ, position + 1, torch.float32, torch.device("cpu")).lookup(
        torch.tensor([position]))
    return apply_rotary(x[None], cos, sin)[0]


def pool_with_pairs(changes: list[float], shifts: list[int], seed: int = 0):
    """A pool where row 2i's K and V are the base row 2i+1's (K computed `shifts[i]` positions
    later), then moved away by exactly `changes[i]` of the base row's norm in every layer."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(NUM_BLOCKS, LAYERS, 2, BLOCK_SIZE, HEADS, DIM, generator=gen)
    rows, base = [], []
    for i, (change, shift) in enumerate(zip(changes, shifts)):
        mine, theirs = 2 * i, 2 * i + 1
        rows.append(mine)
        base.append(theirs)
        for layer in range(LAYERS):
            x = torch.randn(HEADS, DIM, generator=gen)
            k_base = rope_at(x, 5)
            v_base = torch.randn(HEADS, DIM, generator=gen)
            for kv, at_base, at_mine in ((0, k_base, rope_at(x, 5 + shift)), (1, v_base, v_base)):
                delta = torch.randn(HEADS, DIM, generator=gen)
                delta *= change * at_base.norm() / delta.norm()
                pool[theirs // BLOCK_SIZE, layer, kv, theirs % BLOCK_SIZE] = at_base
                pool[mine // BLOCK_SIZE, layer, kv, mine % BLOCK_SIZE] = at_mine + delta
    return pool, torch.tensor(rows), torch.tensor(base), torch.tensor(shifts, dtype=torch.int32)


def test_ref_measures_the_change_after_undoing_the_shift():
    changes, shifts = [0.0, 0.1, 0.5, 0.02], [0, 7, -3, 40]
    pool, rows, base, shift = pool_with_pairs(changes, shifts)
    got = row_change_ref(pool, rows, base, shift, INV_FREQ)
    # K and V each moved by `change` in each layer.
    want = torch.tensor([2 * LAYERS * c for c in changes])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Compared at the wrong shift, an unchanged row looks changed.
    wrong = row_change_ref(pool, rows[1:2], base[1:2], torch.tensor([0], dtype=torch.int32),
                           INV_FREQ)
    assert float(wrong[0]) > 2 * LAYERS * changes[1] + 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_ref(triton_device, dtype):
    gen = torch.Generator().manual_seed(3)
    pool = torch.randn(NUM_BLOCKS, LAYERS, 2, BLOCK_SIZE, HEADS, DIM, generator=gen).to(dtype)
    n = 9
    rows = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen)[:n]
    base = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen)[:n]
    shifts = torch.randint(-50, 50, (n,), generator=gen, dtype=torch.int32)
    args = [t.to(triton_device) for t in (pool, rows, base, shifts, INV_FREQ)]
    got = row_change_triton(*args)
    want = row_change_ref(pool, rows, base, shifts, INV_FREQ)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.cpu(), want, atol=tol, rtol=tol)
    assert row_change_triton(*[a[:0] if a.dim() == 1 and a is not args[4] else a
                               for a in args]).numel() == 0
