"""`make gpu-check`'s runner, on the CPU (how CI can check it; the GPU run is the real one): the
engine steps against transformers and the host tier's round trip on a tiny model, the report's
shape, a failing or crashing step recorded while the others still run, and clear refusals."""

from __future__ import annotations

import json

import pytest
import torch

from kvrt.runtime.bench import gpu_check


def test_the_engine_steps_pass_on_the_cpu_and_write_one_report(tiny_checkpoint_dir, tmp_path):
    model = str(tiny_checkpoint_dir())
    code = gpu_check.main(["--device", "cpu", "--model", model, "--out", str(tmp_path),
                           "--skip", "gpu_tests,engine_speed,bench_quick"])
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert code == 0 and list(report) == ["environment", "engine_vs_transformers",
                                          "host_round_trip"]
    assert report["environment"]["figures"]["device"] == "cpu"
    exact = report["engine_vs_transformers"]["figures"]["float32/torch"]
    assert exact["identical"] and exact["tokens_agreeing"] == [gpu_check.NEW_TOKENS] * 3
    assert "bfloat16/torch" in report["engine_vs_transformers"]["figures"]
    trip = report["host_round_trip"]["figures"]["torch"]
    assert trip["bit_identical"] and trip["same_tokens"] and trip["left_on_device"] == 0
    assert trip["uploaded"] >= trip["blocks"] > 0


def test_a_failing_or_crashing_step_is_recorded_and_the_others_still_run() -> None:
    def wrong() -> dict:
        raise gpu_check.CheckFailed("tokens differ", {"agreeing": 3})

    def crashes() -> dict:
        raise RuntimeError("CUDA error: an illegal memory access")

    report = gpu_check.run_steps({"wrong": wrong, "crashes": crashes, "fine": lambda: {"x": 1}})
    assert report["wrong"]["ok"] is False and report["wrong"]["figures"] == {"agreeing": 3}
    assert "illegal memory access" in report["crashes"]["error"]
    assert report["fine"] == {"ok": True, "figures": {"x": 1}, "seconds": 0.0}


def test_bad_arguments_are_refused_clearly(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        gpu_check.main(["--skip", "kernels", "--out", str(tmp_path)])
    assert "unknown steps ['kernels']" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.main(["--out", str(tmp_path)])
        assert "no CUDA device is visible" in capsys.readouterr().err
