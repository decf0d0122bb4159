"""`dag-apps`: application DAGs arriving as a Poisson process (TokenCake-shaped).

After TokenCake (Bian et al., arXiv 2510.18586, and its repository): multi-agent applications
are DAGs of model calls with tool (function-call) nodes between them, and apps arrive at `qps`.
Two shapes, each of `width` parallel branches:

    Code-Writer:    planner -> coder_i -> [run_tests] -> coder_i -> reviewer_i -> integrator
    Deep-Research:  planner -> searcher_i -> [web_search] -> searcher_i -> summarizer_i -> writer

A branch's worker calls the model, runs its tool, then calls the model again over the tool's
output (TokenCake's "inference -> function call -> inference" pattern, whose idle KV its time
scheduler offloads); a tool node is that worker's tool call, not an agent. Each agent reads its
predecessors' outputs: a worker the plan, a reviewer its worker's result, the last agent every
reviewer's. Counting every model call and every tool call as a node, a shape of width W has
4W + 2 nodes, 5W edges and 3W + 2 model calls; at the paper scale's W = 8 that is
34 nodes, 40 edges and 26 calls, near TokenCake's ~29 nodes, 36 edges and 27 calls. The daemon is
told the DAG: one declared graph per shape (2W + 2 agents, 3W edges, the tool's median seconds
on each worker), one run per app. Agents of one shape share their system prompts across apps.
Each model call's output length is one of `output_tokens`, chosen per node; tool times are
log-normal. A job is an app.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from kvrt.runtime.bench.session import BenchSession
from kvrt.runtime.bench.workloads import text
from kvrt.runtime.bench.workloads.arrivals import (
    check_positive,
    check_qps,
    check_tool_times,
    lognormal,
    poisson_arrivals,
    wait_until,
)
from kvrt.sdk import AgentClient, Graph


@dataclass(frozen=True, slots=True)
class Shape:
    name: str
    planner: str
    worker: str
    tool: str
    reviewer: str
    final: str


SHAPES = (Shape("code-writer", "planner", "coder", "run_tests", "reviewer", "integrator"),
          Shape("deep-research", "planner", "searcher", "web_search", "summarizer", "writer"))


@dataclass(frozen=True, slots=True)
class DagAppsParams:
    apps: int = 4  # alternating Code-Writer and Deep-Research
    width: int = 3  # parallel branches of an app
    qps: float = 0.2  # app arrivals a second (Poisson); 0: all at once
    output_tokens: str = "16,24,32"  # each model call's length is one of these, drawn per node
    system_words: int = 200  # each role's system prompt, shared by the apps of a shape
    task_words: int = 40
    tool_output_words: int = 60  # a test log, a search result page
    test_median_s: float = 2.0
    test_p95_s: float = 8.0
    search_median_s: float = 1.0
    search_p95_s: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive(self, "apps", "width", "system_words")
        check_qps(self.qps)
        check_tool_times("test", self.test_median_s, self.test_p95_s)
        check_tool_times("search", self.search_median_s, self.search_p95_s)
        if min(self.lengths()) < 1:
            raise ValueError(f"output_tokens must be positive, not {self.output_tokens!r}")

    def lengths(self) -> list[int]:
        try:
            return [int(item) for item in self.output_tokens.split(",")]
        except ValueError:
            raise ValueError("output_tokens must be comma-separated integers, "
                             f"not {self.output_tokens!r}") from None

    def tool_times(self, tool: str) -> tuple[float, float]:
        """(median, p95) seconds of a shape's tool."""
        if tool == "run_tests":
            return self.test_median_s, self.test_p95_s
        return self.search_median_s, self.search_p95_s

    @property
    def concurrent_agents(self) -> int:
        return self.apps * (2 * self.width + 2)


@dataclass(frozen=True, slots=True)
class BranchPlan:
    tool_s: float  # before time scaling
    tool_output: str
    lengths: tuple[int, int, int]  # worker's first and second call, reviewer


@dataclass(frozen=True, slots=True)
class AppPlan:
    shape: Shape
    task: str
    arrival_s: float
    branches: list[BranchPlan]
    lengths: tuple[int, int]  # planner, final


class DagApps:
    name = "dag-apps"

    def __init__(self, params: DagAppsParams) -> None:
        self.params = p = params
        rng = random.Random(p.seed)
        choices = p.lengths()
        self.systems = {shape.name: {
            role: f"You are the {role} of a {shape.name} application. House rules: "
                  + text.words(rng, p.system_words)
            for role in (shape.planner, shape.worker, shape.reviewer, shape.final)}
            for shape in SHAPES}
        arrivals = poisson_arrivals(rng, p.apps, p.qps)
        self.plans = []
        for k in range(p.apps):
            shape = SHAPES[k % len(SHAPES)]
            median, p95 = p.tool_times(shape.tool)
            self.plans.append(AppPlan(
                shape=shape, task=text.words(rng, p.task_words), arrival_s=arrivals[k],
                branches=[BranchPlan(
                    tool_s=lognormal(rng, median, p95),
                    tool_output=text.words(rng, p.tool_output_words),
                    lengths=(rng.choice(choices), rng.choice(choices), rng.choice(choices)))
                    for _ in range(p.width)],
                lengths=(rng.choice(choices), rng.choice(choices))))

    def graph(self, shape: Shape, time_scale: float = 1.0) -> Graph:
        p, systems = self.params, self.systems[shape.name]
        mean = sum(p.lengths()) // len(p.lengths())
        median = p.tool_times(shape.tool)[0]
        graph = Graph(f"{self.name}-{shape.name}")
        graph.agent(shape.planner, system=systems[shape.planner], expected_output_tokens=mean)
        graph.agent(shape.final, system=systems[shape.final], expected_output_tokens=mean)
        for i in range(p.width):
            worker, reviewer = f"{shape.worker}{i}", f"{shape.reviewer}{i}"
            graph.agent(worker, system=systems[shape.worker],
                        tools={shape.tool: median * time_scale}, expected_output_tokens=2 * mean)
            graph.agent(reviewer, system=systems[shape.reviewer], expected_output_tokens=mean)
            graph.edge(shape.planner, worker).edge(worker, reviewer).edge(reviewer, shape.final)
        return graph

    async def run(self, session: BenchSession) -> None:
        infos = {shape.name: await session.client.create_graph(
            self.graph(shape, session.time_scale)) for shape in SHAPES[:self.params.apps]}
        started = session.clock()
        await asyncio.gather(*(self._app(session, infos[plan.shape.name], k, plan, started)
                               for k, plan in enumerate(self.plans)))
        for info in infos.values():
            await session.client.delete_graph(info)

    async def _app(self, session: BenchSession, info, k: int, plan: AppPlan,
                   started: float) -> None:
        await wait_until(session, started, plan.arrival_s)
        job, shape = f"app {k + 1} ({plan.shape.name})", plan.shape
        async with session.job(job), await session.client.start_run(info) as run:
            planner = run.agent(shape.planner)
            steps = await session.chat(planner, [{"role": "user", "content": plan.task}],
                                       plan.lengths[0], job)
            await planner.done()
            reviews = await asyncio.gather(*(
                self._branch(session, run.agent(f"{shape.worker}{i}"),
                             run.agent(f"{shape.reviewer}{i}"), shape, steps, i, branch, job)
                for i, branch in enumerate(plan.branches)))
            final = run.agent(shape.final)
            combined = "\n".join(f"Part {i + 1}: {r}" for i, r in enumerate(reviews))
            await session.chat(final, [{"role": "user", "content": f"Task: {plan.task}\n\n"
                                        f"Put these together:\n{combined}"}], plan.lengths[1], job)
            await final.done()

    async def _branch(self, session: BenchSession, worker: AgentClient, reviewer: AgentClient,
                      shape: Shape, steps: str, i: int, branch: BranchPlan, job: str) -> str:
        history = [{"role": "user", "content": f"Plan:\n{steps}\n\nDo part {i + 1}."}]
        first = await session.chat(worker, history, branch.lengths[0], job)
        await session.tool(worker, shape.tool, branch.tool_s)
        history += [{"role": "assistant", "content": first},
                    {"role": "user", "content": f"{shape.tool} returned:\n{branch.tool_output}"}]
        result = await session.chat(worker, history, branch.lengths[1], job)
        await worker.done()
        review = await session.chat(reviewer, [{"role": "user", "content":
                                    f"Part {i + 1}, as done:\n{result}"}], branch.lengths[2], job)
        await reviewer.done()
        return review
