"""The Llama family (Llama, Qwen2, Qwen3) over a paged KV pool: our own forward, no HF model.

One forward runs every new token of a step's batch (prefill chunks and decode tokens together)
through the dense layers as one [T, hidden] matrix; only attention looks at sequences, through
the paged-attention kernel and the block tables in `ForwardBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvrt.kernels import Kernels
from kvrt.runtime.model.config import ModelConfig
from kvrt.runtime.model.rope import RotaryTable, apply_rotary, inverse_frequencies


@dataclass(slots=True)
class ForwardBatch:
    """A step's batch, as tensors. T new tokens over S sequences; see kernels/paged_attention."""

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each new token in its sequence
    store_slots: torch.Tensor  # [T] int64, where each new token's K and V go
    kv_slots: torch.Tensor  # [S, max_kv] int64, every KV position each sequence reads
    kv_lens: torch.Tensor  # [S] int32
    q_starts: torch.Tensor  # [S + 1] int32
    logit_rows: torch.Tensor  # [N] int64, rows of T whose next-token logits are wanted
    kv_shifts: torch.Tensor | None = None  # [S, max_kv] int32, None when every shift is zero
    q_positions: torch.Tensor | None = None  # `positions`, when a chunk skips spliced spans


@dataclass(slots=True)
class _Layer:
    attn_norm: torch.Tensor
    qkv: torch.Tensor  # q, k and v projections fused into one matrix: one matmul, not three
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: torch.Tensor
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor  # gate and up projections fused
    down: torch.Tensor


class LlamaModel:
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        kernels: Kernels,
        device: torch.device,
        dtype: torch.dtype,
        max_positions: int,
    ) -> None:
        self.config = config
        self.kernels = kernels
        self.device, self.dtype = device, dtype
        take = _Taker(weights, device, dtype)
        self.embed = take("model.embed_tokens.weight")
        self.layers = [self._layer(take, i) for i in range(config.num_layers)]
        self.norm = take("model.norm.weight")
        self.lm_head = self.embed if config.tie_embeddings else take("lm_head.weight")
        inv_freq = inverse_frequencies(config.rope, config.head_dim)
        self.rotary = RotaryTable(inv_freq, max_positions, dtype, device)
        self.scale = config.head_dim**-0.5

    def _layer(self, take: _Taker, i: int) -> _Layer:
        p = f"model.layers.{i}."
        names = [p + f"self_attn.{x}_proj" for x in "qkv"]
        qkv_bias = None
        if self.config.attention_bias:
            qkv_bias = torch.cat([take(n + ".bias") for n in names])
        return _Layer(
            attn_norm=take(p + "input_layernorm.weight"),
            qkv=torch.cat([take(n + ".weight") for n in names]),
            qkv_bias=qkv_bias,
            q_norm=take(p + "self_attn.q_norm.weight") if self.config.qk_norm else None,
            k_norm=take(p + "self_attn.k_norm.weight") if self.config.qk_norm else None,
            o_proj=take(p + "self_attn.o_proj.weight"),
            mlp_norm=take(p + "post_attention_layernorm.weight"),
            gate_up=torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
            down=take(p + "mlp.down_proj.weight"),
        )

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_pool: torch.Tensor) -> torch.Tensor:
        """Runs the batch, stores its K/V in `kv_pool`, returns float32 logits [N, vocab]."""
        hidden = F.embedding(batch.token_ids, self.embed)
        cos, sin = self.rotary.lookup(batch.positions)
        for index, layer in enumerate(self.layers):
            q, k, v = self.attention_inputs(layer, hidden, cos, sin)
            self.kernels.kv_store(kv_pool, index, k, v, batch.store_slots)
            attn = self.kernels.paged_attention(
                q,
                kv_pool,
                index,
                batch.kv_slots,
                batch.kv_lens,
                batch.q_starts,
                self.scale,
                batch.kv_shifts,
                self.rotary.inv_freq if batch.kv_shifts is not None else None,
                batch.q_positions,
            )
            hidden = self.after_attention(layer, hidden, attn)
        return self.logits(hidden[batch.logit_rows])

    # One layer in two halves around attention, and the head: shared with the dense reference
    # path (runtime/model/dense_forward.py), which attends differently.

    def attention_inputs(self, layer: _Layer, hidden: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, heads, dim], and k, v [T, kv_heads, dim] with RoPE applied to q and k."""
        cfg = self.config
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        x = _rms_norm(hidden, layer.attn_norm, cfg.rms_eps)
        q, k, v = F.linear(x, layer.qkv, layer.qkv_bias).split([q_size, kv_size, kv_size], -1)
        q = q.view(-1, cfg.num_heads, cfg.head_dim)
        k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        if layer.q_norm is not None:
            q = _rms_norm(q, layer.q_norm, cfg.rms_eps)
            k = _rms_norm(k, layer.k_norm, cfg.rms_eps)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def after_attention(self, layer: _Layer, hidden: torch.Tensor,
                        attn: torch.Tensor) -> torch.Tensor:
        """The residual stream after the output projection of `attn` [T, heads, dim] and the
        MLP."""
        cfg = self.config
        hidden = hidden + F.linear(attn.reshape(-1, cfg.num_heads * cfg.head_dim), layer.o_proj)
        x = _rms_norm(hidden, layer.mlp_norm, cfg.rms_eps)
        gate, up = F.linear(x, layer.gate_up).chunk(2, dim=-1)
        return hidden + F.linear(F.silu(gate) * up, layer.down)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms_norm(hidden, self.norm, self.config.rms_eps), self.lm_head).float()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers does: statistics in float32, the scale multiplied after casting back.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class _Taker:
    """Moves named weights to the device and dtype, with a clear error for a missing one."""

    def __init__(
        self, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> None:
        self.weights, self.device, self.dtype = weights, device, dtype

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.weights:
            raise KeyError(f"checkpoint lacks tensor {name}")
        return self.weights[name].to(device=self.device, dtype=self.dtype).contiguous()
