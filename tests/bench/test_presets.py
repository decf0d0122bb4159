"""The paper-shaped presets (`workflows`, `dag-apps`, `swe-agents`), played against the real engine
and daemon with the tiny model, and their plans and parameters checked without one."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import pytest

from kvrt.runtime.bench.main import workload_from
from kvrt.runtime.bench.metrics import summarize
from kvrt.runtime.bench.runner import PolicyRun, run_policy
from kvrt.runtime.bench.workloads import make_workload
from kvrt.runtime.cli import build_parser
from kvrt.runtime.config import EngineConfig, ServeConfig
from kvrt.runtime.model.tiny import init_tiny

PRESETS = ("workflows", "dag-apps", "swe-agents")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_tiny(tmp_path_factory.mktemp("tiny") / "llama", arch="llama", seed=0)


def play(model: Path, name: str, time_scale: float = 0.01, quick: bool = False,
         **params) -> PolicyRun:
    engine = EngineConfig(model=str(model), kv_cache_memory=16 * 1024**2, policy="lru")
    workload = make_workload(name, quick=quick, **params)
    return asyncio.run(run_policy(workload, ServeConfig(served_model_name="bench", engine=engine),
                                  time_scale))


def by_job(run: PolicyRun) -> dict[str, list]:
    calls = defaultdict(list)
    for call in sorted(run.calls, key=lambda c: c.submitted):
        calls[call.job].append(call)
    return calls


# Per preset at --quick: jobs, and model calls per job, counted by hand from the documented
# shapes: 2 workflows of a 2-agent chain; 2 apps of width 1 (planner, worker twice, reviewer,
# final); 2 agents of 3 calls each.
QUICK_SHAPE = {"workflows": (2, 2), "dag-apps": (2, 5), "swe-agents": (2, 3)}


@pytest.mark.parametrize("name", PRESETS)
def test_quick_plays_to_completion(tiny: Path, name: str) -> None:
    run = play(tiny, name, quick=True)
    jobs, calls_per_job = QUICK_SHAPE[name]
    assert len(run.jobs) == jobs and len({j.name for j in run.jobs}) == jobs
    assert sorted(len(calls) for calls in by_job(run).values()) == [calls_per_job] * jobs
    row = summarize(run)
    assert row["calls"] == jobs * calls_per_job
    assert all(16 <= c.completion_tokens <= 32 for c in run.calls)  # quick's output lengths


@pytest.mark.parametrize("name", PRESETS)
def test_the_plan_is_seeded(name: str) -> None:
    first, again = make_workload(name, seed=3), make_workload(name, seed=3)
    other = make_workload(name, seed=4)
    assert first.plans == again.plans
    assert first.plans != other.plans


def test_workflows_of_one_template_share_each_agents_fixed_prompt(tiny: Path) -> None:
    run = play(tiny, "workflows", workflows=4, templates=2, agents_per_workflow=2,
               fixed_prompt_words=40, task_words=8, min_output_tokens=4, max_output_tokens=4)
    # Read from the prompts the engine got: two prompts share a long prefix (the fixed prompt,
    # ~50 tokens) exactly when they are the same agent of the same template.
    prompts = [prompt for prompt, _ in run.tokens]
    assert len(prompts) == 8

    def common(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    groups: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        group = next((g for g in groups if common(prompts[g[0]], prompt) > 40), None)
        if group is None:
            groups.append([i])
        else:
            group.append(i)
    assert sorted(len(g) for g in groups) == [2, 2, 2, 2]  # 2 templates x 2 agents, 2 each
    for calls in by_job(run).values():  # a chain: agent0, then agent1
        assert [c.agent for c in calls] == ["agent0", "agent1"]
        assert calls[1].submitted >= calls[0].finished


def test_dag_apps_declare_each_shape_at_default_params() -> None:
    workload = make_workload("dag-apps")
    assert workload.params.width == 3
    expected = {
        "code-writer": ("planner", "coder", "run_tests", "reviewer", "integrator"),
        "deep-research": ("planner", "searcher", "web_search", "summarizer", "writer"),
    }
    for shape in (plan.shape for plan in workload.plans[:2]):
        planner, worker, tool, reviewer, final = expected[shape.name]
        spec = workload.graph(shape).spec()
        agents = {a.name: a for a in spec.agents}
        assert sorted(agents) == sorted([planner, final, f"{worker}0", f"{worker}1", f"{worker}2",
                                         f"{reviewer}0", f"{reviewer}1", f"{reviewer}2"])
        assert len(agents) == 8
        assert sorted(spec.edges) == sorted([
            (planner, f"{worker}0"), (planner, f"{worker}1"), (planner, f"{worker}2"),
            (f"{worker}0", f"{reviewer}0"), (f"{worker}1", f"{reviewer}1"),
            (f"{worker}2", f"{reviewer}2"),
            (f"{reviewer}0", final), (f"{reviewer}1", final), (f"{reviewer}2", final)])
        assert [set(agents[f"{worker}{i}"].tools) for i in range(3)] == [{tool}] * 3
        assert all(not agents[n].tools for n in agents if not n.startswith(worker))


def test_dag_apps_play_their_dag(tiny: Path) -> None:
    run = play(tiny, "dag-apps", apps=4, width=2, qps=0.0, output_tokens="4,6",
               system_words=40, task_words=8, tool_output_words=10)
    calls = by_job(run)
    assert sorted(calls) == ["app 1 (code-writer)", "app 2 (deep-research)",
                             "app 3 (code-writer)", "app 4 (deep-research)"]
    order = {"code-writer": ["planner", "coder0", "coder0", "coder1", "coder1", "reviewer0",
                             "reviewer1", "integrator"],
             "deep-research": ["planner", "searcher0", "searcher0", "searcher1", "searcher1",
                               "summarizer0", "summarizer1", "writer"]}
    for job, job_calls in calls.items():
        agents = [c.agent for c in job_calls]
        shape = job.split("(")[1].rstrip(")")
        assert sorted(agents) == sorted(order[shape])  # each worker calls twice, the rest once
        assert (agents[0], agents[-1]) == (order[shape][0], order[shape][-1])
    assert {c.completion_tokens for c in run.calls} <= {4, 6}


class Declare:
    """A workload that only declares one dag-apps graph and reads it back from the daemon."""

    name = "declare"

    def __init__(self, workload) -> None:
        self.workload, self.params = workload, workload.params
        self.info = None

    async def run(self, session) -> None:
        created = await session.client.create_graph(
            self.workload.graph(self.workload.plans[0].shape, session.time_scale))
        self.info = await session.client.get_graph(created.id)
        await session.client.delete_graph(created)


def test_dag_apps_graph_is_known_to_the_daemon(tiny: Path) -> None:
    declare = Declare(make_workload("dag-apps", width=9))
    engine = EngineConfig(model=str(tiny), kv_cache_memory=16 * 1024**2)
    asyncio.run(run_policy(declare, ServeConfig(served_model_name="bench", engine=engine), 0.5))
    info = declare.info
    # Width 9: planner, 9 coders, 9 reviewers, integrator; 9 + 9 + 9 edges.
    assert (len(info.agents), len(info.edges)) == (20, 27)
    tools = {tool: s for agent in info.agents for tool, s in agent.tools.items()}
    assert tools == {"run_tests": 2.0 * 0.5}  # the test median, time-scaled


def test_swe_agents_prompts_grow_call_over_call(tiny: Path) -> None:
    run = play(tiny, "swe-agents", agents=2, calls=4, qps=0.0, system_words=30, task_words=10,
               tool_output_words=25, min_output_tokens=4, max_output_tokens=4)
    calls = by_job(run)
    assert sorted(calls) == ["agent 1", "agent 2"]
    for job_calls in calls.values():
        prompts = [c.prompt_tokens for c in job_calls]
        assert len(prompts) == 4
        # Each call adds the answer (4 tokens) and a tool output (25 words) to the last prompt.
        assert all(b - a > 25 for a, b in zip(prompts, prompts[1:]))
        assert all(c.cached_tokens > 0 for c in job_calls[1:])  # its conversation so far


@pytest.mark.parametrize("name", PRESETS)
def test_poisson_arrivals_are_spread_and_zero_means_at_once(name: str) -> None:
    count = {"workflows": "workflows", "dag-apps": "apps", "swe-agents": "agents"}[name]
    spread = [p.arrival_s for p in make_workload(name, **{count: 6, "qps": 0.5}).plans]
    assert spread[0] > 0 and all(a < b for a, b in zip(spread, spread[1:]))
    assert 2 < spread[-1] < 60  # 6 arrivals at 0.5 a second: ~12 s, not at once nor hours
    at_once = [p.arrival_s for p in make_workload(name, **{count: 6, "qps": 0.0}).plans]
    assert at_once == [0.0] * 6


def test_arrival_gaps_follow_the_time_scale(tiny: Path) -> None:
    params = dict(agents=2, calls=1, qps=1.0, system_words=10, task_words=5,
                  min_output_tokens=2, max_output_tokens=2)
    planned = [p.arrival_s for p in make_workload("swe-agents", **params).plans]
    run = play(tiny, "swe-agents", time_scale=0.5, **params)
    starts = sorted(j.started for j in run.jobs)
    assert starts[1] - starts[0] == pytest.approx((planned[1] - planned[0]) * 0.5, abs=0.15)


@pytest.mark.parametrize(("name", "setting", "words"), [
    ("workflows", {"qps": "-1"}, r"qps must not be negative \(0: all jobs at once\), not -1.0"),
    ("dag-apps", {"qps": "-0.5"}, "qps must not be negative"),
    ("swe-agents", {"qps": "-2"}, "qps must not be negative"),
    ("workflows", {"workflows": "0"}, "workflows must be at least 1, not 0"),
    ("dag-apps", {"apps": "0"}, "apps must be at least 1, not 0"),
    ("swe-agents", {"agents": "0"}, "agents must be at least 1, not 0"),
    ("swe-agents", {"calls": "0"}, "calls must be at least 1, not 0"),
    ("dag-apps", {"output_tokens": "128,lots"}, "output_tokens must be comma-separated"),
    ("dag-apps", {"output_tokens": "0,128"}, "output_tokens must be positive"),
    ("swe-agents", {"tool_p95_s": "0.1"}, "need 0 < tool_median_s <= tool_p95_s"),
    ("workflows", {"min_output_tokens": "64"}, "need 1 <= min_output_tokens <= max_output"),
])
def test_bad_params_are_refused_with_what_is_wrong(name: str, setting: dict[str, str],
                                                   words: str) -> None:
    with pytest.raises(ValueError, match=words):
        make_workload(name, settings=setting)
    argv = [item for key, value in setting.items() for item in ("--param", f"{key}={value}")]
    with pytest.raises(SystemExit, match="kvrt: --param: "):
        workload_from(build_parser().parse_args(["bench", name, *argv]))


def test_the_common_flags_reach_the_presets() -> None:
    args = build_parser().parse_args(["bench", "swe-agents", "--agents", "3", "--seed", "7"])
    assert (workload_from(args).params.agents, workload_from(args).params.seed) == (3, 7)
