"""paged_attention: the torch reference against a dense attention written here from scratch, and
the Triton kernel against the reference (interpreted on CPU, compiled on CUDA).

Every case scatters its KV over shuffled blocks of a pool filled with NaN, so any read of a slot
that is not part of a sequence (padding, the unused rows of a last block, another layer) turns the
output into NaN and fails the comparison.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from kvrt.kernels import (
    _triton_support,
    paged_attention,
    paged_attention_ref,
    paged_attention_triton,
    triton_available,
)
from kvrt.kernels.paged_attention import (
    PARTITION_SIZE,
    _fill_programs,
    rotate_by_shift,
    split_kv_partitions,
)

LAYERS, LAYER = 3, 1
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

# (kv_len, new tokens) per sequence; the new tokens are the sequence's last positions.
SCENARIOS = {
    "decode": [(7, 1), (13, 1), (1, 1), (20, 1)],
    "prefill": [(9, 9), (40, 20), (12, 5)],  # a fresh prompt, then chunks after cached prefixes
    "mixed": [(10, 1), (16, 6), (5, 5), (37, 1)],
}


# ------------------------------------------------------------------ independent dense reference


def inv_freq_for(head_dim: int) -> Tensor:
    return 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def rope(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Hugging Face Llama RoPE in float64: x * cos + rotate_half(x) * sin, x [L, heads, D]."""
    freqs = positions.double()[:, None] * inv_freq.double()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    x = x.double()
    x1, x2 = x.chunk(2, dim=-1)
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


def dense_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q k^T) v in float64; q [n, H, D] are the last n of the L positions of k, v."""
    n, length = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k) * scale
    causal = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return torch.einsum("hnl,lhd->nhd", probs, v)


# ------------------------------------------------------------------ building paged cases


@dataclass
class Case:
    q: Tensor
    kv_pool: Tensor
    kv_slots: Tensor
    kv_lens: Tensor
    q_starts: Tensor
    scale: float
    kv_shifts: Tensor | None
    inv_freq: Tensor
    expected: Tensor  # float64, from dense_attention
    q_positions: Tensor | None = None

    def args(self) -> tuple:
        inv_freq = None if self.kv_shifts is None else self.inv_freq
        return (
            self.q,
            self.kv_pool,
            LAYER,
            self.kv_slots,
            self.kv_lens,
            self.q_starts,
            self.scale,
            self.kv_shifts,
            inv_freq,
            self.q_positions,
        )

    def to(self, device: torch.device) -> Case:
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in vars(self).items()}
        return Case(**moved)


def new_pool(
    num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> Tensor:
    return torch.full(
        (num_blocks, LAYERS, 2, block_size, kv_heads, head_dim), math.nan, dtype=dtype
    )


def write_kv(pool: Tensor, slots: Tensor, k: Tensor, v: Tensor) -> None:
    """Test-side store (plain indexing, independent of kv_store)."""
    block_size = pool.shape[3]
    for slot, k_row, v_row in zip(slots.tolist(), k, v):
        pool[slot // block_size, LAYER, 0, slot % block_size] = k_row
        pool[slot // block_size, LAYER, 1, slot % block_size] = v_row


def build_case(
    specs: list[tuple[int, int]], *, block_size: int = 4, kv_heads: int = 2, group: int = 1,
    head_dim: int = 32, dtype: torch.dtype = torch.float32, shifted: bool = False,
    slot_dtype: torch.dtype = torch.int64, pad: int | None = None, seed: int = 0,
    one_shift: bool = False,
) -> Case:  # fmt: skip
    """Sequences with KV in shuffled blocks. With `shifted`, K at reader position r was stored
    rotated at a canonical position r - d and is read with shift d (d random per position; with
    `one_shift`, one d per sequence for a random half of its positions, as a reader of one
    master copy sees)."""
    gen = torch.Generator().manual_seed(seed)
    inv_freq = inv_freq_for(head_dim).float()
    blocks_per_seq = [-(-length // block_size) for length, _ in specs]
    pool = new_pool(sum(blocks_per_seq) + 3, block_size, kv_heads, head_dim, dtype)
    order = torch.randperm(pool.shape[0], generator=gen)
    width = max(length for length, _ in specs) + 3
    # Padding garbage: by default random values, -1 and far out-of-range slots included.
    slots = torch.randint(-1, 10**6, (len(specs), width), generator=gen)
    if pad is not None:
        slots.fill_(pad)
    shifts = torch.randint(-(10**4), 10**4, (len(specs), width), generator=gen)
    qs, expected = [], []
    for s, (length, n_new) in enumerate(specs):
        first = sum(blocks_per_seq[:s])
        blocks = order[first : first + blocks_per_seq[s]]
        pos = torch.arange(length)
        slots[s, :length] = blocks[pos // block_size] * block_size + pos % block_size
        shift = torch.randint(-50, 50, (length,), generator=gen) if shifted else pos * 0
        if one_shift:
            half = torch.rand(length, generator=gen) < 0.5
            shift = torch.where(half, torch.randint(1, 50, (1,), generator=gen), 0)
        shifts[s, :length] = shift
        reader_pos = pos + 3
        k_raw = torch.randn(length, kv_heads, head_dim, generator=gen)
        v = torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype)
        write_kv(pool, slots[s, :length], rope(k_raw, reader_pos - shift, inv_freq).to(dtype), v)
        q_raw = torch.randn(n_new, kv_heads * group, head_dim, generator=gen)
        q = rope(q_raw, reader_pos[length - n_new :], inv_freq).to(dtype)
        qs.append(q)
        expected.append(dense_attention(q, rope(k_raw, reader_pos, inv_freq), v, head_dim**-0.5))
    counts = torch.tensor([0] + [n for _, n in specs])
    return Case(
        q=torch.cat(qs), kv_pool=pool, kv_slots=slots.to(slot_dtype),
        kv_lens=torch.tensor([length for length, _ in specs], dtype=torch.int32),
        q_starts=counts.cumsum(0).to(torch.int32), scale=head_dim**-0.5,
        kv_shifts=shifts.to(torch.int32) if shifted else None, inv_freq=inv_freq,
        expected=torch.cat(expected),
    )  # fmt: skip


def assert_matches(out: Tensor, expected: Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == expected.shape
    tol = TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), expected.double().cpu(), rtol=tol, atol=tol)


# ------------------------------------------------------------------ torch reference vs dense


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shifted", [False, True], ids=["no_shift", "shift"])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_ref_matches_dense(scenario, block_size, group, shifted, dtype):
    case = build_case(
        SCENARIOS[scenario], block_size=block_size, group=group, shifted=shifted, dtype=dtype
    )
    assert_matches(paged_attention_ref(*case.args()), case.expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_ref_readers_of_one_copy(scenario, dtype):
    # One shift a row, as a reader of one master copy sees.
    case = build_case(SCENARIOS[scenario], shifted=True, one_shift=True, group=3, dtype=dtype)
    assert_matches(paged_attention_ref(*case.args()), case.expected, dtype)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_ref_accepts_int32_and_int64_slots(slot_dtype):
    case = build_case(SCENARIOS["mixed"], slot_dtype=slot_dtype, shifted=True)
    assert_matches(paged_attention_ref(*case.args()), case.expected, torch.float32)


def test_padding_slots_are_never_read():
    outs = [
        paged_attention_ref(*build_case(SCENARIOS["mixed"], pad=pad, seed=3).args())
        for pad in (-1, 0, 10**9)
    ]
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_zero_shifts_equal_no_shifts():
    case = build_case(SCENARIOS["mixed"], dtype=torch.bfloat16)
    plain = paged_attention_ref(*case.args())
    case.kv_shifts = torch.zeros_like(case.kv_slots, dtype=torch.int32)
    assert torch.equal(paged_attention_ref(*case.args()), plain)


def test_ref_reads_a_strided_pool():
    case = build_case(SCENARIOS["mixed"], shifted=True)
    wide = torch.full((*case.kv_pool.shape[:-1], 2 * case.kv_pool.shape[-1]), math.nan)
    wide[..., ::2] = case.kv_pool
    contiguous_out = paged_attention_ref(*case.args())
    case.kv_pool = wide[..., ::2]
    assert not case.kv_pool.is_contiguous()
    assert torch.equal(paged_attention_ref(*case.args()), contiguous_out)


def test_rotate_by_shift_composes_rope():
    # K stored rotated at p, then rotated by d, is K rotated at p + d.
    gen = torch.Generator().manual_seed(1)
    inv_freq = inv_freq_for(64).float()
    k_raw = torch.randn(1, 20, 3, 64, generator=gen)
    p = torch.randint(0, 4000, (20,), generator=gen)
    d = torch.randint(-300, 300, (20,), generator=gen)
    stored = rope(k_raw[0], p, inv_freq).float()
    shifted = rotate_by_shift(stored[None], d[None], inv_freq)[0]
    torch.testing.assert_close(
        shifted.double(), rope(k_raw[0], p + d, inv_freq), rtol=1e-4, atol=1e-4
    )


def gapped_case(shifted: bool = False, dtype: torch.dtype = torch.float32) -> Case:
    """Prefills whose new tokens skip spans (KV reused, not computed): a full-prefill case with
    only some query rows kept, each seeing the KV positions up to its own."""
    lengths = [12, 21, 9]
    case = build_case([(n, n) for n in lengths], shifted=shifted, dtype=dtype, seed=5)
    kept = [[0, 1, 5, 6, 7, 11], [3, 4, 12, 13, 14, 15, 16, 20], [8]]
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()[:-1]]
    rows = torch.tensor([offset + p for offset, ps in zip(offsets, kept) for p in ps])
    case.q, case.expected = case.q[rows], case.expected[rows]
    case.q_starts = torch.tensor([0, *torch.tensor([len(k) for k in kept]).cumsum(0).tolist()],
                                 dtype=torch.int32)
    case.q_positions = torch.tensor([p for ps in kept for p in ps])
    return case


@pytest.mark.parametrize("shifted", [False, True], ids=["no_shift", "shift"])
def test_ref_queries_that_skip_reused_spans(shifted):
    case = gapped_case(shifted)
    assert_matches(paged_attention_ref(*case.args()), case.expected, torch.float32)


def shared_segment_case() -> Case:
    """One physical segment read by three sequences at shifts 0, 3 and 20 (the design's
    position-independent reuse): a shifted reader must see K as if computed at its position."""
    gen = torch.Generator().manual_seed(7)
    bs, kv_heads, group, dim = 4, 2, 2, 32
    inv_freq = inv_freq_for(dim).float()
    pool = new_pool(16, bs, kv_heads, dim, torch.float32)
    seg_slots = torch.tensor([5 * bs + r for r in range(4)] + [2 * bs + r for r in range(4)])
    seg_k = torch.randn(8, kv_heads, dim, generator=gen)
    seg_v = torch.randn(8, kv_heads, dim, generator=gen)
    write_kv(pool, seg_slots, rope(seg_k, torch.arange(8), inv_freq).float(), seg_v)
    # (own tokens before the segment, its reader offset = shift, own tokens after, new tokens)
    layouts = [(0, 0, 1, 1), (3, 3, 1, 1), (0, 20, 3, 3)]
    own_blocks = [b for b in range(16) if b not in (2, 5)]
    free_slots = iter(
        torch.tensor([b * bs + r for b in own_blocks for r in range(bs)])[
            torch.randperm(len(own_blocks) * bs, generator=gen)
        ].tolist()
    )
    width = 16
    slots = torch.full((3, width), -1)
    shifts = torch.zeros(3, width, dtype=torch.int32)
    qs, expected = [], []
    for s, (before, offset, after, n_new) in enumerate(layouts):
        own = [next(free_slots) for _ in range(before)]
        tail = [next(free_slots) for _ in range(after)]
        length = before + 8 + after
        slots[s, :length] = torch.tensor(own + seg_slots.tolist() + tail)
        shifts[s, before : before + 8] = offset
        reader_pos = torch.cat(
            (torch.arange(before), offset + torch.arange(8), offset + 8 + torch.arange(after))
        )
        own_k = torch.randn(before + after, kv_heads, dim, generator=gen)
        own_v = torch.randn(before + after, kv_heads, dim, generator=gen)
        own_pos = torch.cat((reader_pos[:before], reader_pos[before + 8 :]))
        write_kv(
            pool,
            torch.tensor(own + tail, dtype=torch.long),
            rope(own_k, own_pos, inv_freq).float(),
            own_v,
        )
        k_all = torch.cat((own_k[:before], seg_k, own_k[before:]))
        v_all = torch.cat((own_v[:before], seg_v, own_v[before:]))
        q = rope(
            torch.randn(n_new, kv_heads * group, dim, generator=gen),
            reader_pos[length - n_new :],
            inv_freq,
        ).float()
        qs.append(q)
        expected.append(dense_attention(q, rope(k_all, reader_pos, inv_freq), v_all, dim**-0.5))
    return Case(
        q=torch.cat(qs), kv_pool=pool, kv_slots=slots,
        kv_lens=torch.tensor([1 + 8 + 0, 3 + 8 + 1, 0 + 8 + 3], dtype=torch.int32),
        q_starts=torch.tensor([0, 1, 2, 5], dtype=torch.int32), scale=dim**-0.5,
        kv_shifts=shifts, inv_freq=inv_freq, expected=torch.cat(expected),
    )  # fmt: skip


def test_ref_shifted_shared_segment():
    case = shared_segment_case()
    assert_matches(paged_attention_ref(*case.args()), case.expected, torch.float32)


def many_readers_case(dtype: torch.dtype = torch.float32) -> Case:
    """Five decoding readers of a round: a prefix block they all read at shift 0, then their
    own history (1 to 9 tokens), then two masters' segments (10 and 7 rows, lying in two blocks
    of which they share one) each at the reader's own shift, then own tokens again."""
    gen = torch.Generator().manual_seed(11)
    bs, kv_heads, group, dim = 4, 2, 3, 32
    inv_freq = inv_freq_for(dim).float()
    pool = new_pool(40, bs, kv_heads, dim, dtype)
    prefix_slots = torch.arange(4)  # block 0
    master_slots = [torch.arange(9 * bs + 1, 9 * bs + 11), torch.arange(11 * bs + 3, 11 * bs + 10)]
    shared_k = [torch.randn(n, kv_heads, dim, generator=gen) for n in (4, 10, 7)]
    shared_v = [torch.randn(n, kv_heads, dim, generator=gen) for n in (4, 10, 7)]
    # The masters computed their segments at positions 30 and 50.
    for slots, k, v, at in zip([prefix_slots, *master_slots], shared_k, shared_v, (0, 30, 50)):
        k = rope(k, at + torch.arange(len(slots)), inv_freq)
        write_kv(pool, slots, k.to(dtype), v.to(dtype))
    width = 40
    slots = torch.full((5, width), -1)
    shifts = torch.zeros(5, width, dtype=torch.int32)
    qs, expected, lens = [], [], []
    for s, history in enumerate((1, 4, 9, 2, 6)):
        free = iter(range((14 + 4 * s) * bs, (18 + 4 * s) * bs))  # its own 4 blocks
        parts = [("shared", 0, 0), ("own", history), ("shared", 1, 4 + history - 30),
                 ("own", 2), ("shared", 2, 16 + history - 50), ("own", 3)]
        k_all, v_all, row_slots, row_shifts = [], [], [], []
        for part in parts:
            if part[0] == "own":
                n = part[1]
                own = torch.tensor([next(free) for _ in range(n)])
                k, v = torch.randn(n, kv_heads, dim, generator=gen), torch.randn(
                    n, kv_heads, dim, generator=gen)
                at = len(row_slots)
                write_kv(pool, own, rope(k, at + torch.arange(n), inv_freq).to(dtype), v.to(dtype))
                row_slots += own.tolist()
                row_shifts += [0] * n
            else:
                _, which, shift = part
                k, v = shared_k[which], shared_v[which]
                row_slots += [prefix_slots, *master_slots][which].tolist()
                row_shifts += [shift] * len(k)
            k_all.append(k)
            v_all.append(v)
        length = len(row_slots)
        slots[s, :length] = torch.tensor(row_slots)
        shifts[s, :length] = torch.tensor(row_shifts)
        lens.append(length)
        q = rope(torch.randn(1, kv_heads * group, dim, generator=gen), torch.tensor([length - 1]),
                 inv_freq).to(dtype)
        qs.append(q)
        positions = torch.arange(length)
        expected.append(dense_attention(q, rope(torch.cat(k_all), positions, inv_freq),
                                        torch.cat(v_all).to(dtype), dim**-0.5))
    return Case(
        q=torch.cat(qs), kv_pool=pool, kv_slots=slots,
        kv_lens=torch.tensor(lens, dtype=torch.int32),
        q_starts=torch.arange(6, dtype=torch.int32), scale=dim**-0.5, kv_shifts=shifts,
        inv_freq=inv_freq, expected=torch.cat(expected),
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ref_decode_reads_each_shared_block_once(dtype, monkeypatch):
    """Decode with shifts reads a block that several readers share (the prefix, the masters'
    segments) once for all of them, each reader's query rotated back by its own shift; only
    each reader's own rows are gathered per reader. Against the dense reference, and against
    the fallback that rotates every K."""
    case = many_readers_case(dtype)
    bs = case.kv_pool.shape[3]
    gathered = []
    real_gather = paged_attention._gather_kv

    def counting(pool, layer, slots):
        gathered.append(slots.numel())
        return real_gather(pool, layer, slots)

    monkeypatch.setattr(paged_attention, "_gather_kv", counting)
    out = paged_attention_ref(*case.args())
    assert_matches(out, case.expected, dtype)
    # Own rows: 2 + 3 and the history, padded to the widest reader's (9 + 5 = 14). Shared,
    # whole: the prefix's block 0 and the masters' blocks 9, 10, 12 and 13, each read by the 5
    # readers (one call), then block 11, where the first master ends and the second begins,
    # read by 10 (5 readers at 2 shifts: another call).
    assert gathered == [5 * 14, 5 * bs, 1 * bs]
    monkeypatch.setattr(paged_attention, "_FLASH_CPU", None)
    assert_matches(paged_attention_ref(*case.args()), case.expected, dtype)


# ------------------------------------------------------------------ Triton vs the reference

TRITON_CASES = [
    pytest.param({"block_size": 4, "shifted": True}, id="bs4-shift"),
    pytest.param({"block_size": 16, "shifted": False}, id="bs16-noshift"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("layout", TRITON_CASES)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_triton_matches_ref(triton_device, scenario, layout, group, dtype):
    case = build_case(SCENARIOS[scenario], group=group, dtype=dtype, **layout).to(triton_device)
    expected = paged_attention_ref(*case.args())
    out = paged_attention_triton(*case.args())
    assert out.dtype == dtype and out.device == triton_device
    torch.testing.assert_close(out.float(), expected.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("head_dim,group", [(48, 4), (32, 5)])
def test_triton_odd_head_dim_and_group(triton_device, head_dim, group):
    # head_dim / 2 = 24 and a group of 5 are not powers of two: padded lanes must stay masked.
    case = build_case(
        SCENARIOS["mixed"],
        head_dim=head_dim,
        group=group,
        kv_heads=1,
        shifted=True,
        slot_dtype=torch.int32,
    )
    assert_matches(
        paged_attention_triton(*case.to(triton_device).args()), case.expected, torch.float32
    )


def test_triton_strided_q_and_shared_segment(triton_device):
    case = shared_segment_case().to(triton_device)
    wide = torch.zeros(case.q.shape[0], case.q.shape[1], 3 * case.q.shape[2], device=triton_device)
    wide[..., 5 : 5 + case.q.shape[2]] = case.q
    case.q = wide[..., 5 : 5 + case.q.shape[2]]  # q as a view into a fused projection
    assert not case.q.is_contiguous()
    assert_matches(paged_attention_triton(*case.args()), case.expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_queries_that_skip_reused_spans(triton_device, dtype):
    case = gapped_case(shifted=True, dtype=dtype).to(triton_device)
    expected = paged_attention_ref(*case.args())
    out = paged_attention_triton(*case.args())
    torch.testing.assert_close(out.float(), expected.float(), rtol=TOL[dtype], atol=TOL[dtype])
    assert_matches(out, case.expected, dtype)


def test_triton_refuses_cpu_tensors_when_compiled(monkeypatch):
    # Compiled Triton cannot take CPU tensors; the launcher must say so before launching.
    monkeypatch.setattr(
        _triton_support, "triton_kernels", lambda: SimpleNamespace(INTERPRETED=False)
    )
    case = build_case(SCENARIOS["decode"])
    with pytest.raises(ValueError, match="CUDA"):
        paged_attention_triton(*case.args())


# ------------------------------------------------------------------ split-KV decode

# Forced to partitions of 32 KV positions (64 where said): 150 positions span 5 partitions, the
# last one ragged (22); 33 span 2 (ragged 1); 64 exactly 2; 7 one. kv_slots is 153 wide, so the
# shorter sequences also get partitions past their end (empty partials the reduce must ignore).
SPLIT_SPECS = [(150, 1), (7, 1), (33, 1), (64, 1)]


class LaunchSpy:
    """Stands in for a @triton.jit kernel: records each launch's grid, then launches it."""

    def __init__(self, kernel) -> None:
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.fixture
def launches(triton_device, monkeypatch) -> dict[str, LaunchSpy]:
    """The grids of the attention and reduce kernels' launches in this test."""
    jit = _triton_support.triton_kernels()
    spies = {}
    for name in ("paged_attention_kernel", "paged_attention_reduce_kernel"):
        spies[name] = LaunchSpy(getattr(jit, name))
        monkeypatch.setattr(jit, name, spies[name])
    return spies


@pytest.mark.parametrize(
    "dtype,group,shifted,partition",
    [
        pytest.param(torch.float32, 1, False, 32, id="fp32-mha-noshift"),
        pytest.param(torch.float32, 4, True, 32, id="fp32-gqa4-shift"),
        pytest.param(torch.bfloat16, 4, True, 32, id="bf16-gqa4-shift"),
        pytest.param(torch.bfloat16, 1, False, 64, id="bf16-mha-noshift-p64"),
        pytest.param(torch.float16, 3, True, 32, id="fp16-gqa3-shift"),
    ],
)  # fmt: skip
def test_triton_split_kv_matches_ref(triton_device, launches, dtype, group, shifted, partition):
    case = build_case(SPLIT_SPECS, group=group, dtype=dtype, shifted=shifted, block_size=16)
    case = case.to(triton_device)
    out = paged_attention_triton(*case.args(), partition_size=partition)
    parts = -(-153 // partition)
    assert launches["paged_attention_kernel"].grids[0][1:] == (2, parts)  # (kv heads, parts)
    assert launches["paged_attention_reduce_kernel"].grids == [(4, 2 * group)]  # (T, heads)
    expected = paged_attention_ref(*case.args())
    torch.testing.assert_close(out.float(), expected.float(), rtol=TOL[dtype], atol=TOL[dtype])
    assert_matches(out, case.expected, dtype)
    if dtype == torch.float32:  # the same sums in another order: as the unsplit kernel
        unsplit = paged_attention_triton(*case.args())
        torch.testing.assert_close(out, unsplit, rtol=2e-6, atol=2e-6)


def test_triton_split_kv_more_partitions_than_one_reduce_step(triton_device, launches):
    # 600 positions in partitions of 32: 19, past the 16 the reduce merges per step. K of the
    # last 88 positions is scaled up so that the top scores lie in the second step: its running
    # max and sum must be rescaled there. (Against the reference: the scaling is not in
    # case.expected.)
    case = build_case([(600, 1), (40, 1)], kv_heads=1, group=2, block_size=16, seed=2)
    late = case.kv_slots[0, 512:600]
    case.kv_pool[late // 16, LAYER, 0, late % 16] *= 3
    case = case.to(triton_device)
    out = paged_attention_triton(*case.args(), partition_size=32)
    assert launches["paged_attention_kernel"].grids[0][1:] == (1, 19)
    expected = paged_attention_ref(*case.args())
    torch.testing.assert_close(out, expected, rtol=TOL[torch.float32], atol=TOL[torch.float32])


def test_triton_split_kv_prefill_chunks_and_skipped_spans(triton_device):
    # Forced, the split also serves prefill tiles: causal rows that see nothing of a partition,
    # and queries with explicit positions (q_positions) whose visible range ends mid-partition.
    mixed = build_case(SCENARIOS["mixed"] + [(100, 1)], group=3, shifted=True, block_size=4)
    out = paged_attention_triton(*mixed.to(triton_device).args(), partition_size=32)
    assert_matches(out, mixed.expected, torch.float32)
    gapped = gapped_case(shifted=True)
    out = paged_attention_triton(*gapped.to(triton_device).args(), partition_size=32)
    assert_matches(out, gapped.expected, torch.float32)


def test_triton_split_kv_chosen_for_wide_slot_tables(triton_device, launches):
    # Unforced, the interpreter splits only past 8,192 KV positions: slot tables that wide (the
    # sequences short, the rest padding garbage) give 17 partitions, the empty ones ignored.
    case = build_case(SCENARIOS["decode"], shifted=True, kv_heads=1, group=2)
    garbage = torch.randint(-1, 10**6, (4, 8200 - case.kv_slots.shape[1]))
    case.kv_slots = torch.cat((case.kv_slots, garbage), 1)
    case.kv_shifts = torch.cat((case.kv_shifts, garbage.to(torch.int32)), 1)
    out = paged_attention_triton(*case.to(triton_device).args())
    assert launches["paged_attention_kernel"].grids[0][1:] == (1, 17)
    assert launches["paged_attention_reduce_kernel"].grids == [(4, 2)]
    assert_matches(out, case.expected, torch.float32)
    case.kv_slots, case.kv_shifts = case.kv_slots[:, :8192], case.kv_shifts[:, :8192]
    paged_attention_triton(*case.to(triton_device).args())  # 8,192 wide: one program a head
    assert launches["paged_attention_kernel"].grids[1][1:] == (1, 1)
    assert len(launches["paged_attention_reduce_kernel"].grids) == 1


def test_split_kv_partitions_choice():
    # (width, tokens, seqs, kv heads, programs that fill the device): one partition = no split.
    fill = 4 * 132  # an H100
    assert split_kv_partitions(4000, 2, 2, 8, fill) == 8  # few programs: ceil(4000 / 512)
    assert split_kv_partitions(512, 1, 1, 8, fill) == 1  # fits one partition
    assert split_kv_partitions(513, 1, 1, 8, fill) == 2
    assert split_kv_partitions(4000, 128, 128, 8, fill) == 1  # 1,024 programs fill it already
    assert split_kv_partitions(32768, 128, 128, 8, fill) == 64  # long: balance ragged lengths
    assert split_kv_partitions(32768, 129, 128, 8, fill) == 1  # a prefill chunk in the batch
    assert split_kv_partitions(4000, 2, 2, 8, fill, partition_size=256) == 16
    assert split_kv_partitions(4000, 2, 2, 8, fill_programs=0) == 1  # interpreter: long only
    assert split_kv_partitions(9000, 2, 2, 8, fill_programs=0) == 18


def test_triton_split_kv_refuses_a_ragged_partition_size(triton_device):
    case = build_case(SCENARIOS["decode"]).to(triton_device)
    with pytest.raises(AssertionError, match="partition_size"):
        paged_attention_triton(*case.args(), partition_size=48)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shifted", [False, True], ids=["no_shift", "shift"])
def test_triton_split_kv_on_cuda_at_32k(cuda_triton, shifted, dtype):
    # One 32k-token sequence decoding beside short ones: the launcher splits on its own.
    specs = [(32768, 1), (100, 1), (3000, 1)]
    case = build_case(
        specs, block_size=16, kv_heads=2, group=4, head_dim=128, dtype=dtype, shifted=shifted
    ).to(cuda_triton)
    width = case.kv_slots.shape[1]
    parts = split_kv_partitions(width, 3, 3, 2, _fill_programs(case.q.device))
    assert parts == -(-width // PARTITION_SIZE)
    out = paged_attention_triton(*case.args())
    assert_matches(out, case.expected, dtype)
    # Averaged over 32k values the long row's outputs are ~0.01, under bfloat16's absolute
    # tolerance: hold every row to a relative error too. On CPU (torch reference, and this
    # kernel interpreted) bfloat16 gives 3e-3 to 4e-3, float32 6e-7.
    rel_tol = 1e-5 if dtype == torch.float32 else 2e-2
    for row, expected in zip(out.double().cpu(), case.expected):
        assert (row - expected).norm() <= rel_tol * expected.norm()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shifted", [False, True], ids=["no_shift", "shift"])
def test_triton_on_cuda_matches_ref(cuda_triton, shifted, dtype):
    specs = SCENARIOS["mixed"] + [(300, 1)] * 8 + [(700, 130)]
    case = build_case(
        specs, block_size=16, kv_heads=3, group=3, head_dim=64, dtype=dtype, shifted=shifted
    ).to(cuda_triton)
    out = paged_attention_triton(*case.args())
    assert out.device.type == "cuda"
    assert_matches(out, case.expected, dtype)
    torch.testing.assert_close(
        out.float(), paged_attention_ref(*case.args()).float(), rtol=TOL[dtype], atol=TOL[dtype]
    )


# Compiles the kernels for an H100 (sm_90) down to a cubin, which needs no GPU: it catches what
# the interpreter forgives (dot shape limits, types across constexpr branches, loop-carried types).
# A subprocess, because this process may hold Triton in interpreter mode.
COMPILE_CHECK = """
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kvrt.kernels._triton_jit as jit
assert not jit.INTERPRETED

def compile_for_sm90(fn, types, constexprs):
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    paths = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    source = ASTSource(fn=fn, signature=sig, constexprs=paths)
    triton.compile(source, target=GPUTarget("cuda", 90, 32))

variants = [(*v, 0) for v in itertools.product(["fp32", "bf16"], [False, True], [False, True])]
variants += [("fp32", True, False, 512), ("bf16", False, True, 512)]  # split-KV
for dtype, has_shift, has_positions, partition in variants:
    ptr = "*" + dtype
    types = dict(q=ptr, pool=ptr, out=ptr, slots="*i64", shifts="*i32", inv_freq="*fp32",
                 kv_lens="*i32", q_starts="*i32", q_pos="*i64", tile_seq="*i32", tile_q0="*i32",
                 part_m="*fp32", part_l="*fp32", part_acc="*fp32", qk_scale="fp32")
    constexprs = dict(GROUP=3, GROUP_PAD=4, BLOCK_Q=16, BLOCK_M=64, BLOCK_N=32, BLOCK_SIZE=16,
                      HALF=32, HALF_PAD=32, HAS_SHIFT=has_shift,
                      HAS_POSITIONS=has_positions, DOT_IN_FP32=False,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", PARTITION=partition)
    compile_for_sm90(jit.paged_attention_kernel, types, constexprs)
    if partition:
        compile_for_sm90(jit.paged_attention_reduce_kernel,
                         dict(part_m="*fp32", part_l="*fp32", part_acc="*fp32", out=ptr),
                         dict(HEAD_DIM=64, DIM_PAD=64, PARTS_BLOCK=16))
compile_for_sm90(jit.kv_store_kernel, dict(pool="*bf16", k="*bf16", v="*bf16", slots="*i64"),
                 dict(BLOCK_SIZE=16, NUM_HEADS=3, HEAD_DIM=64, HEADS_PAD=4, DIM_PAD=64))
compile_for_sm90(jit.row_change_kernel, dict(pool="*bf16", rows="*i64", base="*i64",
                                             shifts="*i32", inv_freq="*fp32", out="*fp32"),
                 dict(BLOCK_SIZE=16, NUM_HEADS=3, HALF=32, HEADS_PAD=4, HALF_PAD=32, TINY=1e-6))
print("ok")
"""


def test_triton_kernels_compile_for_cuda(tmp_path):
    if not triton_available():  # (not importorskip: importing Triton here would fix its mode)
        pytest.skip("Triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real compile every run, and no stray cache
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_CHECK], env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
