"""`kvrt sim --replicas N --router ...`: the routers side by side over simulated replicas.

The agents a call record names (its job and agent, as the workload submitted it) are the
independent reference for where calls landed: each replica's figures say which agents it
served, and an agent counted on two replicas had its calls split."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from kvrt.runtime.bench.metrics import summarize
from kvrt.runtime.bench.runner import PolicyRun, run_policy
from kvrt.runtime.bench.workloads import make_workload
from kvrt.runtime.cli import main
from kvrt.runtime.config import EngineConfig, ServeConfig
from kvrt.runtime.model.checkpoint import load_checkpoint
from kvrt.runtime.sim.hardware import H100
from kvrt.runtime.sim.main import sim_engine_factory
from kvrt.runtime.sim.model_shapes import QWEN25_7B
from kvrt.runtime.sim.replicas import replica_set_factory
from kvrt.runtime.sim.virtual_loop import VirtualTimeLoop

ROUTERS = ("affinity", "prefix", "round-robin")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_dir) -> Path:
    return tiny_checkpoint_dir()


def simulate(tiny: Path, replicas: int, router: str) -> PolicyRun:
    """Four tool-agents runs (planner, workers with tool turns, reviewer) under `kvrt`."""
    tokenizer = load_checkpoint(str(tiny)).tokenizer
    workload = make_workload("tool-agents", quick=True, runs=4, turns=2)
    config = ServeConfig(served_model_name="bench", engine=EngineConfig(policy="kvrt"))

    async def play() -> PolicyRun:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop)
        one = sim_engine_factory(QWEN25_7B, H100, tokenizer, loop)
        return await run_policy(workload, config, 1.0, replica_set_factory(one, replicas, router))

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(play())


def agents_of(run: PolicyRun) -> set[tuple[str, str]]:
    return {(call.job, call.agent) for call in run.calls}


@pytest.mark.parametrize("replicas", [2, 3])
def test_affinity_keeps_each_agent_on_one_replica_and_round_robin_spreads_them(
        tiny, replicas) -> None:
    affinity, spread = simulate(tiny, replicas, "affinity"), simulate(tiny, replicas, "round-robin")
    for run in (affinity, spread):
        assert len(run.replicas) == replicas
        assert sum(r.calls for r in run.replicas) == len(run.calls)
    agents = len(agents_of(affinity))
    assert agents == len(agents_of(spread)) > replicas
    # Affinity: each agent served by one replica, so the replicas' agents partition them all.
    assert sum(len(r.agents) for r in affinity.replicas) == agents
    assert summarize(affinity)["agents_on_several_replicas"] == 0
    assert all(r.calls for r in affinity.replicas)  # runs placed on every replica
    # Round-robin: calls go in turn, whoever makes them; agents with several calls split.
    assert sum(len(r.agents) for r in spread.replicas) > agents
    assert summarize(spread)["agents_on_several_replicas"] > 0
    counts = [r.calls for r in spread.replicas]
    assert max(counts) - min(counts) <= 1


def test_kvrt_sim_compares_the_routers_side_by_side(tiny, tmp_path) -> None:
    out = tmp_path / "report"
    assert main(["sim", "tool-agents", "--quick", "--runs", "3", "--replicas", "2",
                 "--tokenizer", str(tiny), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["compared"] == "router"
    assert results["replicas"] == {"replicas": 2, "policy": "kvrt", "routers": list(ROUTERS)}
    assert results["engine"]["policy_options"] == {}
    assert list(results["policies"]) == list(ROUTERS)
    pool = results["sim"]["kv_cache_bytes_per_replica"]
    assert results["sim"]["kv_cache_bytes"] == 2 * pool
    for row in results["policies"].values():
        assert len(row["replicas"]) == 2
        for key in ("calls", "prompt_tokens", "prefill_tokens"):
            assert sum(r[key] for r in row["replicas"]) == row[key], key
        assert max(r["kv_peak_bytes"] for r in row["replicas"]) <= row["kv_peak_bytes"]
    markdown = (out / "results.md").read_text()
    assert "| router |" in markdown and "2 x h100" in markdown
    assert all(f"| {router} |" in markdown for router in ROUTERS)
    assert "Against `round-robin`" in markdown and "Against `prefix`" in markdown


@pytest.mark.parametrize("flags, message", [
    (["--replicas", "0"], "--replicas must be at least 1"),
    (["--router", "affinity"], "needs --replicas 2 or more"),
    (["--replicas", "2", "--router", "affinity,nearest"], "unknown --router nearest"),
    (["--replicas", "2", "--router", "prefix,prefix"], "names a router twice"),
    (["--replicas", "2", "--policies", "lru,kvrt"], "under one policy"),
])
def test_kvrt_sim_rejects_bad_replica_flags(tiny, flags, message) -> None:
    with pytest.raises(SystemExit, match=message):
        main(["sim", "tool-agents", "--quick", "--tokenizer", str(tiny), *flags])
