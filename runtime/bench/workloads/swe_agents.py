"""`swe-agents`: long single-agent loops of model calls and tool calls (Continuum-shaped).

After Continuum (Li et al., arXiv 2511.02230), whose agents are SWE-bench coding agents: an agent
makes `calls` model calls with a tool call between each two; each tool returns a chunk of text
(a test log, a file), appended to the conversation with the model's answer, so the context grows
call over call (to tens of thousands of tokens at the paper's scale) and the KV kept across a
tool call saves re-reading all of it. Tool times are heavy-tailed: log-normal with the given
median and 95th percentile. Agents arrive as a Poisson process at `qps` (all at once when 0).
One declared graph (a single agent with its `shell` tool), one run per agent. A job is one
agent's episode.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from kvrt.runtime.bench.session import BenchSession
from kvrt.runtime.bench.workloads import text
from kvrt.runtime.bench.workloads.arrivals import (
    check_lengths,
    check_positive,
    check_qps,
    check_tool_times,
    lognormal,
    poisson_arrivals,
    wait_until,
)
from kvrt.sdk import Graph

TOOL = "shell"


@dataclass(frozen=True, slots=True)
class SweAgentsParams:
    agents: int = 4
    calls: int = 8  # model calls of an episode; a tool call between each two
    qps: float = 0.2  # agent arrivals a second (Poisson); 0: all at once
    system_words: int = 150
    task_words: int = 80  # the issue
    tool_output_words: int = 60  # what each tool call returns: a test log, a file
    tool_median_s: float = 1.0
    tool_p95_s: float = 6.0
    min_output_tokens: int = 16
    max_output_tokens: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive(self, "agents", "calls", "system_words")
        check_qps(self.qps)
        check_lengths(self.min_output_tokens, self.max_output_tokens)
        check_tool_times("tool", self.tool_median_s, self.tool_p95_s)

    @property
    def concurrent_agents(self) -> int:
        return self.agents


@dataclass(frozen=True, slots=True)
class EpisodePlan:
    issue: str
    arrival_s: float  # before time scaling
    lengths: list[int]  # output tokens of each call
    tool_s: list[float]  # each tool call's duration, before time scaling (calls - 1 of them)
    tool_outputs: list[str]


class SweAgents:
    name = "swe-agents"

    def __init__(self, params: SweAgentsParams) -> None:
        self.params = p = params
        rng = random.Random(p.seed)
        self.system = ("You are a software engineering agent fixing an issue in a repository. "
                       "Use the shell; rules: " + text.words(rng, p.system_words))
        arrivals = poisson_arrivals(rng, p.agents, p.qps)
        self.plans = [EpisodePlan(
            issue=text.words(rng, p.task_words), arrival_s=arrivals[k],
            lengths=[rng.randint(p.min_output_tokens, p.max_output_tokens)
                     for _ in range(p.calls)],
            tool_s=[lognormal(rng, p.tool_median_s, p.tool_p95_s) for _ in range(p.calls - 1)],
            tool_outputs=[text.words(rng, p.tool_output_words) for _ in range(p.calls - 1)])
            for k in range(p.agents)]

    def graph(self, time_scale: float = 1.0) -> Graph:
        p = self.params
        mean = (p.min_output_tokens + p.max_output_tokens) // 2
        return Graph(self.name).agent("agent", system=self.system,
                                      tools={TOOL: p.tool_median_s * time_scale},
                                      expected_output_tokens=mean * p.calls)

    async def run(self, session: BenchSession) -> None:
        info = await session.client.create_graph(self.graph(session.time_scale))
        started = session.clock()
        await asyncio.gather(*(self._episode(session, info, k, plan, started)
                               for k, plan in enumerate(self.plans)))
        await session.client.delete_graph(info)

    async def _episode(self, session: BenchSession, info, k: int, plan: EpisodePlan,
                       started: float) -> None:
        await wait_until(session, started, plan.arrival_s)
        job = f"agent {k + 1}"
        async with session.job(job), await session.client.start_run(info) as run:
            agent = run.agent("agent")
            history = [{"role": "user", "content": f"Issue:\n{plan.issue}"}]
            for c, length in enumerate(plan.lengths):
                answer = await session.chat(agent, history, length, job)
                if c == len(plan.tool_s):
                    break
                await session.tool(agent, TOOL, plan.tool_s[c])
                history += [{"role": "assistant", "content": answer},
                            {"role": "user", "content": f"{TOOL} output:\n{plan.tool_outputs[c]}"}]
            await agent.done()
