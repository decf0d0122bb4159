"""Named accelerators for `kvrt sim`: datasheet peaks times achievable-efficiency factors.

Peak figures come from the vendors' datasheets:
- H100 SXM5 80GB: "NVIDIA H100 Tensor Core GPU" datasheet: BF16 Tensor Core 1,979 TFLOP/s
  *with sparsity*, i.e. 989 TFLOP/s dense; HBM3 3.35 TB/s; 80 GB; PCIe Gen5 x16 (64 GB/s per
  direction, ~55 GB/s achieved by pinned-memory copies).
- A100 SXM4 80GB: "NVIDIA A100 Tensor Core GPU" datasheet: BF16 Tensor Core 312 TFLOP/s dense
  (624 with sparsity); HBM2e 2,039 GB/s; 80 GB; PCIe Gen4 x16 (32 GB/s per direction, ~25 GB/s
  achieved).
"80 GB" is taken as 80 GiB: nvidia-smi reports 81,559 MiB on both.

Assumptions (not datasheet figures; a calibration replaces them with fitted values):
- `flops_efficiency`: the fraction of peak a serving step's matmuls and attention reach. Large
  bf16 GEMMs run at ~65-75% of peak; a whole step (norms, small GEMMs, attention) somewhat less:
  0.6 on H100, 0.7 on A100 (whose peak is easier to approach).
- `bandwidth_efficiency`: streaming reads (weights, KV) reach ~80% of HBM peak.
- `attention_flops_efficiency`: prefill attention's fraction of peak; FlashAttention-2 reaches
  50-70% of A100's peak in its paper's forward-pass figures, FlashAttention-3 ~75% of H100's
  with BF16: 0.6 on both.
- `kv_bandwidth_efficiency`: decode attention gathers paged KV blocks; ~70% of HBM peak.
- `host_link_latency`: a fixed cost per host<->device copy (driver call, DMA set-up).

`shared_reads_once` is the engine's attention path too: kvrt's torch path (the CPU's) reads a
KV block that several decoding sequences read, or one reads at a shift, once for all of them in
a step whose batch reads spliced rows (kernels/paged_attention.py, `_decode_shared`); a GPU
kernel (kvrt's Triton path, a vLLM-class engine's) reads each sequence's context.

The host costs (`step_overhead`, `sequence_overhead`, `slot_token_overhead`, `launch_overhead`,
`layer_launch_overhead`) are the engine's, not the device's: `engine_profiles.py` sets them
per engine (`--engine-profile`, their sources there). H100 and A100 carry the `vllm-class`
profile's: 1.5 ms per step, nothing per sequence, no slot-table or launch cost. On the CPU the
calibration fits the first two to kvrt's engine.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    peak_flops: float  # dense FLOP/s at the serving dtype
    memory_bandwidth: float  # bytes/s, device memory peak
    memory_bytes: int  # device memory that weights and the KV pool share
    host_link_bandwidth: float  # bytes/s, achieved host <-> device copy speed (one direction)
    flops_efficiency: float = 0.6
    bandwidth_efficiency: float = 0.8
    attention_flops_efficiency: float = 0.6
    kv_bandwidth_efficiency: float = 0.7
    step_overhead: float = 1.5e-3  # seconds per engine step, whatever its size
    sequence_overhead: float = 0.0  # seconds per sequence sampling in a step
    host_link_latency: float = 10e-6  # seconds per copy
    dtype_bytes: int = 2  # bytes per weight and KV element as served (bf16; 4 on the CPU)
    slot_token_overhead: float = 0.0  # seconds per token of the slot tables built in a step
    launch_overhead: float = 0.0  # seconds of kernel launches per step outside the layers
    layer_launch_overhead: float = 0.0  # seconds of kernel launches per layer per step
    shared_reads_once: bool = False  # decode reads a shared block once a step (the torch path)

    def __post_init__(self) -> None:
        positive = ("peak_flops", "memory_bandwidth", "memory_bytes", "host_link_bandwidth")
        efficiencies = ("flops_efficiency", "bandwidth_efficiency", "attention_flops_efficiency",
                        "kv_bandwidth_efficiency")
        for name in (*positive, *efficiencies, "dtype_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"device {self.name!r}: {name} must be positive")
        overheads = (self.step_overhead, self.sequence_overhead, self.host_link_latency,
                     self.slot_token_overhead, self.launch_overhead, self.layer_launch_overhead)
        if min(overheads) < 0:
            raise ValueError(f"device {self.name!r}: overheads cannot be negative")

    @property
    def effective_flops(self) -> float:
        return self.peak_flops * self.flops_efficiency

    @property
    def effective_bandwidth(self) -> float:
        return self.memory_bandwidth * self.bandwidth_efficiency

    @property
    def effective_attention_flops(self) -> float:
        return self.peak_flops * self.attention_flops_efficiency

    @property
    def effective_kv_bandwidth(self) -> float:
        return self.memory_bandwidth * self.kv_bandwidth_efficiency


H100 = Device(
    name="h100",
    peak_flops=989e12,
    memory_bandwidth=3.35e12,
    memory_bytes=80 * GiB,
    host_link_bandwidth=55e9,
    flops_efficiency=0.6,
)

A100 = Device(
    name="a100",
    peak_flops=312e12,
    memory_bandwidth=2.039e12,
    memory_bytes=80 * GiB,
    host_link_bandwidth=25e9,
    flops_efficiency=0.7,
)

_FIXED = {device.name: device for device in (H100, A100)}
CPU_CALIBRATED = "cpu-calibrated"


def device_names() -> list[str]:
    return [*_FIXED, CPU_CALIBRATED]


def get_device(name: str) -> Device:
    """A device by name (case-insensitive). `cpu-calibrated` loads the saved calibration of this
    machine, or runs it (~1-2 minutes of real engine steps) when there is none."""
    key = name.lower()
    if key == CPU_CALIBRATED:
        from kvrt.runtime.sim.calibrate import cpu_calibrated

        return cpu_calibrated()
    if key not in _FIXED:
        raise KeyError(f"unknown device {name!r}; known: {', '.join(device_names())}")
    return _FIXED[key]
