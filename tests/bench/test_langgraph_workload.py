"""The `langgraph` workload against the real engine and daemon (tiny model), real LangGraph and
the adapter: every thread is one job, every node's model call one record, every planned tool
call reaches the daemon as a tool call, and every thread's run is closed at the end."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest

from kvrt.runtime.bench.report import markdown
from kvrt.runtime.bench.runner import PolicyRun, run_policy
from kvrt.runtime.bench.session import BenchSession
from kvrt.runtime.bench.workloads import make_workload
from kvrt.runtime.bench.workloads.langgraph_apps import LangGraphApps
from kvrt.runtime.config import EngineConfig, ServeConfig
from kvrt.sdk import RunInfo

SCALE = 0.01
TOKENS = 4


class Observed:
    """The workload, and what the daemon says: while it runs, which threads' runs are live once
    their job has ended (polled); once it is over, its live runs and its metrics."""

    def __init__(self, inner: LangGraphApps) -> None:
        self.inner, self.name, self.params = inner, inner.name, inner.params
        self.polls: list[tuple[set[str], set[str]]] = []  # (jobs ended, live run keys)
        self.live: list[RunInfo] = []
        self.metrics = ""

    async def run(self, session: BenchSession) -> None:
        watcher = asyncio.create_task(self._watch(session))
        await self.inner.run(session)
        watcher.cancel()
        self.live = await session.client.list_runs()
        async with httpx.AsyncClient() as http:
            self.metrics = (await http.get(f"{session.client.base_url}/metrics")).text


    async def _watch(self, session: BenchSession) -> None:
        while True:
            ended = {job.name for job in session.jobs}  # a job ends after its run is closed
            live = {run.key for run in await session.client.list_runs() if run.key}
            self.polls.append((ended, live))
            await asyncio.sleep(0.01)


def play(tiny: Path, policy: str) -> tuple[Observed, PolicyRun]:
    # 2 threads of each app; ReAct: 2 tool turns; supervisor: 3 routes, each with a tool.
    workload = Observed(make_workload(  # type: ignore[arg-type]
        "langgraph", threads=2, turns=2, routes=3, specialist_tool_share=1.0, system_words=40,
        min_output_tokens=TOKENS, max_output_tokens=TOKENS))
    engine = EngineConfig(model=str(tiny), kv_cache_memory=16 * 1024**2,
                          host_cache_memory=64 * 1024**2, policy=policy)
    config = ServeConfig(served_model_name="bench", engine=engine)
    return workload, asyncio.run(run_policy(workload, config, time_scale=SCALE))


@pytest.mark.parametrize("policy", ["lru", "tokencake"])
def test_threads_are_jobs_and_node_calls_are_records(tiny_checkpoint_dir, policy: str) -> None:
    workload, run = play(tiny_checkpoint_dir(), policy)
    assert sorted(j.name for j in run.jobs) == [
        "approval 1", "approval 2", "react 1", "react 2", "supervisor 1", "supervisor 2"]
    by_agent = Counter(c.agent for c in run.calls)
    # ReAct: 2 turns + the answer; supervisor: 4 visits, 3 specialists; approval: draft, final.
    assert by_agent["agent"] == 2 * 3 and by_agent["supervisor"] == 2 * 4
    assert by_agent["researcher"] + by_agent["coder"] + by_agent["writer"] == 2 * 3
    assert by_agent["draft"] == by_agent["final"] == 2
    assert len(run.calls) == 24 == len(run.tokens)  # the engine saw each call once
    assert {c.completion_tokens for c in run.calls} == {TOKENS}
    assert all(c.submitted < c.first_token <= c.finished for c in run.calls)
    assert Counter(c.job for c in run.calls) == {
        "react 1": 3, "react 2": 3, "supervisor 1": 7, "supervisor 2": 7,
        "approval 1": 2, "approval 2": 2}
    # The ReAct agent's conversation grows by its answer and the tool's output each turn, and
    # its next call finds the earlier prompt's KV.
    react = [c for c in run.calls if c.job == "react 1"]
    assert react[0].prompt_tokens < react[1].prompt_tokens < react[2].prompt_tokens
    assert react[1].cached_tokens > 0 and react[2].cached_tokens > 0
    # The approval waits for its human between the draft and the final call.
    plans = {plan.thread: plan for plan in workload.inner.plans}
    for job in ("approval 1", "approval 2"):
        draft, final = sorted((c for c in run.calls if c.job == job), key=lambda c: c.submitted)
        assert final.submitted - draft.finished >= plans[job].human_s * SCALE
    # Each thread's run is closed as the thread ends, while other threads still run.
    assert all(not ended & live for ended, live in workload.polls)
    assert any(ended and live for ended, live in workload.polls)
    assert workload.live == []
    if policy == "tokencake":
        # It decides at each tool call's start, 4 ReAct + 6 specialist, and at each wait: an
        # approval thread's interrupt is a wait of its draft and of its approve node.
        decisions = [line for line in workload.metrics.splitlines()
                     if line.startswith("kvrt:kv_tier_decisions_total{")
                     and 'decision="release:' not in line]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in decisions) == 2 * 2 + 2 * 3 + 2 * 2


def test_the_plan_is_seeded_and_routes_only_to_specialists() -> None:
    first = make_workload("langgraph", threads=3, routes=4, specialist_tool_share=0.5)
    again = make_workload("langgraph", threads=3, routes=4, specialist_tool_share=0.5)
    assert first.plans == again.plans  # type: ignore[attr-defined]
    supervisors = [p for p in first.plans if p.app == "supervisor"]  # type: ignore[attr-defined]
    assert len(supervisors) == 3
    assert {name for p in supervisors for name in p.route} <= {"researcher", "coder", "writer"}
    tools = [t for p in supervisors for t in p.tools]
    assert len(tools) == 12 and 0 < sum(t is not None for t in tools) < 12


def test_the_report_shows_the_gain_over_lru_offload() -> None:
    row = {"jct_mean_s": 10.0, "prefill_tokens": 1000, "offload_bytes": 3 * 2**20,
           "upload_bytes": 2**20}
    results = {"workload": "langgraph", "machine": {"description": "here"}, "params": {},
               "ideal": {"prefill_tokens": 1, "kv_bytes": 1, "prefill_tokens_prefix_reuse": 1},
               "policies": {"lru-offload": row,
                            "tokencake": {**row, "jct_mean_s": 8.0, "prefill_tokens": 500}}}
    text = markdown(results)
    assert "| tokencake | 0.80 | 0.50 |" in text
    assert "offload (MiB) | upload (MiB) |" in text and "| 3.0 | 1.0 |" in text
    results["policies"].pop("lru-offload")
    assert "Against `lru-offload`" not in markdown(results)
