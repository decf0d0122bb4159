"""`kvrt bench WORKLOAD --quick` as CI runs it: the real command, the default model, every
registered policy side by side, and the documented report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvrt.runtime.policy import policy_names

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("workload", ["generative-agents", "tool-agents"])
def test_quick_bench_of_the_default_model(workload: str, default_model_path: Path,
                                          tmp_path: Path) -> None:
    command = [sys.executable, "-m", "kvrt.runtime.cli", "bench", workload, "--quick",
               "--out", str(tmp_path)]
    # PYTHONSAFEPATH: `-m` would put the repo root first on sys.path, where its `kernels/`
    # folder shadows the `kernels` distribution that transformers imports.
    done = subprocess.run(command, capture_output=True, text=True, timeout=480,
                          env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["policies"]) == policy_names()
    rows = list(results["policies"].values())
    # The same seeded workload for every policy: the same calls, each of a fixed length (the
    # prompts may differ by a few tokens where batching changed a greedy choice upstream).
    assert len({(r["completion_tokens"], r["calls"]) for r in rows}) == 1
    for row in rows:
        assert results["ideal"]["prefill_tokens"] <= row["prefill_tokens"] <= row["prompt_tokens"]
        assert row["jct_mean_s"] > 0 and row["ttft_p50_ms"] > 0 and row["kv_peak_bytes"] > 0
    assert "| lru |" in done.stdout
