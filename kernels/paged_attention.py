"""Paged attention over the block-major KV pool, for prefill chunks and decode tokens together.

    q          [T, heads, head_dim]        every new query token of the batch, RoPE'd already
    kv_pool    [blocks, layers, 2, block_size, kv_heads, head_dim]   (0 = K, 1 = V)
    kv_slots   [S, max_kv]   slot (block * block_size + row) of each KV position; entries at or
                             past kv_lens[s] are padding and never read
    kv_lens    [S]           KV positions of sequence s, this step's tokens included
    q_starts   [S + 1]       sequence s owns q rows q_starts[s]:q_starts[s+1], its LAST n_s
                             positions; query i of s sees KV positions j < kv_lens[s] - n_s + i + 1
    kv_shifts  [S, max_kv]   K at a KV position is rotated by R(shift) on load (a block stored at
                             canonical position p, read at p + shift); None = all zero, no cost

Grouped-query attention: head h reads kv head h // (heads // kv_heads).
`paged_attention_ref` (torch, also the CPU runtime path) and `paged_attention_triton` (one kernel
for prefill and decode) share this signature. Both need kv_lens[s] >= n_s for every s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvrt.kernels._triton_support import check_launch_device, jitted, tl, triton


def check_paged_attention_args(
    q: Tensor, kv_pool: Tensor, layer: int, kv_slots: Tensor, kv_lens: Tensor,
    q_starts: Tensor, kv_shifts: Tensor | None, rope_inv_freq: Tensor | None,
) -> None:  # fmt: skip
    """Cheap shape/dtype checks (no device sync), shared by both implementations."""
    assert kv_pool.dim() == 6 and kv_pool.shape[2] == 2, f"bad kv_pool shape {tuple(kv_pool.shape)}"
    _, num_layers, _, _, num_kv_heads, head_dim = kv_pool.shape
    assert 0 <= layer < num_layers, f"layer {layer} out of range"
    assert q.dim() == 3 and q.shape[2] == head_dim, f"q {tuple(q.shape)} vs head_dim {head_dim}"
    assert q.shape[1] % num_kv_heads == 0, "heads must be a multiple of kv_heads"
    assert q.dtype == kv_pool.dtype, f"q is {q.dtype} but kv_pool is {kv_pool.dtype}"
    assert head_dim % 2 == 0, "RoPE needs an even head_dim"
    num_seqs = kv_lens.shape[0]
    assert kv_slots.dim() == 2 and kv_slots.shape[0] == num_seqs, "kv_slots must be [S, max_kv]"
    assert kv_slots.dtype in (torch.int32, torch.int64), "kv_slots must be int32 or int64"
    assert kv_lens.dim() == 1 and not kv_lens.is_floating_point(), "kv_lens must be [S] int"
    assert q_starts.shape == (num_seqs + 1,), "q_starts must be [S + 1]"
    if kv_shifts is not None:
        assert kv_shifts.shape == kv_slots.shape, "kv_shifts must be shaped like kv_slots"
        assert not kv_shifts.is_floating_point(), "kv_shifts must be int"
        assert rope_inv_freq is not None, "kv_shifts needs rope_inv_freq"
        assert rope_inv_freq.shape == (head_dim // 2,), "rope_inv_freq must be [head_dim // 2]"
        assert rope_inv_freq.dtype == torch.float32, "rope_inv_freq must be float32"


# ---------------------------------------------------------------------------------------------
# torch reference (the runtime path on CPU)
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    """Which sequences go through the batched decode call and which one by one."""

    lens: list[int]
    starts: list[int]
    decode: list[int]  # sequences with exactly one new token
    prefill: list[int]  # sequences with several (a prefill chunk)


def _plan(kv_lens: Tensor, q_starts: Tensor) -> _Plan:
    # The one host sync of a call: the shapes of the SDPA calls depend on these values.
    lens, starts = kv_lens.tolist(), q_starts.tolist()
    counts = [b - a for a, b in zip(starts, starts[1:])]
    decode = [s for s, n in enumerate(counts) if n == 1]
    prefill = [s for s, n in enumerate(counts) if n > 1]
    return _Plan(lens, starts, decode, prefill)


def paged_attention_ref(
    q: Tensor, kv_pool: Tensor, layer: int, kv_slots: Tensor, kv_lens: Tensor,
    q_starts: Tensor, scale: float,
    kv_shifts: Tensor | None = None, rope_inv_freq: Tensor | None = None,
) -> Tensor:  # fmt: skip
    check_paged_attention_args(q, kv_pool, layer, kv_slots, kv_lens, q_starts, kv_shifts,
                               rope_inv_freq)
    plan = _plan(kv_lens, q_starts)
    out = torch.empty_like(q)
    if plan.decode:
        _decode_batch(out, q, kv_pool, layer, kv_slots, kv_lens, kv_shifts, rope_inv_freq, scale,
                      plan)
    for s in plan.prefill:
        _prefill_one(out, q, kv_pool, layer, kv_slots, kv_shifts, rope_inv_freq, scale, plan, s)
    return out


def _decode_batch(
    out: Tensor, q: Tensor, kv_pool: Tensor, layer: int, kv_slots: Tensor, kv_lens: Tensor,
    kv_shifts: Tensor | None, inv_freq: Tensor | None, scale: float, plan: _Plan,
) -> None:  # fmt: skip
    """Every single-token sequence in one SDPA call over a padded, masked batch."""
    width = max(plan.lens[s] for s in plan.decode)
    rows = [plan.starts[s] for s in plan.decode]
    if len(plan.decode) == kv_lens.shape[0]:  # the common all-decode step: no re-indexing
        slots, lens = kv_slots[:, :width], kv_lens
        shifts = None if kv_shifts is None else kv_shifts[:, :width]
    else:
        seqs = torch.tensor(plan.decode, device=q.device)
        slots, lens = kv_slots[seqs, :width], kv_lens[seqs]
        shifts = None if kv_shifts is None else kv_shifts[seqs, :width]
    valid = torch.arange(width, device=q.device) < lens[:, None]
    # Padding may hold any value: point it at the sequence's first slot, real data it can read.
    slots = torch.where(valid, slots, slots[:, :1])
    k, v = _gather_kv(kv_pool, layer, slots)  # [B, W, kv_heads, D]
    if shifts is not None:
        k = rotate_by_shift(k, shifts, inv_freq)
    row_index = torch.tensor(rows, device=q.device)
    attn = F.scaled_dot_product_attention(
        q[row_index].unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True,
    )  # fmt: skip
    out[row_index] = attn.squeeze(2)


def _prefill_one(
    out: Tensor, q: Tensor, kv_pool: Tensor, layer: int, kv_slots: Tensor,
    kv_shifts: Tensor | None, inv_freq: Tensor | None, scale: float, plan: _Plan, s: int,
) -> None:  # fmt: skip
    """One prefill chunk: causal attention whose diagonal is offset by the cached prefix."""
    kv_len, first, last = plan.lens[s], plan.starts[s], plan.starts[s + 1]
    n = last - first
    k, v = _gather_kv(kv_pool, layer, kv_slots[s : s + 1, :kv_len])
    if kv_shifts is not None:
        k = rotate_by_shift(k, kv_shifts[s : s + 1, :kv_len], inv_freq)
    mask = None
    if kv_len != n:  # SDPA's is_causal aligns the diagonal top-left; we need bottom-right
        kv_pos = torch.arange(kv_len, device=q.device)
        q_pos = torch.arange(kv_len - n, kv_len, device=q.device)
        mask = kv_pos[None, :] <= q_pos[:, None]
    attn = F.scaled_dot_product_attention(
        q[first:last].transpose(0, 1).unsqueeze(0), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True,
    )  # fmt: skip
    out[first:last] = attn[0].transpose(0, 1)


def _gather_kv(kv_pool: Tensor, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
    """K and V at `slots` [B, W] of one layer, each [B, W, kv_heads, head_dim]."""
    block_size, kv_heads, head_dim = kv_pool.shape[3:]
    slots = slots.long()
    blocks, rows = slots // block_size, slots % block_size
    if not kv_pool.is_contiguous():
        return kv_pool[blocks, layer, 0, rows], kv_pool[blocks, layer, 1, rows]
    # index_select over the pool seen as rows of kv_heads * head_dim is ~3x faster on CPU than
    # the equivalent advanced indexing kv_pool[blocks, layer, 0, rows] (measured, 16 x 300 slots).
    table = kv_pool.view(-1, kv_heads * head_dim)
    k_rows = ((blocks * kv_pool.shape[1] + layer) * 2 * block_size + rows).view(-1)
    shape = (*slots.shape, kv_heads, head_dim)
    k = table.index_select(0, k_rows).view(shape)
    v = table.index_select(0, k_rows + block_size).view(shape)
    return k, v


def rotate_by_shift(k: Tensor, shifts: Tensor, inv_freq: Tensor) -> Tensor:
    """k [..., W, kv_heads, D] rotated by R(shifts [..., W]), rotate-half convention.

    Computed in float32 like the model's own RoPE tables, then cast back to k's dtype.
    """
    angles = (shifts.float()[..., None] * inv_freq)[..., None, :]  # [..., W, 1, D/2]
    cos, sin = angles.cos(), angles.sin()
    k1, k2 = k.float().chunk(2, dim=-1)
    return torch.cat((k1 * cos - k2 * sin, k2 * cos + k1 * sin), dim=-1).to(k.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------

_BLOCK_N = 32  # KV positions per inner-loop tile


def paged_attention_triton(
    q: Tensor, kv_pool: Tensor, layer: int, kv_slots: Tensor, kv_lens: Tensor,
    q_starts: Tensor, scale: float,
    kv_shifts: Tensor | None = None, rope_inv_freq: Tensor | None = None,
) -> Tensor:  # fmt: skip
    check_paged_attention_args(q, kv_pool, layer, kv_slots, kv_lens, q_starts, kv_shifts,
                               rope_inv_freq)
    check_launch_device(q, kv_pool, kv_slots, kv_lens, q_starts)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = kv_pool.shape[4]
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    # A tile is BLOCK_M rows of (query token, head of the kv head's group): GQA heads share each
    # K/V load. Bigger tiles only when some sequence has more than one token (a prefill chunk).
    block_m = max(16 if num_tokens <= kv_lens.shape[0] else 64, group_pad)
    block_q = block_m // group_pad
    tile_seq, tile_q0 = _tile_table(q_starts, num_tokens, block_q)
    has_shift = kv_shifts is not None
    shifts = kv_shifts if has_shift else kv_slots  # a valid pointer the kernel never reads
    inv_freq = rope_inv_freq if has_shift else kv_lens
    half = head_dim // 2
    kernel = jitted(_paged_attention_kernel)
    kernel[(tile_seq.shape[0], num_kv_heads)](
        q, kv_pool, out, kv_slots, shifts, inv_freq, kv_lens, q_starts, tile_seq, tile_q0,
        layer, scale * math.log2(math.e),
        *q.stride(), *out.stride(), *kv_pool.stride(), *kv_slots.stride(), *shifts.stride(),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=_BLOCK_N,
        BLOCK_SIZE=kv_pool.shape[3], HALF=half, HALF_PAD=max(16, triton.next_power_of_2(half)),
        HAS_SHIFT=has_shift,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return out


def _tile_table(q_starts: Tensor, num_tokens: int, block_q: int) -> tuple[Tensor, Tensor]:
    """Sequence and first query index of each query tile, computed on the device (no sync).

    The grid is sized by an upper bound, sum(ceil(n_s / BQ)) <= ceil(T / BQ) + S; the tiles past
    the real count get sequence -1 and exit at once.
    """
    num_seqs = q_starts.shape[0] - 1
    counts = (q_starts[1:] - q_starts[:-1]).long()
    tiles = (counts + block_q - 1) // block_q
    ends = torch.cumsum(tiles, 0)
    tile = torch.arange(triton.cdiv(num_tokens, block_q) + num_seqs, device=q_starts.device)
    seq = torch.searchsorted(ends, tile, right=True)
    inside = seq < num_seqs
    seq = seq.clamp(max=num_seqs - 1)
    q0 = (tile - (ends - tiles)[seq]) * block_q
    return torch.where(inside, seq, -1).to(torch.int32), q0.to(torch.int32)


if triton is not None:

    def _paged_attention_kernel(
        q, pool, out, slots, shifts, inv_freq, kv_lens, q_starts, tile_seq, tile_q0,
        layer, qk_scale,
        sq_tok, sq_head, sq_dim,
        so_tok, so_head, so_dim,
        sp_blk, sp_layer, sp_kv, sp_row, sp_head, sp_dim,
        ss_seq, ss_pos,
        sh_seq, sh_pos,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HALF: tl.constexpr, HALF_PAD: tl.constexpr, HAS_SHIFT: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # One program per (query tile, kv head). Head dims are handled as two halves, x1 and x2,
        # because the rotate-half RoPE on K mixes exactly those: q.k = q1.k1 + q2.k2.
        seq = tl.load(tile_seq + tl.program_id(0))
        if seq < 0:
            return
        kv_head = tl.program_id(1)
        q_first = tl.load(q_starts + seq)
        q_count = tl.load(q_starts + seq + 1) - q_first
        kv_len = tl.load(kv_lens + seq)
        prefix = kv_len - q_count  # KV positions before this sequence's first new token

        q0 = tl.load(tile_q0 + tl.program_id(0))  # the tile's first query index in its sequence
        m = tl.arange(0, BLOCK_M)
        tok = q0 + m // GROUP_PAD
        head = kv_head * GROUP + m % GROUP_PAD
        row_ok = (tok < q_count) & (m % GROUP_PAD < GROUP)
        row_limit = prefix + tok + 1  # causal: row sees KV positions j < row_limit
        d = tl.arange(0, HALF_PAD)
        d_ok = d < HALF
        q_mask = row_ok[:, None] & d_ok[None, :]
        q_ptr = q + (q_first + tok)[:, None].to(tl.int64) * sq_tok + head[:, None] * sq_head
        q1 = tl.load(q_ptr + d[None, :] * sq_dim, mask=q_mask, other=0.0)
        q2 = tl.load(q_ptr + (d[None, :] + HALF) * sq_dim, mask=q_mask, other=0.0)
        if HAS_SHIFT:
            freq = tl.load(inv_freq + d, mask=d_ok, other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc1 = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
        acc2 = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
        kv_end = prefix + tl.minimum(q0 + BLOCK_Q, q_count)  # what the tile's last row sees
        seq64 = seq.to(tl.int64)
        for start in range(0, kv_end, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            j_ok = j < kv_end
            # Padding slots are never loaded (masked), so they may hold any value, even -1.
            slot = tl.load(slots + seq64 * ss_seq + j * ss_pos, mask=j_ok, other=0).to(tl.int64)
            base = (slot // BLOCK_SIZE) * sp_blk + (slot % BLOCK_SIZE) * sp_row
            kv_ptr = pool + layer * sp_layer + kv_head * sp_head + base[:, None]
            kv_mask = j_ok[:, None] & d_ok[None, :]
            k1 = tl.load(kv_ptr + d[None, :] * sp_dim, mask=kv_mask, other=0.0)
            k2 = tl.load(kv_ptr + (d[None, :] + HALF) * sp_dim, mask=kv_mask, other=0.0)
            if HAS_SHIFT:  # K stored at canonical p, read at p + shift: rotate by R(shift)
                shift = tl.load(shifts + seq64 * sh_seq + j * sh_pos, mask=j_ok, other=0)
                angle = shift.to(tl.float32)[:, None] * freq[None, :]
                cos, sin = tl.cos(angle), tl.sin(angle)
                k1f, k2f = k1.to(tl.float32), k2.to(tl.float32)
                k1 = (k1f * cos - k2f * sin).to(q1.dtype)
                k2 = (k2f * cos + k1f * sin).to(q1.dtype)
            scores = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
            scores += tl.dot(q2, tl.trans(k2), input_precision=DOT_PRECISION)
            visible = row_ok[:, None] & (j[None, :] < row_limit[:, None])
            scores = tl.where(visible, scores * qk_scale, float("-inf"))

            # Online softmax (base 2). A row that has seen nothing yet keeps m = -inf; compute
            # against 0 instead so exp2 gives 0 rather than NaN.
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(scores - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v1 = tl.load(kv_ptr + sp_kv + d[None, :] * sp_dim, mask=kv_mask, other=0.0)
            v2 = tl.load(kv_ptr + sp_kv + (d[None, :] + HALF) * sp_dim, mask=kv_mask, other=0.0)
            p = p.to(v1.dtype)
            acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision=DOT_PRECISION)
            acc2 = acc2 * alpha[:, None] + tl.dot(p, v2, input_precision=DOT_PRECISION)
            m_i = m_new

        inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
        o_ptr = out + (q_first + tok)[:, None].to(tl.int64) * so_tok + head[:, None] * so_head
        o_mask = q_mask
        tl.store(o_ptr + d[None, :] * so_dim, (acc1 * inv_l[:, None]).to(out.dtype.element_ty),
                 mask=o_mask)
        tl.store(o_ptr + (d[None, :] + HALF) * so_dim,
                 (acc2 * inv_l[:, None]).to(out.dtype.element_ty), mask=o_mask)
