"""A roofline model of one engine step's time, and of a host <-> device copy.

One step runs every scheduled sequence's new tokens (prefill chunks and decodes together) in
one forward, as the real engine batches them. With T = total new tokens, S = sequences that
sample, and for each sequence n new tokens ending at context c:

    term              formula                                        phase
    ----------------  ---------------------------------------------  ---------------
    linear FLOPs      2 * layer_params * T + 2 * vocab * hidden * S  linear (GEMMs)
    weight bytes      layer_params (+ the LM head when S > 0), once  linear
    attention FLOPs   4 * layers * heads * head_dim * keys           attention
                      keys = n*c - n*(n-1)/2 (causal: new token i sees c - n + i + 1)
    KV read bytes     sum of c * kv_bytes_per_token (or the rows     attention
                      the step reads, when given: see below)
    KV write bytes    T * kv_bytes_per_token                         attention

    step time = overhead + per-sequence cost * S + per-slot-token cost * C     (the host)
              + max(linear FLOPs / FLOP/s, weight bytes / bandwidth)            (the GEMMs)
              + max(attention FLOPs / attention FLOP/s, KV bytes / KV bandwidth) (attention)
              + max(0, launches - the GEMMs - attention)                        (launch-bound)

    C = sum of c (every scheduled sequence's slot table, rebuilt each step by an engine that
    does so); launches = launch cost per step + launch cost per layer * layers.

The two phases are separate rooflines, added: a layer's GEMMs and its attention are separate
kernels that run one after the other, and a batch of decodes is bound by reading the weights
in the first and by reading each sequence's KV in the second (one roofline over the summed
terms would let a long-context batch's KV reads hide behind its GEMMs). Attention reaches its
own fractions of peak (FlashAttention-class kernels, paged KV gathers). The per-sequence cost
is the host's work for each sequence in a step (sampling, detokenizing and streaming its
token), which a serving CPU pays and a GPU engine overlaps with the device. Kernel launches
(an engine without CUDA graphs launches each kernel from Python) overlap the device's work: the
device runs each kernel as soon as it is launched, so a step's forward takes the longer of its
launches and its kernels. Which host costs apply is the engine's, not the device's
(engine_profiles.py); all are 0 but the overhead in the `vllm-class` profile.

An engine whose decode reads a block shared by several sequences once for all of them
(`Device.shared_reads_once`: kvrt's torch path, when the batch reads spliced rows) reads fewer
rows than the contexts add up to; its executor counts them (executor.py) and passes
`kv_rows_read`. The attention FLOPs stay: every query still sees every key of its context.

Outside the forward, the diff encode of reused segments works on whole KV rows (every layer, K
and V: kv_bytes_per_token each): it compares a reader's recomputed rows with the master's, and
a compaction moves rows (runtime/sim/executor.py says which call does what). Both are gathers
over the pool, as attention's KV reads are, so `rows_time` prices them at the KV bandwidth:

    rows time = (rows read + rows written) * kv_bytes_per_token / KV bandwidth

Left out, being small next to the terms above at these shapes: activations' memory traffic,
the embedding rows read, norms and RoPE, and attention's repeated KV reads inside a long
prefill (a prefill that long is compute-bound anyway). The terms are exposed (`StepWork`) so a
calibration can fit the coefficients to measured steps.
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
    sequences: int = 0  # that sample a token
    context_tokens: int = 0  # summed over the scheduled sequences: their slot tables' tokens

    @property
    def flops(self) -> float:
        return self.linear_flops + self.attention_flops

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes

    @property
    def kv_bytes(self) -> float:
        return self.kv_read_bytes + self.kv_write_bytes


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

    def work(self, parts: Iterable[tuple], kv_rows_read: int | None = None) -> StepWork:
        """`kv_rows_read`: the KV rows the step's attention reads (default: every part's
        context)."""
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
            kv_read_bytes=float(self.kv_bytes_per_token
                                * (context if kv_rows_read is None else kv_rows_read)),
            kv_write_bytes=float(self.kv_bytes_per_token * tokens),
            sequences=sampling,
            context_tokens=context,
        )

    def time_of(self, work: StepWork) -> float:
        d = self.device
        linear = max(work.linear_flops / d.effective_flops,
                     work.weight_bytes / d.effective_bandwidth)
        attention = max(work.attention_flops / d.effective_attention_flops,
                        work.kv_bytes / d.effective_kv_bandwidth)
        launches = d.launch_overhead + d.layer_launch_overhead * self.shape.num_layers
        # Summed in this order, a profile without slot-table or launch costs adds exact zeros:
        # its times are those of the model before those terms, to the bit.
        return (d.step_overhead + d.sequence_overhead * work.sequences
                + d.slot_token_overhead * work.context_tokens + linear + attention
                + max(0.0, launches - (linear + attention)))

    def step_time(self, parts: Iterable[tuple], kv_rows_read: int | None = None) -> float:
        """Seconds for one step of these parts; 0 for an empty step (nothing runs)."""
        parts = list(parts)
        return self.time_of(self.work(parts, kv_rows_read)) if parts else 0.0

    def rows_time(self, rows_read: int, rows_written: int = 0) -> float:
        """Seconds to read and write whole KV rows within the pool (the diff encode's)."""
        return (rows_read + rows_written) * self.kv_bytes_per_token / (
            self.device.effective_kv_bandwidth)

    def transfer_time(self, num_bytes: int) -> float:
        """Seconds to copy `num_bytes` one way over the host link (offload or upload)."""
        if num_bytes <= 0:
            return 0.0
        return self.device.host_link_latency + num_bytes / self.device.host_link_bandwidth
