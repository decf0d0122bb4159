"""`workflows`: many concurrent multi-agent workflows, each a chain of agents (KVFlow-shaped).

After KVFlow (Pan et al., arXiv 2507.07400): a workflow is a chain of agents run in a known
order; agent i's prompt is its large fixed prompt (its system prompt), then the workflow's task,
then the previous agent's output. There are `templates` workflow templates; the workflows of one
template share their agents' fixed prompts (so the same prefix is wanted again and again, and
the order it is wanted in is known from the graph), and the templates' prompts differ. With
enough templates the distinct prefixes outgrow the device pool: an LRU evicts an agent's prefix
shortly before the next workflow needs it, which is the case KVFlow's steps-to-execution eviction
and prefetching address. Workflow k follows template k mod `templates`; one graph per template
(a chain `agent0 -> agent1 -> ...`), one run per workflow. A job is a workflow.
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
    poisson_arrivals,
    wait_until,
)
from kvrt.sdk import Graph

ROLES = ("analyst", "planner", "coder", "tester", "critic", "editor", "summarizer", "reporter")


@dataclass(frozen=True, slots=True)
class WorkflowsParams:
    workflows: int = 12
    templates: int = 4
    agents_per_workflow: int = 3  # the chain's length
    fixed_prompt_words: int = 300  # each agent's fixed prompt (~400 tokens)
    task_words: int = 40
    min_output_tokens: int = 16
    max_output_tokens: int = 48
    qps: float = 0.0  # workflow arrivals a second (Poisson); 0: all at once
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive(self, "workflows", "templates", "agents_per_workflow",
                       "fixed_prompt_words")
        check_qps(self.qps)
        check_lengths(self.min_output_tokens, self.max_output_tokens)

    @property
    def concurrent_agents(self) -> int:
        return self.workflows * self.agents_per_workflow


@dataclass(frozen=True, slots=True)
class WorkflowPlan:
    template: int
    task: str
    arrival_s: float  # before time scaling
    lengths: list[int]  # output tokens of each agent in the chain


class Workflows:
    name = "workflows"

    def __init__(self, params: WorkflowsParams) -> None:
        self.params = p = params
        rng = random.Random(p.seed)
        # fixed_prompts[t][i]: agent i of template t, shared by every workflow of template t.
        self.fixed_prompts = [
            [f"You are the {ROLES[i % len(ROLES)]} of workflow template {t + 1}, step {i + 1}. "
             f"Your standing instructions: {text.words(rng, p.fixed_prompt_words)}"
             for i in range(p.agents_per_workflow)] for t in range(p.templates)]
        arrivals = poisson_arrivals(rng, p.workflows, p.qps)
        self.plans = [WorkflowPlan(
            template=k % p.templates, task=text.words(rng, p.task_words), arrival_s=arrivals[k],
            lengths=[rng.randint(p.min_output_tokens, p.max_output_tokens)
                     for _ in range(p.agents_per_workflow)]) for k in range(p.workflows)]

    def graph(self, template: int) -> Graph:
        p = self.params
        graph = Graph(f"{self.name}-template{template + 1}")
        mean = (p.min_output_tokens + p.max_output_tokens) // 2
        for i, prompt in enumerate(self.fixed_prompts[template]):
            graph.agent(f"agent{i}", system=prompt, expected_output_tokens=mean)
            if i:
                graph.edge(f"agent{i - 1}", f"agent{i}")
        return graph

    async def run(self, session: BenchSession) -> None:
        used = sorted({plan.template for plan in self.plans})
        infos = {t: await session.client.create_graph(self.graph(t)) for t in used}
        started = session.clock()
        await asyncio.gather(*(self._workflow(session, infos[plan.template], k, plan, started)
                               for k, plan in enumerate(self.plans)))
        for info in infos.values():
            await session.client.delete_graph(info)

    async def _workflow(self, session: BenchSession, info, k: int, plan: WorkflowPlan,
                        started: float) -> None:
        await wait_until(session, started, plan.arrival_s)
        job = f"workflow {k + 1}"
        async with session.job(job), await session.client.start_run(info) as run:
            previous = ""
            for i, length in enumerate(plan.lengths):
                agent = run.agent(f"agent{i}")
                content = f"Task: {plan.task}"
                if previous:
                    content += f"\n\nThe previous agent's output:\n{previous}"
                previous = await session.chat(agent, [{"role": "user", "content": content}],
                                              length, job)
                await agent.done()
