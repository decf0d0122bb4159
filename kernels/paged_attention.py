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
    q_positions [T]          each query's position in its sequence, when a sequence's new tokens
                             are not its last n_s positions (a prefill that skips spans whose KV
                             it reuses): query i sees KV positions j <= q_positions[i]. None =
                             the last n_s, as above. A sequence's positions ascend, and its last
                             one is kv_lens[s] - 1

Grouped-query attention: head h reads kv head h // (heads // kv_heads).
`paged_attention_ref` (torch, also the CPU runtime path) and `paged_attention_triton` (one kernel
for prefill and decode) share this signature. Both need kv_lens[s] >= n_s for every s.
For decode on long contexts the Triton path splits each sequence's KV into partitions computed
by separate programs and merged by a reduce kernel (split-KV, `split_kv_partitions`).
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvrt.kernels._triton_support import check_launch_device, next_power_of_2, triton_kernels


def check_paged_attention_args(
    q: Tensor, kv_pool: Tensor, layer: int, kv_slots: Tensor, kv_lens: Tensor,
    q_starts: Tensor, kv_shifts: Tensor | None, rope_inv_freq: Tensor | None,
    q_positions: Tensor | None = None,
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
    if q_positions is not None:
        assert q_positions.shape == q.shape[:1] and not q_positions.is_floating_point(), \
            "q_positions must be [T] int"
    others = (kv_pool, kv_slots, kv_lens, q_starts, kv_shifts, rope_inv_freq, q_positions)
    assert all(t.device == q.device for t in others if t is not None), "tensors on two devices"
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
    # The shapes of the SDPA calls depend on these values: a host sync (shifted decode adds
    # more, `_split_shared`, once a step).
    lens, starts = kv_lens.tolist(), q_starts.tolist()
    counts = [b - a for a, b in itertools.pairwise(starts)]
    decode = [s for s, n in enumerate(counts) if n == 1]
    prefill = [s for s, n in enumerate(counts) if n > 1]
    return _Plan(lens, starts, decode, prefill)


def paged_attention_ref(
    q: Tensor, kv_pool: Tensor, layer: int, kv_slots: Tensor, kv_lens: Tensor,
    q_starts: Tensor, scale: float,
    kv_shifts: Tensor | None = None, rope_inv_freq: Tensor | None = None,
    q_positions: Tensor | None = None,
) -> Tensor:  # fmt: skip
    check_paged_attention_args(
        q, kv_pool, layer, kv_slots, kv_lens, q_starts, kv_shifts, rope_inv_freq, q_positions
    )
    plan = _plan(kv_lens, q_starts)
    out = torch.empty_like(q)
    if plan.decode:
        _decode_batch(
            out, q, kv_pool, layer, kv_slots, kv_lens, kv_shifts, rope_inv_freq, scale, plan
        )
    for s in plan.prefill:
        _prefill_one(out, q, kv_pool, layer, kv_slots, kv_shifts, rope_inv_freq, q_positions,
                     scale, plan, s)
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
    row_index = torch.tensor(rows, device=q.device)
    num_kv_heads, head_dim = kv_pool.shape[4:]
    # With one query token, a kv head's group of query heads can be SDPA's query length:
    # q [B, kv_heads, group, D]. Same result as enable_gqa=True, and in bfloat16 on CPU 7x faster
    # (0.75 vs 5.2 ms for 16 x 320 positions, 9/3 heads, one thread); no slower in float32.
    q_rows = q[row_index].view(len(rows), num_kv_heads, -1, head_dim)
    if shifts is not None and _FLASH_CPU is not None and q.device.type == "cpu":
        assert kv_shifts is not None and inv_freq is not None
        split = _shared_split(kv_slots, kv_lens, kv_shifts, plan, kv_pool.shape[3])
        attn = _decode_shared(q_rows, kv_pool, layer, split, inv_freq, scale)
    else:
        valid = torch.arange(width, device=q.device) < lens[:, None]
        # Padding may hold any value: point it at the sequence's first slot, real data it can
        # read.
        kv = _gather_kv(kv_pool, layer, torch.where(valid, slots, slots[:, :1]))
        k, v = kv[:, :, 0], kv[:, :, 1]  # [B, W, kv_heads, D]
        if shifts is not None:
            k = rotate_by_shift(k, shifts, inv_freq)
        attn = F.scaled_dot_product_attention(
            q_rows, k.transpose(1, 2), v.transpose(1, 2), attn_mask=valid[:, None, None, :],
            scale=scale,
        )  # fmt: skip
    out[row_index] = attn.reshape(len(rows), -1, head_dim)


# The CPU flash attention that also returns each row's log-sum-exp (private to torch, hence the
# fallback), so that attentions over disjoint sets of keys can be merged.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass(slots=True)
class _SharedBlocks:
    """Blocks that several (sequence, shift) readers read, or one reads at a non-zero shift,
    and as many readers per block as `readers` is wide."""

    slots: Tensor  # [U, block_size] each block's rows (a row nobody reads: a row somebody does)
    readers: Tensor  # [U, R] the decode sequence (index into the step's decode rows) reading it
    shifts: Tensor  # [U, R] ... at this shift
    keep: Tensor  # [U, R, block_size] ... these rows of it (none: padding)


@dataclass(slots=True)
class _SharedSplit:
    """A decode step's KV, split into what one sequence alone reads at shift 0 (its private
    rows, padded to a batch) and the shared blocks, grouped by their number of readers."""

    private_slots: Tensor  # [B, Wp]
    private_keep: Tensor  # [B, Wp]
    shared: list[_SharedBlocks]


# The last step's split, for the next layers of the same step (the batch's tensors are the same
# objects in every layer): one per thread, as each engine steps in its own.
_LAST_SPLIT = threading.local()


def _shared_split(kv_slots: Tensor, kv_lens: Tensor, kv_shifts: Tensor, plan: _Plan,
                  block_size: int) -> _SharedSplit:
    key = (kv_slots, kv_lens, kv_shifts)
    last = getattr(_LAST_SPLIT, "value", None)
    if last is not None and all(a() is b for a, b in zip(last[0], key)):
        return last[1]
    split = _split_shared(kv_slots, kv_lens, kv_shifts, plan, block_size)
    _LAST_SPLIT.value = (tuple(weakref.ref(t) for t in key), split)
    return split


@dataclass(slots=True)
class DecodeReads:
    """Who reads which block in a decode step (`decode_reads`)."""

    pairs: Tensor  # [P, 3] each distinct reader of a block: (block, shift, sequence), sorted
    pair_of: Tensor  # [N] the pair of each position read
    blocks: Tensor  # [K] the distinct blocks read, ascending
    block_of_pair: Tensor  # [P] the index into `blocks` of each pair's block
    readers: Tensor  # [K] each block's pairs
    shared_block: Tensor  # [K] bool: read by two pairs, or by one at a non-zero shift

    @property
    def shared(self) -> Tensor:
        """[N] bool: the position lies in a shared block."""
        return self.shared_block[self.block_of_pair[self.pair_of]]


def decode_reads(block: Tensor, shift: Tensor, seq: Tensor) -> DecodeReads:
    """The rule `_decode_shared` reads by, for the positions a decode step reads (the block,
    shift and sequence of each): a reader of a block is a (block, shift, sequence); a block
    that two read, or one at a non-zero shift, is read once for all of them, whole. kvrt sim
    prices the torch path's reads by it (runtime/sim/executor.py)."""
    pairs, pair_of = torch.unique(torch.stack([block, shift, seq], 1), dim=0,
                                  return_inverse=True)
    blocks, block_of_pair, readers = torch.unique_consecutive(
        pairs[:, 0], return_inverse=True, return_counts=True)
    shifted = torch.zeros(blocks.numel(), dtype=torch.long, device=block.device).index_add_(
        0, block_of_pair, (pairs[:, 1] != 0).long())
    return DecodeReads(pairs, pair_of, blocks, block_of_pair, readers,
                       (readers > 1) | (shifted > 0))


def _split_shared(kv_slots: Tensor, kv_lens: Tensor, kv_shifts: Tensor, plan: _Plan,
                  block_size: int) -> _SharedSplit:
    """`_SharedSplit` of the decode rows: host work once per step, shared by every layer."""
    device = kv_slots.device
    seqs = torch.tensor(plan.decode, device=device)
    width = max(plan.lens[s] for s in plan.decode)
    slots, lens = kv_slots[seqs, :width].long(), kv_lens[seqs].long()
    positions = torch.arange(width, device=device)
    valid = positions < lens[:, None]
    seq, column = torch.nonzero(valid, as_tuple=True)  # every KV position read, row-major
    slot = slots[seq, column]
    shift = kv_shifts[seqs, :width][seq, column].long()
    block, row = slot // block_size, slot % block_size
    reads = decode_reads(block, shift, seq)
    pairs, pair_of, blocks = reads.pairs, reads.pair_of, reads.blocks
    block_of_pair, readers, shared_block = reads.block_of_pair, reads.readers, reads.shared_block
    shared = reads.shared
    # Private: each sequence's own rows at shift 0, packed left.
    private = valid.clone()
    private[seq[shared], column[shared]] = False
    count = private.sum(1)
    private_width = max(1, int(count.max()))
    private_keep = torch.arange(private_width, device=device) < count[:, None]
    private_slots = slots[:, :1].expand(-1, private_width).clone()  # padding: a real row
    private_slots[private_keep] = slots[private]
    groups = []
    if bool(shared_block.any()):
        rank = torch.arange(pairs.shape[0], device=device) - (readers.cumsum(0) - readers)[
            block_of_pair]  # a pair's index among its block's readers
        for low, high in _reader_buckets(int(readers[shared_block].max())):
            members = shared_block & (readers > low) & (readers <= high)
            if not bool(members.any()):
                continue
            index = torch.full((blocks.numel(),), -1, dtype=torch.long, device=device)
            index[members] = torch.arange(int(members.sum()), device=device)
            u = index[block_of_pair]
            taken = u >= 0
            width_r = int(readers[members].max())
            reader_seq = torch.zeros(int(members.sum()), width_r, dtype=torch.long,
                                     device=device)
            reader_shift = torch.zeros_like(reader_seq)
            reader_seq[u[taken], rank[taken]] = pairs[taken, 2]
            reader_shift[u[taken], rank[taken]] = pairs[taken, 1]
            keep = torch.zeros(*reader_seq.shape, block_size, dtype=torch.bool, device=device)
            at = u[pair_of]
            mine = at >= 0
            keep[at[mine], rank[pair_of[mine]], row[mine]] = True
            read = keep.any(1)  # [U, block_size]: rows some reader reads
            first = read.float().argmax(1, keepdim=True)
            rows = torch.where(read, torch.arange(block_size, device=device), first)
            group_slots = blocks[members][:, None] * block_size + rows
            groups.append(_SharedBlocks(group_slots, reader_seq, reader_shift, keep))
    return _SharedSplit(private_slots, private_keep, groups)


def _reader_buckets(most: int) -> list[tuple[int, int]]:
    """(low, high]: blocks with more than `low` and at most `high` readers share one call, so
    that padding to the most readers of a call wastes at most half of its queries."""
    buckets, high = [], 1
    while True:
        buckets.append((high // 2 if high > 1 else 0, high))
        if high >= most:
            return buckets
        high *= 2


def _decode_shared(q: Tensor, kv_pool: Tensor, layer: int, split: _SharedSplit,
                   inv_freq: Tensor, scale: float) -> Tensor:
    """Decode attention where KV is read in place at any number of shifts, each shared block
    once for all its readers.

    q.R(d)k = (R(-d)q).k: each reader of a shifted block rotates its one query back by its
    shift, instead of rotating every K of its context at every step. And since a block's
    readers are batched into one call over its rows, a master copy that 16 readers read is
    read once, not 16 times (a prefix block several sequences share, too). The private rows
    and each block are attended apart and merged by their log-sum-exps.
    q [B, kv_heads, group, D]; returns [B, kv_heads, group, D]."""
    batch, kv_heads, group, dim = q.shape
    parts: list[tuple[Tensor, Tensor, Tensor]] = []  # (out [P, H, D], lse [P, H], seq [P])
    kv = _gather_kv(kv_pool, layer, split.private_slots)
    out, lse = _flash(q, kv[:, :, 0], kv[:, :, 1], split.private_keep[:, None, None, :], scale)
    parts.append((out.reshape(batch, -1, dim), lse.reshape(batch, -1),
                  torch.arange(batch, device=q.device)))
    for blocks in split.shared:
        units, width = blocks.readers.shape
        query = q[blocks.readers].reshape(units, width, kv_heads * group, dim)
        query = rotate_by_shift(query, -blocks.shifts, inv_freq)
        query = query.view(units, width, kv_heads, group, dim).transpose(1, 2)
        kv = _gather_kv(kv_pool, layer, blocks.slots)
        keep = blocks.keep.repeat_interleave(group, dim=1)[:, None]  # [U, 1, R * group, bs]
        out, lse = _flash(query.reshape(units, kv_heads, width * group, dim),
                          kv[:, :, 0], kv[:, :, 1], keep, scale)
        out = out.view(units, kv_heads, width, group, dim).transpose(1, 2)
        lse = lse.view(units, kv_heads, width, group).transpose(1, 2)
        parts.append((out.reshape(units * width, -1, dim), lse.reshape(units * width, -1),
                      blocks.readers.flatten()))
    out, lse, seq = (torch.cat(x) for x in zip(*parts))
    top = torch.full((batch, lse.shape[1]), float("-inf"), device=q.device)
    top = top.scatter_reduce(0, seq[:, None].expand_as(lse), lse, "amax")
    weight = (lse - top[seq]).exp()  # finite: every sequence reads some key
    total = torch.zeros(batch, *out.shape[1:], device=q.device)
    total.index_add_(0, seq, out * weight[..., None])
    norm = torch.zeros(batch, lse.shape[1], device=q.device).index_add_(0, seq, weight)
    return (total / norm[..., None]).view(batch, kv_heads, group, dim).to(q.dtype)


def _flash(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Attention of q [N, kv_heads, M, D] over k, v [N, W, kv_heads, D] where `keep`
    (broadcast to [N, 1, M, W]) allows: the output in float32 and each query's log-sum-exp
    [N, kv_heads, M], -inf for a query that keeps no key."""
    assert _FLASH_CPU is not None, "the caller checks it"
    bias = torch.where(keep, 0.0, float("-inf")).to(q.dtype)
    out, lse = _FLASH_CPU(q, k.transpose(1, 2), v.transpose(1, 2), 0.0, False, attn_mask=bias,
                          scale=scale)
    # A query that keeps no key (a padding reader) must weigh nothing.
    some = keep.any(-1)
    return torch.where(some[..., None], out.float(), 0.0), torch.where(some, lse, float("-inf"))


def _prefill_one(
    out: Tensor, q: Tensor, kv_pool: Tensor, layer: int, kv_slots: Tensor,
    kv_shifts: Tensor | None, inv_freq: Tensor | None, q_positions: Tensor | None,
    scale: float, plan: _Plan, s: int,
) -> None:  # fmt: skip
    """One prefill chunk: causal attention whose diagonal is offset by the cached prefix."""
    kv_len, first, last = plan.lens[s], plan.starts[s], plan.starts[s + 1]
    n = last - first
    kv = _gather_kv(kv_pool, layer, kv_slots[s : s + 1, :kv_len])
    k, v = kv[:, :, 0], kv[:, :, 1]
    if kv_shifts is not None:
        k = rotate_by_shift(k, kv_shifts[s : s + 1, :kv_len], inv_freq)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    mask = None
    if kv_len != n:  # SDPA's is_causal aligns the diagonal top-left; we need bottom-right
        kv_pos = torch.arange(kv_len, device=q.device)
        if q_positions is None:
            q_pos = torch.arange(kv_len - n, kv_len, device=q.device)
        else:
            q_pos = q_positions[first:last]
        mask = kv_pos[None, :] <= q_pos[:, None]
        # With a mask, CPU SDPA is ~25% slower under enable_gqa than on repeated KV heads
        # (10.9 vs 8.3 ms a layer for 488 queries over 1,000 positions, 9/3 heads, fp32).
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    attn = F.scaled_dot_product_attention(
        q[first:last].transpose(0, 1).unsqueeze(0), k, v,
        attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=mask is None,
    )  # fmt: skip
    out[first:last] = attn[0].transpose(0, 1)


def _gather_kv(kv_pool: Tensor, layer: int, slots: Tensor) -> Tensor:
    """K and V at `slots` [B, W] of one layer, as one [B, W, 2, kv_heads, head_dim] tensor."""
    block_size, kv_heads, head_dim = kv_pool.shape[3:]
    slots = slots.long()
    blocks, rows = slots // block_size, slots % block_size
    if not kv_pool.is_contiguous():
        return kv_pool[blocks, layer, :, rows]
    # One index_select over the pool seen as rows of kv_heads * head_dim, K and V rows
    # interleaved: ~3x faster on CPU than the advanced indexing above, and a single output
    # allocation (fresh large allocations are costly on this VM: page faults).
    table = kv_pool.view(-1, kv_heads * head_dim)
    k_rows = (blocks * kv_pool.shape[1] + layer) * 2 * block_size + rows
    kv_rows = torch.stack((k_rows, k_rows + block_size), dim=-1).view(-1)
    return table.index_select(0, kv_rows).view(*slots.shape, 2, kv_heads, head_dim)


def rotate_by_shift(k: Tensor, shifts: Tensor, inv_freq: Tensor) -> Tensor:
    """k [..., W, kv_heads, D] rotated by R(shifts [..., W]), rotate-half convention.

    Computed in float32 like the model's own RoPE tables, then cast back to k's dtype.
    """
    angles = shifts.float()[..., None, None] * inv_freq  # [..., W, 1, D/2]
    cos, sin = angles.cos(), angles.sin()
    k1, k2 = k.float().chunk(2, dim=-1)
    out = torch.empty(k.shape, dtype=torch.float32, device=k.device)
    out1, out2 = out.chunk(2, dim=-1)
    # In place into one buffer: this runs over a whole context, so temporaries are costly.
    torch.mul(k1, cos, out=out1).addcmul_(k2, sin, value=-1)
    torch.mul(k2, cos, out=out2).addcmul_(k1, sin)
    return out.to(k.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------

_BLOCK_N = 32  # KV positions per inner-loop tile
# Split-KV decode (flash-decoding): KV positions per partition, as vLLM's paged_attention_v2.
# Fixed, so a program's work is bounded whatever the context, and a multiple of _BLOCK_N.
PARTITION_SIZE = 512
_SPLIT_ALWAYS_ABOVE = 8192  # KV width past which decode always splits (vLLM's v1/v2 line)
_PARTS_BLOCK = 16  # partitions the reduce kernel merges per step


def split_kv_partitions(
    width: int, num_tokens: int, num_seqs: int, num_kv_heads: int, fill_programs: int,
    partition_size: int = PARTITION_SIZE,
) -> int:  # fmt: skip
    """How many KV partitions the Triton kernel splits each sequence into (1: no split).

    Decode-sized batches only (T <= S: the prefill tiles of a chunk already give many programs,
    and the partials would cost T x heads x parts x head_dim floats). Unsplit, decode runs one
    program per (sequence, kv head); a split pays a second launch and a round trip of the
    partials through memory, which is worth it when those programs cannot fill the device
    (fewer than `fill_programs`), or when the context is long enough that one long sequence
    in a batch of short ones would leave its program running alone. `width` is kv_slots' width,
    an upper bound of every kv_len known without a device sync; partitions past a sequence's
    end exit after writing an empty partial.
    """
    parts = -(-width // partition_size)
    if num_tokens > num_seqs or parts <= 1:
        return 1
    if width > _SPLIT_ALWAYS_ABOVE or num_seqs * num_kv_heads < fill_programs:
        return parts
    return 1


@functools.cache
def _fill_programs(device: torch.device) -> int:
    """Programs that keep every SM of `device` busy: four resident per SM. 0 off CUDA (the
    interpreter: nothing to fill, so only long contexts split there)."""
    if device.type != "cuda":
        return 0
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def paged_attention_triton(
    q: Tensor, kv_pool: Tensor, layer: int, kv_slots: Tensor, kv_lens: Tensor,
    q_starts: Tensor, scale: float,
    kv_shifts: Tensor | None = None, rope_inv_freq: Tensor | None = None,
    q_positions: Tensor | None = None, *, partition_size: int | None = None,
) -> Tensor:  # fmt: skip
    """`partition_size`: None lets `split_kv_partitions` decide on split-KV; a multiple of 32
    splits every sequence into partitions of that many KV positions, whatever the batch (tests
    check the split path on short contexts this way)."""
    check_paged_attention_args(
        q, kv_pool, layer, kv_slots, kv_lens, q_starts, kv_shifts, rope_inv_freq, q_positions
    )
    _check_triton_layout(q, kv_pool, kv_lens, q_starts, kv_shifts, rope_inv_freq, q_positions)
    assert partition_size is None or (partition_size > 0 and partition_size % _BLOCK_N == 0), \
        f"partition_size must be a positive multiple of {_BLOCK_N}, not {partition_size}"
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = kv_pool.shape[4]
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    partition, parts = _split_plan(q, kv_slots, num_kv_heads, partition_size)
    group = num_heads // num_kv_heads
    group_pad = next_power_of_2(group)
    # A tile is BLOCK_M rows of (query token, head of the kv head's group): GQA heads share each
    # K/V load. Bigger tiles only when some sequence has more than one token (a prefill chunk).
    block_m = max(16 if num_tokens <= kv_lens.shape[0] else 64, group_pad)
    block_q = block_m // group_pad
    tile_seq, tile_q0 = _tile_table(q_starts, num_tokens, block_q)
    has_shift = kv_shifts is not None
    shifts = kv_shifts if has_shift else kv_slots  # a valid pointer the kernel never reads
    inv_freq = rope_inv_freq if has_shift else kv_lens
    has_positions = q_positions is not None
    positions = q_positions if has_positions else kv_lens
    half = head_dim // 2
    jit = triton_kernels()
    if partition:  # split-KV: partials [T, heads, parts(, head_dim)], then the reduce
        part_m = torch.empty(num_tokens, num_heads, parts, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(num_tokens, num_heads, parts, head_dim, device=q.device)
    else:  # valid pointers the kernel never reads
        part_m = part_l = part_acc = kv_lens
    grid = (tile_seq.shape[0], num_kv_heads, parts)
    jit.paged_attention_kernel[grid](
        q, kv_pool, out, kv_slots, shifts, inv_freq, kv_lens, q_starts, positions, tile_seq,
        tile_q0, part_m, part_l, part_acc, layer, scale * math.log2(math.e), num_heads,
        *q.stride(), *out.stride(), *kv_pool.stride(), *kv_slots.stride(), *shifts.stride(),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=_BLOCK_N,
        BLOCK_SIZE=kv_pool.shape[3], HALF=half, HALF_PAD=max(16, next_power_of_2(half)),
        HAS_SHIFT=has_shift, HAS_POSITIONS=has_positions,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # Triton's interpreter multiplies bfloat16 as raw integers; upcast only there.
        DOT_IN_FP32=jit.INTERPRETED and q.dtype == torch.bfloat16,
        PARTITION=partition,
    )  # fmt: skip
    if partition:
        jit.paged_attention_reduce_kernel[(num_tokens, num_heads)](
            part_m, part_l, part_acc, out, parts, *out.stride(),
            HEAD_DIM=head_dim, DIM_PAD=next_power_of_2(head_dim), PARTS_BLOCK=_PARTS_BLOCK,
        )  # fmt: skip
    return out


def _split_plan(
    q: Tensor, kv_slots: Tensor, num_kv_heads: int, partition_size: int | None
) -> tuple[int, int]:
    """(KV positions per partition, partitions): (0, 1) runs the kernel unsplit."""
    num_seqs, width = kv_slots.shape
    if partition_size is not None:  # forced
        return partition_size, max(1, -(-width // partition_size))
    fill = _fill_programs(q.device)
    parts = split_kv_partitions(width, q.shape[0], num_seqs, num_kv_heads, fill)
    return (PARTITION_SIZE, parts) if parts > 1 else (0, 1)


def _check_triton_layout(
    q: Tensor, kv_pool: Tensor, kv_lens: Tensor, q_starts: Tensor, kv_shifts: Tensor | None,
    rope_inv_freq: Tensor | None, q_positions: Tensor | None,
) -> None:  # fmt: skip
    # Strided tensors get their strides passed; these few are indexed as dense vectors.
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported {q.dtype}"
    assert kv_lens.is_contiguous() and q_starts.is_contiguous(), "kv_lens, q_starts: contiguous"
    assert kv_shifts is None or kv_shifts.dtype in (torch.int32, torch.int64)
    assert rope_inv_freq is None or rope_inv_freq.is_contiguous(), "rope_inv_freq: contiguous"
    assert q_positions is None or q_positions.is_contiguous(), "q_positions: contiguous"
    check_launch_device(q)  # the others share its device (check_paged_attention_args)


def _tile_table(q_starts: Tensor, num_tokens: int, block_q: int) -> tuple[Tensor, Tensor]:
    """Sequence and first query index of each query tile, computed on the device (no sync).

    The grid is sized by an upper bound, sum(ceil(n_s / BQ)) <= ceil(T / BQ) + S; the tiles past
    the real count get sequence -1 and exit at once.
    """
    num_seqs = q_starts.shape[0] - 1
    counts = (q_starts[1:] - q_starts[:-1]).long()
    tiles = (counts + block_q - 1) // block_q
    ends = torch.cumsum(tiles, 0)
    tile = torch.arange(-(-num_tokens // block_q) + num_seqs, device=q_starts.device)
    seq = torch.searchsorted(ends, tile, right=True)
    inside = seq < num_seqs
    seq = seq.clamp(max=num_seqs - 1)
    q0 = (tile - (ends - tiles)[seq]) * block_q
    return torch.where(inside, seq, -1).to(torch.int32), q0.to(torch.int32)
