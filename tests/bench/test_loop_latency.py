"""`python -m kvrt.runtime.bench.loop_latency` end to end on the tiny model, small: a `kvrt serve`
subprocess, the polls from their own process, each load answered as it should be."""

from __future__ import annotations

import json
from pathlib import Path

from kvrt.runtime.bench.loop_latency import main

PHASES = ["baseline", "body", "prompt", "round", "all"]


def test_the_benchmark_reports_each_phase_beside_a_baseline(tmp_path: Path, capsys) -> None:
    out = tmp_path / "loop.json"
    main(["--model", "tiny", "--agents", "50", "--body-bytes", "1MiB", "--baseline-s", "0.5",
          "--out", str(out)])
    report = json.loads(out.read_text())
    assert (report["agents"], report["health_errors"]) == (50, 0)
    assert 1024**2 - 1024 < report["body_bytes"] <= 1024**2  # the text, 1 KiB less, in JSON
    # The tiny model's limit: its context (2,048) times its longest token (13) times 2.
    assert report["limit_chars"] == 2048 * 13 * 2
    assert list(report["phases"]) == PHASES
    statuses = {name: {load: result["status"] for load, result in phase["loads"].items()}
                for name, phase in report["phases"].items()}
    assert statuses == {"baseline": {}, "body": {"body": 400}, "prompt": {"prompt": 400},
                        "round": {"round": 200},
                        "all": {"body": 400, "prompt": 400, "round": 200}}
    assert report["phases"]["body"]["loads"]["body"]["error"] == "context_length_exceeded"
    baseline = report["phases"]["baseline"]["latency"]
    assert baseline["polls"] >= 10  # every ~10 ms for 0.5 s, on a busy machine
    for phase in report["phases"].values():
        latency = phase["latency"]
        if latency["polls"]:
            assert 0 < latency["median_ms"] <= latency["p99_ms"] <= latency["max_ms"]
            assert 0 <= latency["over_100ms"] <= latency["polls"]
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in PHASES)
