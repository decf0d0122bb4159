"""A dense forward with explicit positions: the reference path of position-independent prefill.

`LlamaModel.forward` reads a paged pool and assumes a chunk's queries are the last positions of
its sequence. Reusing a cached segment at a new position, and recomputing only some of its
tokens, breaks both assumptions: the tokens computed in one pass sit anywhere among the cached
ones. Here every key carries its position, a query sees exactly the keys at positions up to its
own, and the KV comes and goes as plain per-layer tensors. Slow and simple on purpose: it is
what the measurement of approximate reuse, and later its kernels, are checked against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvrt.runtime.model.llama import LlamaModel
from kvrt.runtime.model.rope import apply_rotary


@dataclass(slots=True)
class DenseKV:
    """Per layer, K (RoPE applied at `positions`) and V of some tokens: [n, kv_heads, head_dim]."""

    keys: list[Tensor]
    values: list[Tensor]
    positions: Tensor  # [n] int64

    def __len__(self) -> int:
        return len(self.positions)

    def select(self, rows: Tensor) -> DenseKV:
        return DenseKV([k[rows] for k in self.keys], [v[rows] for v in self.values],
                       self.positions[rows])

    @staticmethod
    def concat(parts: list[DenseKV]) -> DenseKV:
        layers = len(parts[0].keys)
        return DenseKV([torch.cat([p.keys[i] for p in parts]) for i in range(layers)],
                       [torch.cat([p.values[i] for p in parts]) for i in range(layers)],
                       torch.cat([p.positions for p in parts]))


@torch.inference_mode()
def dense_forward(model: LlamaModel, token_ids: Tensor, positions: Tensor,
                  past: DenseKV | None = None, num_layers: int | None = None
                  ) -> tuple[Tensor, DenseKV]:
    """Runs `token_ids` at `positions` over `past`. Returns float32 logits for every new token
    (or, with `num_layers`, nothing: an empty tensor) and the new tokens' KV of the layers run."""
    layers = model.layers[: num_layers if num_layers is not None else len(model.layers)]
    hidden = F.embedding(token_ids, model.embed)
    cos, sin = model.rotary.lookup(positions)
    key_positions = positions if past is None else torch.cat([past.positions, positions])
    visible = key_positions[None, :] <= positions[:, None]  # [T, P + T]
    new = DenseKV([], [], positions)
    for index, layer in enumerate(layers):
        q, k, v = model.attention_inputs(layer, hidden, cos, sin)
        new.keys.append(k)
        new.values.append(v)
        keys = k if past is None else torch.cat([past.keys[index], k])
        values = v if past is None else torch.cat([past.values[index], v])
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
            attn_mask=visible, scale=model.scale, enable_gqa=True)
        hidden = model.after_attention(layer, hidden, attn.transpose(0, 1))
    if len(layers) < len(model.layers):
        return torch.empty(0), new
    return model.logits(hidden), new


def shift_keys(kv: DenseKV, delta: int, model: LlamaModel) -> DenseKV:
    """The same KV seen `delta` positions later: RoPE angles add, so K rotated at p, rotated
    again by delta, is K rotated at p + delta. V does not depend on position."""
    angles = delta * model.rotary.inv_freq.float()
    angles = torch.cat([angles, angles])
    cos = angles.cos().to(model.dtype)[None, None, :]
    sin = angles.sin().to(model.dtype)[None, None, :]
    return DenseKV([apply_rotary(k, cos, sin) for k in kv.keys], kv.values,
                   kv.positions + delta)
