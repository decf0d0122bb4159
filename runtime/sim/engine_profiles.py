"""Engine profiles: whose engine a simulated GPU's step times describe (`--engine-profile`).

A device (hardware.py) says how fast the GPU computes and reads memory; a profile says what
the serving engine adds on the host each step, which depends on the engine, not the GPU. The
cost model (cost_model.py) charges, per step of S sampling sequences whose slot tables hold C
tokens in all, on a model of L layers:

    host      = step + per-sequence * S + per-slot-token * C
    launches  = outside the layers + per layer * L            (overlapping the device's kernels)
    step time = host + device kernels + max(0, launches - device kernels)

`vllm-class` (the default): the assumptions every `kvrt sim` figure on h100/a100 has used so
far, kept to the bit. Sources:

    constant        value    source
    --------------  -------  --------------------------------------------------------------
    step            1.5 ms   an assumption, not a measurement: a vLLM-class engine's fixed
                             cost per step (scheduling, input preparation, one CUDA-graph
                             launch, sampling). vLLM's v0.6.0 post (blog.vllm.ai, 2024-09-05)
                             found scheduling and output processing took most of a Llama-3-8B
                             H100 step before v0.6 and hid them behind the GPU after (multi-step
                             scheduling, async output processing); 1.5 ms stands for what stays
    per-sequence    0        vLLM overlaps detokenizing and output building with the next
                             step (async output processor, vLLM PR #7049)
    per-slot-token  0        block tables are kept on the GPU and updated, not rebuilt
    launches        0        decode batches replay captured CUDA graphs (in `step`)

`kvrt`: kvrt's own engine on a GPU as the code stands (runtime/engine): each step the engine
thread schedules, builds the batch (each sequence's slot table is mirrored on the device and
copied up only where it changed, runtime/kv/device_mirror.py; the padded table is built on the
device), launches every kernel from eager PyTorch (no CUDA graphs), waits for the logits (the
sampler's `.tolist()`), samples the batch in a few tensor operations and detokenizes. Nothing
of it overlaps the device but the launches.

    constant        value     measured (M) here or estimated (E), from what
    --------------  --------  --------------------------------------------------------------
    step            170 us    M 110 us: the engine's own host work per step (measure_host.py)
                              + E 6 x 10 us: build_batch's 5 small tensors copied to the device
                              and the sampled ids copied back, each a small synchronous copy
                              from pageable memory (~10 us: a driver call and a DMA)
    per-sequence    60 us     M 50 us: scheduler, build_batch's per-sequence work, sampling,
                              update, detokenizing + E 10 us: its slot mirror's new positions,
                              one small copy
    per-slot-token  0         the padded slot table is built on the device from the mirrors
                              (8 bytes a token at TB/s: nothing against the rest). On the CPU,
                              where measure_host runs, that padding is host work: it measures
                              7.0-7.3 ns a token, which a GPU does not pay on the host
    outside layers  97.6 us   16 launches (M: 14 counted in the forward, + the batch's 2 on the
                              device: the padded slot table and the store slots) x 6.1 us
    per layer       335.2 us  52 torch ops (M: counted in a bf16 forward of Qwen2.5's family,
                              34 outside the two kernels; 18 in the Triton attention wrapper's
                              tile table and output, counted once by hand under measure_host's
                              counter in inference mode, as kernels/ stood at 8d8b59f) x 6.1 us
                              + 2 Triton launches (paged attention, KV store) x 9 us
    a torch op      6.1 us    M 1.1 us: eager dispatch of a tiny op on this CPU + E 5 us: the
                              CUDA launch itself (4-6 us measured in "pegainfer (3): From
                              Launch Overhead to CUDA Graph", susun-blog.com)
    a Triton call   9 us      E: Triton's JIT dispatch, 8.68 us per call on GB200 (vLLM PR
                              #34838); kvrt's launcher checks not counted

M figures: `python -m kvrt.runtime.sim.measure_host` (2026-12-07, an AMD EPYC development
machine of 2 cores, torch on one thread), three runs while it was quiet at 8d8b59f: 108-112 us
a step, 49.8-55.2 us a sequence, 6.5-7.3 ns a slot-table token (median fit errors 1.9-3.8%),
1.1-1.2 us a dispatch, of which the constants are round middles; a run while other processes
shared the cores gave 100 us, 60 us, 8.4 ns and 2.5 us. After the slot tables moved to device
mirrors and sampling was batched, a run gave 119 us, 46.9 us, 7.29 ns (the padding, now on the
device on a GPU) and 1.2 us: within the spread, so the measured parts stand.
A GPU server's host CPU is likely faster per core, so they lean high; the estimates have
not been checked on a GPU. The daemon's own per-token work (an SSE
chunk per token on the event loop, which holds the GIL the engine thread needs to launch) is
left out: the calibration's serving stage measures it on this CPU (+4.7 ms per sequence) but
mixed with the daemon and the bench's client competing for the two cores with the CPU forward,
which a GPU forward does not; so `kvrt` is a lower bound on kvrt's host cost where the daemon
streams many tokens at once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvrt.runtime.sim.hardware import Device


@dataclass(frozen=True, slots=True)
class EngineProfile:
    name: str
    summary: str  # one line, for reports
    step_overhead: float  # seconds per step
    sequence_overhead: float  # seconds per sampling sequence
    slot_token_overhead: float  # seconds per token of the slot tables (their contexts)
    launch_overhead: float  # seconds of launches per step outside the layers
    layer_launch_overhead: float  # seconds of launches per layer

    def on(self, device: Device) -> Device:
        """`device` with this engine's host costs."""
        return replace(device, step_overhead=self.step_overhead,
                       sequence_overhead=self.sequence_overhead,
                       slot_token_overhead=self.slot_token_overhead,
                       launch_overhead=self.launch_overhead,
                       layer_launch_overhead=self.layer_launch_overhead)


VLLM_CLASS = EngineProfile(
    name="vllm-class",
    summary="a vLLM-class engine: 1.5 ms per step, CUDA graphs, host work overlapped",
    step_overhead=1.5e-3, sequence_overhead=0.0, slot_token_overhead=0.0,
    launch_overhead=0.0, layer_launch_overhead=0.0,
)

# kvrt's constants, named as in the docstring's table (M: measured here; E: estimated).
_HOST_STEP = 110e-6  # M
_HOST_SEQUENCE = 50e-6  # M
_SMALL_COPY = 10e-6  # E, per synchronous small copy
_COPIES_PER_STEP = 6  # 5 batch tensors over, the sampled ids back
_COPIES_PER_SEQUENCE = 1  # its slot mirror's new positions
_DISPATCH = 1.1e-6  # M
_CUDA_LAUNCH = 5e-6  # E
_TRITON_CALL = 9e-6  # E
_OPS_OUTSIDE_LAYERS = 14 + 2  # M: the forward's; the padded slot table and the store slots
_OPS_PER_LAYER = 34 + 18  # M: the layer's own, the Triton attention wrapper's
_TRITON_CALLS_PER_LAYER = 2  # paged attention, KV store

KVRT = EngineProfile(
    name="kvrt",
    summary="kvrt's engine: host work per step and sequence, eager launches",
    step_overhead=_HOST_STEP + _COPIES_PER_STEP * _SMALL_COPY,
    sequence_overhead=_HOST_SEQUENCE + _COPIES_PER_SEQUENCE * _SMALL_COPY,
    slot_token_overhead=0.0,  # built on the device from the mirrors
    launch_overhead=_OPS_OUTSIDE_LAYERS * (_DISPATCH + _CUDA_LAUNCH),
    layer_launch_overhead=(_OPS_PER_LAYER * (_DISPATCH + _CUDA_LAUNCH)
                           + _TRITON_CALLS_PER_LAYER * _TRITON_CALL),
)

_PROFILES = {p.name: p for p in (VLLM_CLASS, KVRT)}
DEFAULT_PROFILE = VLLM_CLASS.name


def profile_names() -> list[str]:
    return list(_PROFILES)


def get_profile(name: str) -> EngineProfile:
    if name not in _PROFILES:
        raise KeyError(f"unknown engine profile {name!r}; known: {', '.join(_PROFILES)}")
    return _PROFILES[name]
