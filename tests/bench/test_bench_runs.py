"""Workloads played against the real engine and daemon (tiny model), with their figures checked
against an independent count: under `lru` with ample memory, each call is served from cache
for the longest run of whole blocks it shares with a sequence computed before it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from kvrt.runtime.bench.main import add_arguments, bench
from kvrt.runtime.bench.metrics import summarize
from kvrt.runtime.bench.runner import PolicyRun, run_policy
from kvrt.runtime.bench.workloads import make_workload
from kvrt.runtime.config import EngineConfig, ServeConfig
from kvrt.runtime.model.tiny import init_tiny

BLOCK = EngineConfig().block_size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_tiny(tmp_path_factory.mktemp("tiny") / "llama", arch="llama", seed=0)


def config(model: Path, policy: str = "lru") -> ServeConfig:
    engine = EngineConfig(model=str(model), kv_cache_memory=16 * 1024**2, policy=policy)
    return ServeConfig(served_model_name="bench", engine=engine)


def expected_cached(tokens: list[tuple[list[int], list[int]]]) -> list[int]:
    """Per call, in submission order: whole blocks of the longest common prefix with any earlier
    call's prompt + output (the last generated token never gets KV), leaving one prompt token
    to compute."""
    done: list[list[int]] = []
    out = []
    for prompt, output in tokens:
        best = 0
        for seq in done:
            common = 0
            for a, b in zip(prompt, seq):
                if a != b:
                    break
                common += 1
            best = max(best, common)
        out.append(min(best // BLOCK, (len(prompt) - 1) // BLOCK) * BLOCK)
        done.append([*prompt, *output[:-1]])
    return out


def play(model: Path, workload_name: str, **params) -> PolicyRun:
    workload = make_workload(workload_name, **params)
    return asyncio.run(run_policy(workload, config(model), time_scale=0.01))


def test_two_agents_two_rounds_under_lru(tiny: Path) -> None:
    run = play(tiny, "generative-agents", agents=2, rounds=2, persona_words=60,
               min_output_tokens=8, max_output_tokens=8)
    row = summarize(run)
    assert row["calls"] == 4 and row["jobs"] == 2 and row["completion_tokens"] == 32
    prompts = [len(p) for p, _ in run.tokens]
    cached = expected_cached(run.tokens)
    assert cached[:2] == [0, 0]  # two different personas: nothing to share in round 1
    assert all(c > 0 for c in cached[2:])  # round 2 starts with the agent's round-1 prefix
    assert row["prompt_tokens"] == sum(prompts)
    assert row["cached_tokens"] == sum(cached)
    assert row["prefill_tokens"] == sum(prompts) - sum(cached)
    assert row["preemptions"] == 0 and row["kv_peak_bytes"] > 0
    assert row["memory_pressure"] is False  # 16 MiB for a few hundred tokens: nothing evicted


def test_map_reduce_mappers_share_the_document(tiny: Path) -> None:
    run = play(tiny, "map-reduce", agents=3, document_words=80, min_output_tokens=4,
               max_output_tokens=4)
    row = summarize(run)
    assert row["calls"] == 4 and row["jobs"] == 1
    # Mappers run concurrently: those admitted in the same step all compute the document, later
    # ones find its blocks. So the cache serves at most what a sequential replay would get.
    assert row["cached_tokens"] <= sum(expected_cached(run.tokens))
    assert row["prompt_tokens"] == sum(len(p) for p, _ in run.tokens)


def test_reuse_reports_the_shared_kv_the_engine_sampled_beside_the_token_figure(
        tiny: Path) -> None:
    workload = make_workload("generative-agents", agents=4, rounds=2, persona_words=60,
                             min_output_tokens=8, max_output_tokens=8)
    run = asyncio.run(run_policy(workload, config(tiny, "kvrt"), time_scale=0.01))
    row = summarize(run)
    # Sampled on the engine's thread, at the sampler's request: some sample saw the segments.
    assert 0 < row["shared_kv_bytes_per_agent"] <= row["kv_peak_bytes"]
    assert row["shared_kv_token_bytes_per_agent"] > 0


def test_tool_agents_report_tool_calls(tiny: Path) -> None:
    run = play(tiny, "tool-agents", runs=2, min_workers=2, max_workers=2, turns=1,
               system_words=40, tool_median_s=1.0, tool_p95_s=3.0, min_output_tokens=4,
               max_output_tokens=4)
    row = summarize(run)
    # Per run: planner, 2 workers x (1 turn + 1 final), reviewer.
    assert row["calls"] == 2 * (1 + 2 * 2 + 1) and row["jobs"] == 2
    # A worker's second call extends its first prompt and answer: served from cache.
    assert row["cached_tokens"] > 0


def test_bench_command_writes_the_documented_report(tiny: Path, tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["generative-agents", "--quick", "--model", str(tiny),
                              "--policies", "lru", "--out", str(tmp_path),
                              "--kv-cache-memory", "16MiB"])
    asyncio.run(bench(args))
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) >= {"workload", "params", "machine", "ideal", "policies"}
    assert set(results["ideal"]) == {"prefill_tokens", "kv_bytes", "prefill_tokens_prefix_reuse",
                                     "kv_bytes_prefix_reuse"}
    assert results["ideal"]["prefill_tokens"] <= results["ideal"]["prefill_tokens_prefix_reuse"]
    row = results["policies"]["lru"]
    assert set(row) >= {"jct_mean_s", "jct_p95_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_ms",
                        "prefill_tokens", "cached_tokens", "kv_peak_bytes", "kv_bytes_per_agent",
                        "offload_bytes", "upload_bytes", "preemptions", "max_agents_within_slo"}
    assert results["ideal"]["prefill_tokens"] <= row["prefill_tokens"]
    assert "| lru |" in (tmp_path / "results.md").read_text()
    for png in ("summary.png", "kv_timeline.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_trace_replays_calls_tools_and_timing(tiny: Path, tmp_path: Path) -> None:
    lines = [
        {"kind": "call", "run": "r1", "agent": "a", "at": 0.0, "max_tokens": 3,
         "messages": [{"role": "user", "content": "one"}]},
        {"kind": "tool", "run": "r1", "agent": "a", "at": 0.0, "tool": "search",
         "duration_s": 0.2},
        {"kind": "call", "run": "r1", "agent": "a", "at": 0.0, "max_tokens": 2,
         "messages": [{"role": "user", "content": "two"}]},
        {"kind": "call", "run": "r2", "agent": "b", "at": 1.0, "max_tokens": 4,
         "messages": [{"role": "user", "content": "late"}]},
        {"kind": "done", "run": "r2", "agent": "b", "at": 0.0},
    ]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    run = asyncio.run(run_policy(make_workload("trace", path=str(trace)), config(tiny),
                                 time_scale=1.0))
    calls = sorted(run.calls, key=lambda c: c.submitted)
    assert [(c.agent, c.completion_tokens) for c in calls] == [("a", 3), ("a", 2), ("b", 4)]
    start = min(j.started for j in run.jobs)
    assert calls[1].submitted - calls[0].finished >= 0.2  # a's tool call sits between
    assert calls[2].submitted - start >= 0.95  # b waits for its `at` (jobs start a bit late)
    assert sorted(j.name for j in run.jobs) == ["r1", "r2"]


def test_a_bad_trace_line_is_named(tmp_path: Path) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"kind": "call", "run": "r", "agent": "a", "max_tokens": 0, '
                     '"messages": []}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        make_workload("trace", path=str(trace))


def test_a_policy_run_lets_go_of_its_engine(tiny: Path) -> None:
    """`kvrt bench` runs policy after policy in one process: each engine (its KV pool) must be
    freed when its run ends, though aiohttp keeps the app (its middleware-chain cache)."""
    import gc
    import weakref

    from kvrt.runtime.bench.runner import real_engine

    engines: list[weakref.ref] = []

    def make_engine(config: EngineConfig):
        engine, block_bytes = real_engine(config)
        engines.append(weakref.ref(engine))
        return engine, block_bytes

    workload = make_workload("generative-agents", agents=2, rounds=1, persona_words=30,
                             min_output_tokens=2, max_output_tokens=2)
    for policy in ("lru", "kvrt"):
        run = asyncio.run(run_policy(workload, config(tiny, policy), 0.01, make_engine))
        assert len(run.calls) == 2
    gc.collect()  # the engine's own reference cycles; nothing outside may hold it
    assert [ref() for ref in engines] == [None, None]
