"""The roofline step-time model, checked by hand on H100 with Llama-3.1-8B."""

from dataclasses import replace

import pytest

from kvrt.runtime.sim.cost_model import CostModel, StepPart
from kvrt.runtime.sim.hardware import A100, H100, device_names, get_device
from kvrt.runtime.sim.model_shapes import (
    LLAMA31_8B,
    layer_parameters,
    lm_head_parameters,
    parameter_count,
)

LAYERS = layer_parameters(LLAMA31_8B)
HEAD = lm_head_parameters(LLAMA31_8B)


@pytest.fixture
def h100():
    return CostModel(LLAMA31_8B, H100)


def test_one_decode_token_is_memory_bound(h100):
    work = h100.work([(1, 128)])
    weights = (LAYERS + HEAD) * 2  # bf16: the layers and the LM head, read once
    assert work.weight_bytes == weights
    assert work.kv_read_bytes == 128 * 131072
    assert work.flops / H100.effective_flops < work.bytes / H100.effective_bandwidth / 100
    # Two phases: the GEMMs read the weights, attention reads 128 tokens' KV and writes one's.
    expected = H100.step_overhead + weights / (3.35e12 * 0.8) + 129 * 131072 / (3.35e12 * 0.7)
    assert h100.step_time([(1, 128)]) == pytest.approx(expected, rel=1e-12)
    assert h100.step_time([(1, 128)]) == pytest.approx(7.1e-3, abs=0.1e-3)  # ~7 ms a token


def test_a_4k_prefill_is_compute_bound(h100):
    n = 4096
    work = h100.work([StepPart(n, n)])
    assert work.linear_flops == 2 * (LAYERS * n + HEAD)
    assert work.attention_flops == 4 * 32 * 32 * 128 * (n * (n + 1) // 2)  # causal keys
    assert work.flops / H100.effective_flops > 10 * work.bytes / H100.effective_bandwidth
    time = h100.step_time([(n, n)])
    # Both phases compute-bound; attention at its own efficiency (0.6 of peak, as the GEMMs).
    expected = work.linear_flops / (989e12 * 0.6) + work.attention_flops / (989e12 * 0.6)
    assert time == pytest.approx(H100.step_overhead + expected, rel=1e-12)
    rough = 2 * parameter_count(LLAMA31_8B) * n / H100.effective_flops
    assert time == pytest.approx(rough, rel=0.1)  # ~0.1 s


def test_a_batch_costs_one_weight_read(h100):
    single = h100.step_time([(1, 1000)])
    batch = h100.step_time([(1, 1000)] * 32)
    # 32 decodes read the weights once: far less than 32 single steps, a little more than one.
    assert single < batch < 1.5 * single
    mixed = h100.step_time([(1, 1000)] * 32 + [(512, 2048, False)])
    assert mixed > batch
    assert h100.work([(512, 2048, False)]).weight_bytes == LAYERS * 2  # no sampling, no head


def test_plain_tuples_and_empty_steps(h100):
    assert h100.step_time([(5, 9)]) == h100.step_time([StepPart(5, 9, True)])
    assert h100.step_time([]) == 0.0
    with pytest.raises(ValueError):
        h100.work([(10, 5)])


def test_a100_is_slower_than_h100():
    step = [(1, 4000)] * 64
    assert CostModel(LLAMA31_8B, A100).step_time(step) > CostModel(LLAMA31_8B, H100).step_time(step)


def test_transfer_time(h100):
    assert h100.transfer_time(0) == 0.0
    assert h100.transfer_time(1024**3) == pytest.approx(10e-6 + 1024**3 / 55e9)


def test_device_registry():
    assert device_names() == ["h100", "a100", "cpu-calibrated"]
    assert get_device("H100") is H100
    assert H100.effective_flops == pytest.approx(989e12 * 0.6)
    with pytest.raises(KeyError):
        get_device("tpu")


def test_the_phases_add_and_each_sequence_costs_the_host_its_share():
    device = replace(H100, sequence_overhead=1e-4)
    model = CostModel(LLAMA31_8B, device)
    parts = [(1, 8000)] * 16  # 16 long-context decodes: weight-bound GEMMs, KV-bound attention
    work = model.work(parts)
    assert work.sequences == 16
    weights = work.weight_bytes / device.effective_bandwidth
    kv = work.kv_bytes / device.effective_kv_bandwidth
    expected = device.step_overhead + 16 * 1e-4 + weights + kv
    assert model.step_time(parts) == pytest.approx(expected, rel=1e-12)
    assert kv > weights  # 128k tokens of KV outweigh 16 GB of weights: both are paid
