"""`kvrt sim`: the bench's workloads through the real daemon and SDK on simulated time.

Times are checked against the cost model summed by hand over the steps the engine must run
(which fails if any real time leaks into the simulated clock), token counts against the same
independent prefix count the bench's tests use, and the report against a real `kvrt bench`."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvrt.runtime.bench.metrics import summarize
from kvrt.runtime.bench.runner import PolicyRun, run_policy
from kvrt.runtime.bench.session import BenchSession
from kvrt.runtime.bench.workloads import make_workload
from kvrt.runtime.cli import main
from kvrt.runtime.config import EngineConfig, ServeConfig
from kvrt.runtime.model.checkpoint import load_checkpoint
from kvrt.runtime.sim.cost_model import CostModel
from kvrt.runtime.sim.engine_profiles import KVRT
from kvrt.runtime.sim.hardware import A100, H100
from kvrt.runtime.sim.main import (
    GPU_MAX_NUM_BATCHED_TOKENS,
    GPU_MAX_NUM_SEQS,
    sim_engine_factory,
)
from kvrt.runtime.sim.model_shapes import QWEN25_7B
from kvrt.runtime.sim.virtual_loop import VirtualTimeLoop
from kvrt.sdk import Graph
from tests.bench.test_bench_runs import expected_cached

DOCUMENTED = {"jct_mean_s", "jct_p95_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_ms", "prefill_tokens",
              "cached_tokens", "kv_peak_bytes", "kv_bytes_per_agent", "offload_bytes",
              "upload_bytes", "preemptions", "max_agents_within_slo"}


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_dir) -> Path:
    return tiny_checkpoint_dir()


def simulate(tiny: Path, workload, policy: str = "lru", time_scale: float = 1.0,
             device=H100, **engine) -> PolicyRun:
    tokenizer = load_checkpoint(str(tiny)).tokenizer
    config = ServeConfig(served_model_name="bench", engine=EngineConfig(policy=policy, **engine))

    async def play() -> PolicyRun:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop)
        factory = sim_engine_factory(QWEN25_7B, device, tokenizer, loop)
        return await run_policy(workload, config, time_scale, factory)

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(play())


@dataclass(frozen=True)
class _Params:
    concurrent_agents: int = 1


class OneAgentWithATool:
    """ask (n1 tokens) -> tool (tool_s) -> ask again, the conversation extended (n2 tokens)."""

    name = "one-agent"
    params = _Params()

    def __init__(self, n1: int, n2: int, tool_s: float) -> None:
        self.n1, self.n2, self.tool_s = n1, n2, tool_s

    async def run(self, session: BenchSession) -> None:
        graph = Graph("one").agent("solo", system="You fix bugs.", tools={"tests": self.tool_s})
        info = await session.client.create_graph(graph)
        async with session.job("job"), await session.client.start_run(info) as run:
            agent = run.agent("solo")
            history = [{"role": "user", "content": "Fix the parser. " * 20}]
            answer = await session.chat(agent, history, self.n1, "job")
            await session.tool(agent, "tests", self.tool_s)
            history += [{"role": "assistant", "content": answer},
                        {"role": "user", "content": "The tests passed."}]
            await session.chat(agent, history, self.n2, "job")
            await agent.done()
        await session.client.delete_graph(info)


@pytest.mark.parametrize("device", [H100, A100, KVRT.on(H100)],
                         ids=["h100", "a100", "h100-kvrt-engine"])
def test_a_jobs_time_is_its_steps_priced_by_the_cost_model_plus_its_tool(tiny, device) -> None:
    run = simulate(tiny, OneAgentWithATool(n1=7, n2=5, tool_s=2.0), time_scale=1.5,
                   device=device)
    cost = CostModel(QWEN25_7B, device)
    (first, second), (job,) = run.calls, run.jobs
    expected = 2.0 * 1.5
    for call in (first, second):
        prompt, new = call.prompt_tokens, call.prompt_tokens - call.cached_tokens
        prefill = cost.step_time([(new, prompt)])  # one step: under the 512-token budget
        decodes = [cost.step_time([(1, prompt + i)]) for i in range(1, call.completion_tokens)]
        assert call.first_token - call.submitted == pytest.approx(prefill, rel=1e-9)
        assert call.finished - call.submitted == pytest.approx(prefill + sum(decodes), rel=1e-9)
        expected += prefill + sum(decodes)
    assert second.cached_tokens > 0  # the second call extends the first: served from cache
    assert job.finished - job.started == pytest.approx(expected, rel=1e-9)
    assert run.wall_s == pytest.approx(expected, rel=1e-9)


def test_a_simulation_is_exactly_repeatable(tiny) -> None:
    workload = make_workload("tool-agents", runs=3, min_workers=2, max_workers=3, turns=2,
                             system_words=60, min_output_tokens=4, max_output_tokens=12)
    rows = [summarize(simulate(tiny, workload, policy="ttl")) for _ in range(2)]
    assert rows[0] == rows[1]
    assert rows[0]["jct_mean_s"] > 2.0  # three tool calls in a row: at least two seconds each


def test_two_agents_two_rounds_under_lru_count_exactly(tiny) -> None:
    run = simulate(tiny, make_workload("generative-agents", agents=2, rounds=2,
                                       persona_words=60, min_output_tokens=8,
                                       max_output_tokens=8))
    row = summarize(run)
    cached = expected_cached(run.tokens)
    assert row["calls"] == 4 and cached[:2] == [0, 0] and all(c > 0 for c in cached[2:])
    assert row["cached_tokens"] == sum(cached)
    assert row["prefill_tokens"] == sum(len(p) for p, _ in run.tokens) - sum(cached)


def test_kvrt_sim_writes_the_bench_report_and_compares_with_a_bench(tiny, tmp_path) -> None:
    bench_out, sim_out = tmp_path / "bench", tmp_path / "sim"
    quick = ["generative-agents", "--quick", "--policies", "lru"]
    assert main(["bench", *quick, "--model", str(tiny), "--kv-cache-memory", "16MiB",
                 "--out", str(bench_out)]) == 0
    # 16 MiB holds few blocks of a 7B model's KV: a flag overrides the bench's setting.
    assert main(["sim", *quick, "--tokenizer", str(tiny), "--device", "a100",
                 "--kv-cache-memory", "1GiB", "--compare", str(bench_out / "results.json"),
                 "--out", str(sim_out)]) == 0
    bench = json.loads((bench_out / "results.json").read_text())
    sim = json.loads((sim_out / "results.json").read_text())
    assert set(sim["policies"]["lru"]) >= DOCUMENTED and set(sim["ideal"]) == set(bench["ideal"])
    assert sim["machine"]["simulated"] and sim["machine"]["device"] == "a100"
    assert sim["params"] == bench["params"]  # the bench's workload, replayed
    assert sim["engine"]["max_num_seqs"] == bench["engine"]["max_num_seqs"] == 32  # its engine
    assert sim["engine"]["kv_cache_memory"] == 1024**3
    # Completion times and the reuse figures, each measured, simulated and its error.
    compared = sim["comparison"]["policies"]["lru"]
    assert set(compared) == {"jct_mean_s", "jct_p95_s", "prefill_tokens",
                             "shared_kv_bytes_per_agent"}
    for key, figure in compared.items():
        measured, simulated = bench["policies"]["lru"][key], sim["policies"]["lru"][key]
        assert (figure["bench"], figure["sim"]) == (measured, simulated)
        assert figure["error"] == pytest.approx(simulated / measured - 1)
    report = (sim_out / "results.md").read_text()
    for header in ("JCT mean (s)", "prefill tokens", "shared KV/agent (MiB)"):
        assert f"| lru | {header} |" in report
    assert (sim_out / "summary.png").is_file() and (sim_out / "kv_timeline.png").is_file()


def test_kvrt_sim_refuses_a_report_of_another_workload_or_a_simulation(tiny, tmp_path) -> None:
    report = tmp_path / "results.json"
    report.write_text(json.dumps({"workload": "map-reduce", "params": {}, "machine": {}}))
    with pytest.raises(SystemExit, match="`map-reduce` report"):
        main(["sim", "generative-agents", "--tokenizer", str(tiny), "--compare", str(report)])
    report.write_text(json.dumps({"workload": "map-reduce", "params": {},
                                  "machine": {"simulated": True}}))
    with pytest.raises(SystemExit, match="is a simulation"):
        main(["sim", "map-reduce", "--tokenizer", str(tiny), "--compare", str(report)])
    with pytest.raises(SystemExit, match="cannot read"):
        main(["sim", "map-reduce", "--compare", str(tmp_path / "missing.json")])


def test_the_slo_sweep_finds_the_largest_scale_that_meets_it(tiny, tmp_path) -> None:
    common = ["sim", "map-reduce", "--agents", "4", "--policies", "lru", "--tokenizer",
              str(tiny), "--device", "a100", "--kv-cache-memory", "1GiB"]

    def swept(slo_ms: float) -> int | None:
        out = tmp_path / str(slo_ms)
        assert main([*common, "--slo-ttft-ms", str(slo_ms), "--out", str(out)]) == 0
        row = json.loads((out / "results.json").read_text())["policies"]["lru"]
        assert "agents within SLO" in (out / "results.md").read_text()
        return row["max_agents_within_slo"]

    assert swept(1e9) == (8 + 1) * 1  # every scale meets it, up to twice --agents (8 mappers)
    assert swept(1e-3) is None  # none does

    def ttft_p99(mappers: int) -> float:
        workload = make_workload("map-reduce", agents=mappers)
        run = simulate(tiny, workload, device=A100, kv_cache_memory=1024**3,
                       max_num_seqs=GPU_MAX_NUM_SEQS,
                       max_num_batched_tokens=GPU_MAX_NUM_BATCHED_TOKENS)
        return summarize(run)["ttft_p99_ms"]

    # Between the TTFT of 2 and of 4 mappers: the sweep doubles (1, 2, 4) then tries 3.
    low, middle, high = ttft_p99(2), ttft_p99(3), ttft_p99(4)
    assert low < middle < high
    assert swept((low + middle) / 2) == 2 + 1
    assert swept((middle + high) / 2) == 3 + 1


def test_a_pool_too_small_for_a_prompt_ends_the_run_with_the_daemons_message(tiny) -> None:
    with pytest.raises(SystemExit, match="kvrt sim: the daemon refused a call.*KV pool holds"):
        main(["sim", "map-reduce", "--quick", "--policies", "lru", "--tokenizer", str(tiny),
              "--kv-cache-memory", "4MiB"])


def test_tokencake_moves_kv_over_the_simulated_host_link(tiny) -> None:
    """Tool calls under pressure (a small pool): tokencake offloads and uploads, each copy
    taking the cost model's transfer time; the run is repeatable like any other."""
    workload = make_workload("tool-agents", runs=6, min_workers=3, max_workers=3, turns=2,
                             system_words=100, tool_median_s=5.0, tool_p95_s=20.0,
                             min_output_tokens=8, max_output_tokens=16)
    settings = {"kv_cache_memory": 120 * 16 * 57344, "host_cache_memory": 2**30}  # 120 blocks
    runs = [simulate(tiny, workload, policy="tokencake", **settings) for _ in range(2)]
    rows = [summarize(run) for run in runs]
    assert rows[0] == rows[1]
    assert rows[0]["offload_bytes"] > 0 and rows[0]["upload_bytes"] > 0
    lru = summarize(simulate(tiny, workload, policy="lru", **settings))
    assert lru["offload_bytes"] == 0
