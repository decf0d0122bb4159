"""`tool-agents`: K concurrent runs of planner -> 2-4 workers with tool calls -> reviewer.

Like a coding or research agent: every agent shares one long system prompt (reused across
agents and runs), the planner splits the task, each worker alternates model calls and tool
calls over a growing conversation (its next call extends its previous prompt and answer, so
its KV is worth keeping while the tool runs), and the reviewer reads every worker's result.
What a tool returns is `tool_output_words` long (a coding agent's test logs and files make it
thousands of tokens). Tool durations are log-normal with the given median and 95th percentile
(heavy-tailed), drawn in advance from the seed so every policy sees the same ones.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass

from kvrt.runtime.bench.session import BenchSession
from kvrt.runtime.bench.workloads import text
from kvrt.sdk import Graph

_Z95 = 1.6449  # the standard normal's 95th percentile


@dataclass(frozen=True, slots=True)
class ToolAgentsParams:
    runs: int = 4
    min_workers: int = 2
    max_workers: int = 4
    turns: int = 2  # tool calls per worker, each followed by a model call
    tool_median_s: float = 2.0
    tool_p95_s: float = 10.0
    system_words: int = 250
    tool_output_words: int = 30  # what each tool returns (a test log, a file, a page)
    min_output_tokens: int = 32
    max_output_tokens: int = 96
    seed: int = 0

    @property
    def concurrent_agents(self) -> int:
        return self.runs * (self.max_workers + 2)


@dataclass(frozen=True, slots=True)
class _RunPlan:
    task: str
    workers: int
    durations: list[list[float]]  # [worker][turn] seconds
    lengths: list[int]  # output tokens, consumed in call order per agent
    tool_outputs: list[list[str]]


class ToolAgents:
    name = "tool-agents"

    def __init__(self, params: ToolAgentsParams) -> None:
        self.params = params
        rng = random.Random(params.seed)
        self.system = ("You are part of a team of software agents. Follow the house rules: "
                       + text.words(rng, params.system_words))
        sigma = math.log(params.tool_p95_s / params.tool_median_s) / _Z95
        self.plans = []
        for _ in range(params.runs):
            workers = rng.randint(params.min_workers, params.max_workers)
            self.plans.append(_RunPlan(
                task=text.words(rng, 40), workers=workers,
                durations=[[rng.lognormvariate(math.log(params.tool_median_s), sigma)
                            for _ in range(params.turns)] for _ in range(workers)],
                lengths=[rng.randint(params.min_output_tokens, params.max_output_tokens)
                         for _ in range(2 + workers * (params.turns + 1))],
                tool_outputs=[[text.words(rng, params.tool_output_words)
                               for _ in range(params.turns)]
                              for _ in range(workers)]))

    def graph(self, workers: int, time_scale: float = 1.0) -> Graph:
        p = self.params
        mean = (p.min_output_tokens + p.max_output_tokens) // 2
        graph = Graph(f"{self.name}-{workers}")
        graph.agent("planner", system=f"{self.system}\nYou plan.", expected_output_tokens=mean)
        graph.agent("reviewer", system=f"{self.system}\nYou review.", expected_output_tokens=mean)
        for w in range(workers):
            graph.agent(f"worker{w}", system=f"{self.system}\nYou implement.",
                        tools={"run_tests": p.tool_median_s * time_scale},
                        expected_output_tokens=mean * (p.turns + 1))
            graph.edge("planner", f"worker{w}").edge(f"worker{w}", "reviewer")
        return graph

    async def run(self, session: BenchSession) -> None:
        counts = sorted({plan.workers for plan in self.plans})
        infos = {n: await session.client.create_graph(self.graph(n, session.time_scale))
                 for n in counts}
        await asyncio.gather(*(self._run(session, infos[plan.workers], k, plan)
                               for k, plan in enumerate(self.plans)))
        for info in infos.values():
            await session.client.delete_graph(info)

    async def _run(self, session: BenchSession, info, k: int, plan: _RunPlan) -> None:
        job = f"run {k + 1}"
        lengths = iter(plan.lengths)
        async with session.job(job), await session.client.start_run(info) as run:
            planner = run.agent("planner")
            steps = await session.chat(planner, [{"role": "user", "content": plan.task}],
                                       next(lengths), job)
            await planner.done()
            results = await asyncio.gather(*(
                self._worker(session, run.agent(f"worker{w}"), steps, w, plan,
                             [next(lengths) for _ in range(self.params.turns + 1)], job)
                for w in range(plan.workers)))
            review = [{"role": "user", "content": "Review the work:\n" + "\n".join(
                f"Worker {w}: {r}" for w, r in enumerate(results))}]
            await session.chat(run.agent("reviewer"), review, next(lengths), job)

    async def _worker(self, session: BenchSession, agent, steps: str, w: int, plan: _RunPlan,
                      lengths: list[int], job: str) -> str:
        history = [{"role": "user", "content": f"Plan:\n{steps}\nDo part {w + 1}."}]
        for turn in range(self.params.turns):
            answer = await session.chat(agent, history, lengths[turn], job)
            history.append({"role": "assistant", "content": answer})
            await session.tool(agent, "run_tests", plan.durations[w][turn])
            history.append({"role": "user", "content": f"Tests said: {plan.tool_outputs[w][turn]}"})
        result = await session.chat(agent, history, lengths[-1], job)
        await agent.done()
        return result
