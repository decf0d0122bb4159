"""Approximate prefill of a prompt `prefix + segment + suffix` whose segment's KV was computed
in another prompt (the donor), at another position: the reference algorithm.

1. The prefix is computed (in the runtime it is the reader's own cached history).
2. The segment's cached KV is shifted to the reader's positions (`shift_keys`): with ratio 0
   that is all ("shift only"). Its tokens never attended to the reader's prefix, which is what
   the recompute restores.
3. Selection, CacheBlend-style: the segment is run in the reader's context up to `check_layer`
   and the `ratio` of its tokens whose K there deviates most from the cached K are chosen (or,
   EPIC-style, its first `first_k` tokens).
4. The chosen tokens, the suffix and anything after it run in one pass over the prefix's KV and
   the rest of the segment's cached KV. A chosen token's fresh KV replaces its cached rows
   (the reader's diff, in the runtime).
5. Diff encode (`diff_keep`): of the chosen rows, only the share that changed most from the
   cached rows (`row_change`) is kept for what comes after the pass; the others are read from
   the cached copy again.

Measured on the default model (`python -m kvrt.runtime.bench.reuse_quality`, README): with
persona-length private histories, the first 15% of a block's tokens restore more than the 15%
the deviation selects (top-1 agreement 0.926 vs 0.906; shift only 0.905).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kvrt.runtime.model.dense_forward import DenseKV, dense_forward, shift_keys
from kvrt.runtime.model.llama import LlamaModel


@dataclass(frozen=True, slots=True)
class Blend:
    logits: Tensor  # [len(suffix), vocab] float32: the suffix's next-token logits
    recomputed: Tensor  # indices into the segment of the tokens computed again
    kept: Tensor  # of those, the ones whose fresh rows the reader keeps (its diff)
    kv: DenseKV  # the reader's KV after the pass: prefix, segment (diff encoded), suffix


def row_change(fresh: DenseKV, cached: DenseKV) -> Tensor:
    """[n]: how much each fresh row differs from the cached row at the same position, summed
    over layers: |K - K'| / |K'| + |V - V'| / |V'| (L2 over heads and dims): the measure of
    kernels/row_change.py, on dense KV."""
    total = torch.zeros(len(fresh))
    for pair in (*zip(fresh.keys, cached.keys), *zip(fresh.values, cached.values)):
        mine, theirs = (x.float().flatten(1) for x in pair)
        total += (mine - theirs).norm(dim=1) / theirs.norm(dim=1).clamp_min(1e-6)
    return total


def select_by_deviation(model: LlamaModel, prefix: DenseKV, segment_ids: Tensor,
                        cached: DenseKV, ratio: float, check_layer: int = 1) -> Tensor:
    """The `ratio` of the segment's tokens whose K at `check_layer`, computed after the prefix,
    deviates most (L2 over heads and dims) from the cached K shifted to the same positions."""
    count = math.ceil(ratio * len(segment_ids))
    if count == 0:
        return torch.empty(0, dtype=torch.int64)
    _, fresh = dense_forward(model, segment_ids, cached.positions, prefix,
                             num_layers=check_layer + 1)
    deviation = (fresh.keys[check_layer].float() - cached.keys[check_layer].float())
    scores = deviation.flatten(1).norm(dim=1)
    return scores.topk(count).indices.sort().values


def blend_prefill(model: LlamaModel, prefix_ids: Tensor, segment_ids: Tensor, donor: DenseKV,
                  suffix_ids: Tensor, ratio: float = 0.15, check_layer: int = 1,
                  first_k: int | None = None, pieces: list[int] | None = None,
                  diff_keep: float = 1.0) -> Blend:
    """`donor`: the segment's KV where it was computed. `first_k` replaces the deviation
    selection with the segment's first k tokens; `pieces` (lengths that add up to the segment:
    its messages, each a segment to the runtime) with the first `ratio` of each piece, as the
    runtime's reuse planner recomputes, and then keeps `diff_keep` of each piece's recomputed
    rows, as its diff encode does."""
    start = len(prefix_ids)
    _, prefix = dense_forward(model, prefix_ids, torch.arange(start))
    cached = shift_keys(donor, start - int(donor.positions[0]), model)
    groups = None  # how many rows each piece recomputes, for the diff encode
    if pieces is not None:
        assert sum(pieces) == len(segment_ids), "pieces must add up to the segment"
        starts = torch.tensor([0, *pieces]).cumsum(0)[:-1].tolist()
        groups = [math.ceil(ratio * n) for n in pieces]
        chosen = torch.cat([torch.arange(s, s + k) for s, k in zip(starts, groups)]).long()
    elif first_k is not None:
        chosen = torch.arange(min(first_k, len(segment_ids)))
    else:
        chosen = select_by_deviation(model, prefix, segment_ids, cached, ratio, check_layer)
    unchosen = torch.ones(len(segment_ids), dtype=torch.bool)
    unchosen[chosen] = False
    past = DenseKV.concat([prefix, cached.select(unchosen.nonzero().flatten())])
    end = start + len(segment_ids)
    ids = torch.cat([segment_ids[chosen], suffix_ids])
    positions = torch.cat([start + chosen, torch.arange(end, end + len(suffix_ids))])
    logits, new = dense_forward(model, ids, positions, past)
    fresh = new.select(torch.arange(len(chosen)))
    kept = torch.arange(len(chosen))
    if diff_keep < 1:  # of each piece's rows, the ones that changed most
        sizes = groups or [len(chosen)]
        change = row_change(fresh, cached.select(chosen)).split(sizes)
        kept = torch.cat([kept[:0]] + [
            part.argsort(descending=True)[:math.ceil(diff_keep * len(part))] + first
            for part, first in zip(change, itertools.accumulate([0, *sizes]))]).sort().values
    segment = DenseKV([k.clone() for k in cached.keys], [v.clone() for v in cached.values],
                      cached.positions)
    for layer in range(len(model.layers)):
        segment.keys[layer][chosen[kept]] = fresh.keys[layer][kept]
        segment.values[layer][chosen[kept]] = fresh.values[layer][kept]
    suffix = new.select(torch.arange(len(chosen), len(ids)))
    return Blend(logits[len(chosen):], chosen, kept,
                 DenseKV.concat([prefix, segment, suffix]))
