"""The `cpu-calibrated` device: the cost model's coefficients fitted to the real CPU engine.

    python -m kvrt.runtime.sim.calibrate [--model PATH]   (re)fits, saves, prints; ~2 min

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from kvrt.runtime.config import EngineConfig
from kvrt.runtime.model.config import ModelConfig
from kvrt.runtime.sim.cost_model import CostModel, StepPart
from kvrt.runtime.sim.hardware import CPU_CALIBRATED, Device
from kvrt.runtime.sim.measure import DEFAULT_GRID, Sample, measure

FORMAT = 1


class CalibrationError(RuntimeError):
    """The measurements cannot pin down the coefficients."""


@dataclass(frozen=True, slots=True)
class Fit:
    device: Device
    median_rel_error: float
    max_rel_error: float
    num_samples: int


def fit(
    samples: Sequence[Sample], shape: ModelConfig, dtype_bytes: int, name: str = CPU_CALIBRATED
) -> Fit:
    """Fits overhead, FLOP/s and bandwidth to the samples; the other Device fields are this
    machine's (memory: its RAM; host link: a memory copy, read plus write)."""
    if len(samples) < 3:
        raise CalibrationError(f"3 samples at least are needed, got {len(samples)}")
    unit = _unit_device(dtype_bytes)
    model = CostModel(shape, unit)
    works = [model.work(s.parts) for s in samples]
    flops = np.array([w.flops for w in works])
    nbytes = np.array([w.bytes for w in works])
    seconds = np.array([s.seconds for s in samples])
    overhead, per_flop, per_byte = fit_coefficients(flops, nbytes, seconds)
    if per_flop <= 0 or per_byte <= 0:
        raise CalibrationError(
            "the grid has no compute-bound or no memory-bound step: "
            f"seconds per FLOP {per_flop:g}, per byte {per_byte:g}"
        )
    device = Device(
        name=name,
        peak_flops=1 / per_flop,
        memory_bandwidth=1 / per_byte,
        memory_bytes=_ram_bytes(),
        host_link_bandwidth=0.5 / per_byte,
        flops_efficiency=1.0,
        bandwidth_efficiency=1.0,
        step_overhead=overhead,
        host_link_latency=0.0,
        dtype_bytes=dtype_bytes,
    )
    errors = relative_errors(CostModel(shape, device), samples)
    return Fit(device, float(np.median(errors)), float(np.max(errors)), len(samples))


def relative_errors(model: CostModel, samples: Sequence[Sample]) -> np.ndarray:
    return np.array([abs(model.step_time(s.parts) - s.seconds) / s.seconds for s in samples])


def fit_coefficients(
    flops: np.ndarray, nbytes: np.ndarray, seconds: np.ndarray
) -> tuple[float, float, float]:
    """(overhead, seconds per FLOP, seconds per byte) minimising the relative squared error of
    overhead + max(flops * a, bytes * b), all three >= 0."""
    weight = 1.0 / seconds
    intensity = flops / nbytes
    # Under any coefficients, the compute-bound steps are those above an arithmetic intensity
    # threshold (b / a): start from every such split, refine each by alternation.
    thresholds = [-np.inf, *np.sort(intensity)]
    best: tuple[float, np.ndarray] | None = None
    for threshold in thresholds:
        compute_bound = intensity > threshold
        for _ in range(20):
            design = np.stack(
                [
                    np.ones_like(flops),
                    np.where(compute_bound, flops, 0),
                    np.where(compute_bound, 0, nbytes),
                ],
                axis=1,
            )
            coef = nnls(design * weight[:, None], seconds * weight)
            regime = flops * coef[1] >= nbytes * coef[2]
            if np.array_equal(regime, compute_bound):
                break
            compute_bound = regime
        predicted = coef[0] + np.maximum(flops * coef[1], nbytes * coef[2])
        loss = float(np.sum(((predicted - seconds) * weight) ** 2))
        if best is None or loss < best[0]:
            best = (loss, coef)
    assert best is not None
    overhead, per_flop, per_byte = best[1]
    return float(overhead), float(per_flop), float(per_byte)


def nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a few columns: every subset of free columns, solved
    exactly, the best feasible one kept (exact for the 3 columns used here)."""
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


def calibration_path() -> Path:
    from kvrt.runtime.model.gguf_loader import cache_dir

    return cache_dir() / "sim" / f"{CPU_CALIBRATED}.json"


def cpu_calibrated(refit: bool = False) -> Device:
    """This machine's calibrated device: loaded from the cache folder, or measured (~2 min)
    and saved when there is none, it is unreadable or of another format, or `refit` is set."""
    path = calibration_path()
    if path.is_file() and not refit:
        try:
            return load_calibration(path)
        except (CalibrationError, ValueError, KeyError, TypeError):
            pass  # measured again below
    return calibrate(None, path).fit.device


@dataclass(frozen=True, slots=True)
class Calibration:
    fit: Fit
    samples: list[Sample]
    shape: ModelConfig  # the measured model's


def calibrate(model: str | None = None, path: Path | None = None, repeats: int = 2) -> Calibration:
    """Measures the real engine on the CPU in float32 (`model`: None for the default SmolLM2),
    fits, and saves the result to `path` when given."""
    from kvrt.runtime.engine.factory import build_engine

    config = EngineConfig(
        model=model,
        device="cpu",
        dtype="float32",
        kv_cache_memory=1024**3,
        max_num_seqs=64,
        max_num_batched_tokens=4096,
    )
    engine, checkpoint = build_engine(config)
    samples = measure(engine, DEFAULT_GRID, repeats)
    result = fit(samples, checkpoint.config, dtype_bytes=4)
    if path is not None:
        save_calibration(path, result, samples, checkpoint.name)
    return Calibration(result, samples, checkpoint.config)


def load_calibration(path: Path) -> Device:
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise CalibrationError(f"{path} holds format {record.get('format')}, not {FORMAT}")
    return Device(**record["device"])


def save_calibration(path: Path, result: Fit, samples: Sequence[Sample], model_name: str) -> None:
    record = {
        "format": FORMAT,
        "device": asdict(result.device),
        "fit": {
            "median_rel_error": result.median_rel_error,
            "max_rel_error": result.max_rel_error,
            "num_samples": result.num_samples,
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
        "samples": [
            {"parts": [list(p) for p in s.parts], "seconds": s.seconds, "disturbed": s.disturbed}
            for s in samples
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
    partial.write_text(json.dumps(record, indent=1))
    partial.replace(path)  # appears whole or not at all


def report(result: Fit, samples: Sequence[Sample], shape: ModelConfig) -> str:
    model = CostModel(shape, result.device)
    d = result.device
    lines = [
        f"{d.name}: {d.peak_flops / 1e9:.1f} GFLOP/s, {d.memory_bandwidth / 1e9:.2f} GB/s, "
        f"overhead {d.step_overhead * 1e3:.2f} ms per step",
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
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    path = calibration_path()
    done = calibrate(args.model, path, args.repeats)
    print(report(done.fit, done.samples, done.shape))
    print(f"\nsaved to {path}")


if __name__ == "__main__":
    main()
