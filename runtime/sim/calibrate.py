"""The `cpu-calibrated` device: the cost model's coefficients fitted to the real CPU engine.

    python -m kvrt.runtime.sim.calibrate [--model PATH] [--plan full|quick]
                                                          (re)fits, saves, prints; ~2 min

The real engine (default SmolLM2 model, float32 on the CPU, as `kvrt serve` runs it) runs the
grid of `measure.py`: prefills of 16-2048 tokens, pure decodes of 1-32 sequences at contexts
32-2048, prefill chunks after a cached prefix, decodes mixed with a prefill.

The fit: step time = overhead + max(FLOPs * a, bytes * b) with a = 1 / FLOP/s, b = 1 / bytes/s,
by least squares on relative error, all three non-negative. The max makes it piecewise linear:
given which steps are compute-bound (those above an arithmetic-intensity threshold), it is a
linear non-negative least squares; the fit starts from every threshold, alternates the two
until the split is stable, and keeps the best. The result is saved as JSON in the kvrt cache
folder (KVRT_CACHE_DIR, default ~/.cache/kvrt) under sim/, with the samples and the fit's
errors, and reused by later runs.

A plan says what is measured: `full` (the above; what the README's figures come from) or
`quick` (a few steps of each kind and one small served workload, no waiting for a quiet
machine: seconds, a rough fit, for tests and a first look). Each plan's result is cached apart,
so a quick fit never stands in for the full one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from kvrt.runtime.config import EngineConfig
from kvrt.runtime.model.config import ModelConfig
from kvrt.runtime.sim.cost_model import CostModel, StepPart
from kvrt.runtime.sim.hardware import CPU_CALIBRATED, Device
from kvrt.runtime.sim.measure import DEFAULT_GRID, Grid, Sample, measure
from kvrt.runtime.sim.measure_serving import SERVING_WORKLOADS, ServedWorkload

FORMAT = 3  # 2: two phases, per-sequence and serving costs; 3: the torch path's shared reads


class CalibrationError(RuntimeError):
    """The measurements cannot pin down the coefficients."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What a calibration measures: the engine alone on `grid` (each point the fastest of
    `repeats` undisturbed tries, at most `max_attempts`, waiting at most `quiet_wait_s` in all
    for the machine to go quiet; measured again, up to `remeasure` times, while the fit cannot
    bind every phase), then serving `served`."""

    grid: Grid
    served: tuple[ServedWorkload, ...]
    repeats: int = 2
    max_attempts: int = 8
    quiet_wait_s: float = 600.0
    remeasure: int = 0


# Two of each kind of step, each phase bound by one: a long prefill and a chunk at a long
# context (compute, attention's FLOPs), decodes of 1 and 16 at short and long contexts (weights,
# KV reads, the per-sequence cost).
QUICK_GRID = Grid(prefills=(16, 512), decode_contexts=(32, 2048), decode_batches=(1, 16),
                  decode_steps=2, chunks=((1536, 512),), mixed=((8, 512, 256),))
QUICK_SERVED: tuple[ServedWorkload, ...] = (
    ("generative-agents", {"agents": 3, "rounds": 1, "persona_words": 60,
                           "min_output_tokens": 4, "max_output_tokens": 8, "seed": 101}),)
PLANS = {
    "full": Plan(DEFAULT_GRID, SERVING_WORKLOADS),
    "quick": Plan(QUICK_GRID, QUICK_SERVED, repeats=2, max_attempts=2, quiet_wait_s=0.0,
                  remeasure=3),
}
DEFAULT_PLAN = "full"


@dataclass(frozen=True, slots=True)
class Fit:
    device: Device
    median_rel_error: float
    max_rel_error: float
    num_samples: int


def fit(
    samples: Sequence[Sample], shape: ModelConfig, dtype_bytes: int, name: str = CPU_CALIBRATED
) -> Fit:
    """Fits the engine's coefficients (overhead, per-sequence cost, the GEMMs' FLOP/s and
    bandwidth, attention's FLOP/s and KV bandwidth) to the samples; the other Device fields are
    this machine's (memory: its RAM; host link: a memory copy, read plus write)."""
    if len(samples) < len(_TERMS):
        raise CalibrationError(f"{len(_TERMS)} samples at least are needed, got {len(samples)}")
    terms, seconds = _terms(samples, shape, dtype_bytes)
    # One model's steps all read the same weights, so a fixed overhead per step and the weight
    # read (the floor of the GEMMs' roofline) could only be told apart by the kink of the max:
    # the engine's steps get no fixed overhead here; fit_serving measures one under the daemon.
    terms[:, 0] = 0.0
    overhead, per_sequence, per_flop, per_byte, per_attn_flop, per_kv_byte = fit_coefficients(
        terms, seconds)
    if min(per_flop, per_byte, per_attn_flop, per_kv_byte) <= 0:
        raise CalibrationError(
            "the grid does not bind every phase: seconds per GEMM FLOP "
            f"{per_flop:g}, per weight byte {per_byte:g}, per attention FLOP {per_attn_flop:g}, "
            f"per KV byte {per_kv_byte:g}"
        )
    device = Device(
        name=name,
        peak_flops=1 / per_flop,
        memory_bandwidth=1 / per_byte,
        memory_bytes=_ram_bytes(),
        host_link_bandwidth=0.5 / per_byte,
        flops_efficiency=1.0,
        bandwidth_efficiency=1.0,
        attention_flops_efficiency=per_flop / per_attn_flop,
        kv_bandwidth_efficiency=per_byte / per_kv_byte,
        step_overhead=overhead,
        sequence_overhead=per_sequence,
        host_link_latency=0.0,
        dtype_bytes=dtype_bytes,
        shared_reads_once=True,  # the CPU engine's attention is the torch path
    )
    return _scored(device, shape, samples)


def fit_serving(device: Device, shape: ModelConfig, samples: Sequence[Sample]) -> Fit:
    """Adds what serving costs beyond the engine's own step (the daemon's and its clients' work
    on the same cores: a fixed part per step and a part per sequence) to a fitted device, from
    steps timed while the daemon served: their excess over the device's prediction."""
    if len(samples) < 2:
        raise CalibrationError(f"2 served steps at least are needed, got {len(samples)}")
    model = CostModel(shape, device)
    seconds = np.array([s.seconds for s in samples])
    excess = seconds - np.array([model.step_time(s.parts) for s in samples])
    sequences = np.array([model.work(s.parts).sequences for s in samples], dtype=float)
    design = np.stack([np.ones_like(seconds), sequences], axis=1)
    weight = 1.0 / seconds
    per_step, per_sequence = nnls(design * weight[:, None], excess * weight)
    served = replace(device, step_overhead=device.step_overhead + per_step,
                     sequence_overhead=device.sequence_overhead + per_sequence)
    return _scored(served, shape, samples)


def _scored(device: Device, shape: ModelConfig, samples: Sequence[Sample]) -> Fit:
    errors = relative_errors(CostModel(shape, device), samples)
    return Fit(device, float(np.median(errors)), float(np.max(errors)), len(samples))


def relative_errors(model: CostModel, samples: Sequence[Sample]) -> np.ndarray:
    return np.array([abs(model.step_time(s.parts) - s.seconds) / s.seconds for s in samples])


# The raw terms of a step (StepWork's), in the order of the fitted coefficients' pairs.
_TERMS = ("ones", "sequences", "linear_flops", "weight_bytes", "attention_flops", "kv_bytes")


def _terms(samples: Sequence[Sample], shape: ModelConfig, dtype_bytes: int
           ) -> tuple[np.ndarray, np.ndarray]:
    model = CostModel(shape, _unit_device(dtype_bytes))
    rows = []
    for s in samples:
        w = model.work(s.parts)
        rows.append([1.0, w.sequences, w.linear_flops, w.weight_bytes, w.attention_flops,
                     w.kv_bytes])
    return np.array(rows), np.array([s.seconds for s in samples])


def fit_coefficients(terms: np.ndarray, seconds: np.ndarray) -> tuple[float, ...]:
    """Coefficients (c0..c5) >= 0 of the cost model's form over `terms` (rows of _TERMS),
    minimising the relative squared error of

        c0 + c1 * sequences + max(c2 * linear FLOPs, c3 * weight bytes)
                            + max(c4 * attention FLOPs, c5 * KV bytes)

    Each max makes it piecewise linear: given which steps are compute-bound in each phase
    (those above an arithmetic-intensity threshold), it is a linear non-negative least squares.
    The fit starts from every pair of thresholds, alternates the two until the split is
    stable, and keeps the best."""
    weight = 1.0 / seconds
    ones, sequences, lin_f, lin_b, att_f, att_b = terms.T
    lin_i = lin_f / np.maximum(lin_b, 1e-30)
    att_i = att_f / np.maximum(att_b, 1e-30)
    best: tuple[float, np.ndarray] | None = None
    for lin_t, att_t in itertools.product([-np.inf, *np.unique(lin_i)],
                                          [-np.inf, *np.unique(att_i)]):
        lin_cb, att_cb = lin_i > lin_t, att_i > att_t
        for _ in range(20):
            design = np.stack([ones, sequences, np.where(lin_cb, lin_f, 0),
                               np.where(lin_cb, 0, lin_b), np.where(att_cb, att_f, 0),
                               np.where(att_cb, 0, att_b)], axis=1)
            coef = nnls(design * weight[:, None], seconds * weight)
            lin_now = lin_f * coef[2] >= lin_b * coef[3]
            att_now = att_f * coef[4] >= att_b * coef[5]
            if np.array_equal(lin_now, lin_cb) and np.array_equal(att_now, att_cb):
                break
            lin_cb, att_cb = lin_now, att_now
        predicted = (coef[0] + coef[1] * sequences + np.maximum(lin_f * coef[2], lin_b * coef[3])
                     + np.maximum(att_f * coef[4], att_b * coef[5]))
        loss = float(np.sum(((predicted - seconds) * weight) ** 2))
        if best is None or loss < best[0]:
            best = (loss, coef)
    assert best is not None
    return tuple(float(c) for c in best[1])


def nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a few columns: every subset of free columns, solved
    exactly, the best feasible one kept (exact, and quick for the 6 columns used here)."""
    columns = a.shape[1]
    best_x, best_loss = np.zeros(columns), float(np.sum(y**2))
    for size in range(1, columns + 1):
        for free in itertools.combinations(range(columns), size):
            sub, *_ = np.linalg.lstsq(a[:, free], y, rcond=None)
            if np.any(sub < 0):
                continue
            x = np.zeros(columns)
            x[list(free)] = sub
            loss = float(np.sum((a @ x - y) ** 2))
            if loss < best_loss:
                best_x, best_loss = x, loss
    return best_x


def _unit_device(dtype_bytes: int) -> Device:
    """A device whose coefficients are 1: its CostModel gives the raw terms."""
    return Device(
        name="unit",
        peak_flops=1.0,
        memory_bandwidth=1.0,
        memory_bytes=1,
        host_link_bandwidth=1.0,
        flops_efficiency=1.0,
        bandwidth_efficiency=1.0,
        step_overhead=0.0,
        host_link_latency=0.0,
        dtype_bytes=dtype_bytes,
    )


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 1024**3


# -- the saved device ------------------------------------------------------------------------


def calibration_path(plan: str = DEFAULT_PLAN) -> Path:
    from kvrt.runtime.model.gguf_loader import cache_dir

    suffix = "" if plan == DEFAULT_PLAN else f"-{plan}"
    return cache_dir() / "sim" / f"{CPU_CALIBRATED}{suffix}.json"


def cpu_calibrated(refit: bool = False, plan: str = DEFAULT_PLAN,
                   progress: Callable[[str], None] = print) -> Device:
    """This machine's calibrated device: loaded from the cache folder, or measured by `plan`
    (full: ~2 min) and saved when there is none, it is unreadable or of another format, or
    `refit` is set. It runs event loops of its own (the served workloads): call it before
    starting one, not from a coroutine."""
    path = calibration_path(plan)
    if path.is_file() and not refit:
        try:
            return load_calibration(path)
        except (CalibrationError, ValueError, KeyError, TypeError):
            pass  # measured again below
    progress(f"calibrating this machine ({plan} plan), saved to {path} for later runs")
    return calibrate(None, path, plan=PLANS[plan], progress=progress).fit.device


@dataclass(frozen=True, slots=True)
class Calibration:
    engine_fit: Fit  # the engine alone, on the grid
    fit: Fit  # with what serving adds: the device
    samples: list[Sample]
    served: list[Sample]
    shape: ModelConfig  # the measured model's


def calibrate(model: str | None = None, path: Path | None = None,
              plan: Plan = PLANS[DEFAULT_PLAN],
              progress: Callable[[str], None] = print) -> Calibration:
    """Measures the real engine on the CPU in float32 (`model`: None for the default SmolLM2)
    alone on the plan's grid, then serving its `kvrt bench`-style workloads with `kvrt bench`'s
    engine settings; fits both stages, and saves the result to `path` when given."""
    from kvrt.runtime.engine.factory import build_engine
    from kvrt.runtime.sim.measure_serving import measure_serving

    alone = EngineConfig(model=model, device="cpu", dtype="float32", kv_cache_memory=1024**3,
                         max_num_seqs=64, max_num_batched_tokens=4096)
    engine, checkpoint = build_engine(alone)
    samples = measure(engine, plan.grid, plan.repeats, progress, max_attempts=plan.max_attempts,
                      wait_budget=plan.quiet_wait_s)
    for remeasures in range(plan.remeasure, -1, -1):
        try:
            engine_fit = fit(samples, checkpoint.config, dtype_bytes=4)
            break
        except CalibrationError as exc:
            if not remeasures:
                raise
            # Other work only adds time: each point's fastest over more tries is less disturbed.
            progress(f"{exc}; measuring the grid again (a busy machine?)")
            again = measure(engine, plan.grid, plan.repeats, progress,
                            max_attempts=plan.max_attempts, wait_budget=plan.quiet_wait_s)
            samples = [min(a, b, key=lambda s: s.seconds) for a, b in zip(samples, again)]
    del engine
    serving = EngineConfig(model=model, device="cpu", dtype="float32", kv_cache_memory=256 * 2**20)
    served = measure_serving(serving, plan.served, progress)
    result = fit_serving(engine_fit.device, checkpoint.config, served)
    if path is not None:
        save_calibration(path, result, engine_fit, samples, served, checkpoint.name)
    return Calibration(engine_fit, result, samples, served, checkpoint.config)


def load_calibration(path: Path) -> Device:
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise CalibrationError(f"{path} holds format {record.get('format')}, not {FORMAT}")
    return Device(**record["device"])


def save_calibration(path: Path, result: Fit, engine_fit: Fit, samples: Sequence[Sample],
                     served: Sequence[Sample], model_name: str) -> None:
    record = {
        "format": FORMAT,
        "device": asdict(result.device),
        "fit": {  # over the served steps
            "median_rel_error": result.median_rel_error,
            "max_rel_error": result.max_rel_error,
            "num_samples": result.num_samples,
        },
        "engine_fit": {  # the engine alone, over the grid
            "median_rel_error": engine_fit.median_rel_error,
            "max_rel_error": engine_fit.max_rel_error,
            "num_samples": engine_fit.num_samples,
            "disturbed_samples": sum(s.disturbed for s in samples),
        },
        "model": model_name,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        "samples": _samples_json(samples),
        "served": _samples_json(served),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
    partial.write_text(json.dumps(record, indent=1))
    partial.replace(path)  # appears whole or not at all


def _samples_json(samples: Sequence[Sample]) -> list[dict]:
    return [{"parts": [list(p) for p in s.parts], "seconds": s.seconds, "disturbed": s.disturbed}
            for s in samples]


def report(result: Fit, samples: Sequence[Sample], shape: ModelConfig) -> str:
    model = CostModel(shape, result.device)
    d = result.device
    lines = [
        f"{d.name}: GEMMs {d.effective_flops / 1e9:.1f} GFLOP/s, weights "
        f"{d.effective_bandwidth / 1e9:.2f} GB/s; attention {d.effective_attention_flops / 1e9:.1f}"
        f" GFLOP/s, KV {d.effective_kv_bandwidth / 1e9:.2f} GB/s; overhead "
        f"{d.step_overhead * 1e3:.2f} ms per step, {d.sequence_overhead * 1e3:.2f} ms per sequence",
        f"relative error over {result.num_samples} steps: median "
        f"{result.median_rel_error:.1%}, max {result.max_rel_error:.1%}",
        "",
        "| step | measured ms | predicted ms | error | disturbed |",
        "|---|---:|---:|---:|---|",
    ]
    for s in samples:
        predicted = model.step_time(s.parts)
        lines.append(
            f"| {_describe(s.parts)} | {s.seconds * 1e3:.1f} | {predicted * 1e3:.1f} "
            f"| {(predicted - s.seconds) / s.seconds:+.1%} | {'yes' if s.disturbed else ''} |"
        )
    return "\n".join(lines)


def summary(result: Fit, samples: Sequence[Sample], shape: ModelConfig) -> str:
    """The served steps are many: their errors by kind and batch size."""
    model = CostModel(shape, result.device)
    groups: dict[tuple[str, int], list[float]] = {}
    for s in samples:
        kind = "decode" if all(p.new_tokens == 1 for p in s.parts) else "with prefill"
        errors = groups.setdefault((kind, min(len(s.parts), 8)), [])
        errors.append((model.step_time(s.parts) - s.seconds) / s.seconds)
    lines = [f"relative error over {result.num_samples} served steps: median "
             f"{result.median_rel_error:.1%}, max {result.max_rel_error:.1%}", "",
             "| step | sequences | steps | median error |", "|---|---:|---:|---:|"]
    for (kind, batch), errors in sorted(groups.items()):
        lines.append(f"| {kind} | {batch if batch < 8 else '8+'} | {len(errors)} | "
                     f"{statistics.median(errors):+.1%} |")
    return "\n".join(lines)


def _describe(parts: tuple[StepPart, ...]) -> str:
    decodes = [p for p in parts if p.new_tokens == 1]
    chunks = [p for p in parts if p.new_tokens > 1]
    text = [f"{p.new_tokens} tokens at context {p.context_len}" for p in chunks]
    if decodes:
        contexts = statistics.median(p.context_len for p in decodes)
        text.append(f"{len(decodes)} decodes at context ~{contexts:.0f}")
    return " + ".join(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fits the cpu-calibrated device and saves it.")
    parser.add_argument(
        "--model", default=None, help="checkpoint to measure (default: SmolLM2-135M GGUF)"
    )
    parser.add_argument("--plan", default=DEFAULT_PLAN, choices=sorted(PLANS),
                        help="what to measure (default: %(default)s; quick: seconds, rough)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="tries per grid point, the fastest kept (default: the plan's)")
    args = parser.parse_args(argv)
    path = calibration_path(args.plan)
    plan = PLANS[args.plan]
    if args.repeats is not None:
        plan = replace(plan, repeats=args.repeats)
    done = calibrate(args.model, path, plan)
    print("## The engine alone, on the grid\n")
    print(report(done.engine_fit, done.samples, done.shape))
    print("\n## Serving (the device): served steps' errors\n")
    print(summary(done.fit, done.served, done.shape))
    print(f"\nsaved to {path}")


if __name__ == "__main__":
    main()
