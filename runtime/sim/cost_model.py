"""A roofline model of one engine step's time, and of a host <-> device copy.

One step runs every scheduled sequence's new tokens (prefill chunks and decodes together) in
one forward, as the real engine batches them. With T = total new tokens, S = sequences that
sample, and for each sequence n new tokens ending at context c:

    term              formula                                        bound by
    ----------------  ---------------------------------------------  ---------------
    linear FLOPs      2 * layer_params * T + 2 * vocab * hidden * S  compute
    attention FLOPs   4 * layers * heads * head_dim * keys           compute
                      keys = n*c - n*(n-1)/2 (causal: new token i sees c - n + i + 1)
    weight bytes      layer_params (+ the LM head when S > 0), once  memory
    KV read bytes     sum of c * kv_bytes_per_token                  memory
    KV write bytes    T * kv_bytes_per_token                         memory

    step time = overhead + max(FLOPs / effective FLOP/s, bytes / effective bandwidth)

Left out, being small next to the terms above at these shapes: activations' memory traffic,
the embedding rows read, norms and RoPE, and attention's repeated KV reads inside a long
prefill (a prefill that long is compute-bound anyway). The terms are exposed (`StepWork`) so a
calibration can fit the three coefficients (overhead, FLOP/s, bandwidth) to measured steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from kvrt.runtime.model.config import ModelConfig
from kvrt.runtime.sim.hardware import Device
from kvrt.runtime.sim.model_shapes import kv_bytes_per_token, layer_parameters, lm_head_parameters


class StepPart(NamedTuple):
    """One scheduled sequence in a step. A plain (new_tokens, context_len) tuple also works."""

    new_tokens: int
    context_len: int  # tokens with KV after this step, the new ones included
    samples: bool = True  # the chunk ends the sequence, so the LM head runs on its last token


@dataclass(frozen=True, slots=True)
class StepWork:
    linear_flops: float
    attention_flops: float
    weight_bytes: float
    kv_read_bytes: float
    kv_write_bytes: float

    @property
    def flops(self) -> float:
        return self.linear_flops + self.attention_flops

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes


class CostModel:
    def __init__(self, shape: ModelConfig, device: Device) -> None:
        self.shape, self.device = shape, device
        dtype_bytes = device.dtype_bytes
        self.layer_params = layer_parameters(shape)
        self.head_params = lm_head_parameters(shape)
        self.kv_bytes_per_token = kv_bytes_per_token(shape, dtype_bytes)
        self.layer_weight_bytes = self.layer_params * dtype_bytes
        self.head_weight_bytes = self.head_params * dtype_bytes
        self.attention_flops_per_key = 4 * shape.num_layers * shape.num_heads * shape.head_dim

    def work(self, parts: Iterable[tuple]) -> StepWork:
        tokens = sampling = keys = context = 0
        for part in parts:
            new, ctx, samples = StepPart(*part)
            if new < 1 or ctx < new:
                raise ValueError(f"a step part needs 1 <= new_tokens <= context_len, got {part}")
            tokens += new
            sampling += bool(samples)
            keys += new * ctx - new * (new - 1) // 2
            context += ctx
        return StepWork(
            linear_flops=2.0 * (self.layer_params * tokens + self.head_params * sampling),
            attention_flops=float(self.attention_flops_per_key * keys),
            weight_bytes=float(
                self.layer_weight_bytes + (self.head_weight_bytes if sampling else 0)
            ),
            kv_read_bytes=float(self.kv_bytes_per_token * context),
            kv_write_bytes=float(self.kv_bytes_per_token * tokens),
        )

    def time_of(self, work: StepWork) -> float:
        device = self.device
        compute = work.flops / device.effective_flops
        memory = work.bytes / device.effective_bandwidth
        return device.step_overhead + max(compute, memory)

    def step_time(self, parts: Iterable[tuple]) -> float:
        """Seconds for one step of these parts; 0 for an empty step (nothing runs)."""
        parts = list(parts)
        return self.time_of(self.work(parts)) if parts else 0.0

    def transfer_time(self, num_bytes: int) -> float:
        """Seconds to copy `num_bytes` one way over the host link (offload or upload)."""
        if num_bytes <= 0:
            return 0.0
        return self.device.host_link_latency + num_bytes / self.device.host_link_bandwidth
