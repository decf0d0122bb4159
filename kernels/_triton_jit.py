"""The @triton.jit kernels behind `paged_attention_triton`, `kv_store_triton`, the block copies and
`row_change_triton`.

Imported only through `_triton_support.triton_kernels()`, on the first launch: Triton is optional,
and importing it fixes interpreted vs compiled mode for the process. The launchers, with their
layout checks, are beside the torch references in paged_attention.py, kv_store.py,
block_copy.py and row_change.py.
"""

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# True when Triton runs in its CPU interpreter. Read off Triton's own library, which it jitted in
# one mode or the other when it was first imported, whoever imported it.
INTERPRETED = isinstance(tl.zeros, InterpretedFunction)


@triton.jit
def kv_store_kernel(
    pool, k, v, slots, layer,
    s_blk, s_layer, s_kv, s_row, s_head, s_dim,
    sk_tok, sk_head, sk_dim,
    sv_tok, sv_head, sv_dim,
    s_slot,
    BLOCK_SIZE: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
):  # fmt: skip
    # One program per token: its [heads, head_dim] K and V rows go to one pool row.
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots + tok * s_slot).to(tl.int64)  # int64: big pools pass 2**31 elements
    row_base = pool + (slot // BLOCK_SIZE) * s_blk + layer * s_layer + (slot % BLOCK_SIZE) * s_row
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, DIM_PAD)[None, :]
    mask = (h < NUM_HEADS) & (d < HEAD_DIM)
    k_row = tl.load(k + tok * sk_tok + h * sk_head + d * sk_dim, mask=mask)
    v_row = tl.load(v + tok * sv_tok + h * sv_head + d * sv_dim, mask=mask)
    tl.store(row_base + h * s_head + d * s_dim, k_row, mask=mask)
    tl.store(row_base + s_kv + h * s_head + d * s_dim, v_row, mask=mask)


@triton.jit
def pack_blocks_kernel(pool, packed, block_ids, block_numel, s_id, CHUNK: tl.constexpr):
    # One program per (packed block i, chunk): packed[i] = pool[block_ids[i]], as flat runs.
    i = tl.program_id(0).to(tl.int64)
    block = tl.load(block_ids + i * s_id).to(tl.int64)  # int64: big pools pass 2**31 elements
    offs = tl.program_id(1).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_numel
    vals = tl.load(pool + block * block_numel + offs, mask=mask)
    tl.store(packed + i * block_numel + offs, vals, mask=mask)


@triton.jit
def unpack_blocks_kernel(pool, packed, block_ids, block_numel, s_id, CHUNK: tl.constexpr):
    # The inverse: pool[block_ids[i]] = packed[i].
    i = tl.program_id(0).to(tl.int64)
    block = tl.load(block_ids + i * s_id).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_numel
    vals = tl.load(packed + i * block_numel + offs, mask=mask)
    tl.store(pool + block * block_numel + offs, vals, mask=mask)


@triton.jit
def paged_attention_kernel(
    q, pool, out, slots, shifts, inv_freq, kv_lens, q_starts, q_pos, tile_seq, tile_q0,
    part_m, part_l, part_acc, layer, qk_scale, num_heads,
    sq_tok, sq_head, sq_dim,
    so_tok, so_head, so_dim,
    sp_blk, sp_layer, sp_kv, sp_row, sp_head, sp_dim,
    ss_seq, ss_pos,
    sh_seq, sh_pos,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_POSITIONS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    PARTITION: tl.constexpr,
):  # fmt: skip
    # One program per (query tile, kv head), and with PARTITION > 0 per KV partition too
    # (split-KV): program_id(2) = p covers KV positions [p * PARTITION, (p + 1) * PARTITION) and
    # writes its rows' unnormalised partial softmax (max, sum, output) to part_m, part_l and
    # part_acc, [T, heads, parts(, head_dim)] float32, which paged_attention_reduce_kernel
    # merges; a partition past a row's end writes max -inf, sum 0, output 0.
    # Head dims are handled as two halves, x1 and x2, because the rotate-half RoPE on K mixes
    # exactly those: q.k = q1.k1 + q2.k2.
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
    if HAS_POSITIONS:  # the new tokens skip reused spans: each row's position is given
        row_limit = tl.load(q_pos + q_first + tok, mask=row_ok, other=0) + 1
        last = tl.minimum(q0 + BLOCK_Q, q_count) - 1
        kv_end = tl.load(q_pos + q_first + last) + 1  # what the tile's last row sees
    else:
        row_limit = prefix + tok + 1  # causal: row sees KV positions j < row_limit
        kv_end = prefix + tl.minimum(q0 + BLOCK_Q, q_count)
    d = tl.arange(0, HALF_PAD)
    d_ok = d < HALF
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_ptr = q + (q_first + tok)[:, None].to(tl.int64) * sq_tok + head[:, None] * sq_head
    q1 = tl.load(q_ptr + d[None, :] * sq_dim, mask=q_mask, other=0.0)
    q2 = tl.load(q_ptr + (d[None, :] + HALF) * sq_dim, mask=q_mask, other=0.0)
    if DOT_IN_FP32:  # the interpreter's tl.dot misreads bfloat16; every operand follows q1's type
        q1, q2 = q1.to(tl.float32), q2.to(tl.float32)
    if HAS_SHIFT:
        freq = tl.load(inv_freq + d, mask=d_ok, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    acc2 = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    seq64 = seq.to(tl.int64)
    if PARTITION > 0:
        kv_lo = tl.program_id(2) * PARTITION
        kv_hi = tl.minimum(kv_end, kv_lo + PARTITION)
    else:
        kv_lo = 0
        kv_hi = kv_end
    for start in range(kv_lo, kv_hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < kv_hi
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
            k1, k2 = k1f * cos - k2f * sin, k2f * cos + k1f * sin
        k1, k2 = k1.to(q1.dtype), k2.to(q1.dtype)
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
        v1, v2, p = v1.to(q1.dtype), v2.to(q1.dtype), p.to(q1.dtype)
        acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision=DOT_PRECISION)
        acc2 = acc2 * alpha[:, None] + tl.dot(p, v2, input_precision=DOT_PRECISION)
        m_i = m_new

    if PARTITION > 0:
        num_parts = tl.num_programs(2)
        part = ((q_first + tok).to(tl.int64) * num_heads + head) * num_parts + tl.program_id(2)
        tl.store(part_m + part, m_i, mask=row_ok)
        tl.store(part_l + part, l_i, mask=row_ok)
        a_ptr = part_acc + part[:, None] * (2 * HALF) + d[None, :]
        tl.store(a_ptr, acc1, mask=q_mask)
        tl.store(a_ptr + HALF, acc2, mask=q_mask)
    else:
        inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
        o_ptr = out + (q_first + tok)[:, None].to(tl.int64) * so_tok + head[:, None] * so_head
        tl.store(
            o_ptr + d[None, :] * so_dim,
            (acc1 * inv_l[:, None]).to(out.dtype.element_ty),
            mask=q_mask,
        )
        tl.store(
            o_ptr + (d[None, :] + HALF) * so_dim,
            (acc2 * inv_l[:, None]).to(out.dtype.element_ty),
            mask=q_mask,
        )


@triton.jit
def paged_attention_reduce_kernel(
    part_m, part_l, part_acc, out, num_parts,
    so_tok, so_head, so_dim,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, PARTS_BLOCK: tl.constexpr,
):  # fmt: skip
    # One program per (query token, head): merges its split-KV partials (paged_attention_kernel
    # with PARTITION > 0) by their log-sum-exps, in base 2 like the kernel's online softmax:
    # out = sum_p 2^(m_p - M) acc_p / sum_p 2^(m_p - M) l_p, M the running max over partitions.
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = (tok * tl.num_programs(1) + head) * num_parts
    d = tl.arange(0, DIM_PAD)
    d_ok = d < HEAD_DIM
    # Running max and sum as float32 scalar tensors: a loop-carried value keeps one type.
    m_run = tl.max(tl.full([PARTS_BLOCK], float("-inf"), tl.float32), 0)
    l_run = tl.sum(tl.zeros([PARTS_BLOCK], tl.float32), 0)
    acc = tl.zeros([DIM_PAD], tl.float32)
    for p0 in range(0, num_parts, PARTS_BLOCK):
        p = p0 + tl.arange(0, PARTS_BLOCK)
        p_ok = p < num_parts
        m_p = tl.load(part_m + row + p, mask=p_ok, other=float("-inf"))
        l_p = tl.load(part_l + row + p, mask=p_ok, other=0.0)
        acc_p = tl.load(
            part_acc + (row + p)[:, None] * HEAD_DIM + d[None, :],
            mask=p_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        m_new = tl.maximum(m_run, tl.max(m_p, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: no NaN
        alpha = tl.exp2(m_run - m_safe)
        w = tl.exp2(m_p - m_safe)  # 0 for a partition that saw nothing
        l_run = l_run * alpha + tl.sum(w * l_p, 0)
        acc = acc * alpha + tl.sum(w[:, None] * acc_p, 0)
        m_run = m_new
    result = acc / tl.where(l_run == 0.0, 1.0, l_run)
    o_ptr = out + tok * so_tok + head * so_head + d * so_dim
    tl.store(o_ptr, result.to(out.dtype.element_ty), mask=d_ok)


@triton.jit
def row_change_kernel(
    pool, rows, base, shifts, inv_freq, out,
    s_blk, s_layer, s_kv, s_row, s_head, s_dim,
    num_layers,
    BLOCK_SIZE: tl.constexpr, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
    HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr, TINY: tl.constexpr,
):  # fmt: skip
    # One program per row: over every layer, its K and V against its base row's (K rotated by
    # the shift, in float32, in the two rotate-half halves), relative L2 distances summed.
    i = tl.program_id(0)
    row = tl.load(rows + i).to(tl.int64)
    other = tl.load(base + i).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < NUM_HEADS) & (d < HALF)
    angle = tl.load(shifts + i).to(tl.float32) * tl.load(inv_freq + d, mask=d < HALF, other=0.0)
    cos, sin = tl.cos(angle), tl.sin(angle)
    offsets = h * s_head + d * s_dim
    mine_base = pool + (row // BLOCK_SIZE) * s_blk + (row % BLOCK_SIZE) * s_row + offsets
    their_base = pool + (other // BLOCK_SIZE) * s_blk + (other % BLOCK_SIZE) * s_row + offsets
    total = 0.0
    for layer in range(num_layers):
        mine = mine_base + layer * s_layer
        theirs = their_base + layer * s_layer
        # K: the base row rotated by R(shift) before comparing.
        a1 = tl.load(theirs, mask=mask, other=0.0).to(tl.float32)
        a2 = tl.load(theirs + HALF * s_dim, mask=mask, other=0.0).to(tl.float32)
        r1, r2 = a1 * cos - a2 * sin, a2 * cos + a1 * sin
        m1 = tl.load(mine, mask=mask, other=0.0).to(tl.float32)
        m2 = tl.load(mine + HALF * s_dim, mask=mask, other=0.0).to(tl.float32)
        k_diff = tl.sum(tl.sum((m1 - r1) * (m1 - r1) + (m2 - r2) * (m2 - r2), 1), 0)
        k_base = tl.sum(tl.sum(a1 * a1 + a2 * a2, 1), 0)
        # V: no rotation.
        b1 = tl.load(theirs + s_kv, mask=mask, other=0.0).to(tl.float32)
        b2 = tl.load(theirs + s_kv + HALF * s_dim, mask=mask, other=0.0).to(tl.float32)
        n1 = tl.load(mine + s_kv, mask=mask, other=0.0).to(tl.float32)
        n2 = tl.load(mine + s_kv + HALF * s_dim, mask=mask, other=0.0).to(tl.float32)
        v_diff = tl.sum(tl.sum((n1 - b1) * (n1 - b1) + (n2 - b2) * (n2 - b2), 1), 0)
        v_base = tl.sum(tl.sum(b1 * b1 + b2 * b2, 1), 0)
        total += tl.sqrt(k_diff) / tl.maximum(tl.sqrt(k_base), TINY)
        total += tl.sqrt(v_diff) / tl.maximum(tl.sqrt(v_base), TINY)
    tl.store(out + i, total)
