"""Percentiles, the ideal and the predictive uploads' landing, on cases counted by hand."""

from __future__ import annotations

import math

import pytest

from kvrt.runtime.bench.metrics import ideal, percentile, summarize, upload_landing
from kvrt.runtime.bench.report import landing_markdown
from kvrt.runtime.bench.runner import PolicyRun
from kvrt.runtime.bench.session import CallRecord, JobRecord
from kvrt.runtime.engine.landing import LandingSample


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([3, 1, 2, 4], 50) == 2.5
    assert percentile([10, 20], 95) == pytest.approx(19.5)
    assert percentile([7], 99) == 7
    assert math.isnan(percentile([], 50))


def test_ideal_counts_each_distinct_prefix_once() -> None:
    calls = [
        ([1, 2, 3, 4], [9, 9]),  # 4 new tokens
        ([1, 2, 3, 4, 9, 5], [8]),  # 1 2 3 4 9 are known (9 was generated): 1 new
        ([1, 2, 7], [6]),  # 1 2 known, 7 new
        ([1, 2, 3], [5]),  # all known, but the last prompt token is always computed: 1
    ]
    result = ideal(calls, bytes_per_token=10)
    assert result["prefill_tokens_prefix_reuse"] == 4 + 1 + 1 + 1
    # Distinct KV: 1 2 3 4 9 | 5 | 7 (the last generated token of each call has no KV).
    assert result["kv_bytes_prefix_reuse"] == 7 * 10


def test_the_ideal_reuses_runs_of_tokens_wherever_they_sit() -> None:
    calls = [
        ([1, 2, 3, 4], [9, 9]),  # all new: 4 (runs with KV: 12 23 34 49)
        ([5, 6, 2, 3, 7], [8]),  # prefix: all 5 new; anywhere: "2 3" was seen, 3 new
        ([1, 2, 3, 9, 5, 6], [4]),  # prefix: 1 2 3 known, 3 new; anywhere: only 9 is new
    ]
    result = ideal(calls, bytes_per_token=10, span=2)
    assert result["prefill_tokens_prefix_reuse"] == 4 + 5 + 3
    assert result["prefill_tokens"] == 4 + 3 + 1
    assert result["kv_bytes"] == (8 + 1) * 10  # the computed tokens and one generated 9


def test_upload_landing_leaves_early_returns_out_of_the_fraction_and_percentiles() -> None:
    # (landing - actual return, early return, landing - predicted return), in seconds.
    samples = [LandingSample(s, False, -s) for s in (-0.1, -0.03, 0.0, 0.02, -0.05)]
    samples += [LandingSample(0.4, True, -0.1), LandingSample(-0.2, True, -0.3)]  # early
    result = upload_landing(samples)
    assert result is not None
    # Timed, in ms and sorted: -100 -50 -30 0 20; in time (<= 0): 4 of 5.
    assert (result["count"], result["early_returns"]) == (7, 2)
    assert result["in_time_fraction"] == pytest.approx(0.8)
    assert result["p50_ms"] == pytest.approx(-30.0)
    assert result["p5_ms"] == pytest.approx(-90.0)  # rank 0.2: -100 + 0.2 x 50
    assert result["p95_ms"] == pytest.approx(16.0)  # rank 3.8: 0 + 0.8 x 20
    # Against the prediction, sorted: -20 0 30 50 100; at or before it: 2 of 5.
    assert result["vs_predicted_in_time_fraction"] == pytest.approx(0.4)
    assert result["vs_predicted_p50_ms"] == pytest.approx(30.0)
    assert result["vs_predicted_p95_ms"] == pytest.approx(90.0)  # rank 3.8: 50 + 0.8 x 50
    line = landing_markdown({"tokencake": {"upload_landing": result}, "lru": {}})
    assert line[2] == ("- `tokencake`: 7 predictive uploads, 80% landed in time (2 early "
                       "returns left out); landing minus the tool's return p5/p50/p95: "
                       "-90/-30/+16 ms; minus its predicted return p50/p95: +30/+90 ms (40% at "
                       "or before it)")
    assert len(line) == 4


def test_upload_landing_is_none_without_uploads_and_has_no_fraction_if_all_were_early() -> None:
    assert upload_landing([]) is None
    result = upload_landing([LandingSample(0.1, True, 0.3)])
    assert result == {"count": 1, "in_time_fraction": None, "early_returns": 1, "p5_ms": None,
                      "p50_ms": None, "p95_ms": None, "vs_predicted_in_time_fraction": None,
                      "vs_predicted_p50_ms": None, "vs_predicted_p95_ms": None}


def _report(**rows: dict) -> str:
    from kvrt.runtime.bench.report import markdown

    return markdown({"workload": "w", "machine": {"description": "here"}, "params": {},
                     "ideal": {"prefill_tokens": 1, "kv_bytes": 1,
                               "prefill_tokens_prefix_reuse": 1},
                     "policies": {name.replace("_", "-"): row for name, row in rows.items()}})


def test_the_report_says_when_the_policies_tie_and_whether_there_was_pressure() -> None:
    calm = {"jct_mean_s": 10.0, "evicted_blocks": 0, "preemptions": 0}
    text = _report(lru_offload=calm, tokencake={**calm, "jct_mean_s": 10.2})
    assert "Nothing to gain here" in text and "within 2.0%" in text
    pressed = {**calm, "evicted_blocks": 40}
    text = _report(lru_offload=pressed, tokencake={**pressed, "jct_mean_s": 9.8})
    assert "The policies tie" in text and "with memory pressure present" in text
    text = _report(lru_offload=pressed, tokencake={**pressed, "jct_mean_s": 8.0})
    assert "tie" not in text and "Nothing to gain" not in text
    text = _report(lru_offload=calm, tokencake={**calm, "jct_mean_s": 10.5})  # 5%: no tie
    assert "tie" not in text


def test_the_report_shows_shared_kv_in_blocks_beside_tokens_and_the_kv_peak() -> None:
    mib = 2**20
    text = _report(lru={"kv_peak_bytes": 40 * mib, "shared_kv_bytes_per_agent": 3 * mib,
                        "shared_kv_token_bytes_per_agent": 3 * mib},
                   kvrt={"kv_peak_bytes": 30 * mib, "shared_kv_bytes_per_agent": 1.5 * mib,
                         "shared_kv_token_bytes_per_agent": 0.25 * mib})
    header, _, *rows = [line for line in text.splitlines() if line.startswith("|")][:4]
    cells = [cell.strip() for cell in header.split("|")]
    peak = cells.index("KV peak (MiB)")
    blocks = cells.index("shared KV/agent (MiB)")
    tokens = cells.index("shared KV/agent, tokens (MiB)")
    kvrt = [cell.strip() for cell in rows[1].split("|")]
    assert (kvrt[peak], kvrt[blocks], kvrt[tokens]) == ("30.0", "1.50", "0.25")
    assert "shared KV" not in _report(lru={"kv_peak_bytes": mib})  # no segments: no columns


def test_each_jobs_prefill_runs_from_its_start_to_its_last_calls_first_token() -> None:
    calls = [CallRecord("round 1", "a", 0.0, 2.0, 5.0, 10, 0, 4),
             CallRecord("round 1", "b", 0.0, 3.5, 6.0, 10, 0, 4),
             CallRecord("round 2", "a", 6.0, 7.0, 9.0, 20, 10, 4)]
    run = PolicyRun("lru", 64, calls, [JobRecord("round 1", 0.0, 6.0),
                                       JobRecord("round 2", 6.0, 9.0)], [], [], 0, 9.0)
    row = summarize(run)
    assert row["job_prefill_s"] == {"round 1": 3.5, "round 2": 1.0}
    assert row["job_prefill_mean_s"] == pytest.approx(2.25)


def test_a_run_had_memory_pressure_when_it_evicted_or_preempted() -> None:
    def run(**counts: int) -> PolicyRun:
        return PolicyRun(policy="lru", block_bytes=1024, calls=[], jobs=[], samples=[],
                         tokens=[], wall_s=1.0, **{"preemptions": 0, **counts})

    assert summarize(run())["memory_pressure"] is False
    assert summarize(run(evicted_blocks=3))["memory_pressure"] is True
    assert summarize(run(preemptions=1))["memory_pressure"] is True


def test_the_report_says_which_runs_had_no_memory_pressure() -> None:
    from kvrt.runtime.bench.report import pressure_markdown

    mib = 2**20
    calm = {"memory_pressure": False, "kv_resident_peak_bytes": 51.2 * mib}
    pressed = {"memory_pressure": True, "kv_resident_peak_bytes": 512 * mib}
    [line, _] = pressure_markdown({"lru": calm, "kvrt": calm}, 512 * mib)
    assert line.startswith("**No memory pressure**: in no run did the KV pool fill")
    assert "peaked at 51.2 MiB of the 512 MiB pool (10%)" in line
    assert "could not differ" in line
    [line, _] = pressure_markdown({"lru": calm, "kvrt": pressed}, None)
    assert line == ("No memory pressure under `lru` (no cached KV evicted, no call preempted; "
                    "resident KV peaked at 51.2 MiB).")
    assert pressure_markdown({"kvrt": pressed}, 512 * mib) == []
    assert pressure_markdown({"kvrt": {}}, 512 * mib) == []  # not measured: nothing said


def test_the_timeline_has_a_panel_per_policy_each_saying_how_full_the_pool_got(
        tmp_path) -> None:
    from matplotlib.image import imread

    from kvrt.runtime.bench.plots import panel_note, plot

    names = [f"policy-{i}" for i in range(12)]  # more policies than matplotlib has colours
    rows = {name: {"memory_pressure": i % 2 == 1, "evicted_blocks": i, "preemptions": 0,
                   "jct_mean_s": 1.0 + i} for i, name in enumerate(names)}
    results = {"workload": "w", "machine": {"description": "here"}, "policies": rows,
               "ideal": {"prefill_tokens": 1, "prefill_tokens_prefix_reuse": 1}}
    timelines = {name: [(t, 1.0, 2.0 + t) for t in range(5)] for name in names}
    plot(tmp_path, results, timelines, pool_bytes=8 * 2**20)
    summary, timeline = imread(tmp_path / "summary.png"), imread(tmp_path / "kv_timeline.png")
    assert timeline.shape[0] > timeline.shape[1] / 2  # 4 rows of 3 panels, not one crowded plot
    assert summary.shape[1] > 1000
    assert panel_note(rows["policy-0"], 6.0, 8.0) == "no memory pressure: at most 75% of the pool"
    assert panel_note(rows["policy-3"], 8.0, 8.0) == "memory pressure: 3 blocks evicted, " \
                                                     "0 preemptions"
