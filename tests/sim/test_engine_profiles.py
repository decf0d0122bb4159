"""Engine profiles: `vllm-class` is today's GPU figures to the bit; `kvrt` adds kvrt's host
costs, checked by hand on H100 with Qwen2.5-7B from the constants engine_profiles.py documents
(170 us a step, 60 us a sequence, no slot-table cost on the host; launches of 97.6 us a step
and 335.2 us a layer, overlapping the device's kernels)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pytest

from kvrt.runtime.cli import main
from kvrt.runtime.sim.cost_model import CostModel
from kvrt.runtime.sim.engine_profiles import KVRT, VLLM_CLASS, get_profile, profile_names
from kvrt.runtime.sim.hardware import A100, H100
from kvrt.runtime.sim.main import engine_profile
from kvrt.runtime.sim.measure_host import count_launches
from kvrt.runtime.sim.model_shapes import QWEN25_7B, layer_parameters, lm_head_parameters

LAYERS = layer_parameters(QWEN25_7B)
HEAD = lm_head_parameters(QWEN25_7B)
KV_PER_TOKEN = 2 * 28 * 4 * 128 * 2  # K and V, 28 layers, 4 KV heads of 128, bf16
LAUNCHES = 97.6e-6 + 28 * 335.2e-6  # outside the layers + 28 layers: 9.48 ms


def device_seconds(batch: int, context: int) -> float:
    """H100's kernels for `batch` decodes at `context`: the two rooflines, by hand."""
    gemms = max(2 * (LAYERS + HEAD) * batch / (989e12 * 0.6), (LAYERS + HEAD) * 2 / (3.35e12 * 0.8))
    attention = max(4 * 28 * 28 * 128 * context * batch / (989e12 * 0.6),
                    (context + 1) * batch * KV_PER_TOKEN / (3.35e12 * 0.7))
    return gemms + attention


def test_the_profiles_constants_are_the_documented_ones():
    assert profile_names() == ["vllm-class", "kvrt"]
    assert get_profile("kvrt") is KVRT
    assert (VLLM_CLASS.step_overhead, VLLM_CLASS.sequence_overhead,
            VLLM_CLASS.slot_token_overhead, VLLM_CLASS.launch_overhead,
            VLLM_CLASS.layer_launch_overhead) == (1.5e-3, 0.0, 0.0, 0.0, 0.0)
    assert KVRT.step_overhead == pytest.approx(110e-6 + 6 * 10e-6)
    assert KVRT.sequence_overhead == pytest.approx(50e-6 + 10e-6)
    assert KVRT.slot_token_overhead == 0.0
    assert KVRT.launch_overhead == pytest.approx(16 * (1.1e-6 + 5e-6))
    assert KVRT.layer_launch_overhead == pytest.approx(52 * (1.1e-6 + 5e-6) + 2 * 9e-6)
    with pytest.raises(KeyError, match="unknown engine profile 'sglang'; known: vllm-class, kvrt"):
        get_profile("sglang")


def test_vllm_class_is_todays_h100_and_a100_to_the_bit():
    assert VLLM_CLASS.on(H100) == H100 and VLLM_CLASS.on(A100) == A100
    model = CostModel(QWEN25_7B, VLLM_CLASS.on(H100))
    for batch, context in [(1, 128), (64, 2048), (256, 4000)]:
        parts = [(1, context)] * batch
        # The model before engine profiles, summed in its order: equal, not approximately.
        gemms = max(2 * (LAYERS * batch + HEAD * batch) / (989e12 * 0.6),
                    (LAYERS + HEAD) * 2 / (3.35e12 * 0.8))
        attention = max(4 * 28 * 28 * 128 * context * batch / (989e12 * 0.6),
                        (context * batch + batch) * KV_PER_TOKEN / (3.35e12 * 0.7))
        assert model.step_time(parts) == 1.5e-3 + 0.0 * batch + gemms + attention


@pytest.mark.parametrize("batch", [1, 16, 64, 256])
def test_a_kvrt_decode_step_pays_its_host_work_and_launches(batch):
    context = 2048
    parts = [(1, context)] * batch
    device = device_seconds(batch, context)
    host = 170e-6 + 60e-6 * batch
    expected = host + device + max(0.0, LAUNCHES - device)
    assert CostModel(QWEN25_7B, KVRT.on(H100)).step_time(parts) == pytest.approx(expected,
                                                                                  rel=1e-9)
    assert CostModel(QWEN25_7B, H100).step_time(parts) == pytest.approx(1.5e-3 + device,
                                                                        rel=1e-9)


def test_kvrt_costs_more_than_vllm_class_and_the_more_the_larger_the_batch():
    kvrt, vllm = CostModel(QWEN25_7B, KVRT.on(H100)), CostModel(QWEN25_7B, H100)
    extra = []
    for batch in (1, 16, 64, 256):
        parts = [(1, 2048)] * batch
        extra.append(kvrt.step_time(parts) - vllm.step_time(parts))
    # By hand: one decode is launch-bound (9.48 ms of launches over 5.3 ms of kernels); 256
    # are not (18.9 ms of kernels), and pay 256 sequences' host work.
    assert device_seconds(1, 2048) < LAUNCHES < device_seconds(256, 2048)
    assert extra[0] == pytest.approx(170e-6 + 60e-6 + LAUNCHES
                                     - device_seconds(1, 2048) - 1.5e-3, rel=1e-9)
    assert extra[-1] == pytest.approx(170e-6 + 256 * 60e-6 - 1.5e-3, rel=1e-9)
    assert 0 < extra[0] < extra[1] < extra[2] < extra[3]
    assert extra[-1] > 13e-3  # a 256-sequence decode step: 34.4 ms against 20.4 ms


def test_a_long_prefill_hides_kvrts_launches():
    """4,096 tokens in one step: 96 ms of kernels. kvrt pays its host work, not its launches,
    and no vLLM-class 1.5 ms: the step costs it less."""
    parts = [(4096, 4096)]
    kvrt = CostModel(QWEN25_7B, KVRT.on(H100)).step_time(parts)
    vllm = CostModel(QWEN25_7B, H100).step_time(parts)
    assert kvrt - vllm == pytest.approx(170e-6 + 60e-6 - 1.5e-3, rel=1e-6)


def test_the_counted_launches_are_the_profiles(tiny_checkpoint_dir):
    """The bf16 forward's ops as measure_host counts them (qwen2: q/k/v bias, as Qwen2.5): the
    profile's 34 per layer (+18 of the Triton wrapper, counted apart), 2 kernel calls and 14
    outside the layers; qwen3's q/k norms add 16. A change to the forward fails here: re-derive
    the profile."""
    per_layer, outside, kernel_calls, _ = count_launches(str(tiny_checkpoint_dir("qwen2")))
    assert (per_layer, outside, kernel_calls) == (34, 14, 2)
    assert count_launches(str(tiny_checkpoint_dir("qwen3")))[0] == 34 + 16


def test_an_unknown_profile_exits_2_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["sim", "map-reduce", "--engine-profile", "sglang"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--engine-profile" in err and "'sglang'" in err and "vllm-class" in err, err


def test_cpu_calibrated_takes_no_profile():
    with pytest.raises(SystemExit, match="--engine-profile applies to a GPU device"):
        main(["sim", "map-reduce", "--device", "cpu-calibrated", "--engine-profile", "kvrt"])


def test_a_calibrated_cpu_keeps_its_fitted_costs_and_names_them():
    fitted = replace(H100, name="cpu-calibrated", step_overhead=4e-3, sequence_overhead=5e-3)
    args = argparse.Namespace(device="cpu-calibrated", engine_profile=None)
    device, profile = engine_profile(args, fitted)
    assert device is fitted and profile["name"] == "kvrt-calibrated"
    args = argparse.Namespace(device="a100", engine_profile="kvrt")
    device, profile = engine_profile(args, A100)
    assert (device.name, device.step_overhead, device.peak_flops) == ("a100", KVRT.step_overhead,
                                                                      312e12)
    assert profile["name"] == "kvrt" and profile["launch_overhead"] == KVRT.launch_overhead


def test_every_report_names_its_profile_and_kvrt_runs_slower(tiny_checkpoint_dir, tmp_path):
    common = ["sim", "map-reduce", "--quick", "--policies", "lru", "--tokenizer",
              str(tiny_checkpoint_dir())]
    reports = {}
    for profile in (None, "kvrt"):
        folder = tmp_path / str(profile)
        flags = [] if profile is None else ["--engine-profile", profile]
        assert main([*common, *flags, "--out", str(folder)]) == 0
        reports[profile] = (json.loads((folder / "results.json").read_text()),
                            (folder / "results.md").read_text().splitlines()[0])
    default, kvrt = reports[None][0], reports["kvrt"][0]
    assert default["machine"]["engine_profile"] == "vllm-class"
    assert default["sim"]["engine_profile"]["step_overhead"] == 1.5e-3
    assert "simulated h100 (vllm-class engine), qwen2.5-7b" in reports[None][1]
    assert kvrt["machine"]["engine_profile"] == "kvrt"
    assert kvrt["sim"]["engine_profile"]["sequence_overhead"] == pytest.approx(60e-6)
    assert kvrt["sim"]["device_spec"]["layer_launch_overhead"] == KVRT.layer_launch_overhead
    assert "simulated h100 (kvrt engine), qwen2.5-7b" in reports["kvrt"][1]
    # The same prompts and tokens, priced higher: decode steps of a few sequences are
    # launch-bound under kvrt (9.7 ms a step against 6.8 ms).
    assert kvrt["policies"]["lru"]["prefill_tokens"] == default["policies"]["lru"]["prefill_tokens"]
    assert kvrt["policies"]["lru"]["tpot_ms"] > 1.25 * default["policies"]["lru"]["tpot_ms"]
