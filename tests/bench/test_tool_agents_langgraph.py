"""`tool-agents-langgraph` against the real engine and daemon (tiny model), real LangGraph and
the adapter: it plays exactly `tool-agents`' plan (the same jobs, the same calls of the same
lengths by the same agents), each worker node's inner ReAct loop is credited to that worker on
the daemon (its model calls and its tool calls), and every thread's run is closed."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest

from kvrt.runtime.bench.runner import PolicyRun, run_policy
from kvrt.runtime.bench.session import BenchSession
from kvrt.runtime.bench.workloads import QUICK, make_workload, tool_agents_graphs
from kvrt.runtime.bench.workloads.tool_agents import ToolAgents
from kvrt.runtime.config import EngineConfig, ServeConfig
from kvrt.sdk.protocol.control import RunState

SCALE = 0.01
# 3 runs of 2 or 3 workers (seed 0 draws both: two graphs), 2 tool turns each.
PARAMS = {"runs": 3, "min_workers": 2, "max_workers": 3, "turns": 2, "system_words": 40,
          "tool_median_s": 0.5, "tool_p95_s": 2.0, "min_output_tokens": 4,
          "max_output_tokens": 8}


class Observed:
    """The workload, and what the daemon says of each thread's run just before it is closed,
    whether the close found a live run, the runs still live at the end, and the metrics."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.params = inner, inner.name, inner.params
        self.states: dict[str, RunState] = {}
        self.closed: dict[str, bool] = {}
        self.live: list = []
        self.graphs: list = []
        self.metrics = ""
        self.session: BenchSession | None = None

    async def run(self, session: BenchSession) -> None:
        self.session = session
        await self.inner.run(session)
        self.live = await session.client.list_runs()
        self.graphs = await session.client.list_graphs()
        async with httpx.AsyncClient() as http:
            self.metrics = (await http.get(f"{session.client.base_url}/metrics")).text

    def watch_closes(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = tool_agents_graphs.close

        async def close(graph, thread_id):
            assert self.session is not None
            client = self.session.client
            [info] = await client.list_runs(key=thread_id)
            self.states[thread_id] = await (await client.get_run(info.id)).state()
            closed = await original(graph, thread_id)
            self.closed[thread_id] = closed is not None
            return closed

        monkeypatch.setattr(tool_agents_graphs, "close", close)


def events(metrics: str, kind: str) -> float:
    """The daemon's count of control-plane events of one type."""
    [line] = [line for line in metrics.splitlines()
              if line.startswith("kvrt:control_events_total{") and f'type="{kind}"' in line]
    return float(line.rsplit(" ", 1)[1])


def play(workload, tiny: Path, policy: str) -> PolicyRun:
    engine = EngineConfig(model=str(tiny), kv_cache_memory=16 * 1024**2,
                          host_cache_memory=64 * 1024**2, policy=policy)
    config = ServeConfig(served_model_name="bench", engine=engine)
    return asyncio.run(run_policy(workload, config, time_scale=SCALE))


def test_it_plays_tool_agents_plan_through_langgraph(tiny_checkpoint_dir, monkeypatch) -> None:
    tiny = tiny_checkpoint_dir()
    workload = Observed(make_workload("tool-agents-langgraph", **PARAMS))
    workload.watch_closes(monkeypatch)
    run = play(workload, tiny, "tokencake")
    sdk_observed = Observed(make_workload("tool-agents", **PARAMS))
    sdk = play(sdk_observed, tiny, "tokencake")

    workers = [plan.workers for plan in workload.inner.plan.plans]
    assert sorted(set(workers)) == [2, 3]  # the seed draws both team sizes
    jobs = [f"run {k + 1}" for k in range(3)]
    assert sorted(j.name for j in run.jobs) == sorted(j.name for j in sdk.jobs) == jobs
    # Per run: the planner, each worker's 2 turns and its answer, the reviewer (once).
    expected = Counter()
    for job, n in zip(jobs, workers):
        expected[(job, "planner")] = expected[(job, "reviewer")] = 1
        for w in range(n):
            expected[(job, f"worker{w}")] = 3
    assert Counter((c.job, c.agent) for c in run.calls) == expected
    assert len(run.calls) == sum(2 + 3 * n for n in workers) == len(run.tokens)
    # The same calls as tool-agents, of the same planned lengths, in each agent's order.
    def lengths(calls) -> dict[tuple[str, str], list[int]]:
        out: dict[tuple[str, str], list[int]] = {}
        for c in sorted(calls, key=lambda c: c.submitted):
            out.setdefault((c.job, c.agent), []).append(c.completion_tokens)
        return out
    assert lengths(run.calls) == lengths(sdk.calls)
    # The planner's prompt is the same in both forms: system prompt, then the task.
    assert ({c.job: c.prompt_tokens for c in run.calls if c.agent == "planner"}
            == {c.job: c.prompt_tokens for c in sdk.calls if c.agent == "planner"})
    # Each worker's conversation grows turn by turn and finds its earlier prompt's KV.
    for job in jobs:
        calls = sorted((c for c in run.calls if (c.job, c.agent) == (job, "worker0")),
                       key=lambda c: c.submitted)
        assert calls[0].prompt_tokens < calls[1].prompt_tokens < calls[2].prompt_tokens
        assert calls[1].cached_tokens > 0 and calls[2].cached_tokens > 0
        review = next(c for c in run.calls if (c.job, c.agent) == (job, "reviewer"))
        assert review.submitted >= max(c.finished for c in run.calls
                                       if c.job == job and c.agent.startswith("worker"))

    # The daemon knows what tool-agents declares: the same agents (system prompts, run_tests'
    # seconds, expected output tokens) and edges, for each team size.
    declared = {g.name: g for g in workload.graphs}
    assert sorted(declared) == ["lg-tool-agents-2", "lg-tool-agents-3"]
    for n in (2, 3):
        want = ToolAgents(workload.params).graph(n, SCALE).spec()
        have = declared[f"lg-tool-agents-{n}"]
        assert (sorted((a.name, a.system, a.tools, a.expected_output_tokens) for a in have.agents)
                == sorted((a.name, a.system, a.tools, a.expected_output_tokens)
                          for a in want.agents))
        assert sorted((e.source, e.target) for e in have.edges) == sorted(want.edges)

    # The daemon credits each worker's inner ReAct loop to that worker: its model calls and
    # its tool calls; the planner and the reviewer call the model once and no tool.
    assert sorted(workload.states) == jobs
    for job, n in zip(jobs, workers):
        agents = {a.name: (a.calls, a.tool_calls) for a in workload.states[job].agents}
        assert agents == {"planner": (1, 0), "reviewer": (1, 0),
                          **{f"worker{w}": (3, 2) for w in range(n)}}
    # The daemon saw the tool calls tool-agents makes: one start per worker turn.
    assert (events(workload.metrics, "tool_call.started")
            == events(sdk_observed.metrics, "tool_call.started") == 2 * sum(workers))
    # Every thread's run was live until its end, and closed then.
    assert workload.closed == dict.fromkeys(jobs, True)
    assert workload.live == []


def test_it_is_registered_with_tool_agents_quick_plan() -> None:
    quick = make_workload("tool-agents-langgraph", quick=True)
    assert quick.params == make_workload("tool-agents", quick=True).params
    assert QUICK["tool-agents-langgraph"] == QUICK["tool-agents"]
