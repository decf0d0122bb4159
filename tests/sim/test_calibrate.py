"""The calibration fit recovers known coefficients; the measuring path runs on a tiny model."""

from dataclasses import replace

import numpy as np
import pytest

from kvrt.runtime.config import EngineConfig
from kvrt.runtime.engine.factory import build_engine
from kvrt.runtime.sim.calibrate import (
    Fit,
    calibration_path,
    cpu_calibrated,
    fit,
    fit_serving,
    nnls,
    save_calibration,
)
from kvrt.runtime.sim.cost_model import CostModel, StepPart
from kvrt.runtime.sim.hardware import Device, get_device
from kvrt.runtime.sim.measure import Grid, Sample, measure
from kvrt.runtime.sim.model_shapes import SMOLLM2_135M

TRUE = Device(
    name="true",
    peak_flops=2.0e11,
    memory_bandwidth=9.0e9,
    memory_bytes=16 * 1024**3,
    host_link_bandwidth=4.5e9,
    flops_efficiency=1.0,
    bandwidth_efficiency=1.0,
    attention_flops_efficiency=0.5,
    kv_bandwidth_efficiency=0.25,
    step_overhead=0.0,  # the engine's steps are fitted without one: see fit()
    sequence_overhead=0.4e-3,
    host_link_latency=0.0,
    dtype_bytes=4,
)


def _grid_parts() -> list[tuple[StepPart, ...]]:
    steps = [(StepPart(n, n),) for n in (16, 64, 256, 512, 1024, 2048)]
    for context in (32, 512, 2048):
        for batch in (1, 2, 4, 8, 16, 32):
            steps.append((StepPart(1, context + 2),) * batch)
    steps.append((StepPart(256, 1280),))
    steps.append((StepPart(1, 513),) * 8 + (StepPart(256, 256),))
    return steps


def _synthetic(noise: float = 0.0, seed: int = 0) -> list[Sample]:
    model = CostModel(SMOLLM2_135M, TRUE)
    rng = np.random.default_rng(seed)
    return [
        Sample(parts, model.step_time(parts) * (1 + noise * rng.standard_normal()))
        for parts in _grid_parts()
    ]


RATES = ("effective_flops", "effective_bandwidth", "effective_attention_flops",
         "effective_kv_bandwidth", "sequence_overhead")


def test_fit_recovers_known_coefficients():
    result = fit(_synthetic(), SMOLLM2_135M, dtype_bytes=4)
    for rate in RATES:
        assert getattr(result.device, rate) == pytest.approx(getattr(TRUE, rate), rel=0.01), rate
    assert result.device.step_overhead == 0.0
    assert result.max_rel_error < 1e-6
    assert result.num_samples == len(_grid_parts())


def test_fit_tolerates_noise():
    result = fit(_synthetic(noise=0.02), SMOLLM2_135M, dtype_bytes=4)
    for rate in RATES[:4]:
        assert getattr(result.device, rate) == pytest.approx(getattr(TRUE, rate), rel=0.05), rate
    assert result.median_rel_error < 0.03


def test_serving_adds_its_cost_per_step_and_per_sequence():
    engine = fit(_synthetic(), SMOLLM2_135M, dtype_bytes=4).device
    serving = replace(TRUE, step_overhead=6e-3, sequence_overhead=TRUE.sequence_overhead + 2e-3)
    model = CostModel(SMOLLM2_135M, serving)
    served = [Sample(parts, model.step_time(parts)) for parts in _grid_parts()]
    result = fit_serving(engine, SMOLLM2_135M, served)
    assert result.device.step_overhead == pytest.approx(6e-3, rel=0.01)
    assert result.device.sequence_overhead == pytest.approx(2.4e-3, rel=0.01)
    assert result.device.effective_flops == engine.effective_flops  # the engine's terms stay
    assert result.max_rel_error < 1e-6


def test_nnls_clamps_a_negative_coefficient():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    y = np.array([2.0, 1.0, 0.0])  # unconstrained: 2 - x, a negative slope
    np.testing.assert_allclose(nnls(a, y), [1.0, 0.0])
    np.testing.assert_allclose(nnls(a, a @ [0.5, 2.0]), [0.5, 2.0])


def test_measure_runs_the_grid_on_a_real_engine(tiny_checkpoint_dir):
    config = EngineConfig(
        model=str(tiny_checkpoint_dir()), device="cpu", dtype="float32", max_num_batched_tokens=256
    )
    engine, _ = build_engine(config)
    grid = Grid(
        prefills=(8, 32),
        decode_contexts=(16, 64),
        decode_batches=(1, 3),
        decode_steps=2,
        chunks=((32, 16),),
        mixed=((2, 16, 24),),
    )
    samples = measure(engine, grid, 1, lambda _: None, max_attempts=1, wait_budget=0.0)
    assert [s.parts for s in samples[:2]] == [((8, 8, True),), ((32, 32, True),)]
    decodes = samples[2:6]
    assert [len(s.parts) for s in decodes] == [1, 3, 1, 3]
    for sample, context in zip(decodes, (16, 16, 64, 64)):
        assert all(p.new_tokens == 1 and p.context_len == context + 2 for p in sample.parts)
    assert samples[6].parts == ((16, 48, True),)
    assert samples[7].parts == ((1, 18, True), (1, 18, True), (24, 24, True))
    assert all(s.seconds > 0 for s in samples)
    assert len(samples) == 8
    engine.check_integrity()


def test_the_device_is_saved_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRT_CACHE_DIR", str(tmp_path))
    samples = _synthetic()
    result = fit(samples, SMOLLM2_135M, dtype_bytes=4)
    path = calibration_path()
    assert path.parent.parent == tmp_path
    save_calibration(path, result, result, samples, samples[:3], "synthetic")
    assert cpu_calibrated() == result.device  # loaded: no measuring
    assert get_device("cpu-calibrated") == result.device
    assert isinstance(result, Fit)


def test_a_saved_file_of_another_format_is_refused(tmp_path):
    from kvrt.runtime.sim.calibrate import CalibrationError, load_calibration

    path = tmp_path / "old.json"
    path.write_text('{"format": 0, "device": {}}')
    with pytest.raises(CalibrationError, match="format"):
        load_calibration(path)


@pytest.mark.slow
def test_the_first_cpu_calibrated_sim_calibrates_then_simulates(tiny_checkpoint_dir, tmp_path,
                                                                monkeypatch, default_model_path):
    """The README's first `kvrt sim --device cpu-calibrated`: no calibration cached, so it
    measures this machine (the quick plan: seconds), saves it, and the simulation runs on it."""
    import json

    from kvrt.runtime.cli import main
    from kvrt.runtime.model.gguf_loader import cache_dir

    converted = cache_dir() / "gguf"  # the default model's converted copy, if made: not refit
    monkeypatch.setenv("KVRT_CACHE_DIR", str(tmp_path / "cache"))
    if converted.is_dir():
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / "gguf").symlink_to(converted)
    assert not calibration_path("quick").exists()
    out = tmp_path / "report"
    assert main(["sim", "map-reduce", "--quick", "--policies", "lru", "--device",
                 "cpu-calibrated", "--calibration", "quick", "--tokenizer",
                 str(tiny_checkpoint_dir()), "--out", str(out)]) == 0
    saved = json.loads(calibration_path("quick").read_text())
    assert not calibration_path().exists()  # the full plan's file is not a quick fit's
    results = json.loads((out / "results.json").read_text())
    assert results["sim"]["device_spec"] == saved["device"]
    assert results["policies"]["lru"]["calls"] > 0
